"""MotionEval: a rule-based verifier of MovingShapes prompts on videos (the video ShapeEval).

1. :func:`parse_prompt` turns a prompt into a :class:`~mmalign.embedded.movingshapes.Script` (one or
   more actors: "a red circle moving left and a blue square moving up"); anything else raises
   ``ValueError`` saying why.
2. Every frame is segmented by ShapeEval's detector (:func:`mmalign.embedded.shapeeval.detect_objects`:
   palette colour, connected components, shape templates).
3. :func:`track` links detections across frames into tracks (greedy nearest-centroid association,
   closest pairs first, at most ``max_jump`` pixels per frame, gaps of up to ``max_gap`` frames), so
   an object keeps its identity when it moves or changes colour.
4. :func:`check` gives each actor three clauses, each tested on the one track that is that actor:

   ========== ============================================== ===================================================
   action     identity                                       action / temporal
   ========== ============================================== ===================================================
   still      exactly one such object in (almost) every      stays still (max drift <= ``still_tol``) /
              frame                                          same colour and shape in every frame, never missing
   move       same                                           moves <dir> (net travel >= ``min_travel`` within
                                                             30 degrees of the direction, no backtracking) /
                                                             moves smoothly (every |acceleration| <= ``max_accel``)
   bounce     same                                           goes out >= ``min_leg`` and comes back >= ``min_leg``
                                                             along one axis, one turn / smooth but for the turn
   appear     one such object in the last frames             absent in the first frame (and identity holds) /
                                                             absent then present,
                                                             one switch, present >= 2 frames
   disappear  one such object in the first frames            absent in the last frame / present then absent
   turn       exactly one such shape in every frame          <from> at the start, <to> at the end / one colour
                                                             switch, in place
   ========== ============================================== ===================================================

   ``score`` is the fraction of clauses passed, ``strict`` whether all did; per-kind fractions
   (identity, action, temporal) are components of the reward.

Distances are in pixels at 32 px and scale with the frame side. :class:`MotionEvalReward` is the
``motioneval`` reward (video ``B, T, 3, H, W`` float in [0, 1], the rewards API's layout; needs prompts;
no weights). Deterministic: every frame is checked (no frame sampling).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..rewards.base import ScoreBatch
from .movingshapes import DIRECTIONS, Actor, Script
from .shapeeval import Detection, Thresholds as ShapeThresholds, VerifierReward, detect_objects, thresholds_from_options
from .shapeworld import COLORS, SHAPES

__all__ = [
    "MotionThresholds",
    "MotionEvalResult",
    "TrackedObject",
    "parse_prompt",
    "detect_frames",
    "track",
    "check",
    "evaluate",
    "MotionEvalReward",
    "load_motioneval",
    "tiny_motioneval",
    "as_video_array",
]

KINDS = ("identity", "action", "temporal")


# ---------------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class MotionThresholds:
    """Tracking and motion settings; distances in pixels at a 32-px frame side (scaled with it)."""

    max_jump: float = 6.0  # an object moves at most this far per frame (farther: another object)
    max_gap: int = 2  # a track may miss this many frames and continue
    presence: float = 0.85  # identity: matched in at least this fraction of the frames it must be in
    min_travel: float = 4.0  # move: net travel along the direction
    max_cross_ratio: float = 0.58  # move: travel across / along (tan 30 degrees)
    max_backtrack: float = 1.5  # move: total travel against the direction
    still_tol: float = 1.5  # still / turn: max distance from the first centre
    min_leg: float = 3.0  # bounce: travel out and back
    max_accel: float = 2.5  # smoothness: |second difference of the centre| per frame
    max_step: float = 5.0  # smoothness: |step| per frame
    edge_frames: int = 1  # appear / disappear / turn: frames at each end that must show the start / end state

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "MotionThresholds" | None) -> "MotionThresholds":
        if isinstance(options, MotionThresholds):
            return options
        return thresholds_from_options(cls, options, "MotionEval")


# ---------------------------------------------------------------------------------------------- parsing
_ARTICLES = {"a", "an", "one"}
_EXAMPLES = "'a red circle moving left', 'a blue square bouncing', 'a green triangle appearing', 'a red square turning blue', 'a red circle moving left and a blue square moving up'"
_PREFIXES = ("a video of ", "a clip of ", "an animation of ")


def _outside(prompt: str, why: str) -> ValueError:
    return ValueError(f"prompt {prompt!r} is outside the MovingShapes grammar: {why}. Expected e.g. {_EXAMPLES}")


def _parse_actor(prompt: str, phrase: str) -> Actor:
    words = phrase.split()
    if len(words) < 3:
        raise _outside(prompt, f"{phrase!r} is not 'a [colour] <shape> <action>'")
    if words[0] not in _ARTICLES:
        raise _outside(prompt, f"{phrase!r} does not start with 'a' or 'an' (one object per phrase)")
    rest = words[1:]
    color = None
    if rest[0] in COLORS:
        color, rest = rest[0], rest[1:]
    if not rest or rest[0] not in SHAPES:
        raise _outside(prompt, f"unknown shape {rest[0] if rest else ''!r} in {phrase!r} (shapes: {', '.join(SHAPES)})")
    shape, verb = rest[0], rest[1:]
    text = " ".join(verb)
    if text in ("standing still", "staying still", "still"):
        return Actor(shape, color, "still")
    if len(verb) == 2 and verb[0] == "moving":
        if verb[1] not in DIRECTIONS:
            raise _outside(prompt, f"unknown direction {verb[1]!r} (directions: {', '.join(DIRECTIONS)})")
        return Actor(shape, color, "move", verb[1])
    if text in ("bouncing", "appearing", "disappearing"):
        return Actor(shape, color, {"bouncing": "bounce", "appearing": "appear", "disappearing": "disappear"}[text])
    if len(verb) == 2 and verb[0] == "turning":
        if color is None:
            raise _outside(prompt, f"{phrase!r}: a colour change needs the starting colour ('a red square turning blue')")
        if verb[1] not in COLORS:
            raise _outside(prompt, f"unknown colour {verb[1]!r} (colours: {', '.join(COLORS)})")
        if verb[1] == color:
            raise _outside(prompt, f"{phrase!r} turns into its own colour")
        return Actor(shape, color, "turn", to_color=verb[1])
    raise _outside(prompt, f"unknown action {text!r} in {phrase!r} (standing still, moving <direction>, bouncing, appearing, disappearing, turning <colour>)")


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> Script:
    """Parse a MovingShapes prompt (case-insensitive; a final period and "a video of" are ignored)::

        prompt := actor ("and" actor)*
        actor  := ("a" | "an") [colour] shape action
        action := "standing still" | "moving" (left|right|up|down) | "bouncing" | "appearing"
                | "disappearing" | "turning" colour

    Two actors may not be the same kind of object (same shape and colour, or the same shape once
    without a colour), so that every actor is one identifiable object."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split()).rstrip(".").strip()
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    if not text:
        raise _outside(prompt, "it is empty")
    if re.search(r"[^a-z ]", text):
        raise _outside(prompt, "only words (letters and spaces) are part of it")
    actors = tuple(_parse_actor(prompt, p) for p in re.split(r"\s+and\s+", text))
    for a, b in [(a, b) for i, a in enumerate(actors) for b in actors[i + 1:]]:
        if a.shape == b.shape and (a.color == b.color or a.color is None or b.color is None or {a.color, a.to_color} & {b.color, b.to_color} - {None}):
            raise _outside(prompt, f"'{a.noun()}' and '{b.noun()}' cannot be told apart")
    return Script(actors)


# ---------------------------------------------------------------------------------------------- input
def as_video_array(video: Any) -> np.ndarray:
    """One clip -> float32 ``T, H, W, 3`` in [0, 1].

    Accepts float ``T, 3, H, W`` in [0, 1] (the rewards API's layout; torch or numpy) or uint8
    ``T, H, W, 3`` / ``T, 3, H, W``. Raises ``ValueError`` for another rank or layout, NaN/inf, or
    float values outside [0, 1]."""
    if isinstance(video, Tensor):
        video = video.detach().cpu()
        video = video.numpy() if video.dtype == torch.uint8 else video.float().numpy()
    arr = np.asarray(video)
    if arr.ndim != 4:
        raise ValueError(f"a video must have 4 dims (T,3,H,W float or T,H,W,3 uint8), got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    elif arr.shape[-1] != 3:
        raise ValueError(f"a video must be T,3,H,W or T,H,W,3, got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise ValueError("a video needs at least one frame")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        bad = sorted({int(t) for t in np.nonzero(~np.isfinite(arr))[0]})
        raise ValueError(f"video frames {bad[:5]} contain NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"float video values must be in [0, 1], got min {lo:.3g} max {hi:.3g}")
    return np.clip(arr, 0.0, 1.0)


def detect_frames(video: Any, shape_thresholds: ShapeThresholds | Mapping[str, Any] | None = None) -> list[list[Detection]]:
    """ShapeEval's detections in every frame of one clip (see :func:`as_video_array` for layouts)."""
    arr = as_video_array(video)
    th = ShapeThresholds.from_options(shape_thresholds)
    return [detect_objects(frame, th) for frame in arr]


# ---------------------------------------------------------------------------------------------- tracking
@dataclass
class TrackedObject:
    """One object across frames: ``detections[t]`` is its detection in frame t (None: not seen)."""

    detections: list[Detection | None]

    def present(self) -> np.ndarray:
        return np.array([d is not None for d in self.detections])

    def centers(self) -> np.ndarray:
        """T, 2 centres (x, y); NaN where absent."""
        return np.array([(d.cx, d.cy) if d is not None else (np.nan, np.nan) for d in self.detections], dtype=np.float64)

    def last_seen(self) -> int:
        return max(i for i, d in enumerate(self.detections) if d is not None)


def track(frames: Sequence[Sequence[Detection]], max_jump: float, max_gap: int = 2) -> list[TrackedObject]:
    """Link per-frame detections into tracks: in each frame the closest (track, detection) pairs are
    joined first, a track's last centre at most ``max_jump`` x (frames since) away; unmatched
    detections start tracks. Tracks unseen for more than ``max_gap`` frames end."""
    T = len(frames)
    tracks: list[TrackedObject] = []
    for t, dets in enumerate(frames):
        live = [i for i, tr in enumerate(tracks) if t - tr.last_seen() <= max_gap + 1]
        pairs = []
        for i in live:
            tr = tracks[i]
            s = tr.last_seen()
            last = tr.detections[s]
            for j, d in enumerate(dets):
                dist = math.hypot(d.cx - last.cx, d.cy - last.cy)
                if dist <= max_jump * (t - s):
                    pairs.append((dist, i, j))
        pairs.sort()
        used_t, used_d = set(), set()
        for _, i, j in pairs:
            if i in used_t or j in used_d:
                continue
            tracks[i].detections[t] = dets[j]
            used_t.add(i)
            used_d.add(j)
        for j, d in enumerate(dets):
            if j not in used_d:
                tracks.append(TrackedObject([None] * t + [d] + [None] * (T - t - 1)))
    return tracks


# ---------------------------------------------------------------------------------------------- checking
@dataclass
class MotionEvalResult:
    clauses: list[tuple[str, bool]]
    kinds: list[str]  # per clause: identity | action | temporal
    score: float
    strict: bool
    category: str
    script: Script | None = None
    tracks: list[TrackedObject] = field(default_factory=list)

    def kind_scores(self) -> dict[str, float]:
        """Fraction of passed clauses of each kind (NaN when a kind has none)."""
        out = {}
        for k in KINDS:
            oks = [ok for (_, ok), kk in zip(self.clauses, self.kinds) if kk == k]
            out[k] = float(np.mean(oks)) if oks else math.nan
        return out


def _matches(d: Detection | None, shape: str, color: str | None) -> bool:
    return d is not None and d.shape == shape and (color is None or d.color == color)


def _fill(c: np.ndarray) -> np.ndarray:
    """Linear interpolation of missing (NaN) centres between seen ones; ends held. T,2 -> T,2."""
    out = c.copy()
    idx = np.arange(len(c))
    ok = ~np.isnan(c[:, 0])
    if not ok.any():
        return out
    for k in range(2):
        out[:, k] = np.interp(idx, idx[ok], c[ok, k])
    return out


def _smooth(c: np.ndarray, th: MotionThresholds, scale: float, skip_largest: int = 0) -> bool:
    """All steps <= max_step and all |accelerations| <= max_accel (the ``skip_largest`` largest ignored)."""
    steps = np.diff(c, axis=0)
    if len(steps) and np.hypot(steps[:, 0], steps[:, 1]).max() > th.max_step * scale:
        return False
    acc = np.diff(steps, axis=0)
    if not len(acc):
        return True
    mags = np.sort(np.hypot(acc[:, 0], acc[:, 1]))
    if skip_largest:
        mags = mags[:-skip_largest]
    return bool(len(mags) == 0 or mags.max() <= th.max_accel * scale)


def _moves(c: np.ndarray, direction: str, th: MotionThresholds, scale: float) -> bool:
    u = np.array(DIRECTIONS[direction], dtype=np.float64)
    n = np.array([-u[1], u[0]])
    d = c[-1] - c[0]
    along, across = float(d @ u), abs(float(d @ n))
    back = float(np.clip(-(np.diff(c, axis=0) @ u), 0, None).sum())
    return along >= th.min_travel * scale and across <= th.max_cross_ratio * along and back <= th.max_backtrack * scale


def _bounces(c: np.ndarray, th: MotionThresholds, scale: float) -> bool:
    """Out and back along the axis of larger range, with one turn and little motion across."""
    ranges = np.ptp(c, axis=0)
    ax = int(np.argmax(ranges))
    p, q = c[:, ax], c[:, 1 - ax]
    k = int(np.argmax(np.abs(p - p[0])))
    if k == 0 or k == len(p) - 1:
        return False
    out, back = p[k] - p[0], p[k] - p[-1]
    if abs(out) < th.min_leg * scale or abs(back) < th.min_leg * scale or np.sign(out) != np.sign(back):
        return False
    s = np.sign(out)
    leg1, leg2 = np.diff(p[: k + 1]) * s, -np.diff(p[k:]) * s
    backtrack = float(np.clip(-leg1, 0, None).sum() + np.clip(-leg2, 0, None).sum())
    return backtrack <= th.max_backtrack * scale and float(np.ptp(q)) <= max(th.still_tol * scale, th.max_cross_ratio * float(ranges[ax]))


def _runs(x: Sequence[Any]) -> list[Any]:
    """The values of x with consecutive repeats merged."""
    out: list[Any] = []
    for v in x:
        if not out or out[-1] != v:
            out.append(v)
    return out


def _actor_clauses(actor: Actor, tracks: list[TrackedObject], T: int, th: MotionThresholds, scale: float) -> list[tuple[str, bool, str]]:
    """Three (description, passed, kind) clauses for one actor."""
    noun = actor.noun()
    e = max(1, min(int(th.edge_frames), T // 3))
    need = max(1, math.ceil(th.presence * T))
    color = None if actor.action == "turn" else actor.color
    counts = [sum(_matches(d, actor.shape, color) for d in tr.detections) for tr in tracks]

    if actor.action in ("still", "move", "bounce", "turn"):
        what = f"one {actor.shape}" if actor.action == "turn" else f"one {noun}"
        cands = [tr for tr, n in zip(tracks, counts) if n >= need]
        ident = len(cands) == 1
        tr = cands[0] if ident else None
        clauses = [(f"{what} in every frame", ident, "identity")]
        if tr is None:
            desc = {"still": "stays still", "move": f"moves {actor.direction}", "bounce": "bounces", "turn": f"{actor.color} at the start and {actor.to_color} at the end"}[actor.action]
            tdesc = {"still": "keeps its colour and shape", "move": "moves smoothly", "bounce": "moves smoothly", "turn": "changes colour once, in place"}[actor.action]
            return clauses + [(f"the {noun} {desc}", False, "action"), (f"the {noun} {tdesc}", False, "temporal")]
        c = _fill(tr.centers())
        drift = float(np.hypot(*(c - c[0]).T).max())
        if actor.action == "still":
            full = all(_matches(d, actor.shape, color) for d in tr.detections)
            return clauses + [(f"the {noun} stays still", drift <= th.still_tol * scale, "action"),
                              (f"the {noun} keeps its colour and shape in every frame", full, "temporal")]
        if actor.action == "move":
            return clauses + [(f"the {noun} moves {actor.direction}", _moves(c, actor.direction, th, scale), "action"),
                              (f"the {noun} moves smoothly", _smooth(c, th, scale), "temporal")]
        if actor.action == "bounce":
            return clauses + [(f"the {noun} bounces", _bounces(c, th, scale), "action"),
                              (f"the {noun} moves smoothly", _smooth(c, th, scale, skip_largest=1), "temporal")]
        # turn
        cols = [d.color if d is not None and d.shape == actor.shape else None for d in tr.detections]
        ends = all(x == actor.color for x in cols[:e]) and all(x == actor.to_color for x in cols[-e:])
        once = _runs(cols) == [actor.color, actor.to_color] and drift <= th.still_tol * scale
        return clauses + [(f"the {noun} is {actor.color} at the start and {actor.to_color} at the end", ends, "action"),
                          (f"the {noun} changes colour once, in place", once, "temporal")]

    # appear / disappear: the object must be there at the end (appear) or the start (disappear)
    appear = actor.action == "appear"
    edge = slice(T - e, T) if appear else slice(0, e)
    other = slice(0, e) if appear else slice(T - e, T)
    cands = [tr for tr in tracks if all(_matches(d, actor.shape, color) for d in tr.detections[edge]) and sum(_matches(d, actor.shape, color) for d in tr.detections) >= 2]
    ident = len(cands) == 1
    where = "last" if appear else "first"
    clauses = [(f"one {noun} in the {where} frames", ident, "identity")]
    # credited only when the object is there at the other end: an empty clip shows no appearance
    absent_edge = ident and not any(_matches(d, actor.shape, color) for dets in tracks for d in dets.detections[other])
    desc = f"no {noun} in the {'first' if appear else 'last'} frames"
    if not ident:
        return clauses + [(desc, absent_edge, "action"), (f"the {noun} {'appears' if appear else 'disappears'} once", False, "temporal")]
    tr = cands[0]
    seen = [_matches(d, actor.shape, color) for d in tr.detections]
    runs = _runs(seen)
    once = runs == ([False, True] if appear else [True, False]) and sum(seen) >= 2 and (T - sum(seen)) >= 1
    c = _fill(tr.centers())
    still = float(np.hypot(*(c - c[0]).T).max()) <= th.still_tol * scale
    return clauses + [(desc, absent_edge, "action"), (f"the {noun} {'appears' if appear else 'disappears'} once and stays {'' if appear else 'gone'}".rstrip(), once and still, "temporal")]


def check(script: Script, frames: Sequence[Sequence[Detection]], size: int, thresholds: MotionThresholds | Mapping[str, Any] | None = None) -> tuple[list[tuple[str, bool, str]], list[TrackedObject]]:
    """Per-clause verdicts (description, passed, kind) of per-frame detections against a script."""
    th = MotionThresholds.from_options(thresholds)
    scale = size / 32
    tracks = track(frames, th.max_jump * scale, th.max_gap)
    out = []
    for actor in script.actors:
        out += _actor_clauses(actor, tracks, len(frames), th, scale)
    return out, tracks


def evaluate(video: Any, prompt: str | Script, thresholds: MotionThresholds | Mapping[str, Any] | None = None,
             shape_thresholds: ShapeThresholds | Mapping[str, Any] | None = None) -> MotionEvalResult:
    """Check one clip (float ``T, 3, H, W`` in [0, 1] or uint8 ``T, H, W, 3``) against a prompt."""
    script = prompt if isinstance(prompt, Script) else parse_prompt(prompt)
    arr = as_video_array(video)
    if arr.shape[0] < 3:
        raise ValueError(f"MotionEval needs at least 3 frames to see motion, got {arr.shape[0]}")
    th = ShapeThresholds.from_options(shape_thresholds)
    frames = [detect_objects(f, th) for f in arr]
    clauses, tracks = check(script, frames, min(arr.shape[1:3]), thresholds)
    passed = sum(ok for _, ok, _ in clauses)
    return MotionEvalResult([(d, ok) for d, ok, _ in clauses], [k for _, _, k in clauses], passed / len(clauses), passed == len(clauses), script.category, script, tracks)


# ---------------------------------------------------------------------------------------------- reward
class MotionEvalReward(VerifierReward):
    """MotionEval as a reward: score = fraction of the prompt's clauses the clip satisfies.

    Input: video ``B, T, 3, H, W`` float in [0, 1] (or uint8), every frame checked. Components:
    ``strict`` (1.0 when every clause passes), ``num_clauses``, and ``identity`` / ``action`` /
    ``temporal`` (fraction of that kind of clause passed). Prompts outside the grammar
    (``on_unparseable``): "invalid" (default: NaN with the parse error as reason), "zero" or "raise".
    NaN frames or a wrong layout are handled by the reward base (invalid item / ``ValueError``)."""

    name = "motioneval"
    modality = "video"

    def __init__(self, *, batch_size: int = 32, thresholds: MotionThresholds | Mapping[str, Any] | None = None,
                 shape_thresholds: ShapeThresholds | Mapping[str, Any] | None = None, on_unparseable: str = "invalid") -> None:
        self.thresholds = MotionThresholds.from_options(thresholds)
        self.shape_thresholds = ShapeThresholds.from_options(shape_thresholds)
        self.on_unparseable = self.check_on_unparseable(on_unparseable)
        super().__init__(
            batch_size=batch_size,
            weights_id=None,
            preprocessing={"input": "float B,T,3,H,W in [0,1]; every frame", "thresholds": asdict(self.thresholds),
                           "shape_thresholds": asdict(self.shape_thresholds), "on_unparseable": on_unparseable},
        )

    parse = staticmethod(parse_prompt)

    def score(self, samples: Tensor, prompts, references, metadata, **media_info) -> ScoreBatch:
        if samples.ndim != 5 or samples.shape[2] != 3:
            raise ValueError(f"motioneval expects videos B,T,3,H,W, got {tuple(samples.shape)}")
        videos = samples.detach().float().cpu().numpy()
        rows: dict[str, list[float]] = {k: [] for k in ("score", "strict", "num_clauses", *KINDS)}
        for vid, prompt in zip(videos, prompts):
            try:
                script = parse_prompt(prompt)
            except ValueError:
                if self.on_unparseable == "raise":
                    raise
                fill = 0.0 if self.on_unparseable == "zero" else math.nan
                for k in rows:
                    rows[k].append(0.0 if k == "num_clauses" else fill)
                continue
            res = evaluate(vid, script, self.thresholds, self.shape_thresholds)
            rows["score"].append(res.score)
            rows["strict"].append(float(res.strict))
            rows["num_clauses"].append(float(len(res.clauses)))
            for k, v in res.kind_scores().items():
                rows[k].append(v)
        as_t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        return ScoreBatch(as_t(rows["score"]), {k: as_t(v) for k, v in rows.items() if k != "score"})


def load_motioneval(**options: Any) -> MotionEvalReward:
    """The ``motioneval`` reward. Options: ``batch_size``, ``thresholds`` (dict of :class:`MotionThresholds`
    fields), ``shape_thresholds`` (ShapeEval's), ``on_unparseable`` ("zero" | "invalid" | "raise")."""
    return MotionEvalReward(**options)


def tiny_motioneval(seed: int = 0, **options: Any) -> MotionEvalReward:
    """Same reward as :func:`load_motioneval` (it has no weights; ``seed`` is accepted and unused)."""
    del seed
    return load_motioneval(**options)


def _main(argv: list[str] | None = None) -> None:  # python -m mmalign.embedded.motioneval VIDEO.gif PROMPT
    p = argparse.ArgumentParser(description="Check a GIF / MP4 clip against a MovingShapes prompt.")
    p.add_argument("video")
    p.add_argument("prompt")
    args = p.parse_args(argv)
    from ..media import load_media

    items, reasons = load_media([args.video], "video")
    if reasons[0]:
        raise SystemExit(f"error: {reasons[0]}")
    res = evaluate(items[0], args.prompt)
    for desc, ok in res.clauses:
        print(f"[{'x' if ok else ' '}] {desc}")
    print(f"score {res.score:.3f}  strict {res.strict}  category {res.category}")


if __name__ == "__main__":
    _main()

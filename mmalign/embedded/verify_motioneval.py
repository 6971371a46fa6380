"""How well MotionEval reads MovingShapes: strict and per-clause accuracy per category on rendered
ground-truth clips (each checked against its own caption), and the rejection rate of hand-made
negatives (wrong direction, colour or shape; a static object for a moving prompt; jittery motion; ...).

    python -m mmalign.embedded.verify_motioneval --n 200          # clean renders + negatives
    python -m mmalign.embedded.verify_motioneval --write-suites   # rewrite assets/prompts/movingshapes_*.txt

``--n`` is per category (and per negative kind). Exits with status 1 when some category's clean strict
accuracy or some negative kind's rejection rate falls below ``--min-accuracy`` (default 0.99).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import Callable

import numpy as np

from .motioneval import evaluate
from .movingshapes import CATEGORIES, DIRECTIONS, FRAMES, SIZE, Clip, Script, clip_at, render_clip, write_prompt_suites
from .shapeworld import COLORS, SHAPES, load_prompt_suite
from .verify_shapeeval import CONDITIONS, degrade

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _other(rng: np.random.Generator, options, current):
    rest = [x for x in options if x != current]
    return rest[int(rng.integers(len(rest)))]


def _clip(seed: int, i: int, category: str) -> Clip:
    return clip_at(i, seed, SIZE, FRAMES, [category])


def _jitter(clip: Clip, rng: np.random.Generator, amount: float = 2.5) -> np.ndarray:
    """The clip re-rendered with every object shaken by +-``amount`` px (both axes, integer) per frame."""
    tracks = []
    for tr in clip.tracks:
        n = len(tr.xs)
        while True:  # an unmistakable shake: at least one frame kicked by the full amount
            dx = np.rint(rng.uniform(-amount, amount, n))
            dy = np.rint(rng.uniform(-amount, amount, n))
            if np.abs(np.diff(np.stack([dx, dy], 1), 2, axis=0)).max() >= 2 * amount - 1:
                break
        tracks.append(replace(tr, xs=tuple(float(x + d) for x, d in zip(tr.xs, dx)), ys=tuple(float(y + d) for y, d in zip(tr.ys, dy))))
    return render_clip(tracks, len(clip.tracks[0].xs), clip.video.shape[1])


def _static(clip: Clip) -> np.ndarray:
    """The clip with every object frozen at its first-frame place."""
    tracks = [replace(tr, xs=(tr.xs[0],) * len(tr.xs), ys=(tr.ys[0],) * len(tr.ys)) for tr in clip.tracks]
    return render_clip(tracks, len(clip.tracks[0].xs), clip.video.shape[1])


def _prompt_with(script: Script, i: int, **change) -> str:
    actors = list(script.actors)
    actors[i] = replace(actors[i], **change)
    return Script(tuple(actors)).prompt()


def _swap_directions(script: Script) -> str:
    """The two actors' directions swapped (when they differ), else the first one reversed."""
    a, b = script.actors
    if a.direction != b.direction:
        return Script((replace(a, direction=b.direction), replace(b, direction=a.direction))).prompt()
    return Script((replace(a, direction=OPPOSITE[a.direction]), b)).prompt()


# name -> (category of the source clip, fn(clip, rng) -> (video uint8 T,H,W,3, prompt that must be rejected))
NegativeFn = Callable[[Clip, np.random.Generator], tuple[np.ndarray, str]]
NEGATIVES: dict[str, tuple[str, NegativeFn]] = {
    "opposite_direction": ("motion", lambda c, r: (c.video, _prompt_with(c.script, 0, direction=OPPOSITE[c.script.actors[0].direction]))),
    "perpendicular_direction": ("motion", lambda c, r: (c.video, _prompt_with(c.script, 0, direction=_other(r, [d for d in DIRECTIONS if d != OPPOSITE[c.script.actors[0].direction]], c.script.actors[0].direction)))),
    "wrong_color": ("motion", lambda c, r: (c.video, _prompt_with(c.script, 0, color=_other(r, list(COLORS), c.script.actors[0].color)))),
    "wrong_shape": ("motion", lambda c, r: (c.video, _prompt_with(c.script, 0, shape=_other(r, list(SHAPES), c.script.actors[0].shape)))),
    "static_for_moving": ("motion", lambda c, r: (_static(c), c.caption)),
    "jittery_motion": ("motion", lambda c, r: (_jitter(c, r), c.caption)),
    "moving_for_still": ("motion", lambda c, r: (c.video, _prompt_with(c.script, 0, action="still", direction=None))),
    "straight_for_bounce": ("motion", lambda c, r: (c.video, _prompt_with(c.script, 0, action="bounce", direction=None))),
    "static_for_bounce": ("bounce", lambda c, r: (_static(c), c.caption)),
    "jittery_bounce": ("bounce", lambda c, r: (_jitter(c, r), c.caption)),
    "present_for_appear": ("still", lambda c, r: (c.video, _prompt_with(c.script, 0, action="appear"))),
    "appear_for_disappear": ("appear", lambda c, r: (c.video, _prompt_with(c.script, 0, action="disappear"))),
    "reversed_color_change": ("color_change", lambda c, r: (c.video, _prompt_with(c.script, 0, color=c.script.actors[0].to_color, to_color=c.script.actors[0].color))),
    "wrong_target_color": ("color_change", lambda c, r: (c.video, _prompt_with(c.script, 0, to_color=_other(r, [x for x in COLORS if x != c.script.actors[0].color], c.script.actors[0].to_color)))),
    "no_change_for_turn": ("still", lambda c, r: (c.video, _prompt_with(c.script, 0, action="turn", to_color=_other(r, list(COLORS), c.script.actors[0].color)))),
    "two_one_static": ("two_moving", lambda c, r: (render_clip([c.tracks[0], replace(c.tracks[1], xs=(c.tracks[1].xs[0],) * FRAMES, ys=(c.tracks[1].ys[0],) * FRAMES)], FRAMES, SIZE), c.caption)),
    "two_wrong_directions": ("two_moving", lambda c, r: (c.video, _swap_directions(c.script))),
}


def accuracy(n: int, seed: int = 0, condition: str = "clean") -> dict[str, tuple[float, float]]:
    """{category: (strict accuracy, clause accuracy)} over ``n`` rendered clips per category, each
    frame degraded by ShapeEval's ``condition`` (:data:`mmalign.embedded.verify_shapeeval.CONDITIONS`)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; one of {tuple(CONDITIONS)}")
    rng = np.random.default_rng([seed, 13])
    out = {}
    for cat in CATEGORIES:
        strict = passed = total = 0
        for i in range(n):
            clip = _clip(seed, i, cat)
            video = np.stack([degrade(f, rng, **CONDITIONS[condition]) for f in clip.video]) if CONDITIONS[condition] else clip.video
            res = evaluate(video, clip.caption)
            strict += res.strict
            passed += sum(ok for _, ok in res.clauses)
            total += len(res.clauses)
        out[cat] = (strict / n, passed / total)
    return out


def negative_video(kind: str, clip: Clip, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A negative of ``kind`` made from ``clip`` (a clip of that kind's source category)."""
    return NEGATIVES[kind][1](clip, rng)


def rejection(n: int, seed: int = 0) -> dict[str, float]:
    """{negative kind: fraction of ``n`` negatives that MotionEval rejects (not strict)}."""
    rng = np.random.default_rng([seed, 31])
    out = {}
    for kind, (cat, _) in NEGATIVES.items():
        rejected = 0
        for i in range(n):
            video, prompt = negative_video(kind, _clip(seed + 1, i, cat), rng)
            rejected += not evaluate(video, prompt).strict
        out[kind] = rejected / n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="clips per category and per negative kind (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=0.99)
    p.add_argument("--write-suites", action="store_true", help="rewrite assets/prompts/movingshapes_{train,heldout}.txt and exit")
    p.add_argument("--degraded", action="store_true", help="also report blurred / noisy copies (not gated): " + ", ".join(c for c in CONDITIONS if c != "clean"))
    args = p.parse_args(argv)
    if args.write_suites:
        for split, path in write_prompt_suites().items():
            print(f"{split}: {len(load_prompt_suite(path))} prompts -> {path}")
        return 0
    t0 = time.perf_counter()
    acc = accuracy(args.n, args.seed)
    print(f"MotionEval on rendered MovingShapes clips ({FRAMES} frames of {SIZE}x{SIZE}), {args.n} per category ({time.perf_counter() - t0:.1f} s)")
    print(f"  {'category':<14} {'strict':>8} {'clauses':>8}")
    for cat, (s, c) in acc.items():
        print(f"  {cat:<14} {s:>8.3f} {c:>8.3f}")
    if args.degraded:
        for cond in (c for c in CONDITIONS if c != "clean"):
            t0 = time.perf_counter()
            dacc = accuracy(args.n, args.seed, cond)
            print(f"\n{cond} frames ({time.perf_counter() - t0:.1f} s): " + ", ".join(f"{c} {s:.3f}" for c, (s, _) in dacc.items()))
    t0 = time.perf_counter()
    rej = rejection(args.n, args.seed)
    print(f"\nhand-made negatives, {args.n} each: fraction rejected ({time.perf_counter() - t0:.1f} s)")
    for kind, r in rej.items():
        print(f"  {kind:<26} {r:>6.3f}   (from {NEGATIVES[kind][0]} clips)")
    worst_acc = min(s for s, _ in acc.values())
    worst_rej = min(rej.values())
    ok = worst_acc >= args.min_accuracy and worst_rej >= args.min_accuracy
    print(f"\nworst category strict accuracy {worst_acc:.3f}, worst negative rejection {worst_rej:.3f} "
          f"({'ok' if ok else 'BELOW'} {args.min_accuracy})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

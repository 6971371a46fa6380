"""ShapeEval: a rule-based verifier (GenEval-like) of ShapeWorld prompts on generated images.

1. :func:`parse_prompt` turns a prompt of the ShapeWorld grammar into :class:`Requirements`: object
   groups with exact counts ("three blue triangles": exactly 3 blue triangles; "a circle": exactly 1
   circle of any colour) and at most one spatial relation ("a red circle left of a green square").
   Anything else raises ``ValueError`` saying why.
2. :func:`detect_objects` segments the image: a pixel is foreground when it is far enough from the
   black background *along the direction of its nearest palette colour*; its colour is the palette
   colour whose direction (seen from the background) is closest in angle, so pixels fading into the
   background at a blurry edge keep their colour. Same-colour pixels form connected components (pure
   numpy union-find); tiny blobs are dropped; each blob's shape is the template (circle, square,
   apex-up triangle fitted to its bounding box) of highest IoU, or None when no template fits well or
   the blob is elongated.
3. :func:`evaluate` checks one clause per object group (exact count of that shape and colour: extra
   objects of a mentioned kind fail it) and one per relation (between the largest object of each group,
   with GenEval's position rule); ``score`` is the fraction of clauses passed, ``strict`` whether all did.

:class:`ShapeEvalReward` exposes this as the ``shapeeval`` reward (image, needs prompts, no weights).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch
from torch import Tensor

from ..rewards.base import Reward, RewardOutput, ScoreBatch
from .shapeworld import BACKGROUND, COLORS, RELATIONS, SHAPES, Group, Relation, Requirements, relation_holds, shape_mask

__all__ = [
    "Thresholds",
    "Detection",
    "ShapeEvalResult",
    "Requirements",
    "Group",
    "Relation",
    "parse_prompt",
    "detect_objects",
    "evaluate",
    "ShapeEvalReward",
    "load_shapeeval",
    "tiny_shapeeval",
]


# ---------------------------------------------------------------------------------------------- thresholds
T = TypeVar("T")


def thresholds_from_options(cls: type[T], options: Mapping[str, Any] | None, verifier: str) -> T:
    """A verifier's thresholds dataclass ``cls`` from a mapping of overrides (None: the defaults);
    an unknown key raises, naming the verifier and the known keys. Shared by ShapeEval, MotionEval
    and ToneEval."""
    if options is None:
        return cls()
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {verifier} thresholds {unknown}; known: {sorted(known)}")
    return replace(cls(), **dict(options))


@dataclass(frozen=True)
class Thresholds:
    """Detector settings (colour distances are in RGB units of [0, 1])."""

    min_norm: float = 0.12  # foreground: at least this far from the background ...
    fg_alpha: float = 0.5  # ... and at least this fraction of its palette colour's intensity
    max_angle_deg: float = 22.0  # farther than this from every palette colour direction: colour unknown
    min_area_frac: float = 0.006  # blobs smaller than this fraction of the image are ignored ...
    min_area_px: int = 6  # ... and smaller than this many pixels
    min_iou: float = 0.55  # a blob is a shape when some template fits it with this IoU
    max_aspect: float = 2.0  # blobs with a longer/shorter bounding-box side ratio are no shape
    triangle_skew: float = -0.006  # a blob whose vertical profile is skewed below this is a triangle
    square_ratio: float = 1.5  # else a square when its axis/diagonal fourth-cumulant ratio exceeds this
    soft_margin: float = 1 / 32  # the soft moments see the blob's colour this far around it (of the image side) ...
    soft_floor: float = 0.15  # ... where its intensity reaches this
    position_threshold: float = 0.1  # GenEval's relation threshold (fraction of the summed box sizes)
    connectivity: int = 8  # 4 or 8

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "Thresholds" | None) -> "Thresholds":
        if isinstance(options, Thresholds):
            return options
        th = thresholds_from_options(cls, options, "ShapeEval")
        if th.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {th.connectivity}")
        return th


# ---------------------------------------------------------------------------------------------- parsing
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_PREFIXES = ("a photo of ", "an image of ", "a picture of ", "a drawing of ")
_REL_RE = re.compile(r"\s+(?:(?:to|on) the\s+)?(left of|right of)\s+|\s+(above|below)\s+")
_EXAMPLES = "'a circle', 'a red circle', 'three blue triangles', 'a yellow square and a purple circle', 'a red circle left of a green square'"


def _outside(prompt: str, why: str) -> ValueError:
    return ValueError(f"prompt {prompt!r} is outside the ShapeEval grammar: {why}. Expected e.g. {_EXAMPLES}")


def _parse_phrase(prompt: str, phrase: str) -> Group:
    words = phrase.split()
    if not words:
        raise _outside(prompt, "an empty object phrase")
    if words[0] in _NUMBERS:
        count = _NUMBERS[words[0]]
    elif words[0].isdigit():
        count = int(words[0])
    else:
        raise _outside(prompt, f"{phrase!r} does not start with 'a', 'an' or a number")
    if count < 1:
        raise _outside(prompt, f"count {count} in {phrase!r}: counts start at 1")
    rest = words[1:]
    color = None
    if rest and rest[0] in COLORS:
        color, rest = rest[0], rest[1:]
    if len(rest) != 1:
        raise _outside(prompt, f"{phrase!r} is not '<count> [colour] <shape>' (colours: {', '.join(COLORS)})")
    noun = rest[0]
    shape = noun[:-1] if noun.endswith("s") and noun[:-1] in SHAPES else noun
    if shape not in SHAPES:
        raise _outside(prompt, f"unknown shape {noun!r} (shapes: {', '.join(SHAPES)})")
    return Group(shape, color, count)


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> Requirements:
    """Parse a prompt of the ShapeWorld grammar into :class:`Requirements` (``ValueError`` otherwise).

    Grammar (case-insensitive, an optional "a photo of" prefix and final period are ignored)::

        prompt   := phrase ("and" phrase)*  |  phrase relation phrase
        phrase   := ("a" | "an" | number) [colour] shape["s"]      number: one..ten or digits
        relation := ["to the" | "on the"] ("left of" | "right of") | "above" | "below"

    Phrases in a relation name one object each; a shape may not be named both with and without a
    colour, nor twice with the same colour (say "two red circles")."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().replace(",", " , ").split()).rstrip(".").strip()
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    if not text:
        raise _outside(prompt, "it is empty")
    if "," in text:
        raise _outside(prompt, "commas are not part of it")
    rel_matches = list(_REL_RE.finditer(text))
    if len(rel_matches) > 1:
        raise _outside(prompt, "at most one spatial relation is supported")
    if rel_matches:
        m = rel_matches[0]
        rel = m.group(1) or m.group(2)
        left, right = text[: m.start()], text[m.end() :]
        if " and " in f" {left} " or " and " in f" {right} ":
            raise _outside(prompt, "a relation joins exactly two single objects")
        a, b = _parse_phrase(prompt, left), _parse_phrase(prompt, right)
        if a.count != 1 or b.count != 1:
            raise _outside(prompt, "each side of a relation must be one object ('a ...')")
        groups = (a, b)
        relations: tuple[Relation, ...] = (Relation(0, rel, 1),)
    else:
        groups = tuple(_parse_phrase(prompt, p) for p in re.split(r"\s+and\s+", text))
        relations = ()
    seen: dict[str, set[str | None]] = {}
    for g in groups:
        colors = seen.setdefault(g.shape, set())
        if g.color in colors:
            raise _outside(prompt, f"'{g.noun()}' is named twice (give one count instead)")
        if colors and (g.color is None or None in colors):
            raise _outside(prompt, f"{g.shape} is named both with and without a colour")
        colors.add(g.color)
    assert all(r.rel in RELATIONS for r in relations)
    return Requirements(groups, relations)


# ---------------------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class Detection:
    """One object found in an image. ``shape``/``color`` are None when no shape template / palette colour
    fits; ``bbox`` is (x0, y0, x1, y1) in pixel edges (x1, y1 exclusive); ``match`` the template IoU."""

    shape: str | None
    color: str | None
    area: int
    cx: float
    cy: float
    bbox: tuple[int, int, int, int]
    match: float = 0.0


_PALETTE_NAMES = tuple(COLORS)
_BG = np.asarray(BACKGROUND, np.float32) / 255
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], np.float32) / 255 - _BG  # K, 3 directions
_PALETTE_LEN = np.linalg.norm(_PALETTE, axis=1)
_PALETTE_UNIT = _PALETTE / _PALETTE_LEN[:, None]


def _as_hwc_float(image: Any) -> np.ndarray:
    """uint8 H,W,3 (0..255) or float 3,H,W / H,W,3 (0..1), numpy or torch -> float32 H,W,3 in [0, 1]."""
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        image = image.float().numpy() if image.dtype != torch.uint8 else image.numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
        raise ValueError(f"expected an image H,W,3 (uint8) or 3,H,W (float), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        hwc = arr if arr.shape[-1] == 3 else arr.transpose(1, 2, 0)
        return hwc.astype(np.float32) / 255
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or inf")
    hwc = arr.transpose(1, 2, 0) if arr.shape[0] == 3 and arr.shape[-1] != 3 else arr
    return np.clip(hwc, 0.0, 1.0)


def _components(labels: np.ndarray, connectivity: int) -> np.ndarray:
    """Connected components of equal non-negative labels (-1: background). Returns, per pixel, the
    smallest flat index of its component (-1 on background): union-find with vectorised hooking and
    pointer jumping."""
    h, w = labels.shape
    flat = labels.reshape(-1)
    idx = np.arange(h * w).reshape(h, w)
    src, dst = [], []
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
    for dy, dx in offsets:
        ra = (slice(0, h - dy), slice(0, w - dx) if dx >= 0 else slice(-dx, w))
        rb = (slice(dy, h), slice(dx, w) if dx >= 0 else slice(0, w + dx))
        same = (labels[ra] >= 0) & (labels[ra] == labels[rb])
        src.append(idx[ra][same])
        dst.append(idx[rb][same])
    src_a, dst_a = np.concatenate(src), np.concatenate(dst)
    parent = np.arange(h * w)
    while src_a.size:
        ps, pd = parent[src_a], parent[dst_a]
        diff = ps != pd
        if not diff.any():
            break
        src_a, dst_a, ps, pd = src_a[diff], dst_a[diff], ps[diff], pd[diff]
        np.minimum.at(parent, np.maximum(ps, pd), np.minimum(ps, pd))
        while True:  # pointer jumping until every pixel points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return np.where(flat >= 0, parent, -1).reshape(h, w)


@lru_cache(maxsize=2048)
def _templates(w: int, h: int) -> tuple[np.ndarray, ...]:
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    return tuple(shape_mask(s, 0.0, 0.0, float(w), float(h), xs, ys) for s in SHAPES)


_UNIT_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area of the shape in a unit box
_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 6}  # box centre = centroid - dy * side


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def template_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of a blob (mask cropped to its bounding box) with each shape, fitted twice: to the bounding
    box and to the blob's area and centroid (robust to blur eroding a triangle's apex); the better one."""
    h, w = mask.shape
    area = np.count_nonzero(mask)
    pad = int(math.ceil(0.35 * max(h, w))) + 1
    big = np.zeros((h + 2 * pad, w + 2 * pad), bool)
    big[pad : pad + h, pad : pad + w] = mask
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5 + pad, ys.mean() + 0.5 + pad
    gx = np.arange(big.shape[1], dtype=np.float32)[None, :] + 0.5
    gy = np.arange(big.shape[0], dtype=np.float32)[:, None] + 0.5
    out = {}
    for shape, t in zip(SHAPES, _templates(w, h)):
        side = math.sqrt(area / _UNIT_AREA[shape])
        bx, by = cx, cy - _CENTROID_DY[shape] * side
        fitted = shape_mask(shape, bx - side / 2, by - side / 2, bx + side / 2, by + side / 2, gx, gy)
        out[shape] = float(max(_iou(mask, t), _iou(big, fitted)))
    return out


def shape_moments(weights: np.ndarray, area: float | None = None) -> tuple[float, float]:
    """Blur-robust shape statistics of a soft blob (weights >= 0 on a pixel grid; ``area`` in pixels,
    default the total weight). Cumulants above the second add under convolution and a Gaussian's are
    0, so blur leaves both nearly unchanged:

    * ``skew``: third cumulant of the vertical profile over ``area ** 1.5`` (apex-up triangles about
      -0.019, circles and squares 0);
    * ``axis_ratio``: fourth cumulants along the axes over those along the diagonals (squares 2,
      circles 1)."""
    m = float(weights.sum())
    if m <= 0:
        return 0.0, 1.0
    ys, xs = np.indices(weights.shape, dtype=np.float64)
    x = xs - float((weights * xs).sum()) / m
    y = ys - float((weights * ys).sum()) / m

    def k4(u: np.ndarray) -> float:
        return float((weights * u**4).sum()) / m - 3 * (float((weights * u**2).sum()) / m) ** 2

    k3y = float((weights * y**3).sum()) / m
    k4x, k4y = k4(x), k4(y)
    k4d = k4((x + y) / math.sqrt(2)) + k4((x - y) / math.sqrt(2))
    skew = k3y / max(area if area is not None else m, 1e-9) ** 1.5
    axis_ratio = (k4x + k4y) / k4d if k4d < 0 else (2.0 if k4x + k4y < 0 else 1.0)
    return skew, axis_ratio


def classify_shape(mask: np.ndarray, soft: np.ndarray | None = None, thresholds: Thresholds | None = None) -> tuple[str | None, float]:
    """Shape of a blob: (shape or None, IoU of its mask with that shape's template).

    ``mask``: the blob cropped to its bounding box; ``soft``: its colour's intensity in [0, 1] around
    it (any window centred on the same pixels is fine; default: the mask). A blob is a shape only when
    it is compact (aspect ratio) and some template fits it (IoU >= ``min_iou``); which shape is decided
    by the soft moments (triangle: skewed downwards; square vs circle: fourth-cumulant axis ratio)."""
    th = thresholds or Thresholds()
    h, w = mask.shape
    if max(h, w) > th.max_aspect * min(h, w):
        return None, 0.0
    ious = template_ious(mask)
    if max(ious.values()) < th.min_iou:
        return None, float(max(ious.values()))
    skew, ratio = shape_moments(mask.astype(np.float64) if soft is None else soft, float(np.count_nonzero(mask)))
    shape = "triangle" if skew < th.triangle_skew else ("square" if ratio > th.square_ratio else "circle")
    return shape, ious[shape]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1) x (2r+1) square."""
    out = mask.copy()
    for _ in range(r):
        rows = out.copy()
        rows[1:] |= out[:-1]
        rows[:-1] |= out[1:]
        out = rows.copy()
        out[:, 1:] |= rows[:, :-1]
        out[:, :-1] |= rows[:, 1:]
    return out


def _color_maps(image: Any, th: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(labels H,W: palette index, len(COLORS) for foreground of no palette colour, -1 background;
    alphas H,W,K: each palette colour's intensity in [0, 1] along its direction)."""
    img = _as_hwc_float(image)
    v = img - _BG
    norm = np.linalg.norm(v, axis=-1)
    proj = v @ _PALETTE_UNIT.T  # H, W, K
    k = np.argmax(proj, axis=-1)
    best = np.take_along_axis(proj, k[..., None], axis=-1)[..., 0]
    alpha = best / _PALETTE_LEN[k]
    fg = (norm > th.min_norm) & (alpha >= th.fg_alpha)
    cos = best / np.maximum(norm, 1e-6)
    labels = np.where(cos >= math.cos(math.radians(th.max_angle_deg)), k, len(_PALETTE_NAMES))
    return np.where(fg, labels, -1), np.clip(proj / _PALETTE_LEN, 0.0, 1.0)


def color_labels(image: Any, thresholds: Thresholds | None = None) -> np.ndarray:
    """Per pixel: index into ``COLORS`` (in order), ``len(COLORS)`` for a foreground pixel of no palette
    colour, or -1 for background."""
    return _color_maps(image, thresholds or Thresholds())[0]


def detect_objects(image: Any, thresholds: Thresholds | Mapping[str, Any] | None = None) -> list[Detection]:
    """Objects in an image (uint8 ``H, W, 3`` or float ``3, H, W`` in [0, 1]), largest first."""
    th = Thresholds.from_options(thresholds)
    labels, alphas = _color_maps(image, th)
    h, w = labels.shape
    roots = _components(labels, th.connectivity).reshape(-1)
    fg = np.flatnonzero(roots >= 0)
    if fg.size == 0:
        return []
    comp_ids, inverse, areas = np.unique(roots[fg], return_inverse=True, return_counts=True)
    min_area = max(th.min_area_px, th.min_area_frac * h * w)
    ys, xs = np.divmod(fg, w)
    n = comp_ids.size
    x0 = np.full(n, w)
    y0 = np.full(n, h)
    x1 = np.full(n, -1)
    y1 = np.full(n, -1)
    np.minimum.at(x0, inverse, xs)
    np.minimum.at(y0, inverse, ys)
    np.maximum.at(x1, inverse, xs)
    np.maximum.at(y1, inverse, ys)
    sx = np.bincount(inverse, weights=xs + 0.5, minlength=n)
    sy = np.bincount(inverse, weights=ys + 0.5, minlength=n)
    flat_labels = labels.reshape(-1)
    roots2d = roots.reshape(h, w)
    r = max(int(round(th.soft_margin * min(h, w))), 1)
    out = []
    for i in np.flatnonzero(areas >= min_area):
        root = comp_ids[i]
        lab = int(flat_labels[root])
        color = _PALETTE_NAMES[lab] if lab < len(_PALETTE_NAMES) else None
        # a window around the blob: its colour's soft intensity within r pixels of it, other blobs out
        wy0, wy1, wx0, wx1 = max(y0[i] - r, 0), min(y1[i] + 1 + r, h), max(x0[i] - r, 0), min(x1[i] + 1 + r, w)
        win_roots = roots2d[wy0:wy1, wx0:wx1]
        own = win_roots == root
        if color is not None:
            soft = alphas[wy0:wy1, wx0:wx1, lab]
        else:
            soft = own.astype(np.float64)
        keep = _dilate(own, r) & ((win_roots < 0) | own)
        soft = np.where(keep & (soft >= th.soft_floor), soft, 0.0)
        crop = own[y0[i] - wy0 : y1[i] + 1 - wy0, x0[i] - wx0 : x1[i] + 1 - wx0]
        shape, match = classify_shape(crop, soft, th)
        out.append(
            Detection(shape, color, int(areas[i]), float(sx[i] / areas[i]), float(sy[i] / areas[i]), (int(x0[i]), int(y0[i]), int(x1[i]) + 1, int(y1[i]) + 1), match)
        )
    out.sort(key=lambda d: (-d.area, d.cy, d.cx))
    return out


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class ShapeEvalResult:
    clauses: list[tuple[str, bool]]
    score: float  # fraction of clauses passed
    strict: bool  # all clauses passed
    category: str
    detections: list[Detection] = field(default_factory=list)
    requirements: Requirements | None = None


def _matches(d: Detection, g: Group) -> bool:
    return d.shape == g.shape and (g.color is None or d.color == g.color)


def check(requirements: Requirements, detections: list[Detection], thresholds: Thresholds | Mapping[str, Any] | None = None) -> list[tuple[str, bool]]:
    """Per-clause verdicts of detections against requirements."""
    th = Thresholds.from_options(thresholds)
    clauses = []
    found = [[d for d in detections if _matches(d, g)] for g in requirements.groups]
    for g, ds in zip(requirements.groups, found):
        clauses.append((g.describe(), len(ds) == g.count))
    for r in requirements.relations:
        a, b = found[r.a], found[r.b]
        ok = bool(a and b) and relation_holds(r.rel, a[0].bbox, b[0].bbox, th.position_threshold)  # the largest of each
        clauses.append((f"{requirements.groups[r.a].noun()} {r.rel} {requirements.groups[r.b].noun()}", ok))
    return clauses


def evaluate(image: Any, prompt: str | Requirements, thresholds: Thresholds | Mapping[str, Any] | None = None) -> ShapeEvalResult:
    """Check an image against a prompt (``ValueError`` for prompts outside the grammar)."""
    th = Thresholds.from_options(thresholds)
    req = prompt if isinstance(prompt, Requirements) else parse_prompt(prompt)
    dets = detect_objects(image, th)
    clauses = check(req, dets, th)
    passed = sum(ok for _, ok in clauses)
    return ShapeEvalResult(clauses, passed / len(clauses), passed == len(clauses), req.category, dets, req)


# ---------------------------------------------------------------------------------------------- reward
def mark_unparseable_prompts(out: RewardOutput, prompts: Any, parse_error: Callable[[str], str | None]) -> None:
    """Make the items of ``out`` whose prompt a verifier cannot parse invalid, with the parse error as
    their reason (instead of a score computed against nothing). Items already invalid for another reason
    keep it. Shared by the embedded verifiers (ShapeEval, MotionEval, ToneEval)."""
    if prompts is None:
        return
    texts = [prompts] * len(out) if isinstance(prompts, str) else list(prompts)
    for i, text in enumerate(texts):
        if out.reasons[i] is None or out.reasons[i].endswith("non-finite score"):
            err = parse_error(text) if text.strip() else None
            if err:
                out.reasons[i] = err
                out.valid[i] = False
                out.scores[i] = math.nan


class VerifierReward(Reward):
    """Base of the embedded worlds' rule-based verifiers as rewards (ShapeEval, MotionEval, ToneEval):
    ``parse`` reads a caption (ValueError outside the grammar) and ``on_unparseable`` says what a
    caption outside the grammar gets: "invalid" marks the item invalid with the parse error as its
    reason (never a silent 0), "zero" scores it 0 (an explicit opt-in, for mixed suites), "raise"
    raises."""

    differentiable = False
    higher_is_better = True
    score_range = (0.0, 1.0)
    needs = frozenset({"prompt"})

    @staticmethod
    def parse(prompt: str) -> Any:
        raise NotImplementedError

    @staticmethod
    def check_on_unparseable(value: str) -> str:
        if value not in ("zero", "invalid", "raise"):
            raise ValueError(f"on_unparseable must be 'zero', 'invalid' or 'raise', got {value!r}")
        return value

    @classmethod
    def parse_error(cls, prompt: str) -> str | None:
        """The parse error of ``prompt`` (None when the verifier understands it)."""
        try:
            cls.parse(prompt)
        except ValueError as err:
            return str(err)
        return None

    def forward(self, samples: Any, prompts: Any = None, **kwargs: Any) -> RewardOutput:
        out = super().forward(samples, prompts, **kwargs)
        if self.on_unparseable == "invalid":
            mark_unparseable_prompts(out, prompts, self.parse_error)
        return out


class ShapeEvalReward(VerifierReward):
    """ShapeEval as a reward: score = fraction of the prompt's clauses that the image satisfies.

    Components: ``strict`` (1.0 when every clause passes) and ``num_clauses``. Prompts outside the
    grammar (``on_unparseable``): "invalid" (default) marks them invalid with the parse error as reason
    (never a silent 0); "zero" scores them 0 with ``num_clauses`` 0 (an explicit opt-in, for mixed
    suites); "raise" raises it."""

    name = "shapeeval"
    modality = "image"

    def __init__(self, *, batch_size: int = 64, thresholds: Thresholds | Mapping[str, Any] | None = None, on_unparseable: str = "invalid") -> None:
        self.thresholds = Thresholds.from_options(thresholds)
        self.on_unparseable = self.check_on_unparseable(on_unparseable)
        super().__init__(
            batch_size=batch_size,
            weights_id=None,
            preprocessing={"input": "float B,3,H,W in [0,1] (any H, W; one size per batch)", "background": BACKGROUND, "thresholds": asdict(self.thresholds), "on_unparseable": on_unparseable},
        )

    parse = staticmethod(parse_prompt)

    def score(self, samples: Tensor, prompts, references, metadata, **media_info) -> ScoreBatch:
        images = samples.detach().float().cpu().numpy()
        scores, strict, nclauses = [], [], []
        for img, prompt in zip(images, prompts):
            try:
                req = parse_prompt(prompt)
            except ValueError:
                if self.on_unparseable == "raise":
                    raise
                fill = 0.0 if self.on_unparseable == "zero" else math.nan
                scores.append(fill)
                strict.append(fill)
                nclauses.append(0.0)
                continue
            res = evaluate(img, req, self.thresholds)
            scores.append(res.score)
            strict.append(float(res.strict))
            nclauses.append(float(len(res.clauses)))
        as_t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        return ScoreBatch(as_t(scores), {"strict": as_t(strict), "num_clauses": as_t(nclauses)})


def load_shapeeval(**options: Any) -> ShapeEvalReward:
    """The ``shapeeval`` reward. Options: ``batch_size``, ``thresholds`` (dict of :class:`Thresholds`
    fields), ``on_unparseable`` ("zero" | "invalid" | "raise")."""
    return ShapeEvalReward(**options)


def tiny_shapeeval(seed: int = 0, **options: Any) -> ShapeEvalReward:
    """Same reward as :func:`load_shapeeval` (it has no weights; ``seed`` is accepted and unused)."""
    del seed
    return load_shapeeval(**options)


def _main(argv: list[str] | None = None) -> None:  # python -m mmalign.embedded.shapeeval IMAGE PROMPT
    p = argparse.ArgumentParser(description="Check an image file against a ShapeWorld prompt.")
    p.add_argument("image")
    p.add_argument("prompt")
    args = p.parse_args(argv)
    from PIL import Image

    res = evaluate(np.asarray(Image.open(args.image).convert("RGB")), args.prompt)
    for desc, ok in res.clauses:
        print(f"[{'x' if ok else ' '}] {desc}")
    print(f"score {res.score:.3f}  strict {res.strict}  category {res.category}")
    for d in res.detections:
        print(f"  {d}")


if __name__ == "__main__":
    _main()

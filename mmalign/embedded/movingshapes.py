"""MovingShapes: short ShapeWorld clips (objects that move, bounce, appear, disappear or change colour)
with captions, the video half of the embedded world.

The world
---------
Frames are ShapeWorld scenes (:mod:`mmalign.embedded.shapeworld`: its shapes, colours, sizes, black
background and renderer), ``FRAMES`` = 9 frames of 32 x 32 by default (Wan's ``4k + 1`` frame rule).
Every object keeps its box corners on the pixel grid in every frame (crisp shapes, exact centroids).
One clip holds one *actor* (or two for ``two_moving``); an actor is a coloured shape doing one action:

============== ================================================ =========================================
category       caption                                          clip
============== ================================================ =========================================
still          "a red circle standing still"                    the object never moves
motion         "a blue square moving left" (right, up, down)    constant speed 1-2 px/frame, 8-16 px in all
bounce         "a green triangle bouncing"                      moves towards a border, touches it at
                                                                frame 3-5 and comes back (either axis)
appear         "a yellow square appearing"                      absent for 2-6 frames, then present
disappear      "a white circle disappearing"                    present for 3-6 frames, then gone
color_change   "a red square turning green"                     in place; the colour switches once
two_moving     "a red circle moving left and a blue square      two small objects of different colour
               moving up"                                       and shape, each moving; boxes never touch
============== ================================================ =========================================

Captions always name the colour (the verifier also accepts prompts without one: any colour).

Prompt suites
-------------
``assets/prompts/movingshapes_{train,heldout}.txt`` hold ``category<TAB>prompt`` lines from
:func:`build_prompt_suites` (rewrite with ``python -m mmalign.embedded.verify_motioneval --write-suites``).
Every held-out prompt contains a held-out composition and no train prompt contains one:

- a colour-shape pair of ShapeWorld's ``HELDOUT_COMBOS`` (purple triangle, yellow circle, green square),
  also as the start or end colour of a colour change;
- a shape-direction pair of ``HELDOUT_MOVES`` (a triangle moving up, a square moving left);
- a colour transition of ``HELDOUT_TURNS`` (red to blue, yellow to white, green to purple).

``exclude_heldout=True`` keeps them out of training clips too (:func:`sample_clip`, :func:`generate`).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .shapeworld import COLORS, GAP, HELDOUT_COMBOS, SHAPES, SIZES, Obj, Scene, assets_dir, load_prompt_suite, render

FRAMES = 9  # frames per clip (4k + 1, Wan's rule)
SIZE = 32  # frame side in pixels
CATEGORIES: tuple[str, ...] = ("still", "motion", "bounce", "appear", "disappear", "color_change", "two_moving")
ACTIONS: tuple[str, ...] = ("still", "move", "bounce", "appear", "disappear", "turn")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEED_RANGE = (1.0, 2.0)  # px per frame at 32 px (motion)
BOUNCE_SPEED_RANGE = (1.5, 2.25)  # px per frame at 32 px (bounce)

HELDOUT_MOVES: frozenset[tuple[str, str]] = frozenset({("triangle", "up"), ("square", "left")})
HELDOUT_TURNS: frozenset[tuple[str, str]] = frozenset({("red", "blue"), ("yellow", "white"), ("green", "purple")})


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Actor:
    """One object and what it does. ``color`` None: any colour (only in parsed prompts).

    action: "still" | "move" (``direction`` in DIRECTIONS) | "bounce" | "appear" | "disappear" |
    "turn" (from ``color`` to ``to_color``)."""

    shape: str
    color: str | None
    action: str
    direction: str | None = None
    to_color: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes are {SHAPES}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; colours are {tuple(COLORS)}")
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; actions are {ACTIONS}")
        if (self.action == "move") != (self.direction is not None):
            raise ValueError("a direction is given exactly for the 'move' action")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; directions are {tuple(DIRECTIONS)}")
        if self.action == "turn":
            if self.color is None or self.to_color is None or self.to_color not in COLORS or self.to_color == self.color:
                raise ValueError("'turn' needs two different named colours (from color to to_color)")
        elif self.to_color is not None:
            raise ValueError("to_color is only for the 'turn' action")

    def noun(self) -> str:
        return (f"{self.color} " if self.color else "") + self.shape

    def verb(self) -> str:
        return {
            "still": "standing still",
            "move": f"moving {self.direction}",
            "bounce": "bouncing",
            "appear": "appearing",
            "disappear": "disappearing",
            "turn": f"turning {self.to_color}",
        }[self.action]

    def phrase(self) -> str:
        return f"a {self.noun()} {self.verb()}"


@dataclass(frozen=True)
class Script:
    """What a caption asks for: one or two actors."""

    actors: tuple[Actor, ...]

    @property
    def category(self) -> str:
        if len(self.actors) == 2 and all(a.action == "move" for a in self.actors):
            return "two_moving"
        if len(self.actors) == 1:
            return {"still": "still", "move": "motion", "bounce": "bounce", "appear": "appear", "disappear": "disappear", "turn": "color_change"}[self.actors[0].action]
        return "compound"

    def prompt(self) -> str:
        """The canonical caption (what :func:`sample_clip` writes and MotionEval parses back)."""
        return " and ".join(a.phrase() for a in self.actors)


def is_heldout(script: Script) -> bool:
    """Whether a script uses a held-out composition (see the module docstring)."""
    for a in script.actors:
        colors = [c for c in (a.color, a.to_color) if c]
        if any((c, a.shape) in HELDOUT_COMBOS for c in colors):
            return True
        if a.action == "move" and (a.shape, a.direction) in HELDOUT_MOVES:
            return True
        if a.action == "turn" and (a.color, a.to_color) in HELDOUT_TURNS:
            return True
    return False


# ---------------------------------------------------------------------------------------------- clips
@dataclass(frozen=True)
class Track:
    """Where an actor is in every frame: centres ``xs, ys`` (pixels), colour per frame, visibility."""

    shape: str
    size: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    colors: tuple[str, ...]
    visible: tuple[bool, ...]

    def boxes(self, width: int, height: int) -> list[tuple[float, float, float, float]]:
        h = SIZES[self.size] * min(width, height) / 2
        return [(x - h, y - h, x + h, y + h) for x, y in zip(self.xs, self.ys)]


@dataclass
class Clip:
    video: np.ndarray  # uint8 T, H, W, 3
    caption: str
    category: str
    script: Script
    tracks: tuple[Track, ...]


def render_clip(tracks: Sequence[Track], num_frames: int, size: int = SIZE, supersample: int = 1) -> np.ndarray:
    """uint8 ``T, H, W, 3``: frame t draws every visible track at its frame-t place and colour."""
    frames = []
    for t in range(num_frames):
        objs = tuple(Obj(tr.shape, tr.colors[t], tr.size, tr.xs[t], tr.ys[t]) for tr in tracks if tr.visible[t])
        frames.append(render(Scene(objs, size, size), supersample))
    return np.stack(frames)


def _bounds(size: int, side: float) -> tuple[float, float]:
    """Lowest and highest centre coordinate with the box (corners on the grid) inside the border gap."""
    lo = GAP * size + side / 2
    return float(np.ceil(lo - side / 2) + side / 2), float(np.floor(size - lo - side / 2) + side / 2)


def _grid(v: float, side: float) -> float:
    """Snap a centre so the box corners fall on the pixel grid."""
    return float(np.round(v - side / 2) + side / 2)


def _actor_track(rng: np.random.Generator, actor: Actor, size_name: str, size: int, frames: int) -> Track:
    side = SIZES[size_name] * size
    lo, hi = _bounds(size, side)
    scale = size / 32
    T = frames
    x0, y0 = (_grid(v, side) for v in rng.uniform(lo, hi, size=2))
    xs, ys = [x0] * T, [y0] * T
    colors = [actor.color] * T
    visible = [True] * T
    if actor.action == "move":
        dx, dy = DIRECTIONS[actor.direction]
        v = rng.uniform(*SPEED_RANGE) * scale
        travel = v * (T - 1)
        if travel > hi - lo:
            v = (hi - lo) / (T - 1)
            travel = hi - lo
        start = rng.uniform(lo, hi - travel) if (dx + dy) > 0 else rng.uniform(lo + travel, hi)
        path = [_grid(start + (dx + dy) * v * t, side) for t in range(T)]
        path = [min(max(p, lo), hi) for p in path]
        if dx:
            xs = path
        else:
            ys = path
    elif actor.action == "bounce":
        v = rng.uniform(*BOUNCE_SPEED_RANGE) * scale
        k = int(rng.integers(3, 6)) if T >= 7 else max((T - 1) // 2, 1)
        horizontal = bool(rng.integers(2))
        to_high = bool(rng.integers(2))
        wall = hi if to_high else lo
        sign = -1 if to_high else 1
        reach = v * max(k, T - 1 - k)
        if reach > hi - lo:
            v = (hi - lo) / max(k, T - 1 - k)
        path = [_grid(wall + sign * v * abs(t - k), side) for t in range(T)]
        path = [min(max(p, lo), hi) for p in path]
        if horizontal:
            xs = path
        else:
            ys = path
    elif actor.action == "appear":
        k = int(rng.integers(2, T - 2)) if T >= 5 else 1
        visible = [t >= k for t in range(T)]
    elif actor.action == "disappear":
        k = int(rng.integers(3, T - 1)) if T >= 5 else T - 1
        visible = [t < k for t in range(T)]
    elif actor.action == "turn":
        k = int(rng.integers(3, T - 2)) if T >= 6 else max(T // 2, 1)
        colors = [actor.color if t < k else actor.to_color for t in range(T)]
    return Track(actor.shape, size_name, tuple(xs), tuple(ys), tuple(colors), tuple(visible))


def _apart(a: Track, b: Track, size: int) -> bool:
    gap = GAP * size
    for ba, bb in zip(a.boxes(size, size), b.boxes(size, size)):
        if not (ba[2] + gap <= bb[0] or bb[2] + gap <= ba[0] or ba[3] + gap <= bb[1] or bb[3] + gap <= ba[1]):
            return False
    return True


def _sample_script(rng: np.random.Generator, category: str) -> Script:
    colors, shapes = list(COLORS), list(SHAPES)

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    if category == "two_moving":
        s1, s2 = (shapes[i] for i in rng.permutation(len(shapes))[:2])
        c1, c2 = (colors[i] for i in rng.permutation(len(colors))[:2])
        d1, d2 = pick(list(DIRECTIONS)), pick(list(DIRECTIONS))
        return Script((Actor(s1, c1, "move", d1), Actor(s2, c2, "move", d2)))
    action = {"still": "still", "motion": "move", "bounce": "bounce", "appear": "appear", "disappear": "disappear", "color_change": "turn"}.get(category)
    if action is None:
        raise ValueError(f"unknown MovingShapes category {category!r}; categories are {CATEGORIES}")
    s, c = pick(shapes), pick(colors)
    if action == "move":
        return Script((Actor(s, c, "move", pick(list(DIRECTIONS))),))
    if action == "turn":
        return Script((Actor(s, c, "turn", to_color=pick([x for x in colors if x != c])),))
    return Script((Actor(s, c, action),))


def clip_for_script(rng: np.random.Generator, script: Script, size: int = SIZE, frames: int = FRAMES, supersample: int = 1, tries: int = 200) -> Clip:
    """A random clip acting out ``script`` (colours must be named)."""
    if any(a.color is None for a in script.actors):
        raise ValueError("clip_for_script needs every actor's colour named")
    for _ in range(tries):
        n = len(script.actors)
        sizes = ["small"] * n if n > 1 else [("small", "large")[int(rng.integers(2))]]
        tracks = tuple(_actor_track(rng, a, sz, size, frames) for a, sz in zip(script.actors, sizes))
        if all(_apart(a, b, size) for a, b in itertools.combinations(tracks, 2)):
            return Clip(render_clip(tracks, frames, size, supersample), script.prompt(), script.category, script, tracks)
    raise RuntimeError(f"could not place {script.prompt()!r} in {size}x{size}")  # pragma: no cover


def sample_clip(rng: np.random.Generator, category: str, size: int = SIZE, frames: int = FRAMES, *, exclude_heldout: bool = False, supersample: int = 1) -> Clip:
    """A random clip of ``category`` (``frames`` frames of ``size`` x ``size``) with its caption."""
    if size < 16:
        raise ValueError(f"MovingShapes frames need size >= 16, got {size}")
    if frames < 5:
        raise ValueError(f"MovingShapes clips need at least 5 frames, got {frames}")
    for _ in range(1000):
        script = _sample_script(rng, category)
        if exclude_heldout and is_heldout(script):
            continue
        return clip_for_script(rng, script, size, frames, supersample)
    raise RuntimeError(f"could not sample a {category} clip")  # pragma: no cover


def _check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    cats = tuple(categories) if categories else CATEGORIES
    bad = [c for c in cats if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; MovingShapes categories are {CATEGORIES}")
    return cats


def clip_at(index: int, seed: int, size: int = SIZE, frames: int = FRAMES, categories: Sequence[str] | None = None, *, exclude_heldout: bool = False) -> Clip:
    """Clip number ``index`` of the stream ``seed`` (categories cycle; generator ``default_rng([seed, index, 77])``)."""
    cats = _check_categories(categories)
    rng = np.random.default_rng([int(seed), int(index), 77])
    return sample_clip(rng, cats[index % len(cats)], size, frames, exclude_heldout=exclude_heldout)


def to_tensor(videos: np.ndarray) -> torch.Tensor:
    """uint8 ``(N,) T, H, W, 3`` -> float ``(N,) T, 3, H, W`` in [0, 1] (the rewards API's video layout)."""
    t = torch.from_numpy(np.ascontiguousarray(videos)).float().div_(255)
    return t.movedim(-1, -3).contiguous()


def generate(n: int, seed: int, size: int = SIZE, frames: int = FRAMES, categories: Sequence[str] | None = None, *, exclude_heldout: bool = False) -> tuple[torch.Tensor, list[str], list[str]]:
    """``n`` clips of the stream ``seed``: (videos float ``N, T, 3, H, W`` in [0, 1], captions, categories)."""
    clips = [clip_at(i, seed, size, frames, categories, exclude_heldout=exclude_heldout) for i in range(n)]
    videos = to_tensor(np.stack([c.video for c in clips])) if clips else torch.zeros(0, frames, 3, size, size)
    return videos, [c.caption for c in clips], [c.category for c in clips]


# ---------------------------------------------------------------------------------------------- prompt suites
SUITE_SPLITS = ("train", "heldout")
# per category: how many prompts of the pool each suite takes (None: all)
SUITE_SIZES = {
    "train": {"still": None, "motion": None, "bounce": None, "appear": None, "disappear": None, "color_change": None, "two_moving": 160},
    "heldout": {"still": None, "motion": None, "bounce": None, "appear": None, "disappear": None, "color_change": 24, "two_moving": 32},
}


def all_scripts(category: str) -> list[Script]:
    """Every caption of a category the grammar produces (colours always named)."""
    combos = [(c, s) for s in SHAPES for c in COLORS]
    simple = {"still": "still", "bounce": "bounce", "appear": "appear", "disappear": "disappear"}
    if category in simple:
        return [Script((Actor(s, c, simple[category]),)) for c, s in combos]
    if category == "motion":
        return [Script((Actor(s, c, "move", d),)) for c, s in combos for d in DIRECTIONS]
    if category == "color_change":
        return [Script((Actor(s, c, "turn", to_color=c2),)) for c, s in combos for c2 in COLORS if c2 != c]
    if category == "two_moving":
        out = []
        for (c1, s1), (c2, s2) in itertools.permutations(combos, 2):
            if c1 != c2 and s1 != s2:
                out += [Script((Actor(s1, c1, "move", d1), Actor(s2, c2, "move", d2))) for d1 in DIRECTIONS for d2 in DIRECTIONS]
        return out
    raise ValueError(f"unknown MovingShapes category {category!r}; categories are {CATEGORIES}")


def build_prompt_suites(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """{split: [(category, prompt)]}, disjoint by construction (held-out prompts hold a held-out composition)."""
    rng = np.random.default_rng([seed, 5])
    suites: dict[str, list[tuple[str, str]]] = {s: [] for s in SUITE_SPLITS}
    for cat in CATEGORIES:
        scripts = all_scripts(cat)
        pools = {"train": [s for s in scripts if not is_heldout(s)], "heldout": [s for s in scripts if is_heldout(s)]}
        for split in SUITE_SPLITS:
            pool, want = pools[split], SUITE_SIZES[split][cat]
            if want is not None and want < len(pool):
                pool = [pool[i] for i in sorted(rng.choice(len(pool), size=want, replace=False))]
            suites[split] += [(cat, s.prompt()) for s in pool]
    return suites


def prompt_suite_path(split: str) -> Path:
    """Path of a MovingShapes prompt suite (``$MMALIGN_ASSETS`` overrides the repository's assets/)."""
    if split not in SUITE_SPLITS:
        raise ValueError(f"unknown prompt suite {split!r}; choose one of {SUITE_SPLITS}")
    path = assets_dir() / "prompts" / f"movingshapes_{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set MMALIGN_ASSETS to the folder holding prompts/movingshapes_{split}.txt")
    return path


def prompt_suite(split: str) -> list[tuple[str, str]]:
    """(category, prompt) rows of a suite: the shipped file, or built in code when it is missing."""
    try:
        return load_prompt_suite(prompt_suite_path(split))
    except FileNotFoundError:
        return build_prompt_suites()[split]


def write_prompt_suites(directory: str | os.PathLike | None = None, seed: int = 0) -> dict[str, Path]:
    """Write :func:`build_prompt_suites` to ``directory`` (default ``assets/prompts``)."""
    directory = Path(directory) if directory is not None else assets_dir() / "prompts"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in build_prompt_suites(seed).items():
        path = directory / f"movingshapes_{split}.txt"
        path.write_text("".join(f"{c}\t{p}\n" for c, p in rows), encoding="utf-8")
        paths[split] = path
    return paths


def write_media_dataset(out: str | os.PathLike, n: int, seed: int = 0, fmt: str = "gif") -> Path:
    """Render ``n`` training-split clips (no held-out composition) of the stream ``seed`` to ``out`` as
    GIF (or MP4) files with ``dataset.jsonl`` lines ``{"prompt", "video", "category"}``: the source
    media of partial-chain GRPO (``grpo.partial_chain_dataset``) or any video dataset reader. Returns
    the JSONL path."""
    import json

    from ..media import save_video_gif, save_video_mp4

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if fmt not in ("gif", "mp4"):
        raise ValueError(f"fmt must be 'gif' or 'mp4', got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    videos, captions, categories = generate(n, seed, exclude_heldout=True)
    save = save_video_gif if fmt == "gif" else save_video_mp4
    lines = []
    for i, (video, caption, category) in enumerate(zip(videos, captions, categories)):
        name = f"clip_{i:05d}.{fmt}"
        save(video, out / name, fps=8.0)
        lines.append(json.dumps({"prompt": caption, "video": name, "category": category}))
    path = out / "dataset.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="MovingShapes data: write a media dataset of rendered training clips")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dataset", help="render clips + dataset.jsonl (prompt, video, category)")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--format", choices=["gif", "mp4"], default="gif")
    args = p.parse_args(argv)
    path = write_media_dataset(args.out, args.n, args.seed, args.format)
    print(f"wrote {args.n} clips and {path}")
    return 0


__all__ = [
    "ACTIONS",
    "CATEGORIES",
    "DIRECTIONS",
    "FRAMES",
    "HELDOUT_MOVES",
    "HELDOUT_TURNS",
    "SIZE",
    "Actor",
    "Clip",
    "Script",
    "Track",
    "all_scripts",
    "build_prompt_suites",
    "clip_at",
    "clip_for_script",
    "generate",
    "is_heldout",
    "prompt_suite",
    "prompt_suite_path",
    "render_clip",
    "sample_clip",
    "to_tensor",
    "write_media_dataset",
    "write_prompt_suites",
]


if __name__ == "__main__":
    raise SystemExit(main())

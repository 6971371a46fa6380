"""ShapeWorld: a procedural world of small RGB images of simple shapes with compositional captions.

The world
---------
* ``SHAPES``: circle, square, triangle (isoceles, apex up, as wide as it is tall). Every shape fills a
  square bounding box of side ``SIZES[size] * min(width, height)`` so that the shape, not its extent,
  tells them apart.
* ``COLORS``: six saturated colours, name -> RGB, chosen for well separated *hues* (each pair of colour
  directions seen from the background is at least ~28 degrees apart), so that a colour is recognised
  from its direction even where it fades into the background at a blurry edge.
* ``SIZES``: small (1/4 of the image side) and large (3/8). Size is nuisance variation: captions never
  mention it and ShapeEval does not check it.
* ``BACKGROUND``: plain black ``(0, 0, 0)``.
* Rendering is pure numpy with anti-aliasing off by default (a pixel is filled when its centre lies in
  the shape); ``render(scene, supersample=k)`` gives mild anti-aliasing. Objects never overlap: bounding
  boxes keep a gap of ``1/16`` of the image side between each other and from the border.

Captions (the grammar ShapeEval parses; categories follow GenEval):

=============== ======================================================== ==========================
category        caption                                                  scene
=============== ======================================================== ==========================
single_object   "a circle"                                               one object, any colour
two_objects     "a triangle and a square", "a red circle and a square"   two different shapes; at
                                                                         most one colour named
counting        "three triangles", "two blue squares"                    2-4 objects of one shape
colors          "a yellow triangle"                                      one object
position        "a red circle left of a green square" (also right of,    two objects, clearly
                above, below)                                            displaced along that axis
color_attr      "a yellow square and a purple circle"                    two shapes, two colours
=============== ======================================================== ==========================

Counting captions name a colour half of the time; when they do not, the objects' colours vary. Scenes of
three or more objects use small objects only. Position pairs may share a shape ("a red circle above a
blue circle"); a relation holds by GenEval's rule (:func:`relation_holds`), and sampled scenes place the
pair within ~27 degrees of the relation's axis.

Prompt suites
-------------
``assets/prompts/shapeworld_{train,heldout}.txt`` hold ``category<TAB>prompt`` lines, built by
:func:`build_prompt_suites` (rewrite them with ``python -m mmalign.embedded.verify_shapeeval --write-suites``);
:func:`load_prompt_suite` reads one, :func:`prompt_suite_path` finds it (``$MMALIGN_ASSETS`` overrides the
repository's ``assets/``). Held-out prompts are compositions never seen in train: every held-out prompt
contains a held-out colour-shape pair (``HELDOUT_COMBOS``), a held-out count-shape pair
(``HELDOUT_COUNTS``) or a held-out spatial relation between two shapes (``HELDOUT_RELATIONS``, with its
converse), and no train prompt contains any of them. Train: 422 prompts (single_object 3, the whole
category; two_objects 66; counting 42; colors 15; position 170; color_attr 126); held-out: 116
(two_objects 12, counting 21, colors 3, position 40, color_attr 40; single_object has nothing to hold
out). Small categories are small because the grammar is: sample by category to balance them. ``exclude_heldout=True`` in :func:`sample_example`,
:func:`generate` and :class:`ShapeWorldDataset` keeps those compositions out of training images too.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------- world
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 30),
    "purple": (170, 40, 220),
    "white": (240, 240, 240),
}
SIZES: dict[str, float] = {"small": 0.25, "large": 0.375}  # side of the bounding box / image side
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
MAX_COUNT = 4  # counting scenes hold 2..MAX_COUNT objects
GAP = 1.0 / 16  # gap between bounding boxes and to the border, as a fraction of the image side

# compositions kept out of the train prompt suite (see the module docstring)
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("yellow", "circle"), ("green", "square")})
HELDOUT_COUNTS: frozenset[tuple[int, str]] = frozenset({(3, "triangle"), (4, "square")})
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset({("triangle", "left of", "circle"), ("square", "above", "triangle")})


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Group:
    """``count`` objects of ``shape``, of ``color`` (None: any colour). Counts are exact."""

    shape: str
    color: str | None
    count: int = 1

    def noun(self) -> str:
        return (f"{self.color} " if self.color else "") + plural(self.shape, self.count)

    def phrase(self) -> str:
        if self.count == 1:
            return f"a {self.noun()}"
        return f"{NUMBER_WORDS.get(self.count, str(self.count))} {self.noun()}"

    def describe(self) -> str:
        what = plural(self.shape, self.count) if self.color else plural(self.shape, self.count) + " (any colour)"
        return f"exactly {self.count} {(self.color + ' ') if self.color else ''}{what}"


@dataclass(frozen=True)
class Relation:
    """``groups[a]`` is ``rel`` ``groups[b]`` (rel in RELATIONS)."""

    a: int
    rel: str
    b: int


@dataclass(frozen=True)
class Requirements:
    """What a prompt asks for: object groups (exact counts) and spatial relations between groups."""

    groups: tuple[Group, ...]
    relations: tuple[Relation, ...] = ()

    @property
    def category(self) -> str:
        if self.relations:
            return "position"
        if len(self.groups) == 1:
            g = self.groups[0]
            return "counting" if g.count > 1 else ("colors" if g.color else "single_object")
        if len(self.groups) == 2 and all(g.count == 1 for g in self.groups):
            return "color_attr" if all(g.color for g in self.groups) else "two_objects"
        return "compound"

    def prompt(self) -> str:
        """The canonical caption (what :func:`sample_example` writes and ShapeEval parses back)."""
        if self.relations:
            (r,) = self.relations
            return f"{self.groups[r.a].phrase()} {r.rel} {self.groups[r.b].phrase()}"
        return " and ".join(g.phrase() for g in self.groups)

    def clauses(self) -> list[str]:
        out = [g.describe() for g in self.groups]
        for r in self.relations:
            out.append(f"{self.groups[r.a].noun()} {r.rel} {self.groups[r.b].noun()}")
        return out


def is_heldout(req: Requirements) -> bool:
    """Whether the prompt uses a held-out composition (such prompts are only in the held-out suite)."""
    for g in req.groups:
        if g.color and (g.color, g.shape) in HELDOUT_COMBOS:
            return True
        if g.count > 1 and (g.count, g.shape) in HELDOUT_COUNTS:
            return True
    for r in req.relations:
        a, b = req.groups[r.a].shape, req.groups[r.b].shape
        if (a, r.rel, b) in HELDOUT_RELATIONS or (b, CONVERSE[r.rel], a) in HELDOUT_RELATIONS:
            return True
    return False


# ---------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Obj:
    """One object: centre ``(cx, cy)`` in pixels (x right, y down); ``size`` a key of SIZES."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float

    def side(self, width: int, height: int) -> float:
        return SIZES[self.size] * min(width, height)

    def bbox(self, width: int, height: int) -> tuple[float, float, float, float]:
        h = self.side(width, height) / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    width: int = 32
    height: int = 32


def shape_mask(shape: str, x0: float, y0: float, x1: float, y1: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which of the points (xs, ys) (broadcastable) lie in ``shape`` fitted to the box [x0,x1] x [y0,y1]."""
    if shape == "square":
        return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
    if shape == "circle":
        return ((xs - cx) / hw) ** 2 + ((ys - cy) / hh) ** 2 <= 1.0
    if shape == "triangle":  # apex (cx, y0), base from (x0, y1) to (x1, y1)
        t = (ys - y0) / (y1 - y0 if y1 > y0 else 1e-6)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xs - cx) <= t * hw)
    raise ValueError(f"unknown shape {shape!r}; ShapeWorld shapes are {SHAPES}")


def render(scene: Scene, supersample: int = 1) -> np.ndarray:
    """Rasterise a scene: ``uint8`` array ``H, W, 3`` on the plain BACKGROUND.

    A pixel is filled when its centre lies in the shape (``supersample=k`` averages k x k sub-pixels
    instead: mild anti-aliasing)."""
    w, h, k = scene.width, scene.height, max(int(supersample), 1)
    img = np.empty((h, w, 3), np.float32)
    img[:] = BACKGROUND
    sub = (np.arange(k, dtype=np.float32) + 0.5) / k
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; ShapeWorld colours are {tuple(COLORS)}")
        bx0, by0, bx1, by1 = obj.bbox(w, h)
        ix0, iy0 = max(int(np.floor(bx0)), 0), max(int(np.floor(by0)), 0)
        ix1, iy1 = min(int(np.ceil(bx1)) + 1, w), min(int(np.ceil(by1)) + 1, h)
        if ix1 <= ix0 or iy1 <= iy0:
            continue
        xs = (np.arange(ix0, ix1, dtype=np.float32)[:, None] + sub[None, :]).reshape(-1)
        ys = (np.arange(iy0, iy1, dtype=np.float32)[:, None] + sub[None, :]).reshape(-1)
        inside = shape_mask(obj.shape, bx0, by0, bx1, by1, xs[None, :], ys[:, None])
        cover = inside.reshape(iy1 - iy0, k, ix1 - ix0, k).mean(axis=(1, 3), dtype=np.float32)[..., None]
        patch = img[iy0:iy1, ix0:ix1]
        img[iy0:iy1, ix0:ix1] = patch * (1 - cover) + np.asarray(COLORS[obj.color], np.float32) * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def relation_holds(rel: str, a: tuple[float, float, float, float], b: tuple[float, float, float, float], threshold: float = 0.1) -> bool:
    """GenEval's test of "box a is ``rel`` box b" (boxes x0, y0, x1, y1; y grows downwards): the centre
    offset, shrunk by ``threshold`` times the summed box sizes, points within 60 degrees of that direction."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]])
    offset = ca - cb
    norm = float(np.linalg.norm(offset))
    if norm < 1e-6:
        return False
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    dx, dy = revised / norm
    return bool({"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[rel])


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Example:
    image: np.ndarray  # uint8 H, W, 3
    caption: str
    category: str
    spec: Requirements
    scene: Scene


def _fits(box: tuple[float, float, float, float], boxes: list[tuple[float, float, float, float]], gap: float) -> bool:
    return all(box[2] + gap <= o[0] or o[2] + gap <= box[0] or box[3] + gap <= o[1] or o[3] + gap <= box[1] for o in boxes)


def _place(rng: np.random.Generator, shapes: Sequence[tuple[str, str]], size: int, relation: str | None = None, tries: int = 100) -> Scene | None:
    """Place objects (shape, colour) at random without overlap; None when the sampled sizes do not fit."""
    gap = GAP * size
    n = len(shapes)
    sizes = ["small"] * n if n > 2 else [("small", "large")[int(b)] for b in rng.integers(0, 2, size=n)]
    sides = [SIZES[s] * size for s in sizes]
    for _ in range(tries):
        objs: list[Obj] = []
        boxes: list[tuple[float, float, float, float]] = []
        for (shape, color), sz, side in zip(shapes, sizes, sides):
            lo, hi = gap + side / 2, size - gap - side / 2
            for _ in range(tries):
                # box corners on the pixel grid: edges never pass through pixel centres (crisp, no nubs)
                cx, cy = (np.clip(np.round(rng.uniform(lo, hi, size=2) - side / 2), np.ceil(lo - side / 2), np.floor(hi - side / 2)) + side / 2).tolist()
                box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
                if _fits(box, boxes, gap):
                    break
            else:
                break
            objs.append(Obj(shape, color, sz, cx, cy))
            boxes.append(box)
        else:
            if relation is not None:
                (ax, ay), (bx, by) = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
                along = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation]
                across = abs(ay - by) if relation in ("left of", "right of") else abs(ax - bx)
                # clearly displaced along the axis (within ~27 degrees of it), and the verifier agrees
                if not (along > 0 and across <= 0.5 * along and relation_holds(relation, boxes[0], boxes[1])):
                    continue
            return Scene(tuple(objs), size, size)
    return None


def _sample_spec(rng: np.random.Generator, category: str) -> tuple[Requirements, list[tuple[str, str]]]:
    """A random spec of ``category`` and the (shape, colour) of every object to draw."""
    colors = list(COLORS)

    def color() -> str:
        return colors[int(rng.integers(len(colors)))]

    def shape() -> str:
        return SHAPES[int(rng.integers(len(SHAPES)))]

    if category == "single_object":
        s = shape()
        return Requirements((Group(s, None),)), [(s, color())]
    if category == "colors":
        s, c = shape(), color()
        return Requirements((Group(s, c),)), [(s, c)]
    if category == "counting":
        s, n = shape(), int(rng.integers(2, MAX_COUNT + 1))
        if rng.random() < 0.5:
            c = color()
            return Requirements((Group(s, c, n),)), [(s, c)] * n
        return Requirements((Group(s, None, n),)), [(s, color()) for _ in range(n)]
    if category in ("two_objects", "color_attr"):
        s1, s2 = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
        c1, c2 = (colors[i] for i in rng.permutation(len(colors))[:2])
        if category == "color_attr":
            return Requirements((Group(s1, c1), Group(s2, c2))), [(s1, c1), (s2, c2)]
        named = int(rng.integers(4))  # 0, 1: no colour named; 2: the first; 3: the second
        g1, g2 = Group(s1, c1 if named == 2 else None), Group(s2, c2 if named == 3 else None)
        return Requirements((g1, g2)), [(s1, c1), (s2, c2)]
    if category == "position":
        while True:
            s1, s2, c1, c2 = shape(), shape(), color(), color()
            if (s1, c1) != (s2, c2):
                break
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return Requirements((Group(s1, c1), Group(s2, c2)), (Relation(0, rel, 1),)), [(s1, c1), (s2, c2)]
    raise ValueError(f"unknown category {category!r}; ShapeWorld categories are {CATEGORIES}")


def sample_example(rng: np.random.Generator, category: str, size: int = 32, *, exclude_heldout: bool = False, supersample: int = 1) -> Example:
    """A random image of ``category`` (``size`` x ``size``) with its caption and spec.

    ``exclude_heldout``: never produce a held-out composition (see :func:`is_heldout`)."""
    if size < 16:
        raise ValueError(f"ShapeWorld images need size >= 16, got {size}")
    for _ in range(1000):
        spec, objs = _sample_spec(rng, category)
        if exclude_heldout and is_heldout(spec):
            continue
        relation = spec.relations[0].rel if spec.relations else None
        scene = _place(rng, objs, size, relation)
        if scene is None:
            continue
        return Example(render(scene, supersample), spec.prompt(), category, spec, scene)
    raise RuntimeError(f"could not place a {category} scene at size {size}")  # pragma: no cover


def _check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    cats = tuple(categories) if categories else CATEGORIES
    bad = [c for c in cats if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; ShapeWorld categories are {CATEGORIES}")
    return cats


def example_at(index: int, seed: int, size: int = 32, categories: Sequence[str] | None = None, *, exclude_heldout: bool = False) -> Example:
    """The example number ``index`` of the stream ``seed``: categories cycle in order, and each example
    has its own generator ``default_rng([seed, index])``, so any index is reproducible on its own."""
    cats = _check_categories(categories)
    rng = np.random.default_rng([int(seed), int(index)])
    return sample_example(rng, cats[index % len(cats)], size, exclude_heldout=exclude_heldout)


def to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``(N,) H, W, 3`` -> float ``(N,) 3, H, W`` in [0, 1]."""
    arr = np.asarray(images)
    t = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255)
    return t.movedim(-1, -3).contiguous()


def generate(n: int, seed: int, size: int = 32, categories: Sequence[str] | None = None, *, exclude_heldout: bool = False) -> tuple[torch.Tensor, list[str], list[str]]:
    """``n`` examples of the stream ``seed``: (images float ``N, 3, H, W`` in [0, 1], captions, categories).

    Deterministic per seed, and equal to ``ShapeWorldDataset(n, seed, size, categories)`` item by item."""
    exs = [example_at(i, seed, size, categories, exclude_heldout=exclude_heldout) for i in range(n)]
    images = to_tensor(np.stack([e.image for e in exs])) if exs else torch.zeros(0, 3, size, size)
    return images, [e.caption for e in exs], [e.category for e in exs]


class ShapeWorldDataset(torch.utils.data.Dataset):
    """``n`` ShapeWorld examples; item ``i`` is (image float ``3, H, W`` in [0, 1], caption), the same
    on every call and in every worker (see :func:`example_at`)."""

    def __init__(self, n: int, seed: int = 0, size: int = 32, categories: Sequence[str] | None = None, *, exclude_heldout: bool = False) -> None:
        self.n, self.seed, self.size = int(n), int(seed), int(size)
        self.categories = _check_categories(categories)
        self.exclude_heldout = exclude_heldout

    def __len__(self) -> int:
        return self.n

    def example(self, index: int) -> Example:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} examples")
        return example_at(index % self.n, self.seed, self.size, self.categories, exclude_heldout=self.exclude_heldout)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        ex = self.example(index)
        return to_tensor(ex.image), ex.caption


# ---------------------------------------------------------------------------------------------- prompt suites
SUITE_SPLITS = ("train", "heldout")
# per category: how many prompts of the pool each suite takes (None: all of them)
SUITE_SIZES = {
    "train": {"single_object": None, "two_objects": None, "counting": None, "colors": None, "position": 170, "color_attr": None},
    "heldout": {"single_object": None, "two_objects": None, "counting": None, "colors": None, "position": 40, "color_attr": 40},
}


def all_specs(category: str) -> list[Requirements]:
    """Every prompt of a category that the grammar (at most MAX_COUNT objects) can express."""
    combos = [(c, s) for s in SHAPES for c in COLORS]
    if category == "single_object":
        return [Requirements((Group(s, None),)) for s in SHAPES]
    if category == "colors":
        return [Requirements((Group(s, c),)) for c, s in combos]
    if category == "counting":
        return [Requirements((Group(s, c, n),)) for n in range(2, MAX_COUNT + 1) for s in SHAPES for c in (None, *COLORS)]
    if category == "two_objects":
        out = []
        for s1, s2 in itertools.permutations(SHAPES, 2):
            out.append(Requirements((Group(s1, None), Group(s2, None))))
            out += [Requirements((Group(s1, c), Group(s2, None))) for c in COLORS]
            out += [Requirements((Group(s1, None), Group(s2, c))) for c in COLORS]
        return out
    if category == "color_attr":
        return [Requirements((Group(s1, c1), Group(s2, c2))) for (c1, s1), (c2, s2) in itertools.permutations(combos, 2) if c1 != c2 and s1 != s2]
    if category == "position":
        return [Requirements((Group(s1, c1), Group(s2, c2)), (Relation(0, r, 1),)) for (c1, s1), (c2, s2) in itertools.permutations(combos, 2) for r in RELATIONS]
    raise ValueError(f"unknown category {category!r}; ShapeWorld categories are {CATEGORIES}")


def build_prompt_suites(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """The train and held-out suites: {split: [(category, prompt)]}, disjoint by construction."""
    rng = np.random.default_rng(seed)
    suites: dict[str, list[tuple[str, str]]] = {s: [] for s in SUITE_SPLITS}
    for cat in CATEGORIES:
        specs = all_specs(cat)
        pools = {"train": [r for r in specs if not is_heldout(r)], "heldout": [r for r in specs if is_heldout(r)]}
        for split in SUITE_SPLITS:
            pool, want = pools[split], SUITE_SIZES[split][cat]
            if want is not None and want < len(pool):
                pool = [pool[i] for i in sorted(rng.choice(len(pool), size=want, replace=False))]
            suites[split] += [(cat, r.prompt()) for r in pool]
    return suites


def assets_dir() -> Path:
    """The assets folder: ``$MMALIGN_ASSETS`` if set, else ``assets/`` at the repository root."""
    env = os.environ.get("MMALIGN_ASSETS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "assets"


def prompt_suite_path(split: str) -> Path:
    """Path of a ShapeWorld prompt suite: ``split`` is "train" or "heldout"."""
    if split not in SUITE_SPLITS:
        raise ValueError(f"unknown prompt suite {split!r}; choose one of {SUITE_SPLITS}")
    path = assets_dir() / "prompts" / f"shapeworld_{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set MMALIGN_ASSETS to the folder holding prompts/shapeworld_{split}.txt")
    return path


def load_prompt_suite(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read ``category<TAB>prompt`` lines (blank lines and ``#`` comments skipped)."""
    out = []
    for num, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{path}:{num}: expected 'category<TAB>prompt', got {line!r}")
        out.append((parts[0].strip(), parts[1].strip()))
    return out


def write_prompt_suites(directory: str | os.PathLike | None = None, seed: int = 0) -> dict[str, Path]:
    """Write :func:`build_prompt_suites` to ``directory`` (default ``assets/prompts``)."""
    directory = Path(directory) if directory is not None else assets_dir() / "prompts"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in build_prompt_suites(seed).items():
        path = directory / f"shapeworld_{split}.txt"
        path.write_text("".join(f"{c}\t{p}\n" for c, p in rows), encoding="utf-8")
        paths[split] = path
    return paths

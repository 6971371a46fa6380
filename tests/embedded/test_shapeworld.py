"""ShapeWorld: rendering, sampling, determinism, the dataset and the prompt suites."""
import collections
import shutil
import time

import numpy as np
import pytest
import torch

from mmalign.embedded import shapeworld as sw
from mmalign.embedded.shapeeval import parse_prompt
from mmalign.embedded.shapeworld import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    ShapeWorldDataset,
    build_prompt_suites,
    generate,
    is_heldout,
    load_prompt_suite,
    prompt_suite_path,
    render,
    sample_example,
)


def test_world_constants():
    assert SHAPES == ("circle", "square", "triangle")
    assert len(COLORS) == 6 and all(len(rgb) == 3 and all(0 <= v <= 255 for v in rgb) for rgb in COLORS.values())
    assert set(SIZES) == {"small", "large"} and BACKGROUND == (0, 0, 0)
    # colours are told apart by direction from the background: every pair at least 25 degrees apart
    dirs = np.array([np.subtract(c, BACKGROUND) for c in COLORS.values()], float)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    cos = dirs @ dirs.T
    assert np.degrees(np.arccos(cos[~np.eye(len(dirs), dtype=bool)].max())) > 25


def test_render_pixels():
    scene = Scene((Obj("square", "red", "small", 8.0, 8.0), Obj("circle", "blue", "large", 22.0, 20.0), Obj("triangle", "green", "large", 8.0, 24.0)), 32, 32)
    img = render(scene)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[0, 31]) == BACKGROUND
    # a square of side 8 centred at (8, 8) fills pixels 4..11 exactly (no anti-aliasing)
    red = np.all(img == COLORS["red"], axis=-1)
    assert red[4:12, 4:12].all() and red.sum() == 64
    assert tuple(img[20, 22]) == COLORS["blue"]
    circle = np.all(img == COLORS["blue"], axis=-1)
    assert 0.7 < circle.sum() / 12**2 < 0.85  # about pi/4 of its box
    tri = np.all(img == COLORS["green"], axis=-1)
    rows = tri.sum(axis=1)[tri.any(axis=1)]
    assert rows[0] < rows[-1] and 0.4 < tri.sum() / 12**2 < 0.6  # apex up, half its box
    # only palette colours and the background appear
    assert len({tuple(p) for p in img.reshape(-1, 3)}) == 4
    soft = render(scene, supersample=4)
    assert soft.shape == img.shape and len({tuple(p) for p in soft.reshape(-1, 3)}) > 4


def test_render_rejects_unknowns():
    with pytest.raises(ValueError, match="unknown colour"):
        render(Scene((Obj("circle", "teal", "small", 10, 10),)))
    with pytest.raises(ValueError, match="unknown shape"):
        render(Scene((Obj("star", "red", "small", 10, 10),)))


def _boxes_ok(scene):
    w, h = scene.width, scene.height
    gap = sw.GAP * min(w, h) - 1e-6
    boxes = [o.bbox(w, h) for o in scene.objects]
    for b in boxes:
        assert b[0] >= gap and b[1] >= gap and b[2] <= w - gap and b[3] <= h - gap
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("category", CATEGORIES)
def test_sample_example(category, size):
    rng = np.random.default_rng(0)
    for _ in range(15):
        ex = sample_example(rng, category, size)
        assert ex.image.shape == (size, size, 3) and ex.image.dtype == np.uint8
        assert ex.category == category == ex.spec.category
        assert parse_prompt(ex.caption) == ex.spec  # the caption says exactly what the spec says
        _boxes_ok(ex.scene)
        objs = ex.scene.objects
        for g in ex.spec.groups:  # the scene holds exactly what each group asks for
            assert sum(o.shape == g.shape and (g.color is None or o.color == g.color) for o in objs) == g.count
        if category == "counting":
            assert 2 <= len(objs) <= sw.MAX_COUNT and len({o.shape for o in objs}) == 1
        elif category in ("single_object", "colors"):
            assert len(objs) == 1
        else:
            assert len(objs) == 2
        if category == "position":
            (r,) = ex.spec.relations
            a, b = objs
            assert sw.relation_holds(r.rel, a.bbox(size, size), b.bbox(size, size))


def test_captions_read_naturally():
    caps = set(generate(300, 1)[1])
    assert {"a circle", "a square", "a triangle"} <= caps
    assert any(c.startswith(("two ", "three ", "four ")) and c.endswith("s") for c in caps)
    assert any(" left of " in c or " above " in c for c in caps)
    assert not any("  " in c or c != c.strip() for c in caps)


def test_generate_deterministic_and_shaped():
    x1, c1, k1 = generate(24, seed=5)
    x2, c2, k2 = generate(24, seed=5)
    x3, c3, _ = generate(24, seed=6)
    assert x1.shape == (24, 3, 32, 32) and x1.dtype == torch.float32
    assert 0 <= x1.min() and x1.max() <= 1
    assert torch.equal(x1, x2) and c1 == c2 and k1 == k2
    assert not torch.equal(x1, x3) and c1 != c3
    assert k1 == [CATEGORIES[i % len(CATEGORIES)] for i in range(24)]
    # a prefix of a longer stream is the shorter stream
    x4, c4, _ = generate(30, seed=5)
    assert torch.equal(x4[:24], x1) and c4[:24] == c1
    x64, _, k64 = generate(6, seed=0, size=64, categories=["counting", "position"])
    assert x64.shape == (6, 3, 64, 64) and k64 == ["counting", "position"] * 3
    with pytest.raises(ValueError, match="unknown categories"):
        generate(2, 0, categories=["colour"])


def test_generate_is_fast():
    t0 = time.perf_counter()
    generate(1000, seed=0)
    assert time.perf_counter() - t0 < 5.0  # ~0.5 s unloaded: thousands per second


def test_dataset_matches_generate():
    ds = ShapeWorldDataset(12, seed=3)
    x, caps, _ = generate(12, seed=3)
    assert len(ds) == 12
    for i in (0, 5, 11, -1):
        img, cap = ds[i]
        assert img.shape == (3, 32, 32) and torch.equal(img, x[i]) and cap == caps[i]
        assert torch.equal(ds[i][0], img)  # same on every call
    with pytest.raises(IndexError):
        ds[12]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and list(batch[1]) == caps[:4]
    assert ShapeWorldDataset(3, seed=0, size=64)[0][0].shape == (3, 64, 64)


def test_exclude_heldout():
    rng = np.random.default_rng(0)
    for cat in CATEGORIES:
        for _ in range(40):
            assert not is_heldout(sample_example(rng, cat, exclude_heldout=True).spec)
    caps = generate(120, 0, exclude_heldout=True)[1]
    assert not any(is_heldout(parse_prompt(c)) for c in caps)


# ---------------------------------------------------------------------------------------------- suites
def test_prompt_suites_on_disk_match_the_builder():
    built = build_prompt_suites()
    for split in ("train", "heldout"):
        assert load_prompt_suite(prompt_suite_path(split)) == built[split], "rewrite with: python -m mmalign.embedded.verify_shapeeval --write-suites"


def test_prompt_suites_split_and_parse():
    train = load_prompt_suite(prompt_suite_path("train"))
    held = load_prompt_suite(prompt_suite_path("heldout"))
    assert len(train) >= 400 and 100 <= len(held) <= 150
    assert len({p for _, p in train}) == len(train) and len({p for _, p in held}) == len(held)
    assert not {p for _, p in train} & {p for _, p in held}
    for split, suite in (("train", train), ("heldout", held)):
        for cat, prompt in suite:
            req = parse_prompt(prompt)
            assert req.category == cat, (split, prompt)
            assert is_heldout(req) == (split == "heldout"), (split, prompt)
    assert set(c for c, _ in train) == set(CATEGORIES)
    counts = collections.Counter(c for c, _ in held)
    assert set(counts) >= {"two_objects", "counting", "colors", "position", "color_attr"}
    # held-out compositions never appear in train, even partly (e.g. as one object of a pair)
    train_combos = {(g.color, g.shape) for _, p in train for g in parse_prompt(p).groups if g.color}
    assert not train_combos & sw.HELDOUT_COMBOS


def test_prompt_suite_paths(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown prompt suite"):
        prompt_suite_path("test")
    (tmp_path / "prompts").mkdir()
    shutil.copy(prompt_suite_path("train"), tmp_path / "prompts" / "shapeworld_train.txt")
    monkeypatch.setenv("MMALIGN_ASSETS", str(tmp_path))
    assert prompt_suite_path("train") == tmp_path / "prompts" / "shapeworld_train.txt"
    with pytest.raises(FileNotFoundError, match="MMALIGN_ASSETS"):
        prompt_suite_path("heldout")
    bad = tmp_path / "bad.txt"
    bad.write_text("# comment\n\ncolors\ta red circle\nno tab here\n")
    with pytest.raises(ValueError, match="bad.txt:4"):
        load_prompt_suite(bad)
    bad.write_text("# comment\n\ncolors\ta red circle\n")
    assert load_prompt_suite(bad) == [("colors", "a red circle")]

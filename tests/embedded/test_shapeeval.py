"""ShapeEval: parsing, detection, per-clause verdicts, accuracy on ground truth, and the reward."""
import collections
import math

import numpy as np
import pytest
import torch

import mmalign
from mmalign.embedded import shapeworld as sw
from mmalign.embedded.shapeeval import (
    Detection,
    ShapeEvalReward,
    Thresholds,
    _components,
    detect_objects,
    evaluate,
    load_shapeeval,
    parse_prompt,
    tiny_shapeeval,
)
from mmalign.embedded.shapeworld import CATEGORIES, Group, Obj, Relation, Requirements, Scene, example_at, render
from mmalign.embedded.verify_shapeeval import accuracy, degrade


# ---------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "prompt, groups, relations, category",
    [
        ("a circle", [("circle", None, 1)], [], "single_object"),
        ("a red circle", [("circle", "red", 1)], [], "colors"),
        ("A photo of three blue triangles.", [("triangle", "blue", 3)], [], "counting"),
        ("2 squares", [("square", None, 2)], [], "counting"),
        ("a triangle and a square", [("triangle", None, 1), ("square", None, 1)], [], "two_objects"),
        ("a red circle and a square", [("circle", "red", 1), ("square", None, 1)], [], "two_objects"),
        ("a yellow square and a purple circle", [("square", "yellow", 1), ("circle", "purple", 1)], [], "color_attr"),
        ("a red circle left of a green square", [("circle", "red", 1), ("square", "green", 1)], [(0, "left of", 1)], "position"),
        ("a red circle to the right of a red square", [("circle", "red", 1), ("square", "red", 1)], [(0, "right of", 1)], "position"),
        ("a white triangle below a blue triangle", [("triangle", "white", 1), ("triangle", "blue", 1)], [(0, "below", 1)], "position"),
        ("two red circles and a square", [("circle", "red", 2), ("square", None, 1)], [], "compound"),
    ],
)
def test_parse_prompt(prompt, groups, relations, category):
    req = parse_prompt(prompt)
    assert req == Requirements(tuple(Group(*g) for g in groups), tuple(Relation(*r) for r in relations))
    assert req.category == category


@pytest.mark.parametrize(
    "prompt, why",
    [
        ("a green star", "unknown shape 'star'"),
        ("a cat on a mat", "is not '<count> [colour] <shape>'"),
        ("an orange circle", "is not '<count> [colour] <shape>'"),
        ("circle", "does not start with"),
        ("zero circles", "does not start with"),
        ("   ", "empty"),
        ("two red circles left of a square", "one object"),
        ("a red circle above a square below a triangle", "at most one spatial relation"),
        ("a circle and a red circle", "both with and without a colour"),
        ("a red circle and a red circle", "named twice"),
        ("a red circle, a blue square", "commas"),
    ],
)
def test_parse_prompt_rejects(prompt, why):
    with pytest.raises(ValueError, match="outside the ShapeEval grammar") as err:
        parse_prompt(prompt)
    assert why in str(err.value)


def test_every_expressible_prompt_round_trips():
    for cat in CATEGORIES:
        for req in sw.all_specs(cat):
            assert parse_prompt(req.prompt()) == req and req.category == cat


# ---------------------------------------------------------------------------------------------- detection
def test_components_match_a_flood_fill():
    rng = np.random.default_rng(0)
    for conn in (4, 8):
        for _ in range(5):
            labels = rng.integers(-1, 3, size=(13, 17))
            got = _components(labels, conn)
            # reference: BFS
            ref = -np.ones_like(labels)
            nbrs = [(0, 1), (1, 0), (0, -1), (-1, 0)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if conn == 8 else [])
            for y in range(13):
                for x in range(17):
                    if labels[y, x] < 0 or ref[y, x] >= 0:
                        continue
                    stack, ref[y, x] = [(y, x)], y * 17 + x
                    while stack:
                        cy, cx = stack.pop()
                        for dy, dx in nbrs:
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < 13 and 0 <= nx < 17 and ref[ny, nx] < 0 and labels[ny, nx] == labels[y, x]:
                                ref[ny, nx] = y * 17 + x
                                stack.append((ny, nx))
            assert np.array_equal(got, ref)


SCENE = Scene((Obj("square", "red", "small", 8.0, 8.0), Obj("circle", "blue", "large", 22.0, 20.0), Obj("triangle", "green", "large", 8.0, 24.0)), 32, 32)


def test_detect_objects_on_a_scene_and_input_forms():
    img = render(SCENE)
    dets = detect_objects(img)
    assert all(isinstance(d, Detection) for d in dets)
    assert sorted((d.shape, d.color) for d in dets) == [("circle", "blue"), ("square", "red"), ("triangle", "green")]
    sq = next(d for d in dets if d.shape == "square")
    assert sq.bbox == (4, 4, 12, 12) and sq.area == 64 and (sq.cx, sq.cy) == (8.0, 8.0) and sq.match == 1.0
    assert dets[0].area >= dets[1].area >= dets[2].area  # largest first
    chw = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    assert detect_objects(chw) == dets  # torch float 3,H,W
    assert detect_objects(chw.numpy()) == dets  # numpy float 3,H,W
    assert detect_objects(torch.from_numpy(img)) == dets  # torch uint8 H,W,3
    assert detect_objects(np.zeros((32, 32, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="expected an image"):
        detect_objects(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        detect_objects(torch.full((3, 8, 8), float("nan")))


def test_tiny_blobs_and_odd_colours_are_no_objects():
    img = render(SCENE).copy()
    img[28:30, 28:30] = (230, 30, 30)  # a 4-pixel red speck
    img[0:10, 16:18] = (230, 30, 30)  # a thin red bar: no shape
    img[12:14, 26:31] = (0, 130, 130)  # teal: no palette colour
    dets = detect_objects(img)
    assert sorted((d.shape, d.color) for d in dets if d.shape) == [("circle", "blue"), ("square", "red"), ("triangle", "green")]
    assert evaluate(img, "a red square").strict


# ---------------------------------------------------------------------------------------------- verdicts
def _verdicts(objs, prompt, size=32):
    res = evaluate(render(Scene(tuple(objs), size, size)), prompt)
    return [ok for _, ok in res.clauses], res


def test_counts_are_exact():
    tri = lambda c, x, y: Obj("triangle", c, "small", x, y)  # noqa: E731
    three = [tri("blue", 6, 6), tri("blue", 20, 6), tri("blue", 6, 20)]
    assert _verdicts(three, "three blue triangles")[0] == [True]
    assert _verdicts(three[:2], "three blue triangles")[0] == [False]  # too few
    assert _verdicts(three + [tri("blue", 20, 20)], "three blue triangles")[0] == [False]  # too many
    mixed = three[:2] + [tri("red", 20, 20)]
    assert _verdicts(mixed, "two blue triangles")[0] == [True]  # a red one is not a blue one
    assert _verdicts(mixed, "two triangles")[0] == [False]  # but it is a triangle
    assert _verdicts(mixed, "three triangles")[0] == [True]
    # unmentioned kinds are ignored, mentioned kinds must match exactly (GenEval semantics)
    assert _verdicts([Obj("circle", "red", "small", 8, 8), Obj("square", "blue", "small", 22, 22)], "a red circle")[0] == [True]
    assert _verdicts([Obj("circle", "red", "small", 8, 8), Obj("circle", "red", "small", 22, 22)], "a red circle")[0] == [False]


def test_wrong_colour_and_wrong_shape_fail_only_their_clause():
    prompt = "a yellow square and a purple circle"
    right = [Obj("square", "yellow", "large", 9, 9), Obj("circle", "purple", "large", 22, 22)]
    ok, res = _verdicts(right, prompt)
    assert ok == [True, True] and res.score == 1.0 and res.strict and res.category == "color_attr"
    wrong_colour = [Obj("square", "red", "large", 9, 9), right[1]]
    ok, res = _verdicts(wrong_colour, prompt)
    assert ok == [False, True] and res.score == 0.5 and not res.strict
    wrong_shape = [Obj("triangle", "yellow", "large", 9, 9), right[1]]
    assert _verdicts(wrong_shape, prompt)[0] == [False, True]
    swapped = [Obj("square", "purple", "large", 9, 9), Obj("circle", "yellow", "large", 22, 22)]  # binding swapped
    assert _verdicts(swapped, prompt)[0] == [False, False]
    assert _verdicts([right[1]], "a square and a purple circle")[0] == [False, True]  # missing object
    assert _verdicts([Obj("circle", "white", "small", 16, 16)], "a purple circle")[0] == [False]
    assert _verdicts([Obj("triangle", "white", "small", 16, 16)], "a circle")[0] == [False]
    assert _verdicts([Obj("square", "white", "small", 16, 16)], "a circle")[0] == [False]
    assert _verdicts([Obj("circle", "white", "small", 16, 16)], "a square")[0] == [False]


@pytest.mark.parametrize("rel", sw.RELATIONS)
def test_relations(rel):
    a, b = (8.0, 16.0), (24.0, 16.0)  # a is left of b
    if rel in ("above", "below"):
        a, b = (16.0, 8.0), (16.0, 24.0)  # a is above b
    first = rel in ("left of", "above")
    pa, pb = (a, b) if first else (b, a)
    prompt = f"a red circle {rel} a green square"
    good = [Obj("circle", "red", "small", *pa), Obj("square", "green", "small", *pb)]
    ok, res = _verdicts(good, prompt)
    assert ok == [True, True, True] and res.category == "position"
    bad = [Obj("circle", "red", "small", *pb), Obj("square", "green", "small", *pa)]  # positions swapped
    ok, res = _verdicts(bad, prompt)
    assert ok == [True, True, False] and math.isclose(res.score, 2 / 3)
    # placed along the other axis (GenEval's rule: the offset must point within ~60 degrees of the
    # relation's direction), slightly offset the right way: still fails
    across = [Obj("circle", "red", "small", *pa[::-1]), Obj("square", "green", "small", *pb[::-1])]
    assert _verdicts(across, prompt)[0] == [True, True, False]
    # the relation fails when an object is missing
    assert _verdicts(good[:1], prompt)[0] == [True, False, False]


# ---------------------------------------------------------------------------------------------- accuracy
def test_strict_accuracy_on_ground_truth_32px():
    acc = accuracy(100, 32, "clean", seed=11)
    assert all(s >= 0.99 for s, _ in acc.values()), acc


def test_strict_accuracy_on_ground_truth_64px():
    acc = accuracy(30, 64, "clean", seed=12)
    assert all(s >= 0.99 for s, _ in acc.values()), acc


def test_tolerates_blur_and_noise():
    acc = accuracy(20, 32, "mixed", seed=13)  # Gaussian blur 0.8 px, noise, colour shift, darker
    assert np.mean([s for s, _ in acc.values()]) >= 0.95, acc
    rng = np.random.default_rng(0)
    ex = example_at(4, 0, 32, ["position"])
    assert evaluate(degrade(ex.image, rng, blur=1.2), ex.caption).strict


# ---------------------------------------------------------------------------------------------- reward
def test_reward_scores_clauses():
    reward = mmalign.load_reward("shapeeval")
    assert isinstance(reward, ShapeEvalReward) and reward.name == "shapeeval"
    assert reward.modality == "image" and reward.needs == {"prompt"} and not reward.differentiable
    assert reward.score_range == (0.0, 1.0)
    x, caps, _ = sw.generate(12, seed=2)
    wrong = [caps[(i + 1) % 12] for i in range(12)]
    out = reward(x, caps).raise_if_invalid()
    assert torch.equal(out.scores, torch.ones(12)) and torch.equal(out.components["strict"], torch.ones(12))
    expected = torch.tensor([len(parse_prompt(c).clauses()) for c in caps], dtype=torch.float32)
    assert torch.equal(out.components["num_clauses"], expected)
    out = reward(x, wrong)
    ref = [evaluate(x[i], wrong[i]) for i in range(12)]
    assert out.scores.tolist() == pytest.approx([r.score for r in ref])
    assert out.components["strict"].tolist() == [float(r.strict) for r in ref]
    assert out.scores.min() < 1 and ((out.scores >= 0) & (out.scores <= 1)).all()


def test_reward_batch_equals_single_and_noise_is_valid():
    reward = tiny_shapeeval(seed=3, batch_size=3, on_unparseable="zero")
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(5, 3, 32, 32, generator=g)
    prompts = ["a red circle", "two blue squares", "a green star", "a cat on a mat", "a circle left of a square"]
    out = reward(noise, prompts)
    assert out.valid.all() and torch.isfinite(out.scores).all()
    singles = torch.cat([reward(noise[i : i + 1], prompts[i : i + 1]).scores for i in range(5)])
    assert torch.equal(singles, out.scores)
    assert out.components["num_clauses"][2:4].tolist() == [0.0, 0.0]  # outside the grammar: no clause
    assert out.scores[2:4].tolist() == [0.0, 0.0]


def test_reward_unparseable_modes_and_options():
    x, caps, _ = sw.generate(2, seed=0)
    prompts = [caps[0], "a green star"]
    out = load_shapeeval()(x, prompts)  # "invalid" is the default: never a silent 0
    assert out.valid.tolist() == [True, False] and "outside the ShapeEval grammar" in out.reasons[1]
    assert out.scores[0] == 1.0 and math.isnan(out.scores[1])
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        load_shapeeval(on_unparseable="raise")(x, prompts)
    with pytest.raises(ValueError, match="on_unparseable"):
        load_shapeeval(on_unparseable="skip")
    with pytest.raises(ValueError, match="unknown ShapeEval thresholds"):
        load_shapeeval(thresholds={"min_iuo": 0.5})
    r = load_shapeeval(batch_size=4, thresholds={"min_iou": 0.7})
    assert r.batch_size == 4 and r.thresholds == Thresholds(min_iou=0.7)
    assert r.provenance()["preprocessing"]["thresholds"]["min_iou"] == 0.7
    # the same image at 64 px scores the same
    x64, caps64, _ = sw.generate(6, seed=1, size=64)
    assert r(x64, caps64).scores.tolist() == [1.0] * 6


def test_suite_prompts_score_on_their_own_renders():
    """Every suite prompt is satisfiable: a scene built from its spec passes it."""
    suite = sw.load_prompt_suite(sw.prompt_suite_path("heldout"))
    rng = np.random.default_rng(0)
    per_cat = collections.Counter()
    for cat, prompt in suite:
        if per_cat[cat] >= 4:
            continue
        per_cat[cat] += 1
        req = parse_prompt(prompt)
        objs = []
        for g in req.groups:
            objs += [(g.shape, g.color or "white")] * g.count
        rel = req.relations[0].rel if req.relations else None
        scene = sw._place(rng, objs, 32, rel)
        assert scene is not None
        assert evaluate(render(scene), prompt).strict, prompt

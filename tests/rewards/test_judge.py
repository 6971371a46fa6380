"""Judging the judges: preference-set formats, pairwise accuracy with ties and invalid scores."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from mmalign.rewards import CallableReward
from mmalign.rewards.judge import PreferenceDataError, evaluate_reward, load_preferences


def png(path, value, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def brightness(**kw):
    return CallableReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="brightness", needs=(), **kw)


@pytest.fixture
def prefs(tmp_path):
    """Human preferences that mostly prefer the brighter image, with a few hard cases."""
    img = tmp_path / "img"
    for name, v in {"b200": 200, "b100": 100, "b50": 50, "b60": 60, "same1": 80, "same2": 80, "t1": 10, "t2": 11}.items():
        png(img / f"{name}.png", v)
    (img / "broken.png").write_bytes(b"not an image")
    png(img / "big.png", 150, size=16)  # another size: scored in its own batch
    rows = [
        {"prompt": "a lamp", "chosen": "img/b200.png", "rejected": "img/b100.png", "category": "light"},  # correct
        {"prompt": "a lamp", "chosen": "img/b100.png", "rejected": "img/b50.png", "category": "light"},  # correct
        {"prompt": "a cave", "chosen": "img/b50.png", "rejected": "img/b60.png", "category": "dark"},  # wrong
        {"prompt": "a cave", "chosen": "img/same1.png", "rejected": "img/same2.png", "category": "dark"},  # predicted tie
        {"prompt": "fog", "chosen": "img/t1.png", "rejected": "img/t2.png", "tie": True},  # human tie, reward decides
        {"prompt": "fog", "chosen": "img/same2.png", "rejected": "img/same1.png", "tie": True, "category": "dark"},  # both tie
        {"prompt": "a lamp", "chosen": "img/broken.png", "rejected": "img/b50.png", "category": "light"},  # invalid
        {"prompt": "a sun", "chosen": "img/big.png", "rejected": "img/b100.png", "id": 7},  # correct, no category
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[4:]) + "\n")
    return path


def test_accuracy_with_ties_and_invalid_counted(prefs):
    report = evaluate_reward(brightness(), prefs, batch_size=3)
    o = report.overall
    assert (o.pairs, o.correct, o.wrong, o.pred_ties, o.invalid, o.human_ties, o.human_tie_agree) == (8, 3, 1, 1, 1, 2, 1)
    assert o.accuracy == pytest.approx(3 / 4)  # ties and invalid excluded
    assert o.accuracy_strict == pytest.approx(3 / 6)  # of the 6 pairs that are not human ties
    light, dark = report.per_category["light"], report.per_category["dark"]
    assert (light.pairs, light.correct, light.invalid, light.accuracy) == (3, 2, 1, 1.0)
    assert (dark.pairs, dark.correct, dark.wrong, dark.pred_ties, dark.human_ties, dark.human_tie_agree) == (3, 0, 1, 1, 1, 1)
    assert dark.accuracy == 0.0 and dark.accuracy_strict == 0.0
    assert list(report.per_category) == ["dark", "light"]
    outcomes = [p["outcome"] for p in report.pairs]
    assert outcomes == ["correct", "correct", "wrong", "tie", "wrong", "tie", "invalid", "correct"]
    assert report.pairs[6]["reason"].startswith("unreadable image") and math.isnan(report.pairs[6]["score_chosen"])
    table = report.table()
    assert "overall" in table and "0.750" in table and "light" in table and "1 agree" in table
    d = report.to_dict()
    assert d["overall"]["accuracy"] == pytest.approx(0.75) and d["per_category"]["dark"]["pairs"] == 3


def test_tolerance_and_direction(prefs):
    # with tol = 2/255 the 10-vs-11 pair (1/255 apart) is a predicted tie; 50-vs-60 (10/255) stays wrong
    report = evaluate_reward(brightness(), prefs, tol=2 / 255)
    assert report.overall.human_tie_agree == 2
    assert report.overall.wrong == 1
    # a lower-is-better reward of the same numbers gets every decided pair the other way round
    flipped = evaluate_reward(brightness(higher_is_better=False), prefs).overall
    assert (flipped.correct, flipped.wrong, flipped.pred_ties) == (1, 3, 1)
    with pytest.raises(ValueError, match="tol"):
        evaluate_reward(brightness(), prefs, tol=-1)


def test_invalid_scores_never_win(tmp_path):
    png(tmp_path / "a.png", 10)
    png(tmp_path / "b.png", 200)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.png", "rejected": "b.png"}) + "\n")
    # a reward that fails on the rejected (bright) image: the pair is invalid, never a win
    reward = CallableReward(lambda x, p: [math.nan if float(v) > 0.5 else float(v) for v in x.mean((1, 2, 3))], name="flaky", needs=())
    o = evaluate_reward(reward, tmp_path / "p.jsonl").overall
    assert (o.correct, o.wrong, o.invalid) == (0, 0, 1) and math.isnan(o.accuracy) and o.accuracy_strict == 0.0


def test_folder_format(tmp_path):
    root = tmp_path / "prefs"
    for cat, pid, c, r in [("hands", "0001", 200, 100), ("hands", "0002", 20, 100), ("text/signs", "0003", 90, 30)]:
        d = root / cat / pid
        png(d / "chosen.png", c)
        png(d / "rejected.png", r)
        (d / "prompt.txt").write_text(f"prompt {pid}\n")
    d = root / "0004"
    png(d / "chosen.png", 5)
    png(d / "rejected.png", 5)
    (d / "prompt.txt").write_text("flat")
    (d / "meta.json").write_text(json.dumps({"category": "flat", "tie": True, "source": "annotator 3"}))
    data = load_preferences(root)
    assert len(data) == 4 and data.categories() == ["flat", "hands", "text/signs"]
    assert data.pairs[0].prompt == "flat" and data.pairs[0].tie and data.pairs[0].meta == {"source": "annotator 3"}
    report = evaluate_reward(brightness(), root)
    assert report.per_category["hands"].accuracy == 0.5 and report.per_category["text/signs"].correct == 1
    assert report.overall.human_tie_agree == 1
    (root / "hands" / "0001" / "chosen.jpg").write_bytes(b"")
    with pytest.raises(PreferenceDataError, match="exactly one chosen"):
        load_preferences(root)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "chosen": "x.png", "rejected": "y.png"}\n{"prompt": "a", "chosen": "x.png"\n', r"prefs.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "chosen": "x.png"}\n', r"prefs.jsonl:1: missing key\(s\) rejected"),
    ('{"prompt": "a", "chosen": "x.png", "rejected": "nope.png"}\n', r"prefs.jsonl:1: rejected file .*nope.png' does not exist"),
    ('{"prompt": 3, "chosen": "x.png", "rejected": "y.png"}\n', "prefs.jsonl:1: prompt must be a string"),
    ('{"prompt": "a", "chosen": "x.png", "rejected": "y.png", "tie": "yes"}\n', "prefs.jsonl:1: tie must be true or false"),
    ('[1, 2]\n', "prefs.jsonl:1: expected a JSON object"),
    ('\n\n', "holds no preference pairs"),
])
def test_loader_errors_name_file_and_line(tmp_path, content, message):
    png(tmp_path / "x.png", 1)
    png(tmp_path / "y.png", 2)
    path = tmp_path / "prefs.jsonl"
    path.write_text(content)
    with pytest.raises(PreferenceDataError, match=message):
        load_preferences(path)


def test_missing_data_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(PreferenceDataError, match="no preference pairs"):
        load_preferences(tmp_path)

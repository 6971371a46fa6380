"""End-of-run reports: first vs last evaluation with the gap closed to a target, curves, before/after
grids; per-category and per-component eval metrics; sample diversity; the max_minutes budget."""
import json
import math

import pytest
import torch
import yaml

from mmalign.cli import main
from mmalign.rewards.base import RewardOutput
from mmalign.trainers import load_train_config
from mmalign.trainers.common import eval_reward_metrics, seed_diversity
from mmalign.trainers.grpo import GRPOTrainer
from mmalign.trainers.report import compare_evals, paired_changes, read_eval_scores, read_metrics

TINY = {
    "algorithm": "grpo",
    "model": {"name": "tiny:sd3", "device": "cpu"},
    "lora": {"rank": 4},
    "optim": {"lr": 0.01},
    "sampler": {"method": "flow_grpo", "num_steps": 2, "guidance_scale": 1.0, "record_x0": False, "micro_batch": 1},
    "prompts": {"prompts": ["a red circle", "two blue squares"]},
    "rewards": [{"name": "tiny:verifiable", "metadata": {"target_color": [1.0, 0.0, 0.0]}}],
    "grpo": {"prompts_per_step": 1, "group_size": 2, "clip_range": 0.2},
    "max_steps": 2,
    "threads": 1,
    "checkpoint": {"save_final": False},
    "logging": {"stdout": False},
    "eval": {"every": 1, "prompts": ["a red circle", "a blue square"], "seeds": [0, 1], "num_steps": 2,
             "report_targets": {"eval/mean_color_match/mean": 1.0}},
}


def _trainer(tmp_path, *overrides):
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(TINY))
    return GRPOTrainer(load_train_config(f, [f"out={tmp_path / 'run'}", *overrides]), log=lambda s: None)


def test_compare_evals_gap_closed_by_hand():
    first = {"eval/r/mean": 0.2, "eval/r/std": 0.1, "eval/r:strict/mean": 0.0, "eval/r/cat/a": 0.5, "loss": 3.0}
    last = {"eval/r/mean": 0.6, "eval/r/std": 0.3, "eval/r:strict/mean": 0.25, "eval/r/cat/a": 0.4}
    rep = compare_evals(first, last, {"eval/r/mean": 1.0, "eval/r:strict/mean": 1.0})
    assert rep["eval/r/mean"]["gap_closed"] == pytest.approx(0.5)  # (0.6 - 0.2) / (1 - 0.2)
    assert rep["eval/r:strict/mean"]["gap_closed"] == pytest.approx(0.25)
    assert rep["eval/r/cat/a"]["change"] == pytest.approx(-0.1)
    assert "eval/r/std" not in rep and "loss" not in rep
    with pytest.raises(ValueError, match="did not log"):
        compare_evals(first, last, {"eval/nope/mean": 1.0})


def test_paired_changes_by_hand(tmp_path):
    before = {("a", 0): {"r": 0.0, "r:strict": 0.0}, ("a", 1): {"r": 0.5, "r:strict": None}, ("b", 0): {"r": 1.0, "r:strict": 1.0}}
    after = {("a", 0): {"r": 0.5, "r:strict": 1.0}, ("a", 1): {"r": 0.5, "r:strict": 1.0}, ("b", 0): {"r": 1.0, "r:strict": 1.0},
             ("c", 0): {"r": 0.0}}  # not in both: left out
    rep = paired_changes(before, after)
    # r: diffs 0.5, 0, 0 -> mean 1/6, sample var ((1/3)^2 + 2 (1/6)^2) / 2 = 1/12, se sqrt(1/12 / 3) = 1/6
    assert rep["eval/r/mean"] == {"paired_se": pytest.approx(1 / 6), "n_pairs": 3}
    assert rep["eval/r:strict/mean"] == {"paired_se": pytest.approx(0.5), "n_pairs": 2}  # diffs 1, 0: the null pair left out
    f = tmp_path / "s.jsonl"
    f.write_text('{"prompt": "a", "seed": 0, "r": 1.0}\n{"prompt": "a", "seed": 0, "r": 0.5}\n')
    with pytest.raises(ValueError, match="appears twice"):
        read_eval_scores(f)
    f.write_text('{"index": 0, "prompt": "a", "seed": 0, "r": 1.0}\n{"index": 1, "prompt": "a", "seed": 0, "r": 0.5}\n')
    assert len(read_eval_scores(f)) == 2  # one prompt listed twice: two samples
    f.write_text('{"prompt": "a", "r": 1.0}\n')
    with pytest.raises(ValueError, match=":1: not a per-sample score line"):
        read_eval_scores(f)


def test_eval_reward_metrics_components_categories_and_invalid_items():
    out = RewardOutput(scores=torch.tensor([0.5, 1.0, float("nan"), 0.0]),
                       components={"strict": torch.tensor([0.0, 1.0, float("nan"), 0.0])},
                       valid=torch.tensor([True, True, False, True]), reasons=[None, None, "bad", None])
    m = eval_reward_metrics("se", out, ["a", "b", "a", "a"])
    assert m["eval/se/mean"] == pytest.approx(0.5)  # invalid item left out
    assert m["eval/se:strict/mean"] == pytest.approx(1 / 3)
    assert m["eval/se/cat/a"] == pytest.approx(0.25) and m["eval/se/cat/b"] == 1.0
    assert m["eval/se:strict/cat/a"] == 0.0 and m["eval/se/invalid"] == 1
    assert m["eval/se/category_mean"] == pytest.approx((0.25 + 1.0) / 2)
    assert not any("/cat/" in k for k in eval_reward_metrics("se", out, ["x"] * 4))  # one category: no split


def test_seed_diversity_by_hand():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0] = 0.5  # prompt 0 differs by 0.5 everywhere between the seeds, prompt 1 is identical
    assert seed_diversity(torch.cat([a, b]), 2) == pytest.approx(0.25)
    assert seed_diversity(torch.cat([a, a, a]), 2) == 0.0  # collapse
    with pytest.raises(ValueError, match="two seeds"):
        seed_diversity(a, 2)


def test_training_run_writes_report_curves_and_grids(tmp_path, capsys):
    t = _trainer(tmp_path)
    t.fit()
    run = tmp_path / "run"
    rep = json.loads((run / "report.json").read_text())
    assert rep["first_eval_step"] == 0 and rep["last_eval_step"] == 2 and rep["steps"] == 2
    row = rep["eval"]["eval/mean_color_match/mean"]
    assert row["target"] == 1.0 and math.isfinite(row["gap_closed"])
    assert row["gap_closed"] == pytest.approx((row["after"] - row["before"]) / (1.0 - row["before"]))
    assert "eval/diversity/pixel_rms" in rep["eval"] and rep["eval"]["eval/diversity/pixel_rms"]["before"] > 0
    # per-sample scores of each evaluation, paired across the first and last (2 prompts x 2 seeds)
    first = read_eval_scores(run / "eval" / "step_00000000.scores.jsonl")
    last = read_eval_scores(run / "eval" / "step_00000002.scores.jsonl")
    assert sorted(first) == [("a blue square", 0, 1), ("a blue square", 1, 1), ("a red circle", 0, 0), ("a red circle", 1, 0)]
    diffs = torch.tensor([last[k]["mean_color_match"] - first[k]["mean_color_match"] for k in sorted(first)])
    assert sum(r["mean_color_match"] for r in last.values()) / 4 == pytest.approx(row["after"], abs=1e-6)
    assert row["n_pairs"] == 4 and row["paired_se"] == pytest.approx(float(diffs.std() / 2), rel=1e-4)
    assert row["gap_closed_se"] == pytest.approx(row["paired_se"] / (1.0 - row["before"]))
    for f in ("curves.png", "before.png", "after.png", "config.yaml"):
        assert (run / f).stat().st_size > 0, f
    assert [r["kind"] for r in read_metrics(run)].count("eval") == 3
    # the CLI rebuilds it, with the run's own targets or given ones
    (run / "report.json").unlink()
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "of the gap to 1 closed" in printed and "paired SE" in printed
    assert main(["report", str(run), "--target", "eval/mean_color_match/mean=0.5"]) == 0
    assert json.loads((run / "report.json").read_text())["eval"]["eval/mean_color_match/mean"]["target"] == 0.5
    assert main(["report", str(run), "--target", "nonsense"]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_max_minutes_stops_before_the_next_step(tmp_path):
    t = _trainer(tmp_path, "max_minutes=1e-9", "max_steps=5")
    assert t.fit() == [] and t.step == 0
    assert (tmp_path / "run" / "report.json").is_file()  # the start evaluation still gets its report
    with pytest.raises(Exception, match="max_minutes must be > 0"):
        _trainer(tmp_path, "max_minutes=0")

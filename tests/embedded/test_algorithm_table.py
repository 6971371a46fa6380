"""The embedded algorithm table: every recipe it runs exists and validates with its overrides; rows are
read from a run's report."""
import json
from pathlib import Path

import pytest

from mmalign.embedded import algorithm_table as at
from mmalign.trainers import load_train_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(at.RECIPES))
def test_every_recipe_validates_with_the_table_overrides(name):
    cfg = load_train_config(ROOT / at.RECIPES[name], [*at.COMMON, "max_minutes=5"])
    assert cfg.algorithm == name and cfg.max_minutes == 5.0
    assert cfg.eval.prompts_file.endswith("shapeworld_heldout.txt") and cfg.eval.max_prompts is None
    assert cfg.eval.report_targets == {at.STRICT: 1.0} and cfg.model.name == "assets/shapeworld-sd3" and cfg.threads == 1


@pytest.mark.parametrize("world", ["video", "audio"])
def test_media_worlds_have_every_recipe_validating_with_the_table_overrides(world):
    w = at.WORLDS[world]
    assert set(w.recipes) == {"grpo", "dpo", "rwr", "reward_backprop"}
    model = {"video": "assets/movingshapes-wan", "audio": "assets/toneworld-audioldm"}[world]
    for name, path in w.recipes.items():
        cfg = load_train_config(ROOT / path, [*at.common_overrides(w), "max_minutes=5"])
        assert cfg.algorithm == name and cfg.model.name == model and cfg.threads == 1, path
        assert cfg.eval.prompts_file == w.heldout and cfg.eval.report_targets == {w.strict: 1.0}
        assert cfg.eval.seeds == list(w.eval_seeds) and len(w.eval_seeds) >= 2
        labels = [r.name for r in cfg.rewards + cfg.held_out_rewards]
        assert w.verifier in labels and w.learned.split("/")[1] in labels, (path, labels)
    assert at.header(world).count("|") == at.HEADER.count("|")


def test_table_row_from_a_report(tmp_path):
    run = tmp_path / "grpo"
    run.mkdir()
    ev = {at.STRICT: {"before": 0.1, "after": 0.28, "change": 0.18, "target": 1.0, "gap_closed": 0.2},
          "eval/shapeeval/mean": {"before": 0.2, "after": 0.3, "change": 0.1},
          "eval/clipscore/mean": {"before": 60.0, "after": 61.5, "change": 1.5}}
    (run / "report.json").write_text(json.dumps({"steps": 3, "train_seconds": 90.0, "eval": ev}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"kind": "train", "step": i, "samples": 64}) for i in (1, 2, 3)))
    row = at.table_row("grpo", run)
    assert row.startswith("| grpo | 3 | 192 | 0.100 -> 0.280 | +20.0% | 0.200 -> 0.300 | 60.00 -> 61.50 | n/a | 1.5 |")
    # with per-sample scores the report carries the paired SE of each change, and the row shows it
    ev[at.STRICT].update(paired_se=0.03, gap_closed_se=0.0333)
    ev["eval/shapeeval/mean"]["paired_se"] = 0.01
    (run / "report.json").write_text(json.dumps({"steps": 3, "train_seconds": 90.0, "eval": ev}))
    assert at.table_row("grpo", run).startswith(
        "| grpo | 3 | 192 | 0.100 -> 0.280 (±0.030) | +20.0% ± 3.3 | 0.200 -> 0.300 (±0.010) | 60.00 -> 61.50 | n/a |")


def test_bad_arguments():
    with pytest.raises(SystemExit):
        at.main(["--only", "nope"])
    with pytest.raises(SystemExit):
        at.main(["--minutes", "0"])
    with pytest.raises(SystemExit):
        at.main(["--world", "audio", "--only", "prdp"])
    with pytest.raises(SystemExit):
        at.main(["--only", "grpo", "--set", "optim.lr"])


def test_set_overrides_come_last_and_tag_names_the_run(tmp_path):
    cmd = at.command("grpo", 2, tmp_path, ["optim.lr=1e-3", "threads=2"], tag="_fast")
    assert cmd[cmd.index("--config") + 1] == at.RECIPES["grpo"] and f"out={tmp_path / 'grpo_fast'}" in cmd
    assert cmd[-2:] == ["optim.lr=1e-3", "threads=2"]  # after the common overrides, so they win
    cfg = load_train_config(ROOT / at.RECIPES["grpo"], cmd[cmd.index("--config") + 2:])
    assert cfg.optim.lr == 1e-3 and cfg.threads == 2 and cfg.max_minutes == 2.0

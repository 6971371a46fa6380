"""The reward commands of the CLI: score, eval-reward / eval, bench rewards and their configs."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.cli import config_kinds, main

ROOT = Path(__file__).resolve().parents[1]
BRIGHT = "mmalign.testing.combine:tiny_brightness"


def png(path, value, size=8):
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    return [png(tmp_path / "dark.png", 51), png(tmp_path / "light.png", 204)]


def test_score_prints_a_table_and_writes_json(files, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code = main(["score", "--reward", BRIGHT, "--prompt", "a lamp", *files, "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "dark.png" in text and "light.png" in text and "a lamp" in text
    assert "0.2" in text and "0.8" in text and "yes" in text
    data = json.loads(out.read_text())
    assert data["reward"] == "brightness" and [i["prompt"] for i in data["items"]] == ["a lamp"] * 2
    assert [round(i["score"], 3) for i in data["items"]] == [0.2, 0.8]
    assert data["provenance"]["differentiable"] is True


def test_score_invalid_files_are_reported_in_the_table(files, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"nope")
    out = tmp_path / "s.json"
    assert main(["score", "-r", BRIGHT, *files, str(bad), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no: unreadable image" in text
    item = json.loads(out.read_text())["items"][2]
    assert item["valid"] is False and item["score"] is None and item["reason"].startswith("unreadable image")


def test_score_prompts_per_file_and_file(files, tmp_path, capsys):
    assert main(["score", "-r", BRIGHT, "-p", "one", "-p", "two", *files]) == 0
    text = capsys.readouterr().out
    assert "one" in text and "two" in text
    pf = tmp_path / "prompts.txt"
    pf.write_text("first\n# comment\nsecond\n")
    assert main(["score", "-r", BRIGHT, "--prompts-file", str(pf), *files]) == 0
    assert "second" in capsys.readouterr().out


def test_score_with_options_and_a_combination(files, tmp_path, capsys):
    out = tmp_path / "w.json"
    code = main(["score", "-r", "weighted_sum", "-o", f"rewards=[{BRIGHT}, {BRIGHT}]", "-o", "weights=[1, 2]",
                 *files, "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "brightness#2" in text
    items = json.loads(out.read_text())["items"]
    assert items[1]["score"] == pytest.approx(3 * 0.8, abs=1e-3) and items[1]["brightness#2"] == pytest.approx(0.8, abs=1e-3)


def test_score_tiny_clip_reward_shows_components(files, capsys):
    pytest.importorskip("mmalign.rewards.clip")
    assert main(["score", "--reward", "tiny:clipscore", "--prompt", "a lamp", *files]) == 0
    text = capsys.readouterr().out
    assert "clipscore" in text and "cosine" in text


@pytest.fixture
def prefs(tmp_path):
    rows = []
    for i, (c, r, cat) in enumerate([(200, 100, "light"), (150, 50, "light"), (40, 90, "dark"), (70, 70, "dark")]):
        rows.append({"prompt": f"p{i}", "chosen": png(tmp_path / f"c{i}.png", c), "rejected": png(tmp_path / f"r{i}.png", r),
                     "category": cat})
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("command", ["eval-reward", "eval"])
def test_eval_reward_prints_accuracy(prefs, tmp_path, capsys, command):
    out = tmp_path / "report.json"
    assert main([command, "--reward", BRIGHT, "--data", str(prefs), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 pairs" in text and "overall" in text and "light" in text and "dark" in text
    assert "0.667" in text  # 2 of 3 decided pairs; one predicted tie
    report = json.loads(out.read_text())
    assert report["overall"]["correct"] == 2 and report["overall"]["pred_ties"] == 1
    assert report["per_category"]["light"]["accuracy"] == 1.0


def test_configs_for_reward_jobs(prefs, tmp_path, capsys):
    cfg = tmp_path / "eval_bright.yaml"
    cfg.write_text(f"reward:\n  name: {BRIGHT}\ndata: {prefs}\ntol: 0.5\n")
    assert main(["eval-reward", "--config", str(cfg)]) == 0
    assert "tie tolerance 0.5" in capsys.readouterr().out
    assert main(["eval-reward", "--config", str(cfg), "--show-config"]) == 0
    assert "tol: 0.5" in capsys.readouterr().out
    kinds = config_kinds()
    assert {"sample", "bench", "score", "eval"} <= set(kinds)


@pytest.mark.parametrize("argv, needle", [
    (["score", "-r", BRIGHT, "/nonexistent.png"], "does not exist"),
    (["score", "/tmp/x.png"], "no reward given"),
    (["score", "-r", "nonexistent_reward", "FILE"], "unknown reward 'nonexistent_reward'"),
    (["score", "-r", "tiny:nonexistent", "FILE"], "unknown reward 'nonexistent'"),
    (["score", "-r", BRIGHT], "no files to score"),
    (["score", "-r", BRIGHT, "-o", "bad option", "x.png"], "bad override 'bad option'"),
    (["score", "-r", "weighted_sum", "-o", f"rewards=[{BRIGHT}]", "-o", "weights=[1, 2]", "FILE"], "2 weights for 1 rewards"),
    (["score", "-r", BRIGHT, "-p", "a", "-p", "b", "-p", "c", "FILE"], "3 prompts for 1 files"),
    (["score", "-r", BRIGHT, "--batch-size", "0", "FILE"], "batch_size must be >= 1"),
    (["eval"], "needs either --model"),
    (["eval-reward", "-r", BRIGHT], "no preference data given"),
    (["eval-reward", "-r", BRIGHT, "--data", "/nonexistent.jsonl"], "does not exist"),
    (["eval-reward", "-r", BRIGHT, "--data", "BADJSON"], "bad.jsonl:1: not valid JSON"),
    (["bench", "rewards", "repeats=0"], "repeats, batch_size and image_size must be >= 1"),
    (["bench", "rollout", "--config", "configs/bench_rewards.yaml"], "is for benchmark 'rewards', not 'rollout'"),
    (["bench"], "name a benchmark"),
])
def test_errors_are_messages_with_exit_2(argv, needle, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    argv = [files[0] if a == "FILE" else str(bad) if a == "BADJSON" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mmalign: error: " in err and needle in err, err
    assert "Traceback" not in err


def test_bench_configs_load_by_name():
    from mmalign.bench import BenchConfig, RewardsBenchConfig, RolloutBenchConfig, load_bench_config

    assert config_kinds()["bench"] is BenchConfig
    name, cfg = load_bench_config(None, str(ROOT / "configs" / "bench_rewards.yaml"), ["batch_size=4"])
    assert name == "rewards" and isinstance(cfg, RewardsBenchConfig) and cfg.batch_size == 4
    name, cfg = load_bench_config("rollout", None, ["num_steps=3"])
    assert isinstance(cfg, RolloutBenchConfig) and cfg.num_steps == 3


def test_bench_rewards_runs_on_a_tiny_clip(capsys):
    pytest.importorskip("mmalign.rewards.clip")
    assert main(["bench", "rewards", "repeats=1", "batch_size=2", "image_size=40", "clip={}"]) == 0
    text = capsys.readouterr().out
    assert "bare model forward" in text and "reward-call overhead" in text

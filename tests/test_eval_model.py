"""`mmalign eval --model ... --prompts ... --reward ...`: per-category report of a model on a prompt suite."""
import json

import pytest

from mmalign.cli import main
from mmalign.jobs import read_prompt_suite


def test_prompt_suite_reader(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("# comment\ncounting\tthree red squares\n\na plain prompt\n")
    assert read_prompt_suite(f) == [("counting", "three red squares"), ("all", "a plain prompt")]
    (tmp_path / "bad.txt").write_text("colors\t \n")
    with pytest.raises(ValueError, match="bad.txt:1: empty prompt"):
        read_prompt_suite(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError):
        read_prompt_suite(tmp_path / "missing.txt")


def test_eval_model_cli_reports_per_category(tmp_path, capsys):
    suite = tmp_path / "suite.txt"
    suite.write_text("single_object\ta red circle\ncounting\tthree blue squares\ncounting\ttwo green circles\n")
    out = tmp_path / "ev"
    code = main(["eval", "--model", "tiny:sd3", "--prompts", str(suite), "--reward", "tiny:clipscore",
                 "sampler.num_steps=2", "samples_per_prompt=2", f"out={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "single_object" in printed and "counting" in printed and "overall" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["per_category"]["counting"]["n"] == 4 and report["per_category"]["overall"]["n"] == 6
    scores = [s["clipscore"] for s in report["samples"] if s["category"] == "counting"]
    assert report["per_category"]["counting"]["clipscore.mean"] == pytest.approx(sum(scores) / len(scores))
    assert (out / "grid.png").is_file() and (out / "table.txt").is_file()
    # same seed, same report
    out2 = tmp_path / "ev2"
    main(["eval", "--model", "tiny:sd3", "--prompts", str(suite), "--reward", "tiny:clipscore",
          "sampler.num_steps=2", "samples_per_prompt=2", f"out={out2}"])
    assert json.loads((out2 / "report.json").read_text())["samples"] == [
        {**s, "file": s["file"]} for s in report["samples"]
    ]


def test_eval_cli_errors(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "needs either --model" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny:sd3", "--prompts", str(tmp_path / "none.txt"), "--reward", "tiny:clipscore"]) == 2
    assert "does not exist" in capsys.readouterr().err

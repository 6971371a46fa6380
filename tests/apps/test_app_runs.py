"""The runs app's callbacks on a run folder in the trainers' format."""
from __future__ import annotations

import gradio as gr
import pytest


def test_load_run_curves_report_and_grids(apps, run_dir):
    from mmalign.apps.runs import RunsCallbacks, discover_runs, load_run

    assert discover_runs(run_dir.parent) == [str(run_dir)]
    view = load_run(run_dir)
    assert len(view.train) == 6 and len(view.evals) == 3 and [s for s, _ in view.grids] == [0, 3, 6]
    assert view.metric_keys == ["held_out/clipscore/mean", "reward/shapeeval/mean", "kl", "eval/clipscore/mean",
                                "eval/shapeeval/mean", "eval/shapeeval:strict/mean"]
    state, summary, metrics, figure, report, slider, ends, grid = RunsCallbacks().load(str(run_dir))
    assert "`grpo` on `tiny:sd3`" in summary and "3 evaluation grids" in summary
    assert metrics["choices"] == view.metric_keys
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles[0].startswith("trained vs held-out") and titles[1:] == view.default_metrics  # the overlay first
    assert "eval/shapeeval:strict/mean" not in view.default_metrics  # constant over the run
    rows = {r[0]: r for r in report}
    assert rows["eval/shapeeval/mean"][1:3] == [0.2, pytest.approx(0.08)]
    assert rows["eval/shapeeval:strict/mean"][4] == 0.0
    assert slider["maximum"] == 2 and len(ends) == 2 and grid["label"].startswith("evaluation at step 6")
    assert RunsCallbacks().grid(state, 1)["label"] == "evaluation at step 3 (2/3)"
    only_kl = RunsCallbacks().metrics(state, ["kl"], True)
    assert len(only_kl.axes) == 1


def test_run_errors(apps, tmp_path, run_dir):
    from mmalign.apps.runs import RunsCallbacks, curves_figure, load_run

    with pytest.raises(gr.Error, match="does not exist"):
        RunsCallbacks().load(str(tmp_path / "nope"))
    with pytest.raises(gr.Error, match="metrics.jsonl does not exist"):
        RunsCallbacks().load(str(tmp_path))
    with pytest.raises(ValueError, match="not in this run"):
        curves_figure(load_run(run_dir), ["reward/other/mean"])
    with pytest.raises(gr.Error, match="enter a run directory"):
        RunsCallbacks().load("")

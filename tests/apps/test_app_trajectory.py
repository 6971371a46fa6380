"""The trajectory view's callbacks: every step's sample and per-step (dense) rewards."""
from __future__ import annotations

import math
from pathlib import Path

import gradio as gr
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EMBEDDED_MODEL = str(REPO / "assets" / "shapeworld-sd3")


def test_predicted_x0_per_step_and_final_sample(apps, resources, repo_cwd):
    from mmalign.apps.compare import SideSpec, compare
    from mmalign.apps.trajectory import TrajectoryCallbacks, run_trajectory, strip_html

    result = run_trajectory(resources, EMBEDDED_MODEL, "", "a red circle", 3, "ode", 4, 4.0, 0.7, ["shapeeval"])
    assert result.num_points == 5 and result.media.shape[1:] == (3, 32, 32)
    assert len(result.series("shapeeval")) == 5 and len(result.gains("shapeeval")) == 4
    assert all(0 <= v <= 1 for v in result.series("shapeeval"))
    # the last point is the sample the compare app draws for the same seed and settings
    side = compare(resources, "a red circle", "3", 1, [], SideSpec("A", EMBEDDED_MODEL, num_steps=4),
                   SideSpec("B", EMBEDDED_MODEL, num_steps=4)).sides[0]
    assert torch.allclose(result.media[-1], side.samples[0], atol=1e-6)
    assert strip_html(result).count("<figure") == 5
    state, figure, slider, current, strip = TrajectoryCallbacks(resources).run(
        EMBEDDED_MODEL, "", "a red circle", 3, "ode", 4, 4.0, 0.7, "x0", 2, ["shapeeval"], "")
    assert slider["maximum"] == 4 and "final sample" in current and figure.axes
    assert "step 1" in TrajectoryCallbacks(resources).step(state, 1)
    assert TrajectoryCallbacks(resources).step(None, 1) == ""


def test_ode_completion_view_telescopes(apps, resources):
    from mmalign.apps.trajectory import run_trajectory, trajectory_figure

    result = run_trajectory(resources, "tiny:sd3", "", "a red circle", 0, "flow_grpo", 3, 1.0, 0.7, ["tiny:jpeg_size"],
                            view="completion", completion_steps=1)
    values = result.series("tiny:jpeg_size")
    assert len(values) == 4 and all(math.isfinite(v) for v in values)
    assert sum(result.gains("tiny:jpeg_size")) == pytest.approx(values[-1] - values[0], abs=1e-4)
    assert len(trajectory_figure(result).axes) == 1


def test_trajectory_errors(apps, resources):
    from mmalign.apps.trajectory import TrajectoryCallbacks

    callbacks = TrajectoryCallbacks(resources)
    with pytest.raises(gr.Error, match=r"steps must be in \[1, 100\]"):
        callbacks.run("tiny:sd3", "", "a red circle", 0, "ode", 500, 4.0, 0.7, "x0", 2, [], "")
    with pytest.raises(gr.Error, match="unknown view"):
        callbacks.run("tiny:sd3", "", "a red circle", 0, "ode", 2, 4.0, 0.7, "sideways", 2, [], "")
    with pytest.raises(gr.Error, match="enter a prompt"):
        callbacks.run("tiny:sd3", "", " ", 0, "ode", 2, 4.0, 0.7, "x0", 2, [], "")

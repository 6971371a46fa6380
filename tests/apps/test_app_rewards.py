"""The rewards app's callbacks: several rewards on files, ranks, preference pairs, input errors."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

REPO = Path(__file__).resolve().parents[2]
CLIP_SPEC = f"clipscore model_id={REPO / 'assets' / 'shapeworld-clip'}"


def test_scores_components_and_ranks(apps, resources, shapeworld_pngs):
    from mmalign.apps.rewards import RewardsCallbacks, score_files

    paths, captions = shapeworld_pngs
    files = [str(p) for p in paths]
    table = score_files(resources, files, captions, "image", ["shapeeval", CLIP_SPEC])
    assert [row[0].score for row in table.scores] == [1.0, 1.0, 1.0]  # ground truth passes the verifier
    assert sorted(r[1] for r in table.ranks) == [1, 2, 3]
    assert all(r[0] == 1 for r in table.ranks)  # ties share rank 1
    html = RewardsCallbacks(resources).score("image", files[:2], "", "\n".join(captions[:2]), ["shapeeval"], CLIP_SPEC)
    assert html.count("class='mm-file'") == 2 and "rank 1/2" in html and "strict" in html


def test_server_paths_with_globs(apps, resources, shapeworld_pngs):
    from mmalign.apps.rewards import collect_files

    paths, _ = shapeworld_pngs
    found = collect_files(None, str(paths[0].parent / "*.png"), "image", resources.settings.limits)
    assert found == sorted(str(p) for p in paths)


def test_preference_pair(apps, resources, shapeworld_pngs):
    from mmalign.apps.rewards import RewardsCallbacks, compare_pair

    paths, captions = shapeworld_pngs
    verdicts = compare_pair(resources, str(paths[2]), str(paths[0]), captions[2], "image", ["shapeeval"])
    assert verdicts[0].preferred == "A"  # "two green triangles": its own render beats a single triangle
    assert verdicts[0].margin > 0
    html = RewardsCallbacks(resources).pair("image", str(paths[2]), str(paths[0]), captions[2], ["shapeeval"])
    assert "mm-preferred'>A<" in html


def test_input_errors(apps, resources, shapeworld_pngs, tmp_path):
    from mmalign.apps.rewards import RewardsCallbacks, rank

    callbacks = RewardsCallbacks(resources)
    paths, _ = shapeworld_pngs
    png = str(paths[0])
    with pytest.raises(gr.Error, match="no media"):
        callbacks.score("image", None, "", "a", ["shapeeval"], "")
    with pytest.raises(gr.Error, match="not a audio file"):
        callbacks.score("audio", [png], "", "a", ["tiny:clap"], "")
    with pytest.raises(gr.Error, match="2 prompt lines for 1 files"):
        callbacks.score("image", [png], "", "a\nb", ["shapeeval"], "")
    with pytest.raises(gr.Error, match="no file matches"):
        callbacks.score("image", None, str(tmp_path / "*.png"), "a", ["shapeeval"], "")
    with pytest.raises(gr.Error, match="select at least one reward"):
        callbacks.score("image", [png], "", "a", [], "")
    with pytest.raises(gr.Error, match="give both samples"):
        callbacks.pair("image", png, None, "a", ["shapeeval"])
    assert rank([1.0, float("nan"), 3.0], higher_is_better=False) == [1, None, 2]

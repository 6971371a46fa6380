"""The compare app's callbacks on tiny models: same seeds on both sides, scores under every sample,
checkpoints, ReNO / best-of-N sides, video and audio, bounds and errors."""
from __future__ import annotations

import math
from pathlib import Path

import gradio as gr
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EMBEDDED_MODEL = str(REPO / "assets" / "shapeworld-sd3")
CLIP_SPEC = f"clipscore model_id={REPO / 'assets' / 'shapeworld-clip'}"


def side_values(model: str, *, checkpoint: str = "", sampler: str = "ode", steps: int = 3, guidance: float = 4.0,
                noise: float = 0.7, inference: str = "none", inference_reward: str = "", iterations: int = 2) -> list:
    """One side's values in the order of the app's controls (SIDE_FIELDS)."""
    return [model, checkpoint, sampler, steps, guidance, noise, inference, inference_reward, iterations]


def test_same_seeds_give_the_same_noise_on_both_sides(apps, resources):
    from mmalign.apps.compare import SideSpec, compare

    result = compare(resources, "a red circle", "5", 2, ["tiny:jpeg_size"], SideSpec("A", "tiny:sd3", num_steps=2),
                     SideSpec("B", "tiny:sd3", num_steps=2))
    assert result.seeds == [5, 6]
    a, b = result.sides
    assert torch.equal(a.samples, b.samples)  # same model and settings: identical, seed by seed
    assert not torch.equal(a.samples[0], a.samples[1])
    single = compare(resources, "a red circle", "6", 1, [], SideSpec("A", "tiny:sd3", num_steps=2), SideSpec("B", "tiny:sd3", num_steps=2))
    assert torch.equal(single.sides[0].samples[0], a.samples[1])  # a sample depends on its seed only


def test_embedded_base_vs_reno_with_rewards_and_components(apps, resources, repo_cwd):
    from mmalign.apps.compare import CompareCallbacks

    progress_calls = []
    status, html, numbers = CompareCallbacks(resources).generate(
        "a red circle", "0", 2, 0, 0, ["shapeeval"], CLIP_SPEC,
        *side_values(EMBEDDED_MODEL, steps=4),
        *side_values(EMBEDDED_MODEL, steps=4, inference="reno", inference_reward=CLIP_SPEC, iterations=2),
        progress=lambda *a, **k: progress_calls.append((a, k)))
    assert status.startswith("Generated 2 pair(s)")
    assert html.count('<td class="mm-cell mm-side-a">') == 2 and html.count('<td class="mm-cell mm-side-b">') == 2
    assert html.count("<img") == 4 and "strict" in html and "cosine" in html
    sides = numbers["sides"]
    assert [s["label"] for s in sides] == ["A", "B"]
    for side in sides:
        assert set(side["mean"]) == {"shapeeval", CLIP_SPEC}
        for sample in side["samples"]:
            assert 0.0 <= sample["scores"]["shapeeval"]["score"] <= 1.0
            assert "strict" in sample["scores"]["shapeeval"]["components"]
    # ReNO keeps the best of its iterations by the optimised reward, iteration 0 being side A's sample
    for a_sample, b_sample in zip(sides[0]["samples"], sides[1]["samples"]):
        assert b_sample["scores"][CLIP_SPEC]["score"] >= a_sample["scores"][CLIP_SPEC]["score"] - 1e-3
    fractions = [a[0] for a, _ in progress_calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("ReNO iteration" in k.get("desc", "") for _, k in progress_calls)


def test_checkpoint_side_and_best_of_n(apps, resources, lora_checkpoint):
    from mmalign.apps.compare import SideSpec, compare, render_compare

    run = str(lora_checkpoint.parent.parent)
    result = compare(resources, "a blue square", "0", 2, ["tiny:jpeg_size"], SideSpec("A", "tiny:sd3", num_steps=2),
                     SideSpec("B", "tiny:sd3", checkpoint=run, num_steps=2))
    assert not torch.allclose(result.sides[0].samples, result.sides[1].samples)
    assert run in render_compare(result)
    best = compare(resources, "a blue square", "0", 1, ["tiny:jpeg_size"], SideSpec("A", "tiny:sd3", num_steps=2),
                   SideSpec("B", "tiny:sd3", num_steps=2, inference="best_of_n", inference_reward="tiny:jpeg_size", iterations=3))
    a, b = best.scores[0][0][0].score, best.scores[1][0][0].score
    assert math.isfinite(a) and math.isfinite(b)


@pytest.mark.parametrize("family, reward, tag", [("wan", "tiny:temporal_consistency", "mm-video"),
                                                 ("audioldm", "tiny:clap", "<audio")])
def test_video_and_audio_sides_are_playable(apps, resources, family, reward, tag):
    from mmalign.apps.compare import SideSpec, compare, render_compare

    result = compare(resources, "a dog barking", "0", 1, [reward], SideSpec("A", f"tiny:{family}", num_steps=2),
                     SideSpec("B", f"tiny:{family}", num_steps=3))
    html = render_compare(result)
    assert html.count(tag) == 2
    assert all(math.isfinite(side[0][0].score) for side in result.scores)


def test_errors_are_clear(apps, resources):
    from mmalign.apps.compare import CompareCallbacks

    callbacks = CompareCallbacks(resources)
    ok = side_values("tiny:sd3", steps=2)
    cases = [
        (("", "0", 1), ok, "enter a prompt"),
        (("a red circle", "0", 99), ok, r"samples must be in \[1, 16\]"),
        (("a red circle", "0", 1), side_values("tiny:sd3", steps=1000), r"side B steps must be in \[1, 100\]"),
        (("a red circle", "0", 1), side_values("tiny:sd3", sampler="ddim"), "does not apply to a flow model"),
        (("a red circle", "0", 1), side_values("tiny:sd3", sampler="flow_grpo", inference="reno", inference_reward="tiny:clipscore"),
         "set its sampler to 'ode'"),
        (("a red circle", "0", 1), side_values("tiny:wan"), "side A makes image and side B makes video"),
        (("a red circle", "0", 1), side_values("tiny:sd3", inference="best_of_n", inference_reward="tiny:clap"),
         "reward 'tiny:clap' scores audio samples, but tiny:sd3 makes image"),
    ]
    for (prompt, seeds, count), b_side, message in cases:
        with pytest.raises(gr.Error, match=message):
            callbacks.generate(prompt, seeds, count, 0, 0, [], "", *ok, *b_side)
    with pytest.raises(gr.Error, match="scores image samples, but these are video samples"):
        callbacks.generate("a cat", "0", 1, 0, 0, ["tiny:jpeg_size"], "", *side_values("tiny:wan", steps=2),
                           *side_values("tiny:wan", steps=2))
    with pytest.raises(gr.Error, match="not differentiable"):
        callbacks.generate("a red circle", "0", 1, 0, 0, [], "", *ok,
                           *side_values("tiny:sd3", steps=2, inference="reno", inference_reward="shapeeval"))


def test_suite_prompts(apps, resources, repo_cwd):
    from mmalign.apps.common import list_prompt_suites, read_suite
    from mmalign.apps.compare import CompareCallbacks

    suites = list_prompt_suites()
    assert "assets/prompts/shapeworld_heldout.txt" in suites
    update = CompareCallbacks(resources).suite_prompts("assets/prompts/shapeworld_heldout.txt")
    assert update["choices"][0] == read_suite("assets/prompts/shapeworld_heldout.txt")[0]
    with pytest.raises(gr.Error, match="does not exist"):
        CompareCallbacks(resources).suite_prompts("assets/prompts/nothing.txt")


def test_build_app_makes_blocks_without_launching(apps, resources, repo_cwd):
    for name in apps.app_names():
        demo = apps.build_app(name, resources=resources)
        assert isinstance(demo, gr.Blocks)
        assert not getattr(demo, "is_running", False)
    with pytest.raises(ValueError, match="unknown app 'nope'"):
        apps.build_app("nope")

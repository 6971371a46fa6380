"""Contract tests run over every registered reward, on its tiny instance."""
import math

import pytest
import torch

import mmalign
from mmalign.rewards import Reward, RewardOutput
from mmalign.testing import tiny_reward, tiny_reward_names

NAMES = mmalign.list_rewards()
# in the ShapeEval grammar too, so the verifier scores them (not marks them invalid)
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square left of a red circle"]
# audio rewards get ToneWorld captions, which the ToneEval verifier parses
AUDIO_PROMPTS = ["a high beep", "two low tones", "a short beep then a long beep", "a low buzz then a high beep"]
# video rewards get MovingShapes captions, which the MotionEval verifier parses
VIDEO_PROMPTS = ["a red circle moving left", "a blue square bouncing", "a green triangle appearing", "a red square turning blue"]


def test_every_registered_reward_has_a_tiny_builder():
    assert set(NAMES) == set(tiny_reward_names())


def make_inputs(reward: Reward, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if reward.modality == "image":
        samples = torch.rand(batch, 3, 32, 32, generator=g)
        extra = {}
    elif reward.modality == "video":
        samples = torch.rand(batch, 8, 3, 32, 32, generator=g)
        extra = {"fps": 8.0}
    else:
        samples = torch.rand(batch, 1, 4000, generator=g) * 1.6 - 0.8
        extra = {"sample_rate": 16000}
    kwargs = dict(extra)
    if "reference" in reward.needs:
        kwargs["references"] = samples.flip(0).clone()
    if "metadata" in reward.needs:
        kwargs["metadata"] = [{"index": i} for i in range(batch)]
    pool = AUDIO_PROMPTS if reward.modality == "audio" else VIDEO_PROMPTS if reward.modality == "video" else PROMPTS
    prompts = [pool[i % len(pool)] for i in range(batch)]
    return samples, prompts, kwargs


@pytest.fixture(scope="module", params=NAMES)
def reward(request):
    return tiny_reward(request.param)


def test_declares_what_it_is(reward):
    assert isinstance(reward, Reward)
    assert reward.modality in ("image", "video", "audio")
    assert reward.needs <= {"prompt", "reference", "metadata"}
    assert isinstance(reward.differentiable, bool) and isinstance(reward.higher_is_better, bool)
    prov = reward.provenance()
    assert prov["reward"] == reward.name and "preprocessing" in prov


def test_output_shapes_and_batch_invariance(reward):
    samples, prompts, kw = make_inputs(reward, 4)
    out = reward(samples, prompts, **kw)
    assert isinstance(out, RewardOutput)
    assert out.scores.shape == (4,) and out.scores.dtype == torch.float32
    assert out.valid.all(), out.reasons
    assert torch.isfinite(out.scores).all()
    for name, comp in out.components.items():
        assert comp.shape[0] == 4 and comp.dtype == torch.float32, name
    singles = [reward(samples[i : i + 1], prompts[i : i + 1], **_slice_kw(kw, i)).scores for i in range(4)]
    torch.testing.assert_close(torch.cat(singles), out.scores, rtol=1e-4, atol=1e-5)


def _slice_kw(kw, i):
    out = dict(kw)
    if "references" in kw:
        out["references"] = kw["references"][i : i + 1]
    if "metadata" in kw:
        out["metadata"] = kw["metadata"][i : i + 1]
    return out


def test_nan_item_is_reported_not_scored(reward):
    samples, prompts, kw = make_inputs(reward, 3)
    samples = samples.clone()
    samples[1].view(-1)[0] = float("nan")
    out = reward(samples, prompts, **kw)
    assert out.valid.tolist() == [True, False, True]
    assert out.reasons[1] and math.isnan(out.scores[1])
    assert torch.isfinite(out.scores[[0, 2]]).all()


def test_empty_prompt_is_reported_when_prompts_are_needed(reward):
    if "prompt" not in reward.needs:
        pytest.skip("reward does not read prompts")
    samples, prompts, kw = make_inputs(reward, 2)
    out = reward(samples, ["", prompts[1]], **kw)
    assert out.valid.tolist() == [False, True] and out.reasons[0] == "empty prompt"


def test_gradients_reach_the_input_when_differentiable(reward):
    if not reward.differentiable:
        pytest.skip("reward is declared non-differentiable")
    samples, prompts, kw = make_inputs(reward, 2)
    samples = samples.clone().requires_grad_(True)
    out = reward(samples, prompts, **kw)
    out.scores.sum().backward()
    assert samples.grad is not None and torch.isfinite(samples.grad).all() and samples.grad.abs().sum() > 0

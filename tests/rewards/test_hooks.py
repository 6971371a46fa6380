"""Rewards in plain diffusers code: scoring pipeline outputs, and the per-step RewardCallback."""
import numpy as np
import pytest
import torch

from mmalign.rewards import CallableReward
from mmalign.rewards.hooks import RewardCallback, pipeline_media, score_pipeline_output
from mmalign.samplers import SamplerConfig, sample
from mmalign.testing import tiny_adapter

PROMPTS = ["a red circle", "two blue squares"]


def brightness_reward(**kw):
    return CallableReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="brightness", needs=(), differentiable=True, **kw)


@pytest.fixture(scope="module", params=["sd3", "sd"])
def setup(request):
    adapter = tiny_adapter(request.param)
    pipe = adapter.pipeline
    pipe.set_progress_bar_config(disable=True)
    latents = adapter.init_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    return request.param, adapter, pipe, latents


def run(pipe, latents, cb=None, steps=3, output_type="pt"):
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=4.5, latents=latents.clone(),
                output_type=output_type, callback_on_step_end=cb)


def test_pipeline_pil_output_scores_directly(setup):
    _, _, pipe, latents = setup
    reward = brightness_reward()
    pil = run(pipe, latents, output_type="pil").images
    assert isinstance(pil, list) and hasattr(pil[0], "convert")
    out = reward(pil, PROMPTS)  # PIL images straight from the pipeline
    ref = reward(run(pipe, latents).images, PROMPTS)
    assert out.valid.all()
    torch.testing.assert_close(out.scores, ref.scores, atol=2 / 255, rtol=0)
    arr = run(pipe, latents, output_type="np")
    assert isinstance(pipeline_media(arr), list)
    torch.testing.assert_close(score_pipeline_output(reward, arr, PROMPTS).scores, ref.scores, atol=1e-5, rtol=0)


def test_callback_records_every_step_and_matches_the_sampler(setup):
    family, adapter, pipe, latents = setup
    reward = brightness_reward()
    cb = RewardCallback(reward, PROMPTS, initial_latents=latents, keep_x0=True)
    images = run(pipe, latents, cb).images
    assert cb.steps == [0, 1, 2] and cb.skipped == []
    per_step = cb.scores_by_step()
    assert per_step.shape == (3, 2) and torch.isfinite(per_step).all()
    # the last step's prediction is the final sample (DDIM: up to the final alpha_bar < 1): its score is the output's
    torch.testing.assert_close(per_step[-1], reward(images).scores, atol=1e-4, rtol=0)
    # the recovered predicted clean latents equal mmalign's recorded x0_pred on the same trajectory
    rollout = sample(adapter, PROMPTS, SamplerConfig(num_steps=3, guidance_scale=4.5, micro_batch=None), latents=latents.clone())
    torch.testing.assert_close(torch.stack(cb.x0s, 1), rollout.x0_pred, atol=1e-4, rtol=1e-4)
    assert all(not h.guided for h in cb.history)
    if family == "sd3":
        assert cb.history[0].sigma == pytest.approx(float(pipe.scheduler.sigmas[0]))


def test_callback_without_initial_latents_skips_step_zero(setup):
    _, _, pipe, latents = setup
    cb = RewardCallback(brightness_reward(), PROMPTS, score_every=2)
    run(pipe, latents, cb, steps=4)
    assert cb.skipped == [0] and cb.steps == [2, 3]  # every 2nd step, and always the last


def test_reward_guidance_changes_the_output_and_raises_the_reward(setup):
    _, _, pipe, latents = setup
    reward = brightness_reward()
    plain = run(pipe, latents).images
    cb = RewardCallback(reward, PROMPTS, lr=200.0, initial_latents=latents, max_grad_norm=5.0)
    guided = run(pipe, latents, cb).images
    assert all(h.guided for h in cb.history)
    assert all(float(h.grad_norm.max()) <= 5.0 + 1e-4 for h in cb.history)
    assert not torch.allclose(plain, guided)
    assert (reward(guided).scores > reward(plain).scores).all()
    # guidance restricted to some steps; a lower-is-better reward is descended
    down = RewardCallback(brightness_reward(higher_is_better=False), PROMPTS, lr=200.0, initial_latents=latents,
                          guidance_steps=[1, 2])
    darker = run(pipe, latents, down).images
    assert [h.guided for h in down.history] == [False, True, True]
    assert (reward(darker).scores < reward(plain).scores).all()


def test_callback_checks():
    plain = CallableReward(lambda x, p: x.mean((1, 2, 3)), needs=(), differentiable=False)
    with pytest.raises(ValueError, match="needs a differentiable reward"):
        RewardCallback(plain, lr=1.0)
    with pytest.raises(ValueError, match="score_every"):
        RewardCallback(plain, score_every=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_unsupported_scheduler_is_a_clear_error():
    from diffusers import EulerAncestralDiscreteScheduler

    adapter = tiny_adapter("sd")
    latents = adapter.init_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    pipe = adapter.pipeline
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="cannot recover the predicted clean sample for EulerAncestralDiscreteScheduler"):
        run(pipe, latents, RewardCallback(brightness_reward(), PROMPTS, initial_latents=latents), steps=2)


def test_prompts_repeat_for_images_per_prompt_and_noise_pred_path(setup):
    family, _, pipe, _ = setup
    seen = []
    reward = CallableReward(lambda x, p: (seen.append(list(p)), x.mean((1, 2, 3)))[1], name="spy")
    cb = RewardCallback(reward, ["a cat"])
    pipe(["a cat"], num_inference_steps=2, num_images_per_prompt=2, output_type="pt", callback_on_step_end=cb)
    assert seen and seen[-1] == ["a cat", "a cat"]
    if family == "sd3":  # a pipeline passing the velocity: x0 = x_next - sigma_next * v, no previous latent
        x = torch.randn(1, pipe.transformer.config.in_channels, 4, 4)
        v = torch.randn_like(x)
        pipe.scheduler.set_timesteps(2)
        pipe.scheduler._step_index = 1
        parts = RewardCallback(brightness_reward())._x0_map(pipe, 0, pipe.scheduler.timesteps[0], x, {"noise_pred": v})
        a, c, u, _ = parts
        s1 = float(pipe.scheduler.sigmas[1])
        torch.testing.assert_close((x - c * u) / a, x - s1 * v)
        assert np.isclose(c, s1)

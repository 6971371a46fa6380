"""Trajectory sampling and log-prob recomputation on real (tiny) diffusers pipelines."""
import math

import pytest
import torch

from mmalign.samplers import SamplerConfig, flow_x0, log_prob, ode_complete, random_sde_window, sample
from mmalign.testing import tiny_adapter

PROMPTS = ["a red circle", "two blue squares", "a green star", "a cat"]


@pytest.fixture(scope="module")
def sd3():
    return tiny_adapter("sd3")


@pytest.fixture(scope="module")
def sd():
    return tiny_adapter("sd")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("method", ["flow_grpo", "dance", "cps"])
def test_flow_ratio_is_exactly_one_at_any_batch_size(sd3, method):
    cfg = SamplerConfig(method=method, num_steps=3, guidance_scale=3.0, noise_level=0.5)
    r = sample(sd3, PROMPTS[:3], cfg, generator=gen())
    assert r.stochastic.all() or method == "cps"  # CPS's last step (sigma_next = 0) has std 0
    for bs in (1, 2, 3):
        sub = r.select(list(range(bs)))
        lp = log_prob(sd3, sub)
        steps = [k for k in range(3) if r.stochastic[k]]
        assert torch.equal(lp.log_probs, sub.log_probs[:, steps]), f"batch {bs}"
        assert torch.equal(torch.exp(lp.log_probs - sub.log_probs[:, steps]), torch.ones(bs, len(steps)))


def test_diffusion_ratio_is_exactly_one_at_any_batch_size(sd):
    r = sample(sd, PROMPTS[:3], SamplerConfig(method="ddim", eta=1.0, num_steps=3, guidance_scale=4.0), generator=gen())
    for bs in (1, 2, 3):
        sub = r.select(list(range(bs)))
        assert torch.equal(log_prob(sd, sub).log_probs, sub.log_probs)


def test_ddpm_rollout_records_finite_log_probs(sd):
    r = sample(sd, PROMPTS[:2], SamplerConfig(method="ddpm", num_steps=3), generator=gen())
    assert torch.isfinite(r.log_probs[:, r.stochastic]).all()
    assert torch.equal(log_prob(sd, r).log_probs, r.log_probs[:, r.stochastic])


def test_recorded_log_prob_matches_normal_density(sd3):
    r = sample(sd3, PROMPTS[:2], SamplerConfig(method="flow_grpo", num_steps=3, log_prob_reduction="sum"), generator=gen())
    lp = log_prob(sd3, r)
    for j, k in enumerate(range(3)):
        ref = torch.distributions.Normal(lp.means[:, j].double(), lp.stds[j].double()).log_prob(r.latents[:, k + 1].double())
        torch.testing.assert_close(r.log_probs[:, k].double(), ref.flatten(1).sum(1), rtol=1e-5, atol=1e-2)


def test_sde_with_zero_noise_equals_ode(sd3):
    x_t = sd3.init_noise(2, gen(3))
    ode = sample(sd3, PROMPTS[:2], SamplerConfig(method="ode", num_steps=3), latents=x_t)
    for method in ("flow_grpo", "dance", "cps"):
        sde = sample(sd3, PROMPTS[:2], SamplerConfig(method=method, num_steps=3, noise_level=0.0), latents=x_t, generator=gen())
        torch.testing.assert_close(sde.latents, ode.latents, rtol=1e-5, atol=1e-5)
        assert not sde.stochastic.any() and torch.isnan(sde.log_probs).all()


def test_same_seed_same_rollout_and_different_seed_differs(sd3):
    cfg = SamplerConfig(method="flow_grpo", num_steps=2)
    a, b = sample(sd3, PROMPTS[:2], cfg, generator=gen(7)), sample(sd3, PROMPTS[:2], cfg, generator=gen(7))
    c = sample(sd3, PROMPTS[:2], cfg, generator=gen(8))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs) and torch.equal(a.samples, b.samples)
    assert not torch.equal(a.latents, c.latents)


def test_groups_share_initial_noise_on_request(sd3):
    r = sample(sd3, PROMPTS[:2], SamplerConfig(method="flow_grpo", num_steps=2, group_size=3, same_noise_in_group=True), generator=gen())
    assert r.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert r.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(r.latents[0, 0], r.latents[2, 0]) and not torch.equal(r.latents[0, 0], r.latents[3, 0])
    assert not torch.equal(r.latents[0, 1], r.latents[1, 1])  # SDE noise still differs within a group
    r2 = sample(sd3, PROMPTS[:1], SamplerConfig(num_steps=1, group_size=2), generator=gen())
    assert not torch.equal(r2.latents[0, 0], r2.latents[1, 0])


def test_sde_window_mixes_ode_and_sde(sd3):
    cfg = SamplerConfig(method="flow_grpo", num_steps=4, sde_window=(1, 3))
    r = sample(sd3, PROMPTS[:2], cfg, generator=gen())
    assert r.stochastic.tolist() == [False, True, True, False]
    assert torch.isnan(r.log_probs[:, [0, 3]]).all() and torch.isfinite(r.log_probs[:, [1, 2]]).all()
    assert (r.noise[:, 0] == 0).all() and (r.noise[:, 3] == 0).all()
    assert torch.equal(log_prob(sd3, r).log_probs, r.log_probs[:, [1, 2]])
    with pytest.raises(ValueError, match="deterministic"):
        log_prob(sd3, r, steps=[0])
    with pytest.raises(ValueError, match="out of range"):
        log_prob(sd3, r, steps=[9])
    lo, hi = random_sde_window(10, 2, gen(0))
    assert hi - lo == 2 and 0 <= lo <= 8


def test_x0_prediction_and_ode_completion(sd3):
    r = sample(sd3, PROMPTS[:2], SamplerConfig(method="ode", num_steps=4), generator=gen())
    cond = sd3.encode_prompts(r.prompts, None, r.meta["guidance_scale"])
    v = sd3.denoise(r.latents[:, 1], r.timesteps[1], cond)
    torch.testing.assert_close(r.x0_pred[:, 1], flow_x0(r.latents[:, 1], v, r.sigmas[1]), rtol=1e-4, atol=1e-4)
    for k in (0, 2, 4):
        done = ode_complete(sd3, r.latents[:, k], k, 4, cond)
        torch.testing.assert_close(done, r.final_latents, rtol=1e-4, atol=1e-4)
    img = ode_complete(sd3, r.latents[:, 2], 2, 4, cond, decode=True)
    assert img.shape == r.samples.shape


def test_log_prob_is_differentiable_through_lora(sd3):
    adapter = tiny_adapter("sd3", seed=1)
    adapter.add_lora(rank=2)
    r = sample(adapter, PROMPTS[:2], SamplerConfig(method="flow_grpo", num_steps=2), generator=gen())
    lp = log_prob(adapter, r)
    lp.log_probs.sum().backward()
    grads = [p.grad for p in adapter.denoiser.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_bad_input_raises_clear_errors(sd3, sd):
    with pytest.raises(ValueError, match="prompt list is empty"):
        sample(sd3, [], SamplerConfig(num_steps=2))
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(num_steps=0)
    with pytest.raises(ValueError, match="initial latents have shape"):
        sample(sd3, PROMPTS[:2], SamplerConfig(num_steps=2), latents=torch.randn(3, 4, 16, 16))
    with pytest.raises(ValueError, match="negative prompts"):
        sample(sd3, PROMPTS[:2], SamplerConfig(num_steps=2), negative_prompts=["x"])
    with pytest.raises(ValueError, match="does not apply to a diffusion model"):
        sample(sd, PROMPTS[:1], SamplerConfig(method="flow_grpo", num_steps=2))
    with pytest.raises(ValueError, match="does not apply to a flow model"):
        sample(sd3, PROMPTS[:1], SamplerConfig(method="ddim", num_steps=2))
    with pytest.raises(ValueError, match="sde_window"):
        SamplerConfig(num_steps=4, sde_window=(2, 6))
    with pytest.raises(ValueError, match="unknown sampler method"):
        SamplerConfig(method="euler_a")
    from mmalign.registry import RegistryError

    with pytest.raises(RegistryError, match="unknown model adapter 'nope'"):
        tiny_adapter("nope")
    _ = math


# ---------------------------------------------------------------------------- partial chains (InstructVideo)
def test_noise_to_step_is_the_forward_process(sd3, sd):
    from mmalign.samplers import noise_to_step

    clean, eps = torch.randn(2, 4, 8, 8, generator=gen(1)), torch.randn(2, 4, 8, 8, generator=gen(2))
    flow = sd3.schedule(5)
    for k in range(5):
        s = float(flow.sigmas[k])
        torch.testing.assert_close(noise_to_step(flow, clean, k, eps), (1 - s) * clean + s * eps)
    assert flow.sigmas[0] == 1 and torch.equal(noise_to_step(flow, clean, 0, eps), eps)
    diff = sd.schedule(5)
    for k in range(5):  # diffusers' own q(x_t | x_0) at the step's timestep
        ref = sd.pipeline.scheduler.add_noise(clean, eps, diff.timesteps[k:k + 1].long())
        torch.testing.assert_close(noise_to_step(diff, clean, k, eps), ref)


@pytest.mark.parametrize("fixture, method", [("sd3", "flow_grpo"), ("sd", "ddim")])
def test_partial_chain_records_only_its_steps_and_recomputes_them(request, fixture, method):
    adapter = request.getfixturevalue(fixture)
    k, start = 5, 2
    cfg = SamplerConfig(method=method, num_steps=k, guidance_scale=2.0, group_size=2, start_step=start,
                        noise_levels=[0.1, 0.2, 0.3, 0.4, 0.5])
    clean = torch.randn(adapter.latent_shape(2), generator=gen(3))  # one per prompt, shared by its group
    r = sample(adapter, PROMPTS[:2], cfg, generator=gen(4), clean_latents=clean)
    assert r.batch_size == 4 and r.num_steps == k - start and r.latents.shape[1] == k - start + 1
    assert r.meta["start_step"] == start and r.stochastic.all() and torch.isfinite(r.log_probs).all()
    full = adapter.schedule(k)
    torch.testing.assert_close(r.timesteps, full.timesteps[start:])
    lp = log_prob(adapter, r)  # steps of the rollout map to schedule steps start + k (noise levels included)
    assert torch.equal(lp.log_probs, r.log_probs)
    # a noise level changed at a skipped step changes nothing; at a run step it changes the density
    skipped = SamplerConfig(**{**r.meta["sampler"], "noise_levels": [9.0, 9.0, 0.3, 0.4, 0.5]})
    assert torch.equal(log_prob(adapter, r, config=skipped).log_probs, r.log_probs)
    moved = SamplerConfig(**{**r.meta["sampler"], "noise_levels": [0.1, 0.2, 0.9, 0.4, 0.5]})
    assert not torch.equal(log_prob(adapter, r, config=moved).log_probs[:, 0], r.log_probs[:, 0])
    # the group's rows start from the same clean latent with different noise
    x_start = r.latents[:, 0]
    assert not torch.equal(x_start[0], x_start[1])


def test_partial_chain_bad_input(sd3):
    with pytest.raises(ValueError, match="start_step must be an integer in"):
        SamplerConfig(num_steps=3, start_step=3)
    with pytest.raises(ValueError, match="ends before start_step"):
        SamplerConfig(num_steps=6, start_step=3, sde_window=(0, 2))
    cfg = SamplerConfig(num_steps=3, start_step=1)
    with pytest.raises(ValueError, match="pass clean_latents"):
        sample(sd3, PROMPTS[:1], cfg)
    with pytest.raises(ValueError, match="clean_latents have shape"):
        sample(sd3, PROMPTS[:2], cfg, clean_latents=torch.randn(3, *sd3.latent_shape(1)[1:]))
    with pytest.raises(ValueError, match="NaN"):
        sample(sd3, PROMPTS[:1], cfg, clean_latents=torch.full(sd3.latent_shape(1), float("nan")))
    with pytest.raises(ValueError, match="only used by a partial chain"):
        sample(sd3, PROMPTS[:1], SamplerConfig(num_steps=3), clean_latents=torch.zeros(sd3.latent_shape(1)))
    r = sample(sd3, PROMPTS[:1], SamplerConfig(method="flow_grpo", num_steps=3, start_step=1),
               clean_latents=torch.zeros(sd3.latent_shape(1)), generator=gen())
    with pytest.raises(ValueError, match="starts at step 0, the rollout at step 1"):
        log_prob(sd3, r, config=SamplerConfig(method="flow_grpo", num_steps=3))

"""Step functions against their formulas, torch.distributions.Normal and diffusers' schedulers."""
import math

import pytest
import torch
from torch.distributions import Normal

from mmalign.samplers import ddim_step, ddpm_step, flow_ode_step, flow_sde_step, gaussian_log_prob
from mmalign.samplers.steps import flow_grpo_std

torch.manual_seed(0)
X = torch.randn(3, 4, 5, 6)
V = torch.randn(3, 4, 5, 6)


def normal_lp(x, mean, std, reduction):
    lp = Normal(mean.double(), float(std)).log_prob(x.double())
    return lp.flatten(1).mean(1) if reduction == "mean" else lp.flatten(1).sum(1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_log_prob_matches_normal(reduction):
    mean = torch.randn(2, 3, 4)
    x = mean + 0.3 * torch.randn(2, 3, 4)
    got = gaussian_log_prob(x, mean, 0.3, reduction)
    torch.testing.assert_close(got.double(), normal_lp(x, mean, 0.3, reduction), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, mean, 0.3, "max")
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_log_prob(x, mean, 0.0)


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flow_sde_log_prob_is_normal_of_mean_and_std(kind, reduction):
    g = torch.Generator().manual_seed(1)
    out = flow_sde_step(V, X, 0.6, 0.45, noise_level=0.7, kind=kind, generator=g, reduction=reduction)
    torch.testing.assert_close(out.prev_sample, out.mean + out.std * out.noise)
    torch.testing.assert_close(out.log_prob.double(), normal_lp(out.prev_sample, out.mean, out.std, reduction), rtol=1e-5, atol=1e-3)
    # scoring the same sample reproduces the sampled log-prob exactly
    again = flow_sde_step(V, X, 0.6, 0.45, noise_level=0.7, kind=kind, prev_sample=out.prev_sample, reduction=reduction)
    torch.testing.assert_close(again.log_prob, out.log_prob, rtol=0, atol=0)


def test_flow_grpo_formula_by_hand():
    s, sn, a = 0.6, 0.45, 0.7
    dt = sn - s
    st = a * math.sqrt(s / (1 - s))
    mean = X * (1 + st**2 / (2 * s) * dt) + V * (1 + st**2 * (1 - s) / (2 * s)) * dt
    out = flow_sde_step(V, X, s, sn, noise_level=a, kind="flow_grpo", noise=torch.zeros_like(X))
    torch.testing.assert_close(out.mean, mean)
    assert out.std.item() == pytest.approx(st * math.sqrt(-dt), rel=1e-6)


def test_flow_grpo_sigma_one_uses_substitute():
    with pytest.raises(ValueError, match="sigma_for_one"):
        flow_grpo_std(1.0, 0.7)
    assert flow_grpo_std(1.0, 0.7, 0.9).item() == pytest.approx(0.7 * math.sqrt(1 / 0.1), rel=1e-6)


def test_dance_and_cps_formulas_by_hand():
    s, sn, eta = 0.6, 0.45, 0.3
    dt = sn - s
    x0 = X - s * V
    score = -(X - (1 - s) * x0) / s**2
    out = flow_sde_step(V, X, s, sn, noise_level=eta, kind="dance", noise=torch.zeros_like(X))
    torch.testing.assert_close(out.mean, X + V * dt - 0.5 * eta**2 * score * dt)
    assert out.std.item() == pytest.approx(eta * math.sqrt(-dt), rel=1e-6)
    a = 0.5
    std = sn * math.sin(a * math.pi / 2)
    x1 = X + (1 - s) * V
    out = flow_sde_step(V, X, s, sn, noise_level=a, kind="cps", noise=torch.zeros_like(X))
    torch.testing.assert_close(out.mean, x0 * (1 - sn) + x1 * math.sqrt(sn**2 - std**2))
    assert out.std.item() == pytest.approx(std, rel=1e-6)


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
def test_flow_sde_with_zero_noise_is_euler(kind):
    ode = flow_ode_step(V, X, 0.6, 0.45)
    sde = flow_sde_step(V, X, 0.6, 0.45, noise_level=0.0, kind=kind)
    torch.testing.assert_close(sde.prev_sample, ode.prev_sample, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ode.prev_sample, X + (0.45 - 0.6) * V)
    assert not sde.stochastic and torch.isnan(sde.log_prob).all()


def test_flow_step_bad_input():
    with pytest.raises(ValueError, match="decrease sigma"):
        flow_sde_step(V, X, 0.4, 0.5, noise_level=0.7)
    with pytest.raises(ValueError, match="unknown flow SDE kind"):
        flow_sde_step(V, X, 0.6, 0.5, noise_level=0.7, kind="nope")
    with pytest.raises(ValueError, match="noise shape"):
        flow_sde_step(V, X, 0.6, 0.5, noise_level=0.7, noise=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step(V, X, 0.6, 0.5, noise_level=-1)


def test_flow_euler_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(4)
    x = X.clone()
    for k, t in enumerate(sch.timesteps):
        ref = sch.step(V, t, x).prev_sample
        ours = flow_ode_step(V, x, sch.sigmas[k], sch.sigmas[k + 1]).prev_sample
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        x = ref


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(prediction_type, eta):
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    sch.set_timesteps(5)
    ratio = sch.config.num_train_timesteps // 5
    for t in sch.timesteps:
        a = sch.alphas_cumprod[t]
        prev_t = t - ratio
        a_prev = sch.alphas_cumprod[prev_t] if prev_t >= 0 else sch.final_alpha_cumprod
        noise = torch.randn_like(X)
        ref = sch.step(V, t, X, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step(V, X, a, a_prev, eta=eta, prediction_type=prediction_type, noise=noise)
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)
        if eta > 0:
            torch.testing.assert_close(ours.log_prob.double(), normal_lp(ours.prev_sample, ours.mean, ours.std, "mean"), atol=1e-3, rtol=1e-5)


def test_ddpm_matches_diffusers():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    sch.set_timesteps(5)
    for t in sch.timesteps:
        a = sch.alphas_cumprod[t]
        prev_t = sch.previous_timestep(t)
        a_prev = sch.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        noise = torch.randn_like(X)
        g = torch.Generator().manual_seed(int(t))
        ref_noise = torch.randn(X.shape, generator=g)
        ref = sch.step(V, t, X, generator=torch.Generator().manual_seed(int(t))).prev_sample
        ours = ddpm_step(V, X, a, a_prev, noise=ref_noise if t > 0 else noise)
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)


def test_ddim_eta_one_equals_ddpm_posterior():
    a, a_prev = torch.tensor(0.5), torch.tensor(0.7)
    noise = torch.randn_like(X)
    d = ddim_step(V, X, a, a_prev, eta=1.0, noise=noise)
    p = ddpm_step(V, X, a, a_prev, noise=noise)
    torch.testing.assert_close(d.mean, p.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.std, p.std)

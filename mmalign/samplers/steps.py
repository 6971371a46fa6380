"""Pure single-step functions of flow-matching and diffusion samplers, with Gaussian log-probabilities.

Every stochastic step is ``x_next = mean + std * eps`` with ``eps ~ N(0, I)``, so
``log p(x_next | x) = log N(x_next; mean, std^2 I)``. Each function returns a :class:`StepOutput`;
when ``prev_sample`` is given it is *not* resampled, only scored (that is how log-probs are recomputed
under new parameters during training).

Shapes: ``x``, ``model_output``: ``B,*L`` (any latent layout). ``sigma``/``alpha`` arguments are Python
floats or 0-d tensors (one step for the whole batch). All arithmetic is float32 (bf16 overflows in
the log-prob: Flow-GRPO computes it in float32 too).

Log-prob reduction over latent dimensions: ``"mean"`` (the public Flow-GRPO / DDPO / DanceGRPO code;
it is why their PPO clip ranges are tiny, ~1e-4) or ``"sum"`` (the exact log-density of the step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """Result of one denoising step.

    prev_sample: B,*L  the next latent x_{k+1} (sampled, or the given ``prev_sample``)
    mean:        B,*L  mean of the step's Gaussian
    std:         0-d   its standard deviation (0 for deterministic steps)
    log_prob:    B     log-density of prev_sample, reduced over latent dims; NaN when std == 0
    x0_pred:     B,*L  the predicted clean sample at this step
    noise:       B,*L  the standard-normal noise used (zeros when deterministic)
    """

    prev_sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor
    x0_pred: Tensor
    noise: Tensor

    @property
    def stochastic(self) -> bool:
        return bool(self.std > 0)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduction: Reduction = "mean") -> Tensor:
    """log N(x; mean, std^2 I) per batch row (B,), reduced over all non-batch dims. float32.

    Equals ``torch.distributions.Normal(mean, std).log_prob(x)`` reduced the same way.
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    if bool((std <= 0).any()):
        raise ValueError("gaussian_log_prob: std must be > 0 (deterministic steps have no density)")
    per_elem = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    dims = tuple(range(1, per_elem.ndim))
    if reduction == "mean":
        return per_elem.mean(dim=dims)
    if reduction == "sum":
        return per_elem.sum(dim=dims)
    raise ValueError(f"unknown log-prob reduction {reduction!r} (use 'mean' or 'sum')")


def _finish(
    mean: Tensor,
    std: Tensor,
    x0_pred: Tensor,
    prev_sample: Tensor | None,
    noise: Tensor | None,
    generator: torch.Generator | None,
    reduction: Reduction,
) -> StepOutput:
    """Draw (or score) x_next ~ N(mean, std^2) and package the step."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if prev_sample is None:
        if noise is None:
            if bool(std > 0):
                gen_device = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32).to(mean.device)
            else:
                noise = torch.zeros_like(mean)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match latent shape {tuple(mean.shape)}")
        prev_sample = mean + std * noise.float()
    else:
        if prev_sample.shape != mean.shape:
            raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} does not match latent shape {tuple(mean.shape)}")
        prev_sample = prev_sample.float()
        noise = (prev_sample - mean) / std if bool(std > 0) else torch.zeros_like(mean)
    if bool(std > 0):
        log_prob = gaussian_log_prob(prev_sample, mean, std, reduction)
    else:
        log_prob = torch.full((mean.shape[0],), float("nan"), device=mean.device)
    return StepOutput(prev_sample, mean, std, log_prob, x0_pred, noise)


def _as_f32(v: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=like.device)


# ----------------------------------------------------------------------------- flow matching
# Rectified-flow parametrisation x_sigma = (1 - sigma) x_data + sigma * noise; v = noise - x_data (diffusers).
def flow_x0(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Predicted clean sample x0_hat = x - sigma * v."""
    return x.float() - _as_f32(sigma, x) * v.float()


def flow_x1(x: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """Predicted noise x1_hat = x + (1 - sigma) * v."""
    return x.float() + (1 - _as_f32(sigma, x)) * v.float()


def flow_noise_to(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Forward-noise a clean sample to level ``sigma``: (1 - sigma) x0 + sigma * noise (rectified flow)."""
    sigma = _as_f32(sigma, x0)
    return (1 - sigma) * x0.float() + sigma * noise.float()


def flow_ode_step(
    v: Tensor, x: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, reduction: Reduction = "mean"
) -> StepOutput:
    """Deterministic Euler step x + (sigma_next - sigma) * v (FlowMatchEulerDiscreteScheduler)."""
    x, v = x.float(), v.float()
    dt = _as_f32(sigma_next, x) - _as_f32(sigma, x)
    return _finish(x + dt * v, torch.zeros((), device=x.device), flow_x0(x, v, sigma), None, None, None, reduction)


def flow_grpo_std(sigma: Tensor | float, noise_level: float, sigma_for_one: Tensor | float | None = None) -> Tensor:
    """Flow-GRPO's sigma_t = a * sqrt(sigma / (1 - sigma)) (arXiv 2505.05470).

    At sigma == 1 the ratio is infinite; like the public code, the denominator then uses
    ``sigma_for_one`` (the first sigma below 1 of the schedule).
    """
    s = torch.as_tensor(sigma, dtype=torch.float32)
    denom_sigma = s
    if bool(s >= 1):
        if sigma_for_one is None:
            raise ValueError("flow_grpo step at sigma == 1 needs sigma_for_one (the first sigma < 1 of the schedule)")
        denom_sigma = torch.as_tensor(sigma_for_one, dtype=torch.float32)
    return noise_level * torch.sqrt(s / (1 - denom_sigma))


def flow_sde_step(
    v: Tensor,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    noise_level: float,
    kind: Literal["flow_grpo", "dance", "cps"] = "flow_grpo",
    sigma_for_one: Tensor | float | None = None,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One stochastic flow-matching step from ``sigma`` to ``sigma_next`` (< sigma).

    kind="flow_grpo" (Flow-GRPO, arXiv 2505.05470), with s_t = a * sqrt(sigma / (1 - sigma)), dt = sigma_next - sigma:
        mean = x * (1 + s_t^2 / (2 sigma) * dt) + v * (1 + s_t^2 (1 - sigma) / (2 sigma)) * dt,  std = s_t * sqrt(-dt)
    kind="dance" (DanceGRPO, arXiv 2505.07818), eta = noise_level:
        score = -(x - (1 - sigma) x0_hat) / sigma^2,  mean = x + v dt - eta^2 / 2 * score * dt,  std = eta * sqrt(-dt)
    kind="cps" (coefficient-preserving sampling), a = noise_level:
        std = sigma_next * sin(a pi / 2),  mean = x0_hat (1 - sigma_next) + x1_hat * sqrt(sigma_next^2 - std^2)
    With noise_level = 0 every kind reduces to the Euler ODE step.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    x, v = x.float(), v.float()
    s, s_next = _as_f32(sigma, x), _as_f32(sigma_next, x)
    dt = s_next - s
    if bool(dt >= 0):
        raise ValueError(f"flow step must decrease sigma, got sigma={float(s)} -> sigma_next={float(s_next)}")
    x0 = flow_x0(x, v, s)
    if kind == "flow_grpo":
        st = flow_grpo_std(s, noise_level, sigma_for_one).to(x.device)
        mean = x * (1 + st**2 / (2 * s) * dt) + v * (1 + st**2 * (1 - s) / (2 * s)) * dt
        std = st * torch.sqrt(-dt)
    elif kind == "dance":
        score = -(x - (1 - s) * x0) / s**2
        mean = x + v * dt - 0.5 * noise_level**2 * score * dt
        std = noise_level * torch.sqrt(-dt)
    elif kind == "cps":
        std = s_next * math.sin(noise_level * math.pi / 2)
        mean = x0 * (1 - s_next) + flow_x1(x, v, s) * torch.sqrt(torch.clamp(s_next**2 - std**2, min=0))
    else:
        raise ValueError(f"unknown flow SDE kind {kind!r} (use 'flow_grpo', 'dance' or 'cps')")
    return _finish(mean, std, x0, prev_sample, noise, generator, reduction)


# ----------------------------------------------------------------------------- diffusion (DDIM / DDPM)
def diffusion_noise_to(x0: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Forward-noise a clean sample to ``alpha_bar``: sqrt(a) x0 + sqrt(1 - a) noise (DDPM q(x_t | x_0))."""
    a = _as_f32(alpha_bar, x0)
    return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()


def diffusion_x0_eps(
    model_output: Tensor, x: Tensor, alpha_bar: Tensor | float, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a model output of ``prediction_type`` at cumulative alpha ``alpha_bar``."""
    x, out = x.float(), model_output.float()
    a = _as_f32(alpha_bar, x)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    elif prediction_type == "v_prediction":  # Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1-a) x0
        x0 = torch.sqrt(a) * x - torch.sqrt(1 - a) * out
        eps = torch.sqrt(a) * out + torch.sqrt(1 - a) * x
    elif prediction_type == "sample":
        x0 = out
        eps = (x - torch.sqrt(a) * x0) / torch.sqrt(1 - a)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def ddim_step(
    model_output: Tensor,
    x: Tensor,
    alpha_bar: Tensor | float,
    alpha_bar_prev: Tensor | float,
    *,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """DDIM step with eta (Song et al. 2021, eq. 12; log-prob as in DDPO, arXiv 2305.13301).

    std = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev));
    mean = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps_hat. eta = 0 is deterministic.
    No sample clipping or thresholding (SD-family schedulers ship with them off).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = x.float()
    a, a_prev = _as_f32(alpha_bar, x), _as_f32(alpha_bar_prev, x)
    x0, eps = diffusion_x0_eps(model_output, x, a, prediction_type)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * torch.sqrt(torch.clamp(variance, min=0))
    mean = torch.sqrt(a_prev) * x0 + torch.sqrt(torch.clamp(1 - a_prev - std**2, min=0)) * eps
    return _finish(mean, std, x0, prev_sample, noise, generator, reduction)


def ddpm_step(
    model_output: Tensor,
    x: Tensor,
    alpha_bar: Tensor | float,
    alpha_bar_prev: Tensor | float,
    *,
    prediction_type: str = "epsilon",
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Ancestral DDPM step: the posterior q(x_prev | x, x0_hat) (Ho et al. 2020, eqs. 6-7).

    With alpha = a / a_prev and beta = 1 - alpha over the (possibly strided) step:
    mean = sqrt(a_prev) beta / (1 - a) * x0_hat + sqrt(alpha) (1 - a_prev) / (1 - a) * x,
    variance = (1 - a_prev) / (1 - a) * beta ("fixed_small"). No sample clipping.
    """
    x = x.float()
    a, a_prev = _as_f32(alpha_bar, x), _as_f32(alpha_bar_prev, x)
    x0, _ = diffusion_x0_eps(model_output, x, a, prediction_type)
    alpha = a / a_prev
    beta = 1 - alpha
    mean = torch.sqrt(a_prev) * beta / (1 - a) * x0 + torch.sqrt(alpha) * (1 - a_prev) / (1 - a) * x
    variance = torch.clamp((1 - a_prev) / (1 - a) * beta, min=0)
    return _finish(mean, torch.sqrt(variance), x0, prev_sample, noise, generator, reduction)

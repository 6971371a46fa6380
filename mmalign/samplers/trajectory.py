"""Whole-trajectory sampling that records a :class:`~mmalign.types.Rollout`, and log-prob recomputation.

``sample(adapter, prompts, SamplerConfig(...))`` runs the adapter's own schedule with one step
function per step (ODE outside the SDE window, the chosen SDE inside), recording latents, log-probs,
predicted clean samples and noise. ``log_prob(adapter, rollout, steps)`` recomputes the log-probs
of the recorded transitions under the adapter's *current* parameters (the PPO ratio's numerator);
with unchanged parameters it reproduces the recorded values.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from ..models.base import Conditioning, ModelAdapter, Schedule, check_num_steps, check_prompts
from ..types import Rollout
from .steps import Reduction, StepOutput, ddim_step, ddpm_step, diffusion_noise_to, flow_noise_to, flow_ode_step, flow_sde_step

FLOW_METHODS = ("ode", "flow_grpo", "dance", "cps")
DIFFUSION_METHODS = ("ode", "ddim", "ddpm")
Method = Literal["ode", "flow_grpo", "dance", "cps", "ddim", "ddpm"]


@dataclass
class SamplerConfig:
    """How to sample a trajectory.

    Flow-matching families accept ``ode`` (Euler), ``flow_grpo``, ``dance`` and ``cps`` SDEs;
    diffusion families accept ``ode`` (DDIM with eta 0), ``ddim`` (with ``eta``) and ``ddpm``.
    """

    method: Method = "ode"
    """Step rule used inside the SDE window (outside it, steps are deterministic)."""
    num_steps: int = 10
    """Number of denoising steps K."""
    guidance_scale: float | None = None
    """Classifier-free (or embedded, for FLUX) guidance scale; None uses the family's default."""
    noise_level: float = 0.7
    """Flow SDE noise: ``a`` for flow_grpo (0.7 in Flow-GRPO) and cps, ``eta`` for dance (0.3 for FLUX)."""
    eta: float = 1.0
    """DDIM eta for method ``ddim`` (1.0 in DDPO)."""
    noise_levels: list[float] | None = None
    """Per-step noise (K values, >= 0) used instead of ``noise_level`` (flow SDEs) or ``eta`` (ddim) at
    each step, e.g. DenseGRPO's per-timestep calibration (arXiv 2601.20218); None = the constant one."""
    sde_window: tuple[int, int] | None = None
    """Steps ``[start, end)`` that are stochastic (Flow-GRPO-Fast / MixGRPO); None = every step."""
    log_prob_reduction: Reduction = "mean"
    """Reduce per-dimension log-densities by ``mean`` (public Flow-GRPO/DDPO code) or ``sum`` (exact)."""
    group_size: int = 1
    """Samples per prompt: each prompt is repeated this many times, with a shared ``group_ids`` entry."""
    same_noise_in_group: bool = False
    """Give every sample of a group the same initial noise (DanceGRPO)."""
    record_x0: bool = True
    """Keep the predicted clean latent of every step (dense rewards, viewers)."""
    decode: bool = True
    """Decode final latents into media (``rollout.samples``)."""
    micro_batch: int | None = 1
    """Rows per denoiser call, the same when sampling and recomputing log-probs. A fixed size makes each
    row's float computation independent of the batch, so the training/rollout ratio is exactly 1 for any
    training batch that is a multiple of it (1: any batch). None: one call for the whole batch (fastest)."""
    start_step: int = 0
    """Partial chain (InstructVideo, arXiv 2312.12490): begin at step ``start_step`` of the ``num_steps``
    schedule from given clean latents noised to that step's level, and run only the remaining
    ``num_steps - start_step`` steps (the rollout records those). 0 = the whole chain from pure noise.
    ``sde_window`` and ``noise_levels`` keep indexing the whole schedule."""

    def __post_init__(self) -> None:
        check_num_steps(self.num_steps)
        if self.method not in FLOW_METHODS + DIFFUSION_METHODS:
            raise ValueError(f"unknown sampler method {self.method!r} (flow: {FLOW_METHODS}, diffusion: {DIFFUSION_METHODS})")
        if self.noise_level < 0 or self.eta < 0:
            raise ValueError("noise_level and eta must be >= 0")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or None, got {self.micro_batch}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.log_prob_reduction not in ("mean", "sum"):
            raise ValueError(f"log_prob_reduction must be 'mean' or 'sum', got {self.log_prob_reduction!r}")
        if self.noise_levels is not None:
            if self.method in ("ode", "ddpm"):
                raise ValueError(f"noise_levels: method {self.method!r} has no noise level to set per step "
                                 "(use flow_grpo, dance, cps or ddim)")
            levels = [float(v) for v in self.noise_levels]
            if len(levels) != self.num_steps:
                raise ValueError(f"noise_levels has {len(levels)} values for num_steps={self.num_steps} (give one per step)")
            bad = [i for i, v in enumerate(levels) if not math.isfinite(v) or v < 0]
            if bad:
                raise ValueError(f"noise_levels must be finite and >= 0; steps {bad} are {[levels[i] for i in bad]}")
            self.noise_levels = levels
        if self.sde_window is not None:
            start, end = self.sde_window
            if not (0 <= start < end <= self.num_steps):
                raise ValueError(f"sde_window {self.sde_window} must satisfy 0 <= start < end <= num_steps={self.num_steps}")
            self.sde_window = (int(start), int(end))
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or not 0 <= self.start_step < self.num_steps:
            raise ValueError(f"start_step must be an integer in [0, num_steps={self.num_steps}), got {self.start_step!r}")
        if self.sde_window is not None and self.sde_window[1] <= self.start_step:
            raise ValueError(f"sde_window {self.sde_window} ends before start_step {self.start_step}: the partial chain "
                             "would have no stochastic step")

    def step_noise(self, k: int) -> float:
        """The noise of step ``k``: ``noise_levels[k]`` when given, else ``eta`` (ddim) or ``noise_level``."""
        if self.noise_levels is not None:
            return self.noise_levels[k]
        return self.eta if self.method == "ddim" else self.noise_level

    def in_window(self, k: int) -> bool:
        """Whether step ``k`` uses the stochastic rule."""
        if self.method == "ode":
            return False
        return self.sde_window is None or self.sde_window[0] <= k < self.sde_window[1]


def random_sde_window(num_steps: int, size: int, generator: torch.Generator | None = None, max_start: int | None = None,
                      min_start: int = 0) -> tuple[int, int]:
    """A window of ``size`` consecutive steps at a random start in ``[min_start, max_start]`` (Flow-GRPO-Fast;
    ``min_start`` = a partial chain's first step)."""
    if not 1 <= size <= num_steps - min_start:
        raise ValueError(f"window size {size} must be in [1, num_steps - min_start = {num_steps - min_start}]")
    hi = num_steps - size if max_start is None else min(max_start, num_steps - size)
    hi = max(hi, min_start)
    start = int(torch.randint(min_start, hi + 1, (1,), generator=generator).item())
    return start, start + size


def _check_method(adapter_schedule: Schedule, method: str) -> None:
    allowed = FLOW_METHODS if adapter_schedule.kind == "flow" else DIFFUSION_METHODS
    if method not in allowed:
        raise ValueError(f"sampler method {method!r} does not apply to a {adapter_schedule.kind} model (use one of {allowed})")


def _sigma_for_one(schedule: Schedule) -> Tensor | None:
    """First sigma below 1 (Flow-GRPO's substitute denominator at sigma == 1)."""
    if schedule.sigmas is None:
        return None
    below = schedule.sigmas[schedule.sigmas < 1]
    return below[0] if len(below) else None


def step(
    schedule: Schedule,
    config: SamplerConfig,
    k: int,
    model_output: Tensor,
    x: Tensor,
    *,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """Apply step ``k`` of ``schedule`` with the rule ``config`` assigns to it."""
    stochastic = config.in_window(k)
    red = config.log_prob_reduction
    if schedule.kind == "flow":
        s, s_next = schedule.sigmas[k], schedule.sigmas[k + 1]
        if not stochastic:
            return flow_ode_step(model_output, x, s, s_next, reduction=red)
        return flow_sde_step(
            model_output, x, s, s_next, noise_level=config.step_noise(k), kind=config.method,
            sigma_for_one=_sigma_for_one(schedule), prev_sample=prev_sample, noise=noise,
            generator=generator, reduction=red,
        )
    a, a_prev = schedule.alphas_cumprod[k], schedule.alphas_cumprod[k + 1]
    if config.method == "ddpm" and stochastic:
        return ddpm_step(model_output, x, a, a_prev, prediction_type=schedule.prediction_type,
                         prev_sample=prev_sample, noise=noise, generator=generator, reduction=red)
    eta = config.step_noise(k) if stochastic else 0.0
    return ddim_step(model_output, x, a, a_prev, eta=eta, prediction_type=schedule.prediction_type,
                     prev_sample=prev_sample, noise=noise, generator=generator, reduction=red)


def noise_to_step(schedule: Schedule, clean: Tensor, k: int, noise: Tensor) -> Tensor:
    """The state x_k of step ``k`` of ``schedule`` reached by forward-noising ``clean`` latents (B,*L) with
    standard-normal ``noise`` (B,*L): (1 - sigma_k) x0 + sigma_k eps (flow) or sqrt(a_k) x0 + sqrt(1 - a_k) eps
    (diffusion). With k = 0 on a flow schedule whose first sigma is 1 this is the noise itself."""
    if tuple(clean.shape) != tuple(noise.shape):
        raise ValueError(f"clean latents {tuple(clean.shape)} and noise {tuple(noise.shape)} differ in shape")
    if not 0 <= k < schedule.num_steps:
        raise ValueError(f"step {k} out of range for a {schedule.num_steps}-step schedule")
    if schedule.kind == "flow":
        return flow_noise_to(clean, noise, schedule.sigmas[k])
    return diffusion_noise_to(clean, noise, schedule.alphas_cumprod[k])


def _expand_group(prompts: list[str], negative: list[str] | None, group_size: int) -> tuple[list[str], list[str] | None, Tensor]:
    prompts = [p for p in prompts for _ in range(group_size)]
    negative = None if negative is None else [n for n in negative for _ in range(group_size)]
    group_ids = torch.arange(len(prompts)) // group_size
    return prompts, negative, group_ids


@torch.no_grad()
def sample(
    adapter: ModelAdapter,
    prompts: Sequence[str] | str,
    config: SamplerConfig | None = None,
    *,
    latents: Tensor | None = None,
    negative_prompts: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    conditioning: Conditioning | None = None,
    clean_latents: Tensor | None = None,
) -> Rollout:
    """Sample one trajectory per prompt (``group_size`` per prompt) and record it.

    Args:
        prompts: B0 prompts; the rollout holds B = B0 * group_size samples.
        latents: optional initial noise (B,*L); drawn from ``generator`` otherwise.
        conditioning: pre-encoded prompts for the expanded batch (skips encoding).
        clean_latents: with ``config.start_step > 0`` (a partial chain), the clean latents to start from,
            one per prompt (B0,*L, shared by its group) or per sample (B,*L); the chain begins at
            ``noise_to_step(schedule, clean_latents, start_step, latents)``. The rollout then records
            K' = num_steps - start_step steps (``meta["start_step"]`` says where they begin).

    Runs under ``torch.no_grad``: rollouts are data; gradients come from :func:`log_prob`.
    """
    config = config or SamplerConfig()
    prompts = check_prompts(prompts)
    negative = None if negative_prompts is None else check_prompts(negative_prompts, "negative_prompts")
    if negative is not None and len(negative) != len(prompts):
        raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts; give one per prompt")
    prompts, negative, group_ids = _expand_group(prompts, negative, config.group_size)
    batch = len(prompts)

    schedule = adapter.schedule(config.num_steps)
    _check_method(schedule, config.method)
    guidance = adapter.default_guidance_scale if config.guidance_scale is None else config.guidance_scale
    if conditioning is None:
        conditioning = adapter.encode_in_chunks(prompts, negative, guidance, config.micro_batch)
    elif len(conditioning) != batch:
        raise ValueError(f"conditioning has {len(conditioning)} rows for {batch} samples")

    expected = tuple(adapter.latent_shape(batch))
    if latents is None:
        group = config.group_size if config.same_noise_in_group else 1
        latents = adapter.init_noise(batch, generator, group_size=group)
    elif tuple(latents.shape) != expected:
        raise ValueError(f"initial latents have shape {tuple(latents.shape)}, expected {expected} for batch {batch}")
    x = latents.float().to(adapter.device)
    start = config.start_step
    if start > 0:
        if clean_latents is None:
            raise ValueError(f"start_step {start}: a partial chain starts from clean latents; pass clean_latents")
        clean = clean_latents.float().to(adapter.device)
        if clean.shape[0] * config.group_size == batch and clean.shape[0] != batch:
            clean = clean.repeat_interleave(config.group_size, dim=0)
        if tuple(clean.shape) != expected:
            raise ValueError(f"clean_latents have shape {tuple(clean_latents.shape)}, expected {expected} "
                             f"(or one row per prompt) for batch {batch}")
        if not bool(torch.isfinite(clean).all()):
            raise ValueError("clean_latents hold NaN or infinite values")
        x = noise_to_step(schedule, clean, start, x)
    elif clean_latents is not None:
        raise ValueError("clean_latents are only used by a partial chain: set the sampler's start_step > 0")

    traj, log_probs, x0s, noises, stochastic = [x], [], [], [], []
    for k in range(start, schedule.num_steps):
        out = adapter.denoise_in_chunks(x, schedule.timesteps[k], conditioning, config.micro_batch)
        res = step(schedule, config, k, out, x, generator=generator)
        x = res.prev_sample
        traj.append(x)
        log_probs.append(res.log_prob)
        noises.append(res.noise)
        stochastic.append(res.stochastic)
        if config.record_x0:
            x0s.append(res.x0_pred)

    final = traj[-1]
    return Rollout(
        prompts=prompts,
        negative_prompts=negative,
        latents=torch.stack(traj, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=schedule.timesteps[start:].detach().cpu(),
        sigmas=None if schedule.sigmas is None else schedule.sigmas[start:].detach().cpu(),
        alphas_cumprod=None if schedule.alphas_cumprod is None else schedule.alphas_cumprod[start:].detach().cpu(),
        stochastic=torch.tensor(stochastic),
        samples=adapter.decode(final) if config.decode else None,
        x0_pred=torch.stack(x0s, dim=1) if config.record_x0 else None,
        noise=torch.stack(noises, dim=1),
        group_ids=group_ids,
        meta={
            "family": adapter.family,
            "modality": adapter.modality,
            "guidance_scale": guidance,
            "sampler": asdict(config),
            "start_step": start,
            "log_prob_reduction": config.log_prob_reduction,
            "prediction_type": schedule.prediction_type,
            "sample_rate": adapter.sample_rate,
            "fps": adapter.fps,
        },
    )


@dataclass
class StepLogProbs:
    """Recomputed transitions of a rollout at the chosen steps S.

    log_probs: B,S float32; means: B,S,*L (the step means, for the latent-space KL); stds: S;
    x0_pred: B,S,*L.
    """

    log_probs: Tensor
    means: Tensor
    stds: Tensor
    x0_pred: Tensor


def _config_from_rollout(rollout: Rollout) -> SamplerConfig:
    cfg = dict(rollout.meta["sampler"])
    if cfg.get("sde_window") is not None:
        cfg["sde_window"] = tuple(cfg["sde_window"])
    return SamplerConfig(**cfg)


def log_prob(
    adapter: ModelAdapter,
    rollout: Rollout,
    steps: Sequence[int] | None = None,
    *,
    conditioning: Conditioning | None = None,
    config: SamplerConfig | None = None,
) -> StepLogProbs:
    """Recompute log p(x_{k+1} | x_k) for ``steps`` (default: every stochastic step) under the
    adapter's current parameters, differentiably. With unchanged parameters it equals
    ``rollout.log_probs[:, steps]``. ``steps`` index the rollout's recorded steps (of a partial chain:
    step k is schedule step ``start_step + k``).
    """
    config = config or _config_from_rollout(rollout)
    start = int(rollout.meta.get("start_step", 0))
    if config.start_step != start:
        raise ValueError(f"log_prob: the sampler config starts at step {config.start_step}, the rollout at step {start}")
    if rollout.num_steps != config.num_steps - start:
        raise ValueError(f"log_prob: the rollout has {rollout.num_steps} steps, the sampler config "
                         f"{config.num_steps - start} (num_steps {config.num_steps}, start_step {start})")
    if steps is None:
        steps = [k for k in range(rollout.num_steps) if bool(rollout.stochastic[k])]
    steps = list(steps)
    if not steps:
        raise ValueError("log_prob: no steps to recompute (the rollout has no stochastic step)")
    bad = [k for k in steps if not 0 <= k < rollout.num_steps]
    if bad:
        raise ValueError(f"log_prob: steps {bad} out of range for a {rollout.num_steps}-step rollout")
    det = [k for k in steps if not bool(rollout.stochastic[k])]
    if det:
        raise ValueError(f"log_prob: steps {det} were deterministic (ODE) when sampled and have no density")
    schedule = adapter.schedule(config.num_steps)
    if conditioning is None:
        conditioning = adapter.encode_in_chunks(
            rollout.prompts, rollout.negative_prompts, rollout.meta["guidance_scale"], config.micro_batch
        )
    device = adapter.device
    lps, means, stds, x0s = [], [], [], []
    for k in steps:
        x = rollout.latents[:, k].to(device)
        out = adapter.denoise_in_chunks(x, schedule.timesteps[start + k], conditioning, config.micro_batch)
        res = step(schedule, config, start + k, out, x, prev_sample=rollout.latents[:, k + 1].to(device))
        lps.append(res.log_prob)
        means.append(res.mean)
        stds.append(res.std)
        x0s.append(res.x0_pred)
    return StepLogProbs(torch.stack(lps, 1), torch.stack(means, 1), torch.stack(stds), torch.stack(x0s, 1))


@torch.no_grad()
def ode_complete(
    adapter: ModelAdapter,
    latents: Tensor,
    from_step: int,
    num_steps: int,
    conditioning: Conditioning,
    *,
    decode: bool = False,
    max_steps: int | None = None,
    micro_batch: int | None = None,
) -> Tensor:
    """Finish a trajectory deterministically: from ``latents`` (B,*L) at step ``from_step`` of a
    ``num_steps``-step schedule, run ODE steps to the end. Returns final latents, or media if ``decode``.
    (Dense per-step rewards score these completions.)

    ``max_steps``: at most this many ODE steps, over schedule points evenly spaced in index between
    ``from_step`` and the end (Euler / DDIM eta 0 across the skipped points; None = every remaining step).
    ``micro_batch``: rows per denoiser call (None: the whole batch). ``from_step == num_steps`` returns
    ``latents`` as they are (decoded if ``decode``).
    """
    schedule = adapter.schedule(num_steps)
    if not 0 <= from_step <= schedule.num_steps:
        raise ValueError(f"from_step {from_step} out of range [0, {schedule.num_steps}]")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive integer or None, got {max_steps!r}")
    x = latents.float().to(adapter.device)
    remaining = schedule.num_steps - from_step
    if remaining > 0:
        n = remaining if max_steps is None else min(max_steps, remaining)
        points = [from_step + (i * remaining) // n for i in range(n)] + [schedule.num_steps]  # distinct: remaining >= n
        pick = torch.as_tensor(points)
        sub = Schedule(
            kind=schedule.kind, timesteps=schedule.timesteps[pick[:-1].to(schedule.timesteps.device)],
            prediction_type=schedule.prediction_type,
            sigmas=None if schedule.sigmas is None else schedule.sigmas[pick.to(schedule.sigmas.device)],
            alphas_cumprod=None if schedule.alphas_cumprod is None else schedule.alphas_cumprod[pick.to(schedule.alphas_cumprod.device)],
        )
        ode = SamplerConfig(method="ode", num_steps=n)
        for k in range(n):
            out = adapter.denoise_in_chunks(x, sub.timesteps[k], conditioning, micro_batch)
            x = step(sub, ode, k, out, x).prev_sample
    return adapter.decode(x) if decode else x

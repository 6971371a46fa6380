"""Reward backpropagation for differentiable rewards: DRaFT-K / DRaFT-LV (arXiv 2309.17400), AlignProp's
randomised truncation (arXiv 2310.03739) and the single-step variant of ControlNet++ (arXiv 2404.07987).

The reward's gradient w.r.t. the decoded sample is carried back through the differentiable decoder
(:meth:`~mmalign.models.base.ModelAdapter.decode`) and the last sampling steps into the trained weights;
the loss is ``-sum_i w_i * mean_B R_i(x)`` (no regulariser). Every step uses the shared step functions
(:func:`mmalign.samplers.trajectory.step` over :mod:`mmalign.samplers.steps`) and the adapter's
``denoise``; nothing here is a second sampler.

``mode: last_k`` (DRaFT-K, AlignProp) — one training step:

1. draw ``prompts_per_step`` prompts (the same draw on every process; each takes its slice), and for
   each prompt a generator seeded by (seed, step, prompt index) that draws the initial noise of its
   ``samples_per_prompt`` rows (and the noise of stochastic sampler steps), so a row does not depend on
   the number of processes and a resumed run redraws it exactly;
2. K = ``k`` (``truncation: fixed``) or K ~ U{k_min..k} (``truncation: random``, AlignProp), the same
   on every process;
3. run the sampler's first N - K steps without gradients, then the last K steps with gradients (each
   denoiser call wrapped in ``torch.utils.checkpoint`` when ``checkpoint_steps``), decode, score with
   the trained rewards (all must be differentiable), backward; ``gradient_accumulation_steps`` splits
   the rows into micro-batches, one optimizer update per step.

DRaFT-LV (``lv_samples: n``, K = 1): the whole trajectory runs without gradients; its final latent x0
is re-noised to the last step's noise level n times with fresh noise and denoised once each
(x0_hat of that step, differentiable), and the n losses are averaged.

``mode: single_step`` (ControlNet++): sample x0 with the sampler without gradients (from the same
per-prompt noise), noise it to a random step of a ``timestep_grid_steps``-step schedule whose noise
level lies in ``timestep_range`` (drawn per row: sigma for flow models, t / T for diffusion models),
one differentiable denoiser call, that step's x0_hat, decode, reward.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..models.base import Conditioning, Schedule
from ..samplers import SamplerConfig
from ..samplers.trajectory import step as sampler_step
from .common import PromptSource, TrainConfig, Trainer, make_generator, tensor_stats


@dataclass
class BackpropConfig:
    """Reward-backpropagation hyperparameters (defaults: DRaFT-K with K = 1)."""

    mode: Literal["last_k", "single_step"] = "last_k"
    """``last_k``: backprop through the last K sampling steps (DRaFT-K / DRaFT-LV / AlignProp);
    ``single_step``: noise a sample to a random step, denoise once, score its x0_hat (ControlNet++)."""
    prompts_per_step: int = 4
    """Prompts per training step over all processes (a multiple of the number of processes)."""
    samples_per_prompt: int = 1
    """Samples per prompt (each from its own initial noise)."""
    k: int = 1
    """DRaFT-K: the number K of final sampling steps the gradient flows through (1..sampler.num_steps;
    K = 1 already works well per DRaFT). With ``truncation: random``, the largest K drawn."""
    k_min: int = 1
    """``truncation: random``: the smallest K drawn."""
    truncation: Literal["fixed", "random"] = "fixed"
    """``fixed``: always K = k (DRaFT-K); ``random``: K ~ U{k_min..k} each step, the same on every
    process (AlignProp's randomised truncated backpropagation)."""
    lv_samples: int = 0
    """DRaFT-LV: > 0 re-noises the final sample this many times to the last step's noise level and
    denoises each once (lower-variance K = 1 gradient); needs k = 1 and truncation fixed. 0 = off."""
    checkpoint_steps: bool = True
    """Wrap each differentiable denoiser call in ``torch.utils.checkpoint`` (non-reentrant): only its
    input latents are kept and its activations are recomputed in the backward pass (the activations of
    one denoiser call live at a time instead of K; costs one extra forward per differentiable step; the
    gradients are the same). Independent of the top-level ``gradient_checkpointing`` (diffusers'
    per-block checkpointing inside the denoiser); both can be on."""
    timestep_range: tuple[float, float] = (0.0, 0.25)
    """``single_step``: the noise levels a sample is noised to, as a fraction in [0, 1]: sigma for flow
    models, t / num_train_timesteps for diffusion models (ControlNet++ uses t <= 200 of 1000)."""
    timestep_grid_steps: int | None = None
    """``single_step``: the steps are drawn from this many-step schedule of the model (its own
    (timestep, sigma / alpha_bar) pairs); null = sampler.num_steps."""
    on_invalid_reward: Literal["raise", "skip"] = "raise"
    """A sample a trained reward could not score (NaN): stop with its reason, or leave it out of the
    loss (the mean runs over the scored samples)."""

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}: with K = 0 no sampling step is differentiable, so the "
                             "reward has no gradient w.r.t. the trained weights (DRaFT-K needs K >= 1; K = 1 works)")
        if self.truncation == "random" and not 1 <= self.k_min <= self.k:
            raise ValueError(f"k_min must be in [1, k={self.k}] for truncation: random, got {self.k_min}")
        if self.lv_samples < 0:
            raise ValueError(f"lv_samples must be >= 0, got {self.lv_samples}")
        if self.lv_samples and (self.k != 1 or self.truncation != "fixed" or self.mode != "last_k"):
            raise ValueError("lv_samples (DRaFT-LV) needs mode last_k with k = 1 and truncation fixed")
        lo, hi = self.timestep_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"timestep_range must satisfy 0 <= low <= high <= 1, got {self.timestep_range}")
        self.timestep_range = (float(lo), float(hi))
        if self.timestep_grid_steps is not None and self.timestep_grid_steps < 1:
            raise ValueError(f"timestep_grid_steps must be >= 1 or null, got {self.timestep_grid_steps}")


@dataclass(kw_only=True)
class BackpropTrainConfig(TrainConfig):
    """``mmalign train`` with ``algorithm: reward_backprop``."""

    algorithm: str = "reward_backprop"
    """Must be ``reward_backprop`` for this config."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="ode", num_steps=10, record_x0=False))
    """Sampler of the trajectories the gradient flows through: ``ode`` (Euler / DDIM eta 0, DRaFT and
    AlignProp) or a stochastic method (its noise is reparameterised: drawn per prompt and held fixed)."""
    backprop: BackpropConfig = field(default_factory=BackpropConfig)
    """Reward-backpropagation hyperparameters."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm != "reward_backprop":
            raise ValueError(f"algorithm must be 'reward_backprop' for a reward-backprop config, got {self.algorithm!r}")
        s, b = self.sampler, self.backprop
        if s.group_size != 1:
            raise ValueError("sampler.group_size: set samples per prompt in backprop.samples_per_prompt (sampler.group_size stays 1)")
        if not s.decode:
            raise ValueError("sampler.decode: rewards score decoded samples; keep it true")
        if b.mode == "last_k" and b.k > s.num_steps:
            raise ValueError(f"backprop.k {b.k} exceeds sampler.num_steps {s.num_steps}")


def noise_to_step(schedule: Schedule, k: int, x0: Tensor, noise: Tensor) -> Tensor:
    """The forward process q(x_k | x_0): clean latents ``x0`` (B,*L) at the noise level of step ``k`` of
    ``schedule`` with standard-normal ``noise`` (B,*L); float32, differentiable.

    flow:      (1 - sigma_k) x0 + sigma_k noise          (rectified flow, diffusers' convention)
    diffusion: sqrt(a_k) x0 + sqrt(1 - a_k) noise        (DDPM forward process, Ho et al. 2020 eq. 4)
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match latent shape {tuple(x0.shape)}")
    if not 0 <= k < schedule.num_steps:
        raise ValueError(f"step {k} out of range for a {schedule.num_steps}-step schedule")
    x0, noise = x0.float(), noise.float()
    if schedule.kind == "flow":
        s = schedule.sigmas[k].to(x0.device, torch.float32)
        return (1 - s) * x0 + s * noise
    a = schedule.alphas_cumprod[k].to(x0.device, torch.float32)
    return torch.sqrt(a) * x0 + torch.sqrt(1 - a) * noise


def noise_fraction(schedule: Schedule, num_train_timesteps: int) -> Tensor:
    """Each step's noise level in [0, 1] (K,): sigma (flow) or timestep / num_train_timesteps (diffusion)."""
    if schedule.kind == "flow":
        return schedule.sigmas[:-1].detach().float().cpu()
    return schedule.timesteps.detach().float().cpu() / float(num_train_timesteps)


@dataclass
class _Rows:
    """This process's rows of one step: prompts, categories, and per-row noise drawn per prompt."""

    prompts: list[str]
    categories: list[str]
    init_noise: Tensor  # B,*L
    step_noise: dict[int, Tensor]  # sampler step -> B,*L (stochastic steps only)
    extra_noise: list[Tensor]  # DRaFT-LV re-noising / single-step noise: each B,*L
    picks: Tensor | None = None  # single_step: B step indices

    def select(self, rows: slice) -> "_Rows":
        return _Rows(self.prompts[rows], self.categories[rows], self.init_noise[rows],
                     {k: v[rows] for k, v in self.step_noise.items()}, [e[rows] for e in self.extra_noise],
                     None if self.picks is None else self.picks[rows])


class RewardBackpropTrainer(Trainer):
    """DRaFT-K / DRaFT-LV / AlignProp / ControlNet++ single-step reward backprop (module docstring).

    ``RewardBackpropTrainer(load_train_config("configs/train_backprop_embedded.yaml")).fit()``.
    """

    config_class = BackpropTrainConfig

    # ------------------------------------------------------------------ setup
    def check_setup(self, rewards: Sequence[Any] | None) -> None:
        cfg, b = self.cfg, self.cfg.backprop
        if not (cfg.rewards if rewards is None else rewards):
            raise ValueError("rewards: reward backprop needs at least one trained differentiable reward, "
                             "e.g. rewards: [{name: pickscore}]")
        if b.prompts_per_step % self.world_size:
            raise ValueError(f"backprop.prompts_per_step {b.prompts_per_step} must be a multiple of the number of processes {self.world_size}")
        rows = b.prompts_per_step // self.world_size * b.samples_per_prompt
        if rows % cfg.gradient_accumulation_steps:
            raise ValueError(f"{rows} rows per process do not split into gradient_accumulation_steps={cfg.gradient_accumulation_steps} micro-batches")
        self.prompt_source = PromptSource(cfg.prompts)

    def setup(self) -> None:
        bad = [e.label for e in self.rewards.trained if not getattr(e.reward, "differentiable", False)]
        if bad:
            raise ValueError(f"reward backprop needs differentiable rewards (Reward.differentiable True, gradients reach the "
                             f"pixels); not differentiable: {', '.join(repr(b) for b in bad)}. Train those with GRPO, or keep "
                             "them as held_out_rewards")
        scheduler_config = getattr(getattr(self.adapter.pipeline, "scheduler", None), "config", {}) or {}
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.schedule = self.adapter.schedule(self.cfg.sampler.num_steps)
        self.guidance = (self.adapter.default_guidance_scale if self.cfg.sampler.guidance_scale is None
                         else self.cfg.sampler.guidance_scale)
        if self.cfg.backprop.mode == "single_step":
            b = self.cfg.backprop
            self.grid = self.adapter.schedule(b.timestep_grid_steps or self.cfg.sampler.num_steps)
            frac = noise_fraction(self.grid, self.num_train_timesteps)
            lo, hi = b.timestep_range
            self.grid_steps = [k for k in range(self.grid.num_steps) if lo <= float(frac[k]) <= hi]
            if not self.grid_steps:
                raise ValueError(f"backprop.timestep_range {list(b.timestep_range)} holds no step of the {self.grid.num_steps}-step "
                                 f"schedule (its noise levels: {[round(float(f), 4) for f in frac]}); widen the range or "
                                 "raise backprop.timestep_grid_steps")

    # ------------------------------------------------------------------ randomness (a function of seed and step)
    def truncation(self, step: int) -> int:
        """K of training step ``step``: ``k``, or AlignProp's K ~ U{k_min..k} (same on every process)."""
        b = self.cfg.backprop
        if b.truncation == "fixed":
            return b.k
        return int(torch.randint(b.k_min, b.k + 1, (1,), generator=make_generator(self.cfg.seed, "truncation", step)).item())

    def draw_rows(self, step: int, items: Sequence[tuple[int, str, str]]) -> _Rows:
        """The rows of ``(global_index, category, prompt)`` items at ``step``: each prompt's generator,
        seeded by (seed, "backprop", step, global_index), draws in order the initial noise of its
        ``samples_per_prompt`` rows, the noise of every stochastic sampler step, then the DRaFT-LV /
        single-step noise (and single-step picks)."""
        b, s, adapter = self.cfg.backprop, self.cfg.sampler, self.adapter
        n = b.samples_per_prompt
        stochastic = [k for k in range(self.schedule.num_steps) if s.in_window(k)]
        extra = b.lv_samples if b.mode == "last_k" else 1
        inits, steps, extras, picks = [], {k: [] for k in stochastic}, [[] for _ in range(extra)], []
        shape = adapter.latent_shape(n)
        for gidx, _, _ in items:
            gen = make_generator(self.cfg.seed, "backprop", step, gidx)
            inits.append(adapter.init_noise(n, gen))
            for k in stochastic:
                steps[k].append(torch.randn(shape, generator=gen))
            for e in range(extra):
                extras[e].append(torch.randn(shape, generator=gen))
            if b.mode == "single_step":
                idx = torch.randint(0, len(self.grid_steps), (n,), generator=gen)
                picks.append(torch.tensor([self.grid_steps[i] for i in idx.tolist()]))
        dev = adapter.device
        return _Rows(prompts=[p for _, _, p in items for _ in range(n)], categories=[c for _, c, _ in items for _ in range(n)],
                     init_noise=torch.cat(inits).to(dev), step_noise={k: torch.cat(v).to(dev) for k, v in steps.items()},
                     extra_noise=[torch.cat(e).to(dev) for e in extras], picks=torch.cat(picks) if picks else None)

    # ------------------------------------------------------------------ differentiable pieces
    def denoise(self, x: Tensor, timestep: Tensor, cond: Conditioning, differentiable: bool) -> Tensor:
        """The guided model output at ``timestep`` (B,*L float32), in ``sampler.micro_batch`` chunks; a
        differentiable call is checkpointed when ``backprop.checkpoint_steps``."""
        micro = self.cfg.sampler.micro_batch

        def call(z: Tensor) -> Tensor:
            return self.adapter.denoise_in_chunks(z, timestep, cond, micro)

        if differentiable and self.cfg.backprop.checkpoint_steps:
            return checkpoint(call, x, use_reentrant=False)
        return call(x)

    def last_k_latents(self, rows: _Rows, cond: Conditioning, k_grad: int) -> Tensor:
        """Final latents (B,*L) of the sampler from ``rows.init_noise``: the first N - k_grad steps without
        gradients, the last ``k_grad`` with them."""
        schedule, s = self.schedule, self.cfg.sampler
        n = schedule.num_steps
        x = rows.init_noise
        for k in range(n):
            differentiable = k >= n - k_grad
            with (nullcontext() if differentiable else torch.no_grad()), self.autocast():
                out = self.denoise(x, schedule.timesteps[k], cond, differentiable)
                x = sampler_step(schedule, s, k, out, x, noise=rows.step_noise.get(k)).prev_sample
        return x

    def lv_latents(self, rows: _Rows, cond: Conditioning, final: Tensor, i: int) -> Tensor:
        """DRaFT-LV's i-th estimate: the sample ``final`` (no grad) re-noised to the last step's noise level
        with fresh noise and denoised once, differentiably (that step's x0_hat)."""
        last = self.schedule.num_steps - 1
        x = noise_to_step(self.schedule, last, final.detach(), rows.extra_noise[i])
        ode = dataclasses.replace(self.cfg.sampler, method="ode", sde_window=None)  # x0_hat only: draw no noise
        with self.autocast():
            out = self.denoise(x, self.schedule.timesteps[last], cond, True)
            return sampler_step(self.schedule, ode, last, out, x).x0_pred

    def single_step_latents(self, rows: _Rows, cond: Conditioning, x0: Tensor) -> Tensor:
        """ControlNet++: ``x0`` (no grad) noised to each row's picked step of the grid schedule, one
        differentiable denoiser call per distinct step, that step's x0_hat (B,*L)."""
        grid = self.grid
        xt = noise_to_step_rows(grid, rows.picks, x0.detach(), rows.extra_noise[0])
        ode = dataclasses.replace(self.cfg.sampler, method="ode", num_steps=grid.num_steps, sde_window=None)
        parts, order = [], []
        for k in sorted(set(rows.picks.tolist())):
            idx = [i for i, p in enumerate(rows.picks.tolist()) if p == k]
            with self.autocast():
                out = self.denoise(xt[idx], grid.timesteps[k], cond.select(idx), True)
                parts.append(sampler_step(grid, ode, k, out, xt[idx]).x0_pred)
            order += idx
        x0_hat = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return x0_hat[inverse.to(x0_hat.device)]

    def reward_loss(self, samples: Tensor, prompts: list[str], categories: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """``-sum_i w_i * mean_B R_i(samples)`` over the trained rewards (DRaFT's objective, arXiv 2309.17400),
        and each reward's detached scores (B, NaN where not scored)."""
        adapter = self.adapter
        outs = self.rewards.score(samples, prompts, categories=categories, fps=adapter.fps, sample_rate=adapter.sample_rate,
                                  grad=True, which="trained")
        loss, scores = samples.new_zeros(()), {}
        for e in self.rewards.trained:
            o = outs[e.label]
            if not o.all_valid:
                if self.cfg.backprop.on_invalid_reward == "raise":
                    bad = [f"item {i}: {r}" for i, r in enumerate(o.reasons) if r is not None]
                    raise ValueError(f"step {self.step + 1}: reward {e.label!r} could not score {len(bad)} of {len(o)} samples "
                                     f"({'; '.join(bad[:5])}); set backprop.on_invalid_reward=skip to train on the rest")
                if not bool(o.valid.any()):
                    raise ValueError(f"step {self.step + 1}: reward {e.label!r} scored none of the {len(o)} samples ({o.reasons[0]})")
            valid = o.valid.to(o.scores.device)
            r = o.scores[valid]
            if not r.requires_grad:
                raise RuntimeError(f"reward {e.label!r} returned scores without a gradient although it is declared "
                                   "differentiable (does it detach, round or run under no_grad?)")
            loss = loss - e.weight * r.float().mean().to(loss.device)
            scores[e.label] = o.scores.detach().float().cpu()
        return loss, scores

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict[str, Any]:
        cfg, b, adapter = self.cfg, self.cfg.backprop, self.adapter
        drawn = self.prompt_source.draw(b.prompts_per_step, make_generator(cfg.seed, "prompts", step))
        local, _ = self.shard([(i, c, p) for i, (c, p) in enumerate(drawn)])
        rows = self.draw_rows(step, local)
        k_grad = self.truncation(step) if b.mode == "last_k" else 0
        with torch.no_grad(), self.autocast():
            cond_all = adapter.encode_in_chunks(rows.prompts, None, self.guidance, cfg.sampler.micro_batch)

        micro = len(rows.prompts) // cfg.gradient_accumulation_steps
        losses: list[float] = []
        scored: dict[str, list[Tensor]] = {e.label: [] for e in self.rewards.trained}
        seen: list[tuple[Tensor, list[str], list[str]]] = []  # detached samples, prompts, categories (held-out rewards)
        for m in range(cfg.gradient_accumulation_steps):
            sl = slice(m * micro, (m + 1) * micro)
            sub, cond = rows.select(sl), cond_all.select(list(range(sl.start, sl.stop)))
            if b.mode == "single_step" or b.lv_samples:
                with torch.no_grad():  # the whole trajectory without gradients
                    final = self.last_k_latents(sub, cond, 0)
            if b.mode == "single_step":
                passes = [lambda: self.single_step_latents(sub, cond, final)]
            elif b.lv_samples:
                passes = [lambda i=i: self.lv_latents(sub, cond, final, i) for i in range(b.lv_samples)]
            else:
                passes = [lambda: self.last_k_latents(sub, cond, k_grad)]
            for make in passes:
                latents = make()
                with self.autocast():
                    samples = adapter.decode(latents)
                loss, scores = self.reward_loss(samples, sub.prompts, sub.categories)
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"non-finite reward loss {float(loss.detach())} at step {step + 1}")
                if not loss.requires_grad:
                    raise RuntimeError("the reward loss has no gradient w.r.t. the trained weights")
                self.backward(loss, scale=1.0 / len(passes))
                losses.append(float(loss.detach()))
                for label, s in scores.items():
                    scored[label].append(s)
                seen.append((samples.detach().float().cpu(), sub.prompts, sub.categories))
            self._accum += 1
        update = self.optimizer_step()

        metrics: dict[str, Any] = {"samples": len(rows.prompts) * self.world_size}
        if b.mode == "last_k":
            metrics["k"] = k_grad
        for label, parts in scored.items():
            metrics.update(tensor_stats(self.gather(torch.cat(parts)), f"reward/{label}"))
        if self.rewards.held_out:
            outs = self.rewards.score(torch.cat([x for x, _, _ in seen]), [p for _, ps, _ in seen for p in ps],
                                      categories=[c for _, _, cs in seen for c in cs], fps=adapter.fps,
                                      sample_rate=adapter.sample_rate, which="held_out")
            for label, o in outs.items():
                metrics.update(tensor_stats(self.gather(o.scores.detach().float().cpu()), f"held_out/{label}"))
        if b.mode == "single_step":
            frac = noise_fraction(self.grid, self.num_train_timesteps)[rows.picks]
            metrics.update(tensor_stats(self.gather(frac), "noise_level"))
        agg = {"loss": sum(losses) / len(losses)}
        metrics.update(self.mean_over_processes(agg))
        metrics["grad_norm"], metrics["lr"] = update["grad_norm"], update["lr"]
        return metrics


def noise_to_step_rows(schedule: Schedule, steps: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """:func:`noise_to_step` with a step per row (``steps``: B ints)."""
    return torch.cat([noise_to_step(schedule, int(k), x0[i: i + 1], noise[i: i + 1]) for i, k in enumerate(steps.tolist())])


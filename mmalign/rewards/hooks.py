"""Rewards inside plain diffusers code.

Scoring a pipeline's output needs nothing special: ``reward(pipe(prompts).images, prompts)`` works for
PIL lists (the default ``output_type``), ``"pt"`` tensors and ``"np"`` arrays (see
:func:`pipeline_media`). :class:`RewardCallback` goes inside the sampling loop through diffusers'
``callback_on_step_end``: at every step it forms the predicted clean sample, decodes it with the
pipeline's VAE, scores it and records ``(step, scores)``; optionally it also *guides*, moving the
latents handed back to the pipeline along the reward's gradient.

How the predicted clean sample is recovered
-------------------------------------------
diffusers calls ``callback_on_step_end(pipe, i, t, {"latents": x_{i+1}})`` *after* the scheduler step,
and no pipeline exposes the model output there. The callback therefore remembers the latents it handed
back at the previous step (``x_i``) and inverts the deterministic step of the scheduler:

- Euler on sigmas (``FlowMatchEulerDiscreteScheduler``: flow matching; ``EulerDiscreteScheduler``):
  ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v`` gives ``v = (x_{i+1} - x_i) / (sigma_{i+1} - sigma_i)``
  and ``x0_hat = x_i - sigma_i v = x_{i+1} - sigma_{i+1} v`` (rectified flow ``x_sigma = (1 - sigma) x0 +
  sigma noise``; for Euler-discrete, v is the epsilon-derivative and the same identity holds).
- DDIM with ``eta=0`` (``DDIMScheduler``): both latents lie on the same (x0, eps) line,
  ``x_i = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` and ``x_{i+1} = sqrt(a_p) x0 + sqrt(1 - a_p) eps``; solving
  gives eps and ``x0_hat = (x_{i+1} - sqrt(1 - a_p) eps) / sqrt(a_p)``.

If a (custom) pipeline passes ``noise_pred`` in the callback kwargs of a flow-matching scheduler, it is
used directly (``x0_hat = x_{i+1} - sigma_{i+1} v``). Step 0 has no previous latent: give the callback
the initial noise you pass to the pipeline (``RewardCallback(..., initial_latents=latents)`` and
``pipe(..., latents=latents)``) to score it too, otherwise step 0 is skipped (``callback.skipped``).
Stochastic schedulers (ancestral, ``stochastic_sampling``, DDIM with eta > 0) cannot be inverted.

Guidance: with ``lr > 0`` the callback differentiates the reward of the decoded ``x0_hat`` w.r.t. the
latents, holding the recovered v / eps fixed (``d x0_hat / d x_{i+1}`` is then the identity, or
``1 / sqrt(a_p)`` for DDIM: the usual training-free reward-guidance approximation that skips the
denoiser's Jacobian), and returns ``x_{i+1} + lr * grad`` to the pipeline (ascent on a
higher-is-better reward, descent on a lower-is-better one). Recorded scores are those of the latents
*before* that step's guidance update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Reward, RewardOutput

_EULER_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "EulerDiscreteScheduler")
_DDIM_SCHEDULERS = ("DDIMScheduler",)


def pipeline_media(output: Any) -> Any:
    """A pipeline output (or its ``.images`` / ``.frames`` / ``.audios``) as reward input.

    PIL lists and ``B,3,H,W`` tensors are returned as they are; numpy batches (``output_type="np"``:
    ``B,H,W,3`` floats in [0,1]) become a list of per-image arrays.
    """
    for attr in ("images", "frames", "audios"):
        if hasattr(output, attr):
            output = getattr(output, attr)
            break
    if isinstance(output, np.ndarray) and output.ndim >= 4:
        return list(output)
    return output


def score_pipeline_output(reward: Reward, output: Any, prompts: Sequence[str] | str | None = None, **kwargs: Any) -> RewardOutput:
    """``reward(pipeline_media(output), prompts, **kwargs)``."""
    return reward(pipeline_media(output), prompts, **kwargs)


@dataclass
class StepScore:
    """Scores of one denoising step's predicted clean sample."""

    step: int
    timestep: float
    scores: Tensor  # B float32, NaN where invalid
    valid: Tensor  # B bool
    sigma: float | None = None
    guided: bool = False
    grad_norm: Tensor | None = None  # B: norm of the applied latent update (guided steps)


class RewardCallback:
    """Score (and optionally guide) every denoising step of a diffusers pipeline.

    Usage::

        cb = RewardCallback(reward, prompts, initial_latents=latents)        # score only
        images = pipe(prompts, latents=latents, callback_on_step_end=cb).images
        cb.steps, cb.scores_by_step()                                        # (S,), S x B

        cb = RewardCallback(reward, prompts, lr=0.5, initial_latents=latents)  # reward guidance
        guided = pipe(prompts, latents=latents, callback_on_step_end=cb).images

    Args:
        reward: any :class:`Reward` of the pipeline's modality (differentiable when ``lr > 0``).
        prompts: the prompts for the reward (one per sample; one per prompt when the pipeline makes
            ``num_images_per_prompt`` samples each: they are repeated in diffusers' order).
        lr: reward-guidance step size; 0 only records.
        guidance_steps: step indices to guide at (None: every scored step).
        max_grad_norm: clip each sample's latent update ``lr * grad`` to this norm.
        score_every: score every n-th step (the last step is always scored).
        initial_latents: the ``latents=`` noise given to the pipeline (needed to score step 0).
        adapter: an mmalign adapter of the pipeline used to decode; built from the pipeline when None.
        metadata, references: passed to the reward.
        keep_x0: also keep each step's predicted clean latents (``history[k].x0`` via :attr:`x0s`).
    """

    tensor_inputs = ["latents"]

    def __init__(
        self,
        reward: Reward | Callable[..., Any],
        prompts: Sequence[str] | str | None = None,
        *,
        lr: float = 0.0,
        guidance_steps: Sequence[int] | None = None,
        max_grad_norm: float | None = None,
        score_every: int = 1,
        initial_latents: Tensor | None = None,
        adapter: Any = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        references: Any = None,
        keep_x0: bool = False,
    ) -> None:
        from .base import as_reward

        self.reward = as_reward(reward)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        if lr > 0 and not self.reward.differentiable:
            raise ValueError(f"reward guidance (lr > 0) needs a differentiable reward; {self.reward.name} is not")
        if score_every < 1:
            raise ValueError(f"score_every must be >= 1, got {score_every}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.prompts = [prompts] if isinstance(prompts, str) else (None if prompts is None else list(prompts))
        self.lr = float(lr)
        self.guidance_steps = None if guidance_steps is None else {int(s) for s in guidance_steps}
        self.max_grad_norm = max_grad_norm
        self.score_every = int(score_every)
        self.initial_latents = initial_latents
        self.adapter = adapter
        self.metadata = metadata
        self.references = references
        self.keep_x0 = keep_x0
        self.history: list[StepScore] = []
        self.x0s: list[Tensor] = []
        self.skipped: list[int] = []
        self._prev: Tensor | None = None

    # ------------------------------------------------------------------ results
    @property
    def steps(self) -> list[int]:
        return [h.step for h in self.history]

    def scores_by_step(self) -> Tensor:
        """S x B scores of the scored steps of the latest run (order of :attr:`steps`)."""
        if not self.history:
            return torch.empty(0)
        return torch.stack([h.scores for h in self.history])

    def reset(self) -> None:
        self.history, self.x0s, self.skipped, self._prev = [], [], [], None

    # ------------------------------------------------------------------ helpers
    def _prompts_for(self, batch: int) -> list[str] | None:
        if self.prompts is None:
            return None
        n = len(self.prompts)
        if n == batch:
            return self.prompts
        if n and batch % n == 0:
            return [p for p in self.prompts for _ in range(batch // n)]
        raise ValueError(f"RewardCallback: {n} prompts for a batch of {batch} latents")

    def _adapter_for(self, pipeline: Any, latents: Tensor) -> Any:
        if self.adapter is not None and getattr(self.adapter, "pipeline", None) is pipeline:
            return self.adapter
        from ..loading import family_of_pipeline_class
        from ..models import MODELS

        family = family_of_pipeline_class(type(pipeline).__name__)
        kwargs: dict[str, int] = {}
        scale = int(getattr(pipeline, "vae_scale_factor", 8))
        if family in ("sd", "sdxl", "sd3") and latents.ndim == 4:
            kwargs = {"height": latents.shape[-2] * scale, "width": latents.shape[-1] * scale}
        elif family == "flux" and latents.ndim == 3:  # packed 2x2 tokens; assume a square image
            side = math.isqrt(latents.shape[1])
            if side * side == latents.shape[1]:
                kwargs = {"height": side * 2 * scale, "width": side * 2 * scale}
        self.adapter = MODELS.get(family)(pipeline, **kwargs)
        return self.adapter

    @staticmethod
    def _sched_index(scheduler: Any, step_index: int) -> int:
        """Index (into the scheduler's sigmas) of the step just taken."""
        si = getattr(scheduler, "step_index", None)
        if si is not None:
            return int(si) - 1
        return step_index + int(getattr(scheduler, "begin_index", None) or 0)

    def _x0_map(self, pipeline: Any, step_index: int, timestep: Any, x_next: Tensor, kwargs: Mapping[str, Any]):
        """(a, c, u, sigma) with x0_hat = (x_next - c * u) / a; None when step 0 cannot be recovered."""
        scheduler = pipeline.scheduler
        cls = type(scheduler).__name__
        prev = self._prev
        if cls in _EULER_SCHEDULERS:
            if getattr(scheduler.config, "stochastic_sampling", False):
                raise ValueError("RewardCallback: a stochastic FlowMatchEuler scheduler cannot be inverted")
            k = self._sched_index(scheduler, step_index)
            sigmas = scheduler.sigmas.to(torch.float64)
            s, s_next = float(sigmas[k]), float(sigmas[k + 1])
            if "noise_pred" in kwargs and cls == "FlowMatchEulerDiscreteScheduler":
                v = kwargs["noise_pred"].detach().float()
            elif prev is None:
                return None
            else:
                v = (x_next.detach().float() - prev) / (s_next - s)
            return 1.0, s_next, v, s
        if cls in _DDIM_SCHEDULERS:
            if prev is None:
                return None
            t = int(timestep)
            cfg = scheduler.config
            prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
            ac = scheduler.alphas_cumprod.to(torch.float64)
            a_t = float(ac[t])
            a_p = float(ac[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
            sa_t, sb_t, sa_p, sb_p = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_p), math.sqrt(1 - a_p)
            det = sa_p * sb_t - sa_t * sb_p
            eps = (sa_p * prev - sa_t * x_next.detach().float()) / det
            return sa_p, sb_p, eps, None
        raise ValueError(
            f"RewardCallback cannot recover the predicted clean sample for {cls} (supported: "
            f"{', '.join(_EULER_SCHEDULERS + _DDIM_SCHEDULERS)}); e.g. "
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )

    # ------------------------------------------------------------------ the callback
    def __call__(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        latents = callback_kwargs["latents"]
        if step_index == 0:
            self.reset()
            if self.initial_latents is not None:
                sigma0 = float(getattr(pipeline.scheduler, "init_noise_sigma", 1.0))
                self._prev = self.initial_latents.detach().float().to(latents.device) * sigma0
        last = step_index == int(getattr(pipeline, "num_timesteps", 0) or 0) - 1
        new = latents
        if step_index % self.score_every == 0 or last:
            parts = self._x0_map(pipeline, step_index, timestep, latents, callback_kwargs)
            if parts is None:
                self.skipped.append(step_index)
            else:
                new = self._score_step(pipeline, step_index, timestep, latents, parts)
        self._prev = new.detach().float().clone()
        callback_kwargs["latents"] = new
        return callback_kwargs

    def _score_step(self, pipeline, step_index, timestep, latents, parts) -> Tensor:
        a, c, u, sigma = parts
        adapter = self._adapter_for(pipeline, latents)
        guide = self.lr > 0 and (self.guidance_steps is None or step_index in self.guidance_steps)
        prompts = self._prompts_for(latents.shape[0])
        kwargs: dict[str, Any] = {}
        if self.metadata is not None:
            kwargs["metadata"] = self.metadata
        if self.references is not None:
            kwargs["references"] = self.references
        for key in ("fps", "sample_rate"):
            value = getattr(adapter, key, None)
            if value is not None:
                kwargs[key] = value
        grad_norm = None
        with torch.enable_grad() if guide else torch.no_grad():
            x = latents.detach().float()
            if guide:
                x.requires_grad_(True)
            x0 = (x - c * u) / a
            media = adapter.decode(x0)
            out = self.reward(media, prompts, **kwargs)
            new = latents
            if guide and bool(out.valid.any()):
                sign = 1.0 if self.reward.higher_is_better else -1.0
                objective = sign * out.scores[out.valid.to(out.scores.device)].sum()
                (grad,) = torch.autograd.grad(objective, x)
                update = self.lr * torch.nan_to_num(grad)
                norms = update.flatten(1).norm(dim=1)
                if self.max_grad_norm is not None:
                    factor = (self.max_grad_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
                    update = update * factor.view(-1, *[1] * (update.ndim - 1))
                    norms = update.flatten(1).norm(dim=1)
                grad_norm = norms.detach().cpu()
                new = (latents.float() + update).to(latents.dtype)
        if self.keep_x0:
            self.x0s.append(x0.detach().cpu())
        self.history.append(StepScore(
            step=int(step_index), timestep=float(timestep), scores=out.scores.detach().float().cpu(),
            valid=out.valid.cpu(), sigma=sigma, guided=grad_norm is not None, grad_norm=grad_norm,
        ))
        return new


__all__ = ["RewardCallback", "StepScore", "pipeline_media", "score_pipeline_output"]

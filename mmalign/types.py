"""The records that flow between parts of mmalign: a sampled trajectory (:class:`Rollout`).

Reward results (:class:`mmalign.rewards.RewardOutput`) live with the rewards.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One batch of sampled trajectories, with what reward finetuning needs.

    Shapes use B = batch, K = number of denoising steps, and ``*L`` = the adapter's latent shape
    (e.g. ``C,h,w`` for SD, ``L,C`` packed tokens for FLUX, ``C,F,h,w`` for Wan).

    Log-probabilities are float32 and reduced over latent dimensions as ``meta["log_prob_reduction"]``
    says ("mean" as in the public Flow-GRPO/DDPO code, or "sum" for the exact Gaussian density).
    Deterministic (ODE / eta=0) steps have no density: their entries are NaN and ``stochastic[k]`` is
    False, so a trainer that uses them by mistake fails loudly instead of training on a fake 0.
    """

    prompts: list[str]
    latents: Tensor  # B, K+1, *L   x_0 (initial noise) ... x_K (final latent), float32
    log_probs: Tensor  # B, K         log p(x_{k+1} | x_k) at sampling time, float32; NaN where not stochastic
    timesteps: Tensor  # K            the denoiser's time input at each step
    sigmas: Tensor | None  # K+1      flow-matching noise levels (None for diffusion)
    alphas_cumprod: Tensor | None  # K+1  diffusion alpha_bar at each step and after the last (None for flow)
    stochastic: Tensor  # K           bool, which steps sampled noise (SDE window)
    samples: Tensor | None = None  # decoded media: image B,3,H,W | video B,T,3,H,W in [0,1]; audio B,C,N in [-1,1]
    x0_pred: Tensor | None = None  # B, K, *L  predicted clean latent at each step
    noise: Tensor | None = None  # B, K, *L  standard-normal noise drawn at each step (zeros on ODE steps)
    negative_prompts: list[str] | None = None
    group_ids: Tensor | None = None  # B long: samples of one prompt group share an id
    meta: dict[str, Any] = field(default_factory=dict)  # sampler settings, seed, family, sample_rate/fps

    def __post_init__(self) -> None:
        b = len(self.prompts)
        if self.latents.shape[0] != b or self.log_probs.shape[0] != b:
            raise ValueError(
                f"Rollout batch mismatch: {b} prompts, latents {tuple(self.latents.shape)}, "
                f"log_probs {tuple(self.log_probs.shape)}"
            )
        k = self.log_probs.shape[1]
        if self.latents.shape[1] != k + 1:
            raise ValueError(f"Rollout has {k} steps of log-probs but {self.latents.shape[1]} latents (expected K+1)")

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def final_latents(self) -> Tensor:
        """B, *L: the last latent of each trajectory."""
        return self.latents[:, -1]

    def select(self, index: Tensor | list[int] | slice) -> "Rollout":
        """A rollout holding only the rows ``index`` (a minibatch for training)."""
        if isinstance(index, slice):
            rows = list(range(self.batch_size))[index]
        elif isinstance(index, Tensor):
            rows = index.tolist()
        else:
            rows = list(index)
        idx = torch.as_tensor(rows, dtype=torch.long)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return replace(
            self,
            prompts=[self.prompts[i] for i in rows],
            negative_prompts=None if self.negative_prompts is None else [self.negative_prompts[i] for i in rows],
            latents=pick(self.latents),
            log_probs=pick(self.log_probs),
            samples=pick(self.samples),
            x0_pred=pick(self.x0_pred),
            noise=pick(self.noise),
            group_ids=pick(self.group_ids),
            meta=dict(self.meta),
        )

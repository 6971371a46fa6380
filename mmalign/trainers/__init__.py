"""Trainers: shared pure math (``advantages``, ``losses``); one module per algorithm registers itself."""
from .advantages import aggregate_rewards, group_advantages, group_stats
from .losses import (
    d3po_loss,
    denoising_loss,
    diffusion_dpo_loss,
    diffusion_target,
    flow_matching_target,
    latent_kl,
    ppo_clip_loss,
    prdp_loss,
    ratio_normalize,
    reno_loss,
    reno_regularizer,
    rwr_weights,
    weighted_denoising_loss,
)

__all__ = [
    "aggregate_rewards",
    "d3po_loss",
    "denoising_loss",
    "diffusion_dpo_loss",
    "diffusion_target",
    "flow_matching_target",
    "group_advantages",
    "group_stats",
    "latent_kl",
    "ppo_clip_loss",
    "prdp_loss",
    "ratio_normalize",
    "reno_loss",
    "reno_regularizer",
    "rwr_weights",
    "weighted_denoising_loss",
]

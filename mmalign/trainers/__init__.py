"""Trainers: shared pure math (``advantages``, ``losses``), the shared training machinery (``common``:
configs, accelerate, LoRA / full finetuning, optimizer, checkpoints, logging, evaluation) and one module
per algorithm, registered here by name (lazily: the algorithm module loads on first use).

A new algorithm: a ``TrainConfig`` subclass with its section and a ``Trainer`` subclass with
``config_class`` and ``train_step`` in ``mmalign/trainers/<name>.py``, registered below; ``mmalign
train`` and the shipped-config checks then pick it up.
"""
from __future__ import annotations

from ..registry import TRAINERS
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

TRAINERS.register(
    "grpo", "mmalign.trainers.grpo:GRPOTrainer",
    description="GRPO for flow/diffusion models (Flow-GRPO, DanceGRPO, DDPO-style): group advantages, "
                "PPO clip on recomputed step log-probs, optional latent KL, SDE windows",
)
TRAINERS.register(
    "dense_grpo", "mmalign.trainers.dense_grpo:DenseGRPOTrainer",
    description="DenseGRPO: per-step reward gains of ODE completions as per-step GRPO advantages, "
                "reward-aware per-timestep noise calibration",
)
TRAINERS.register(
    "reward_backprop", "mmalign.trainers.backprop:RewardBackpropTrainer",
    description="reward backpropagation for differentiable rewards: DRaFT-K / DRaFT-LV, AlignProp random "
                "truncation (last K steps, checkpointed), ControlNet++ single-step",
)
TRAINERS.register(
    "dpo", "mmalign.trainers.dpo:DPOTrainer",
    description="preference optimisation: offline Diffusion-DPO / Flow-DPO on (prompt, chosen, rejected) pairs, "
                "online best-vs-worst pairs of the policy's samples with D3PO (per step) or Diffusion-DPO",
)
TRAINERS.register(
    "prdp", "mmalign.trainers.prdp:PRDPTrainer",
    description="PRDP (proximal reward-difference prediction): pairs of one prompt's online SDE samples, "
                "beta * summed step log-ratio difference regressed onto the reward difference, per-step proximal clip",
)
TRAINERS.register(
    "rwr", "mmalign.trainers.rwr:RWRTrainer",
    description="reward-weighted regression (LiFT / BATON / RAFT): denoising loss weighted by w(reward) on "
                "online samples or a scored dataset",
)


def load_train_config(path=None, overrides=()):
    """A training config typed by its ``algorithm`` (see :func:`mmalign.trainers.common.load_train_config`)."""
    from .common import load_train_config as _load

    return _load(path, overrides)


def build_trainer(config, **kwargs):
    """The trainer of ``config.algorithm`` built from ``config`` (keyword arguments go to the trainer)."""
    from .common import trainer_class

    return trainer_class(config.algorithm)(config, **kwargs)


__all__ = [
    "TRAINERS",
    "aggregate_rewards",
    "build_trainer",
    "d3po_loss",
    "denoising_loss",
    "diffusion_dpo_loss",
    "diffusion_target",
    "flow_matching_target",
    "group_advantages",
    "group_stats",
    "latent_kl",
    "load_train_config",
    "ppo_clip_loss",
    "prdp_loss",
    "ratio_normalize",
    "reno_loss",
    "reno_regularizer",
    "rwr_weights",
    "weighted_denoising_loss",
]

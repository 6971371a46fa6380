"""Tiny offline instances of the combination rewards, built from other tiny rewards.

``tiny_weighted_sum()`` = JPEG size (kB) * 0.05 + tiny CLIPScore * 0.01 (raw scores, no normalisation:
batch-independent, so the contract tests' batch invariance holds); ``tiny_ensemble()`` = three tiny
CLIPScore models with different seeds (disagreeing random weights), averaged. Members named in
``rewards=`` are built tiny (``"clipscore"`` -> ``tiny_reward("clipscore", seed=...)``); Reward objects
and callables are used as they are.

``tiny_brightness()`` is a differentiable, prompt-free rule reward (mean pixel value), handy for tests and
demos of preference evaluation and reward guidance (``--reward mmalign.testing.combine:tiny_brightness``).
"""
from __future__ import annotations

from typing import Any, Mapping


def _tiny_member(spec: Any, seed: int):
    from ..rewards.base import Reward
    from . import tiny_reward

    if isinstance(spec, str):
        name = spec[len("tiny:"):] if spec.startswith("tiny:") else spec
        return tiny_reward(name, seed=seed)
    if isinstance(spec, Mapping):
        spec = dict(spec)
        name = spec.pop("name")
        options = {**dict(spec.pop("options", None) or {}), **spec}
        return tiny_reward(name[len("tiny:"):] if name.startswith("tiny:") else name, seed=seed, **options)
    if isinstance(spec, Reward) or callable(spec):
        return spec
    raise TypeError(f"cannot build a tiny member reward from {type(spec).__name__}")


def tiny_weighted_sum(seed: int = 0, **options: Any):
    """``weighted_sum`` over tiny members (default: jpeg_size and clipscore, weights 0.05 and 0.01)."""
    from ..rewards.combine import load_weighted_sum

    if "rewards" not in options:
        options["rewards"] = ["jpeg_size", "clipscore"]
        options.setdefault("weights", [0.05, 0.01])
    members = options.pop("rewards")
    return load_weighted_sum(rewards=[_tiny_member(m, seed + i) for i, m in enumerate(members)], **options)


def tiny_ensemble(seed: int = 0, **options: Any):
    """``ensemble`` over tiny members (default: three tiny clipscore seeds, mean)."""
    from ..rewards.combine import load_ensemble

    members = options.pop("rewards", ["clipscore", "clipscore", "clipscore"])
    return load_ensemble(rewards=[_tiny_member(m, seed + i) for i, m in enumerate(members)], **options)


def _brightness(samples, prompts, **_: Any):
    return samples.float().mean(dim=tuple(range(1, samples.ndim)))


def tiny_brightness(seed: int = 0, **options: Any):
    """Mean pixel value in [0, 1] (a differentiable rule reward; no prompt needed; ``seed`` unused)."""
    from ..rewards.base import CallableReward

    options = {"name": "brightness", "needs": (), "differentiable": True, **options}
    return CallableReward(_brightness, **options)


__all__ = ["tiny_brightness", "tiny_ensemble", "tiny_weighted_sum"]

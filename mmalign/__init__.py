"""mmalign: align image, video and audio generative models with reward models.

Importing ``mmalign`` is cheap: model families, samplers, rewards and trainers are registered by
name and their heavy dependencies load on first use.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _listing(registry, describe: bool) -> Any:
    return registry.describe() if describe else registry.names()


def list_models(describe: bool = False):
    """Model adapter families (``describe=True``: ``{name: description}``)."""
    from . import models  # noqa: F401  (registers the families)
    from .registry import MODELS

    return _listing(MODELS, describe)


def list_samplers(describe: bool = False):
    """Sampler methods usable as ``SamplerConfig(method=...)``."""
    from . import samplers  # noqa: F401
    from .registry import SAMPLERS

    return _listing(SAMPLERS, describe)


def list_rewards(describe: bool = False):
    """Registered reward models."""
    from . import rewards  # noqa: F401
    from .registry import REWARDS

    return _listing(REWARDS, describe)


def list_trainers(describe: bool = False):
    """Registered training algorithms."""
    from . import trainers  # noqa: F401
    from .registry import TRAINERS

    return _listing(TRAINERS, describe)


def load_model(model: str, **kwargs: Any):
    """Load a model adapter; see :func:`mmalign.loading.load_model`."""
    from .loading import load_model as _load

    return _load(model, **kwargs)


def load_reward(name, **options: Any):
    """A reward by registered name, or a Reward / plain callable; see :func:`mmalign.rewards.load_reward`."""
    from .rewards import load_reward as _load

    return _load(name, **options)


__all__ = ["load_reward", "__version__", "list_models", "list_rewards", "list_samplers", "list_trainers", "load_model"]

"""Tiny, seeded, offline instances of every model family (diffusers ``get_dummy_components`` style).

``tiny_pipeline("sd3")`` returns a real diffusers pipeline with random weights (seeded) and tokenizers
built locally; ``tiny_adapter("sd3")`` wraps it in its mmalign adapter. Nothing is downloaded.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..registry import RegistryError

# family -> "module:function" building its tiny pipeline; each function takes (seed: int = 0, **overrides)
_TINY_BUILDERS = {
    "sd": "mmalign.testing.sd:tiny_sd_pipeline",
    "sdxl": "mmalign.testing.sd:tiny_sdxl_pipeline",
    "sd3": "mmalign.testing.sd3:tiny_sd3_pipeline",
    "flux": "mmalign.testing.flux:tiny_flux_pipeline",
    "wan": "mmalign.testing.wan:tiny_wan_pipeline",
    "cogvideox": "mmalign.testing.cogvideox:tiny_cogvideox_pipeline",
    "audioldm": "mmalign.testing.audioldm:tiny_audioldm_pipeline",
}


def tiny_families() -> list[str]:
    """Families that have a tiny builder."""
    return sorted(_TINY_BUILDERS)


def tiny_pipeline(family: str, seed: int = 0, **overrides: Any):
    """A tiny random diffusers pipeline of ``family`` (weights seeded by ``seed``), on CPU, float32."""
    try:
        target = _TINY_BUILDERS[family]
    except KeyError:
        raise RegistryError(f"unknown model family {family!r} (tiny builders: {', '.join(tiny_families())})") from None
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)(seed=seed, **overrides)


def tiny_adapter(family: str, seed: int = 0, adapter_kwargs: dict[str, Any] | None = None, **overrides: Any):
    """``tiny_pipeline(family)`` wrapped in the family's adapter."""
    from ..models import MODELS  # importing the package registers the families

    adapter_cls = MODELS.get(family)
    return adapter_cls(tiny_pipeline(family, seed=seed, **overrides), **(adapter_kwargs or {}))


# reward name -> "module:function" building it on tiny random weights; each takes (seed: int = 0, **options)
_TINY_REWARDS = {
    "clipscore": "mmalign.testing.clip_rewards:tiny_clipscore",
    "pickscore": "mmalign.testing.clip_rewards:tiny_pickscore",
    "hpsv2": "mmalign.testing.clip_rewards:tiny_hpsv2",
    "hpsv2.1": "mmalign.testing.clip_rewards:tiny_hpsv21",
    "aesthetic": "mmalign.testing.clip_rewards:tiny_aesthetic",
    "goal_clip": "mmalign.testing.clip_rewards:tiny_goal_clip",
    "vqascore": "mmalign.testing.vlm:tiny_vqascore",
    "vlm_compare": "mmalign.testing.vlm:tiny_vlm_compare",
    "qalign": "mmalign.testing.vlm:tiny_qalign",
    "artifacts": "mmalign.testing.vlm:tiny_artifacts",
    "video_frames": "mmalign.testing.media_rewards:tiny_video_frames",
    "temporal_consistency": "mmalign.testing.media_rewards:tiny_temporal_consistency",
    "video_vlm": "mmalign.testing.vlm:tiny_video_vlm",
    "clap": "mmalign.testing.media_rewards:tiny_clap",
    "jpeg_size": "mmalign.testing.media_rewards:tiny_jpeg_size",
    "jpeg_compressibility": "mmalign.testing.media_rewards:tiny_jpeg_compressibility",
    "verifiable": "mmalign.testing.media_rewards:tiny_verifiable",
    "shapeeval": "mmalign.embedded.shapeeval:tiny_shapeeval",
    "motioneval": "mmalign.embedded.motioneval:tiny_motioneval",
    "toneeval": "mmalign.embedded.toneeval:tiny_toneeval",
    "weighted_sum": "mmalign.testing.combine:tiny_weighted_sum",
    "ensemble": "mmalign.testing.combine:tiny_ensemble",
}


def tiny_reward_names() -> list[str]:
    """Rewards that have a tiny builder (every registered reward must)."""
    return sorted(_TINY_REWARDS)


def tiny_reward(name: str, seed: int = 0, **options: Any):
    """Registered reward ``name`` on tiny seeded random weights built in code (no download)."""
    try:
        target = _TINY_REWARDS[name]
    except KeyError:
        raise RegistryError(f"unknown reward {name!r} (tiny builders: {', '.join(tiny_reward_names())})") from None
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)(seed=seed, **options)


__all__ = ["tiny_adapter", "tiny_families", "tiny_pipeline", "tiny_reward", "tiny_reward_names"]

"""A tiny, seeded, offline Wan 2.1 text-to-video pipeline (diffusers ``get_dummy_components`` style).

The component sizes follow diffusers' own ``tests/pipelines/wan/test_wan.py``; the tokenizer is the
offline T5/UMT5-style one from :mod:`mmalign.testing.tokenizers` and the text encoder a tiny random
``UMT5EncoderModel`` whose vocabulary covers it. Unlike the published checkpoint (which ships the
multistep ``UniPCMultistepScheduler``), the tiny pipeline uses ``FlowMatchEulerDiscreteScheduler`` with
Wan's 480p shift 3.0, so ``pipe(...)`` takes the same single Euler steps as mmalign's ODE sampler and
the two can be compared step for step.
"""
from __future__ import annotations

from typing import Any

import torch

#: sizes the tiny pipeline is meant to be run at (16x16 pixels, 9 frames -> latents 16 x 3 x 2 x 2)
TINY_WAN_SIZE: dict[str, int] = {"height": 16, "width": 16, "num_frames": 9}


def tiny_wan_pipeline(seed: int = 0, **overrides: Any):
    """A ``diffusers.WanPipeline`` with tiny random weights (float32, CPU), seeded by ``seed``.

    ``overrides`` update the transformer config (e.g. ``num_layers=1``), except these keys:
    ``vae``, ``scheduler``, ``text_encoder`` (dicts of that component's arguments, e.g.
    ``scheduler={"shift": 5.0}``), ``unipc=True`` (ship the published checkpoint's scheduler kind,
    ``UniPCMultistepScheduler`` with flow sigmas, to test that the adapter derives Euler sigmas from it)
    and ``expand_timesteps=True`` (Wan 2.2 TI2V-style per-token timesteps).

    The pipeline carries ``mmalign_defaults`` (:data:`TINY_WAN_SIZE`), which :class:`~mmalign.models.wan.WanAdapter`
    uses as its default size instead of the pipeline's 480x832x81.
    """
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    from .components import tiny_t5_encoder
    from .tokenizers import t5_tokenizer

    overrides = dict(overrides)
    vae: dict[str, Any] = overrides.pop("vae", None) or {}
    scheduler: dict[str, Any] = overrides.pop("scheduler", None) or {}
    text_encoder: dict[str, Any] = overrides.pop("text_encoder", None) or {}
    unipc = bool(overrides.pop("unipc", False))
    expand_timesteps = bool(overrides.pop("expand_timesteps", False))
    transformer: dict[str, Any] = overrides

    tokenizer = t5_tokenizer()

    torch.manual_seed(seed)
    vae_model = AutoencoderKLWan(
        **{
            "base_dim": 3,
            "z_dim": 16,
            "dim_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "temperal_downsample": [False, True, True],
            **vae,
        }
    )

    torch.manual_seed(seed)
    if unipc:
        sched_kwargs = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}
        sched = UniPCMultistepScheduler(**{**sched_kwargs, **scheduler})
    else:
        sched = FlowMatchEulerDiscreteScheduler(**{"shift": 3.0, **scheduler})

    te = tiny_t5_encoder(tokenizer, umt5=True, seed=seed, **{"dropout_rate": 0.0, **text_encoder})

    torch.manual_seed(seed)
    dit = WanTransformer3DModel(
        **{
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 12,
            "in_channels": 16,
            "out_channels": 16,
            "text_dim": te.config.d_model,
            "freq_dim": 256,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
            **transformer,
        }
    )

    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=te, vae=vae_model, transformer=dit, scheduler=sched,
        expand_timesteps=expand_timesteps,
    )
    pipe.set_progress_bar_config(disable=True)
    # A plain attribute (not saved by save_pretrained): the size the tiny model is meant to run at.
    pipe.mmalign_defaults = dict(TINY_WAN_SIZE)
    return pipe


__all__ = ["TINY_WAN_SIZE", "tiny_wan_pipeline"]

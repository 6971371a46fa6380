"""A tiny, seeded, offline Stable Diffusion 3.5-style pipeline (diffusers ``get_dummy_components`` style).

Layout mirrors SD3.5 medium at toy width: an MMDiT with a dual-attention first block and RMS q/k norm,
two CLIP text encoders with projection, no T5 (``text_encoder_3=None``: the pipeline then feeds zeros
of width ``joint_attention_dim`` for the T5 part), a 2-level ``AutoencoderKL`` with a ``shift_factor``
and a ``FlowMatchEulerDiscreteScheduler`` with ``shift=3.0`` like the published scheduler config.

Default image size: ``transformer.sample_size * vae_scale_factor`` = 16 * 2 = 32 pixels (8x8 tokens).
"""
from __future__ import annotations

from typing import Any

import torch

from .components import TINY_CLIP_MERGES, TINY_CLIP_WIDTH, TINY_DIT_VAE_CONFIG, tiny_clip_text_encoder
from .tokenizers import clip_tokenizer


def tiny_sd3_pipeline(seed: int = 0, **overrides: Any):
    """A ``StableDiffusion3Pipeline`` with tiny random weights (seeded by ``seed``), float32 on CPU.

    ``overrides`` update the transformer config (e.g. ``num_layers=1``, ``patch_size=1``,
    ``sample_size=8``), except the keys ``scheduler`` (a dict of scheduler config values) and
    ``vae`` (a dict of ``AutoencoderKL`` arguments).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    overrides = dict(overrides)
    scheduler_kwargs: dict[str, Any] = {"shift": 3.0, **overrides.pop("scheduler", {})}
    vae_kwargs: dict[str, Any] = {
        **TINY_DIT_VAE_CONFIG,
        # SD3's VAE normalises latents with both a scale and a shift
        "shift_factor": 0.0609,
        "scaling_factor": 1.5035,
        **overrides.pop("vae", {}),
    }
    transformer_kwargs: dict[str, Any] = {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": vae_kwargs["latent_channels"],
        "out_channels": vae_kwargs["latent_channels"],
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        # the pipeline concatenates the two CLIP hidden states on the feature axis and pads them to
        # the T5 width (= joint_attention_dim without T5): it must cover 2 * CLIP width or they get cut
        "joint_attention_dim": 2 * TINY_CLIP_WIDTH,
        "caption_projection_dim": 16,
        # pooled = both CLIP projections concatenated
        "pooled_projection_dim": 2 * TINY_CLIP_WIDTH,
        "pos_embed_max_size": 32,
        "dual_attention_layers": (0,),  # SD3.5 uses MMDiT-X blocks with a second self-attention
        "qk_norm": "rms_norm",
        **overrides,
    }

    tokenizer = clip_tokenizer(num_merges=TINY_CLIP_MERGES)
    tokenizer_2 = clip_tokenizer(num_merges=TINY_CLIP_MERGES)
    clip = dict(projection=True, hidden_size=TINY_CLIP_WIDTH, projection_dim=TINY_CLIP_WIDTH)
    text_encoder = tiny_clip_text_encoder(tokenizer, seed=seed, **clip)
    text_encoder_2 = tiny_clip_text_encoder(tokenizer_2, seed=seed + 1, **clip)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**transformer_kwargs).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_kwargs).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs)
    return StableDiffusion3Pipeline(
        scheduler=scheduler,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


__all__ = ["tiny_sd3_pipeline"]

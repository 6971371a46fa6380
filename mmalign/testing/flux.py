"""A tiny, seeded, offline FLUX.1-style pipeline (diffusers ``get_dummy_components`` style).

Layout mirrors FLUX.1: one double-stream and one single-stream block, a CLIP text encoder whose pooled
output feeds ``pooled_projections``, a T5 encoder for the token sequence, a 2-level ``AutoencoderKL``
with a ``shift_factor``, latents packed into 2x2 patches (``in_channels = 4 * latent_channels``) and a
``FlowMatchEulerDiscreteScheduler`` with dynamic (resolution-dependent) shifting like the published
config. ``guidance_embeds=True`` by default (FLUX.1-dev: guidance-distilled);
``tiny_flux_pipeline(guidance_embeds=False)`` gives a schnell-like model.

For a 32x32 image: latents 4x16x16 -> packed tokens (B, 64, 16).
"""
from __future__ import annotations

from typing import Any

import torch

from .components import TINY_CLIP_MERGES, TINY_CLIP_WIDTH, TINY_DIT_VAE_CONFIG, tiny_clip_text_encoder, tiny_t5_encoder
from .tokenizers import clip_tokenizer, t5_tokenizer

T5_WIDTH = 32


def tiny_flux_pipeline(seed: int = 0, **overrides: Any):
    """A ``FluxPipeline`` with tiny random weights (seeded by ``seed``), float32 on CPU.

    ``overrides`` update the transformer config (e.g. ``guidance_embeds=False``, ``num_layers=2``),
    except the keys ``scheduler`` (a dict of scheduler config values) and ``vae`` (a dict of
    ``AutoencoderKL`` arguments).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    overrides = dict(overrides)
    # FLUX.1-dev's scheduler_config.json
    scheduler_kwargs: dict[str, Any] = {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "base_shift": 0.5,
        "max_shift": 1.15,
        **overrides.pop("scheduler", {}),
    }
    vae_kwargs: dict[str, Any] = {
        **TINY_DIT_VAE_CONFIG,
        "shift_factor": 0.1159,
        "scaling_factor": 0.3611,
        **overrides.pop("vae", {}),
    }
    transformer_kwargs: dict[str, Any] = {
        "patch_size": 1,
        # packed 2x2 latent patches: 4 * latent channels per token
        "in_channels": 4 * vae_kwargs["latent_channels"],
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": T5_WIDTH,
        "pooled_projection_dim": TINY_CLIP_WIDTH,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 4, 8),  # must sum to attention_head_dim
        **overrides,
    }

    tokenizer = clip_tokenizer(num_merges=TINY_CLIP_MERGES)
    tokenizer_2 = t5_tokenizer()
    text_encoder = tiny_clip_text_encoder(tokenizer, seed=seed, hidden_size=TINY_CLIP_WIDTH, projection_dim=TINY_CLIP_WIDTH)
    text_encoder_2 = tiny_t5_encoder(
        tokenizer_2, seed=seed, d_model=T5_WIDTH, is_encoder_decoder=False, use_cache=False
    )
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**transformer_kwargs).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_kwargs).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs)
    return FluxPipeline(
        scheduler=scheduler,
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


__all__ = ["tiny_flux_pipeline"]

"""A tiny, seeded, offline CogVideoX text-to-video pipeline (diffusers ``get_dummy_components`` style).

Component sizes follow diffusers' ``tests/pipelines/cogvideo/test_cogvideox.py`` (4 latent channels,
8x spatial and 4x temporal VAE compression, one transformer layer), with the offline T5 tokenizer from
:mod:`mmalign.testing.tokenizers` and a tiny random ``T5EncoderModel`` covering its vocabulary. The
scheduler is ``CogVideoXDDIMScheduler`` configured like the CogVideoX-2b checkpoint (v-prediction,
zero terminal SNR, "trailing" spacing). Rotary position embeddings (CogVideoX-5b style) are on by
default so the adapter's ``image_rotary_emb`` path is exercised; pass
``use_rotary_positional_embeddings=False`` for the 2b-style sincos embedding.
"""
from __future__ import annotations

from typing import Any

import torch

#: text length the tiny transformer is built for (the real models use 226)
TINY_COGVIDEOX_TEXT_LEN = 16


def tiny_cogvideox_pipeline(seed: int = 0, **overrides: Any):
    """A ``diffusers.CogVideoXPipeline`` with tiny random weights (float32, CPU), seeded by ``seed``.

    ``overrides`` update the transformer config (e.g. ``use_rotary_positional_embeddings=False``),
    except the keys ``vae``, ``scheduler`` and ``text_encoder`` (dicts of that component's arguments).
    Its default size (from the transformer config, as the pipeline computes it) is 32x32 pixels and
    9 frames, i.e. latents ``B, 3, 4, 4, 4`` (B, F', C, h, w); text is ``max_text_seq_length`` = 16 tokens.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    from .components import tiny_t5_encoder
    from .tokenizers import t5_tokenizer

    overrides = dict(overrides)
    vae: dict[str, Any] = overrides.pop("vae", None) or {}
    scheduler: dict[str, Any] = overrides.pop("scheduler", None) or {}
    text_encoder: dict[str, Any] = overrides.pop("text_encoder", None) or {}
    transformer: dict[str, Any] = overrides

    tokenizer = t5_tokenizer()

    torch.manual_seed(seed)
    dit = CogVideoXTransformer3DModel(
        **{
            # diffusers' dummy transformer, but 2 heads of 16 dims: the 3D rotary embedding splits the
            # head dim into temporal/height/width parts and needs it divisible accordingly.
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 2,
            "text_embed_dim": 32,
            "num_layers": 1,
            "sample_width": 4,
            "sample_height": 4,
            "sample_frames": 9,
            "patch_size": 2,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": TINY_COGVIDEOX_TEXT_LEN,
            "use_rotary_positional_embeddings": True,
            **transformer,
        }
    )

    torch.manual_seed(seed)
    vae_model = AutoencoderKLCogVideoX(
        **{
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("CogVideoXDownBlock3D",) * 4,
            "up_block_types": ("CogVideoXUpBlock3D",) * 4,
            "block_out_channels": (8, 8, 8, 8),
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 2,
            "temporal_compression_ratio": 4,
            **vae,
        }
    )

    torch.manual_seed(seed)
    sched = CogVideoXDDIMScheduler(
        **{
            # the CogVideoX-2b scheduler config
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "set_alpha_to_one": True,
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "snr_shift_scale": 3.0,
            "steps_offset": 0,
            "timestep_spacing": "trailing",
            **scheduler,
        }
    )

    te = tiny_t5_encoder(tokenizer, seed=seed, **{"dropout_rate": 0.0, **text_encoder})

    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=te, vae=vae_model, transformer=dit, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["TINY_COGVIDEOX_TEXT_LEN", "tiny_cogvideox_pipeline"]

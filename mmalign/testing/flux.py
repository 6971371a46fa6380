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

from .sd3 import CLIP_MERGES, CLIP_WIDTH
from .tokenizers import clip_tokenizer, t5_tokenizer

T5_WIDTH = 32


def tiny_flux_pipeline(seed: int = 0, **overrides: Any):
    """A ``FluxPipeline`` with tiny random weights (seeded by ``seed``), float32 on CPU.

    ``overrides`` update the transformer config (e.g. ``guidance_embeds=False``, ``num_layers=2``),
    except the keys ``scheduler`` (a dict of scheduler config values) and ``vae`` (a dict of
    ``AutoencoderKL`` arguments).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

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
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
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
        "pooled_projection_dim": CLIP_WIDTH,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 4, 8),  # must sum to attention_head_dim
        **overrides,
    }

    tokenizer = clip_tokenizer(num_merges=CLIP_MERGES)
    tokenizer_2 = t5_tokenizer()
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # CLIP pools at the first eos: must be the tokenizer's
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=CLIP_WIDTH,
        intermediate_size=37,
        projection_dim=CLIP_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=tokenizer.model_max_length,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config).eval()
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(t5_config).eval()
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

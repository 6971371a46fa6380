"""Components shared by several tiny test pipelines: a small CLIP text encoder, a small T5/UMT5 encoder
and the SD3/FLUX-style VAE config. The family builders (:mod:`mmalign.testing.sd`, ``.sd3``, ``.flux``,
``.wan``, ``.cogvideox``) pass only what differs.
"""
from __future__ import annotations

from typing import Any

import torch

#: merges kept in the tiny CLIP tokenizers: vocabulary 512 + 1000 + 2 = 1514 ids (eos = 1513)
TINY_CLIP_MERGES = 1000
#: hidden size (and projection size, where there is one) of the tiny CLIP text encoders
TINY_CLIP_WIDTH = 32

#: a 2-level ``AutoencoderKL`` without quant convs (latents 4 x H/2 x W/2), as SD3 / FLUX layouts use;
#: callers add their ``shift_factor`` / ``scaling_factor``
TINY_DIT_VAE_CONFIG: dict[str, Any] = {
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
}


def tiny_clip_text_config(tokenizer: Any, **overrides: Any):
    """A tiny ``CLIPTextConfig`` whose vocabulary and special ids match ``tokenizer``.

    The special ids must be the tokenizer's, not the legacy defaults (bos 0 / eos 2): CLIP pools at the
    first ``eos_token_id``, which for a truncated vocabulary is ``len(tokenizer) - 1``, not 49407.
    """
    from transformers import CLIPTextConfig

    cfg: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TINY_CLIP_WIDTH,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        max_position_embeddings=tokenizer.model_max_length,
    )
    cfg.update(overrides)
    return CLIPTextConfig(**cfg)


def tiny_clip_text_encoder(tokenizer: Any, *, projection: bool = False, seed: int | None = None, **config: Any):
    """A tiny random ``CLIPTextModel`` (``CLIPTextModelWithProjection`` with ``projection=True``) in eval
    mode, config from :func:`tiny_clip_text_config` updated by ``config``; seeded with ``seed`` if given."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    cfg = tiny_clip_text_config(tokenizer, **config)
    if seed is not None:
        torch.manual_seed(seed)
    return model_cls(cfg).eval()


def tiny_t5_encoder(tokenizer: Any, *, umt5: bool = False, seed: int | None = None, **config: Any):
    """A tiny random ``T5EncoderModel`` (``UMT5EncoderModel`` with ``umt5=True``) in eval mode whose
    vocabulary and special ids match ``tokenizer``; ``config`` updates the defaults (d_model 32, 2 layers
    of 4 heads); seeded with ``seed`` if given."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    cfg: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    cfg.update(config)
    if seed is not None:
        torch.manual_seed(seed)
    return model_cls(config_cls(**cfg)).eval()


__all__ = [
    "TINY_CLIP_MERGES",
    "TINY_CLIP_WIDTH",
    "TINY_DIT_VAE_CONFIG",
    "tiny_clip_text_config",
    "tiny_clip_text_encoder",
    "tiny_t5_encoder",
]

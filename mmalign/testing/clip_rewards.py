"""Tiny, seeded, offline CLIP-family rewards (:mod:`mmalign.rewards.clip`) on random weights.

- transformers ``CLIPModel``: vision 32x32 images in 8x8 patches, width 32, 2 layers; text width 32,
  2 layers, vocabulary and special ids of the offline CLIP tokenizer truncated to 1000 merges;
  projection 32 (CLIPScore, PickScore, aesthetic, goal-CLIP);
- ``open_clip.CLIP`` built from a custom config of the same sizes (HPSv2 / v2.1), with the same
  tokenizer (padding replaced by 0, as open_clip's own tokenizer pads);
- the aesthetic head :class:`~mmalign.rewards.clip.AestheticMLP` on 32-d embeddings.

Each builder takes ``seed`` and the reward factory's options (``batch_size``, ``dtype``, ``alpha`` ...);
building seeds a private random stream (the caller's is untouched) and takes milliseconds once the
tokenizer is cached.
"""
from __future__ import annotations

from typing import Any

import torch

from .components import TINY_CLIP_MERGES, TINY_CLIP_WIDTH, tiny_clip_text_config
from .tokenizers import clip_tokenizer

#: image side of the tiny CLIP models (input size of their preprocessing)
TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_PATCH = 8


def tiny_clip_model(seed: int = 0, **config: Any):
    """A tiny random ``transformers.CLIPModel`` (eval mode) and its tokenizer; ``config`` updates the
    ``CLIPConfig`` keyword arguments (``vision_config``/``text_config`` dicts are merged)."""
    from transformers import CLIPConfig, CLIPModel

    tok = clip_tokenizer(TINY_CLIP_MERGES)
    text = tiny_clip_text_config(tok).to_dict()
    text.update(config.pop("text_config", {}))
    vision = dict(image_size=TINY_CLIP_IMAGE_SIZE, patch_size=TINY_CLIP_PATCH, hidden_size=TINY_CLIP_WIDTH, intermediate_size=37,
                  num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5)
    vision.update(config.pop("vision_config", {}))
    cfg = CLIPConfig(text_config=text, vision_config=vision, **{"projection_dim": TINY_CLIP_WIDTH, **config})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    return model, tok


def tiny_open_clip_model(seed: int = 0):
    """A tiny random ``open_clip.CLIP`` (eval mode) built from a custom config, and a tokenizer whose
    ids it covers (the offline CLIP tokenizer; eot is its largest id, as open_clip's pooling needs)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    tok = clip_tokenizer(TINY_CLIP_MERGES)
    vision = CLIPVisionCfg(layers=2, width=TINY_CLIP_WIDTH, head_width=8, patch_size=TINY_CLIP_PATCH, image_size=TINY_CLIP_IMAGE_SIZE)
    text = CLIPTextCfg(context_length=77, vocab_size=len(tok), width=TINY_CLIP_WIDTH, heads=4, layers=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(embed_dim=TINY_CLIP_WIDTH, vision_cfg=vision, text_cfg=text).eval()
    return model, tok


def tiny_aesthetic_head(seed: int = 0, input_size: int = TINY_CLIP_WIDTH):
    """A seeded :class:`~mmalign.rewards.clip.AestheticMLP` (published layer layout) on ``input_size``-d
    embeddings."""
    from ..rewards.clip import AestheticMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AestheticMLP(input_size).eval()


def _label(name: str, seed: int) -> str:
    return f"tiny:{name}(seed={seed})"


def tiny_clipscore(seed: int = 0, **options: Any):
    from ..rewards.clip import load_clipscore

    model, tok = tiny_clip_model(seed)
    return load_clipscore(model=model, tokenizer=tok, **{"weights_id": _label("clipscore", seed), **options})


def tiny_pickscore(seed: int = 0, **options: Any):
    from ..rewards.clip import load_pickscore

    model, tok = tiny_clip_model(seed)
    return load_pickscore(model=model, tokenizer=tok, **{"weights_id": _label("pickscore", seed), **options})


def tiny_goal_clip(seed: int = 0, **options: Any):
    from ..rewards.clip import load_goal_clip

    model, tok = tiny_clip_model(seed)
    return load_goal_clip(model=model, tokenizer=tok, **{"weights_id": _label("goal_clip", seed), **options})


def tiny_aesthetic(seed: int = 0, **options: Any):
    from ..rewards.clip import load_aesthetic

    model, _ = tiny_clip_model(seed)
    head = options.pop("head", None)
    if head is None and options.get("head_path") is None:
        head = tiny_aesthetic_head(seed, model.config.projection_dim)
    return load_aesthetic(model=model, head=head, **{"weights_id": _label("aesthetic", seed), **options})


def tiny_hpsv2(seed: int = 0, **options: Any):
    from ..rewards.clip import load_hpsv2

    model, tok = tiny_open_clip_model(seed)
    return load_hpsv2(model=model, tokenizer=tok, **{"weights_id": _label("hpsv2", seed), **options})


def tiny_hpsv21(seed: int = 0, **options: Any):
    from ..rewards.clip import load_hpsv21

    model, tok = tiny_open_clip_model(seed)
    return load_hpsv21(model=model, tokenizer=tok, **{"weights_id": _label("hpsv2.1", seed), **options})


__all__ = [
    "TINY_CLIP_IMAGE_SIZE",
    "tiny_aesthetic",
    "tiny_aesthetic_head",
    "tiny_clip_model",
    "tiny_clipscore",
    "tiny_goal_clip",
    "tiny_hpsv2",
    "tiny_hpsv21",
    "tiny_open_clip_model",
    "tiny_pickscore",
]

"""Tiny, seeded, offline builders of the video, audio and rule rewards (``mmalign.testing.tiny_reward``).

- ``tiny_video_frames``: :class:`~mmalign.rewards.video.VideoFramesReward` around
  ``tiny_reward("clipscore")`` (or ``image_reward=`` any reward);
- ``tiny_temporal_consistency``: a tiny random ``CLIPVisionModelWithProjection`` (32 px, 8 px patches);
- ``tiny_clap``: a tiny random ``ClapModel`` (RoBERTa text tower over the offline RoBERTa tokenizer of
  :mod:`mmalign.testing.tokenizers`, an HTSAT audio tower on 16 mel bins) with a ``ClapFeatureExtractor``
  at 48 kHz and 1 s windows (101 STFT frames);
- ``tiny_jpeg_size`` / ``tiny_jpeg_compressibility``: the real rules (no weights);
- ``tiny_verifiable``: a real rule, :func:`mean_color_rule` (the mean colour matches the metadata's
  ``target_color``).

Each takes ``(seed=0, **options)``; options go to the reward's factory.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .tokenizers import roberta_tokenizer


def tiny_video_frames(seed: int = 0, image_reward: Any = None, **options: Any):
    """``video_frames`` over ``tiny_reward("clipscore", seed)`` (or ``image_reward``)."""
    from ..rewards.video import load_video_frames

    if image_reward is None:
        from . import tiny_reward

        image_reward = tiny_reward("clipscore", seed=seed)
    return load_video_frames(image_reward, **options)


def tiny_clip_vision_model(seed: int = 0, image_size: int = 32, **config: Any):
    """A tiny random ``CLIPVisionModelWithProjection`` (eval, float32), weights seeded by ``seed``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**{**dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=4, projection_dim=16), **config})
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is untouched
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(cfg).eval()


def tiny_temporal_consistency(seed: int = 0, **options: Any):
    """``temporal_consistency`` with :func:`tiny_clip_vision_model`."""
    from ..rewards.video import load_temporal_consistency

    model = options.pop("model", None) or tiny_clip_vision_model(seed)
    options.setdefault("weights_id", f"tiny-random-clip-vision(seed={seed})")
    return load_temporal_consistency(model=model, **options)


def tiny_clap_processor(max_length_s: int = 1, num_mel_bins: int = 16):
    """A ``ClapProcessor``: the offline RoBERTa tokenizer and a 48 kHz ``ClapFeatureExtractor`` with
    ``max_length_s``-second windows and ``num_mel_bins`` mel bins (non-fusion: ``rand_trunc``)."""
    from transformers import ClapFeatureExtractor, ClapProcessor

    fe = ClapFeatureExtractor(feature_size=num_mel_bins, sampling_rate=48_000, max_length_s=max_length_s, hop_length=480,
                              fft_window_size=1024, frequency_min=50, frequency_max=14_000, truncation="rand_trunc", padding="repeatpad")
    return ClapProcessor(feature_extractor=fe, tokenizer=roberta_tokenizer())


def tiny_clap_model(seed: int = 0, vocab_size: int | None = None, num_mel_bins: int = 16):
    """A tiny random ``ClapModel`` (eval, float32): 2-layer RoBERTa text tower, 2-stage HTSAT (spec_size 64)."""
    from transformers import ClapConfig, ClapModel

    tok = roberta_tokenizer()
    text = dict(vocab_size=vocab_size or len(tok), hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=tok.model_max_length + 2, projection_dim=16, layer_norm_eps=1e-5,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    audio = dict(spec_size=4 * num_mel_bins, num_mel_bins=num_mel_bins, window_size=4, patch_embeds_hidden_size=16, depths=[1, 1],
                 num_attention_heads=[2, 2], hidden_size=32, projection_dim=16, num_hidden_layers=2)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is untouched
        torch.manual_seed(seed)
        return ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).eval()


def tiny_clap(seed: int = 0, **options: Any):
    """``clap`` on :func:`tiny_clap_model` and :func:`tiny_clap_processor` (1 s windows at 48 kHz)."""
    from ..rewards.audio import load_clap

    model = options.pop("model", None) or tiny_clap_model(seed)
    if options.get("tokenizer") is None and options.get("feature_extractor") is None:
        options.setdefault("processor", tiny_clap_processor())
    options.setdefault("weights_id", f"tiny-random-clap(seed={seed})")
    return load_clap(model=model, **options)


def tiny_jpeg_size(seed: int = 0, **options: Any):
    """``jpeg_size`` (a rule: nothing random)."""
    from ..rewards.rules import load_jpeg_size

    return load_jpeg_size(**options)


def tiny_jpeg_compressibility(seed: int = 0, **options: Any):
    """``jpeg_compressibility`` (a rule: nothing random)."""
    from ..rewards.rules import load_jpeg_compressibility

    return load_jpeg_compressibility(**options)


def mean_color_rule(sample: torch.Tensor, metadata: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """Does the sample's mean colour match ``metadata["target_color"]`` (3 numbers in [0, 1])?

    distance = ||mean RGB - target||_2 / sqrt(3) in [0, 1]; score = 1 - distance; components
    ``distance`` and ``match`` (1.0 when distance <= ``metadata.get("tolerance", 0.1)``). Works for images
    ``3,H,W`` and videos ``T,3,H,W``. Without a ``target_color`` the target is mid-grey (0.5, 0.5, 0.5),
    so generic metadata still scores; a malformed target (not 3 numbers in [0, 1]) raises, which makes
    the item invalid with the error as its reason.
    """
    target = torch.as_tensor(metadata.get("target_color", (0.5, 0.5, 0.5)), dtype=torch.float32).reshape(-1)
    if target.numel() != 3 or not bool(((target >= 0) & (target <= 1)).all()):
        raise ValueError(f"target_color must be 3 numbers in [0, 1], got {target.tolist()}")
    if sample.ndim not in (3, 4) or sample.shape[-3] != 3:
        raise ValueError(f"expected an image 3,H,W or a video T,3,H,W, got {tuple(sample.shape)}")
    x = sample.detach().float()
    mean = x.mean(dim=(-2, -1)) if x.ndim == 3 else x.mean(dim=(0, 2, 3))
    dist = float(torch.linalg.vector_norm(mean.cpu() - target)) / math.sqrt(3)
    return 1.0 - dist, {"distance": dist, "match": float(dist <= float(metadata.get("tolerance", 0.1)))}


def tiny_verifiable(seed: int = 0, **options: Any):
    """``verifiable`` with :func:`mean_color_rule` unless ``fn=`` is given."""
    from ..rewards.rules import load_verifiable

    if options.get("fn") is None:
        options["fn"] = mean_color_rule
        options.setdefault("name", "mean_color_match")
        options.setdefault("score_range", (0.0, 1.0))
    return load_verifiable(**options)


__all__ = [
    "mean_color_rule",
    "tiny_clap",
    "tiny_clap_model",
    "tiny_clap_processor",
    "tiny_clip_vision_model",
    "tiny_jpeg_compressibility",
    "tiny_jpeg_size",
    "tiny_temporal_consistency",
    "tiny_verifiable",
    "tiny_video_frames",
]

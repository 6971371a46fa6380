"""Tiny, seeded, offline Qwen2-VL / Qwen2.5-VL models and the VLM rewards built on them.

- :func:`tiny_vlm_tokenizer`: a byte-level BPE trained with the ``tokenizers`` library on a small
  built-in corpus (so any ASCII text tokenises), with the Qwen chat/vision special tokens
  (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``,
  ``<|image_pad|>``, ``<|video_pad|>``) and single tokens for the answer words the rewards read
  (``Yes``/``No``/``yes``/``no`` and the Q-Align rating words after a space). Wrapped as a
  transformers fast tokenizer. Not Qwen's vocabulary, but the same special tokens and chat format.
- :func:`tiny_qwen_vl`: a real ``Qwen2VLForConditionalGeneration`` (or ``Qwen2_5_VLForConditionalGeneration``
  with ``arch="qwen2_5_vl"``) with random weights: text hidden 64, 2 layers, vision depth 1, embed dim
  32, patch 4, spatial merge 2, temporal patch 2; its config token ids match the tokenizer.
- :func:`tiny_image_processor`: the official ``Qwen2VLImageProcessor`` configured like the tiny model
  (for parity tests of the pure-torch patching).
- ``tiny_vqascore`` / ``tiny_vlm_compare`` / ``tiny_qalign`` / ``tiny_artifacts`` / ``tiny_video_vlm``:
  the registered rewards on that model, each ``(seed=0, **options)``; options go to the reward's factory.

The tokenizer is trained once per process (cached); a model builds in a few milliseconds.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

#: Qwen's special tokens, in the order they get ids (``<|endoftext|>`` first, as in Qwen's vocabulary)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

TINY_PATCH_SIZE = 4
TINY_MERGE_SIZE = 2
TINY_TEMPORAL_PATCH_SIZE = 2
TINY_MAX_PIXELS = 32 * 32  # the tiny rewards' pixel budget: 32x32 -> 8x8 patches -> 16 LLM tokens
TINY_MIN_PIXELS = 8 * 8

_ANSWER_WORDS = ("Yes", "No", "yes", "no")
_RATING_WORDS = ("excellent", "good", "fair", "poor", "bad")
_CORPUS = (
    "system\nYou are a helpful assistant.",
    "user\nDoes this figure show a photo of a cat? Please answer yes or no.",
    "assistant\nYes",
    "assistant\nNo",
    'Does this video show "a dog running in the park"? Please answer yes or no.',
    "Is the first image better than the second image in terms of prompt alignment, aesthetics and detail?",
    "How would you rate the quality of this image? The quality of the image is",
    "How would you rate the aesthetics of this image? The aesthetics of the image is",
    "Are there malformed hands, distorted faces, extra limbs, broken geometry, smeared textures, garbled text or inconsistent lighting in this image?",
    "a red cube on a blue sphere, three green triangles, an astronaut riding a horse on the moon",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()-_/",
)


@functools.lru_cache(maxsize=None)
def _tiny_vlm_tokenizer_json(vocab_size: int = 512) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # the answer words are repeated so that each becomes one merged token, bare and after a space
    answers = " ".join(_ANSWER_WORDS + _RATING_WORDS)
    corpus = list(_CORPUS) * 8 + [answers] * 64 + list(_ANSWER_WORDS) * 64
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def tiny_vlm_tokenizer(vocab_size: int = 512, model_max_length: int = 2048):
    """A transformers fast tokenizer with Qwen's special tokens, built offline (see module docstring)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_vlm_tokenizer_json(vocab_size)),
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length,
    )
    for word in _ANSWER_WORDS:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"tiny VLM tokenizer: {word!r} is not one token ({ids})"
    return tok


def _qwen_token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def tiny_qwen_vl(seed: int = 0, arch: str = "qwen2_vl", tokenizer=None, *, text: dict[str, Any] | None = None,
                 vision: dict[str, Any] | None = None):
    """``(model, tokenizer)``: a seeded random tiny Qwen2-VL (``arch="qwen2_vl"``) or Qwen2.5-VL
    (``arch="qwen2_5_vl"``) in eval mode, float32, CPU. ``text`` / ``vision`` override config entries."""
    tokenizer = tokenizer if tokenizer is not None else tiny_vlm_tokenizer()
    text_cfg: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},  # head_dim 16
        initializer_range=0.1,  # larger than the real 0.02 so random answers are not all ~1/vocab
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    text_cfg.update(text or {})
    vis_common: dict[str, Any] = dict(
        depth=1,
        num_heads=2,
        in_channels=3,
        patch_size=TINY_PATCH_SIZE,
        spatial_merge_size=TINY_MERGE_SIZE,
        temporal_patch_size=TINY_TEMPORAL_PATCH_SIZE,
        initializer_range=0.1,
    )
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model

        vis_cfg = dict(vis_common, embed_dim=32, hidden_size=text_cfg["hidden_size"], mlp_ratio=2)
    elif arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

        vis_cfg = dict(vis_common, hidden_size=32, intermediate_size=64, out_hidden_size=text_cfg["hidden_size"],
                       window_size=TINY_PATCH_SIZE * TINY_MERGE_SIZE * 2, fullatt_block_indexes=[0])
    else:
        raise ValueError(f"arch must be 'qwen2_vl' or 'qwen2_5_vl', got {arch!r}")
    vis_cfg.update(vision or {})
    config = Config(text_config=text_cfg, vision_config=vis_cfg, **_qwen_token_ids(tokenizer))
    torch.manual_seed(seed)
    model = Model(config).eval()
    return model, tokenizer


def tiny_image_processor():
    """The official ``Qwen2VLImageProcessor`` with the tiny model's patching and pixel budget."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        patch_size=TINY_PATCH_SIZE,
        merge_size=TINY_MERGE_SIZE,
        temporal_patch_size=TINY_TEMPORAL_PATCH_SIZE,
        min_pixels=TINY_MIN_PIXELS,
        max_pixels=TINY_MAX_PIXELS,
    )


def _tiny_reward(factory: str, seed: int, options: dict[str, Any]):
    from ..rewards import vlm

    arch = options.pop("arch", "qwen2_vl")
    if "model" not in options:
        model, tokenizer = tiny_qwen_vl(seed, arch=arch, tokenizer=options.pop("tokenizer", None))
        options["model"], options["tokenizer"] = model, tokenizer
        options.setdefault("weights_id", f"tiny:{arch}:seed{seed}")
    options.setdefault("max_pixels", TINY_MAX_PIXELS)
    options.setdefault("min_pixels", TINY_MIN_PIXELS)
    if factory == "load_artifacts":
        from ..rewards import artifacts

        return artifacts.load_artifacts(**options)
    return getattr(vlm, factory)(**options)


def tiny_vqascore(seed: int = 0, **options: Any):
    """``vqascore`` on a tiny random Qwen2-VL (``arch="qwen2_5_vl"`` for Qwen2.5-VL)."""
    return _tiny_reward("load_vqascore", seed, options)


def tiny_vlm_compare(seed: int = 0, **options: Any):
    """``vlm_compare`` on a tiny random Qwen2-VL."""
    return _tiny_reward("load_vlm_compare", seed, options)


def tiny_qalign(seed: int = 0, **options: Any):
    """``qalign`` on a tiny random Qwen2-VL."""
    return _tiny_reward("load_qalign", seed, options)


def tiny_artifacts(seed: int = 0, **options: Any):
    """``artifacts`` on a tiny random Qwen2-VL."""
    return _tiny_reward("load_artifacts", seed, options)


def tiny_video_vlm(seed: int = 0, **options: Any):
    """``video_vlm`` on a tiny random Qwen2-VL."""
    return _tiny_reward("load_video_vlm", seed, options)


__all__ = [
    "QWEN_SPECIAL_TOKENS",
    "tiny_artifacts",
    "tiny_image_processor",
    "tiny_qalign",
    "tiny_qwen_vl",
    "tiny_video_vlm",
    "tiny_vlm_compare",
    "tiny_vlm_tokenizer",
    "tiny_vqascore",
]

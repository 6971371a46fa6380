"""A tiny open_clip CLIP for the embedded ShapeWorld: config, builder, save/load and differentiable scoring.

The model is a plain ``open_clip.CLIP`` built from a custom config (a small ViT on 32x32 images and a
small causal text transformer). Its tokenizer is the real CLIP byte-level BPE truncated to the first
``num_merges`` merges (:mod:`mmalign.testing.tokenizers`), saved as a transformers ``CLIPTokenizer``
next to the weights; token ids are open_clip-style (``<sot> ... <eot>`` then padding with
``<eot>``), and since ``<eot>`` is the largest id open_clip's argmax pooling finds it.

A shipped directory holds::

    open_clip_config.json        {"model_cfg": {embed_dim, vision_cfg, text_cfg}, "preprocess_cfg": {...}}
    open_clip_model.safetensors  the state dict
    tokenizer.json, tokenizer_config.json   the tokenizer (transformers CLIPTokenizer files)

and loads either with :func:`load_shapeworld_clip` or natively with
``open_clip.create_model_and_transforms("local-dir:<path>")`` / ``open_clip.get_tokenizer("local-dir:<path>")``
(``text_cfg.hf_tokenizer_name`` is set, so open_clip reads the tokenizer files from the directory).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

#: OpenAI CLIP's normalisation (open_clip.constants.OPENAI_DATASET_MEAN / _STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: merges kept in the BPE: enough that the ShapeWorld words tokenise in 1-3 pieces
DEFAULT_NUM_MERGES = 8000
DEFAULT_CONTEXT_LENGTH = 32


def tiny_clip_config(
    *,
    num_merges: int = DEFAULT_NUM_MERGES,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    image_size: int = 32,
    patch_size: int = 4,
    width: int = 128,
    layers: int = 4,
    heads: int = 4,
    embed_dim: int = 128,
    text_width: int | None = None,
    text_layers: int | None = None,
) -> dict[str, Any]:
    """The open_clip ``model_cfg`` (``embed_dim``, ``vision_cfg``, ``text_cfg``) of the tiny CLIP
    (the text tower has the vision tower's width and depth unless ``text_width`` / ``text_layers``)."""
    from mmalign.testing.tokenizers import clip_vocab_size

    text_width = text_width or width
    text_layers = text_layers or layers
    if width % heads or text_width % heads:
        raise ValueError(f"widths {width} / {text_width} must be multiples of heads {heads}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
            "mlp_ratio": 4.0,
        },
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": clip_vocab_size(num_merges),
            "width": text_width,
            "heads": heads,
            "layers": text_layers,
            "mlp_ratio": 4.0,
            # non-empty: open_clip.get_tokenizer("local-dir:...") then loads the HF tokenizer files
            # saved in the model directory (the name itself is only a label)
            "hf_tokenizer_name": f"clip-bpe-{num_merges}-merges",
            "tokenizer_kwargs": {"clean": "lower"},
        },
        # not open_clip's: how the tokenizer was built (read by load_shapeworld_clip)
        "mmalign_tokenizer": {"num_merges": num_merges, "context_length": context_length},
    }


def preprocess_cfg(image_size: int = 32) -> dict[str, Any]:
    """open_clip ``preprocess_cfg`` (also returned as ``preprocess_info`` by the loader)."""
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "interpolation": "bilinear",
        "resize_mode": "shortest",
    }


def _open_clip_model_cfg(config: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in config.items() if k in ("embed_dim", "vision_cfg", "text_cfg")}


def build_tiny_clip(config: dict[str, Any] | None = None, seed: int | None = None):
    """A randomly initialised ``open_clip.CLIP`` from ``config`` (default :func:`tiny_clip_config`)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    config = config or tiny_clip_config()
    cfg = _open_clip_model_cfg(config)
    if seed is not None:
        torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
        text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
    )


class ShapeWorldClipTokenizer:
    """Texts -> LongTensor ``(B, context_length)`` for the tiny CLIP (open_clip tokenizer interface).

    Wraps a transformers ``CLIPTokenizer`` (lower-cased, CLIP text cleaning); truncation keeps ``<eot>``.
    """

    def __init__(self, hf_tokenizer: Any, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        self.tokenizer = hf_tokenizer
        self.context_length = int(context_length)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = [" ".join(str(t).lower().split()) for t in texts]
        return self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=context_length or self.context_length,
            return_tensors="pt",
        ).input_ids

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(directory))


def shapeworld_clip_tokenizer(num_merges: int = DEFAULT_NUM_MERGES, context_length: int = DEFAULT_CONTEXT_LENGTH):
    """A fresh tokenizer built offline from open_clip's BPE file (see :mod:`mmalign.testing.tokenizers`)."""
    from mmalign.testing.tokenizers import clip_tokenizer

    return ShapeWorldClipTokenizer(clip_tokenizer(num_merges, model_max_length=context_length), context_length)


def save_shapeworld_clip(model: Any, config: dict[str, Any], tokenizer: ShapeWorldClipTokenizer, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16) -> None:
    """Write ``open_clip_config.json``, ``open_clip_model.safetensors`` (in ``dtype``) and the tokenizer."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    image_size = int(config["vision_cfg"]["image_size"])
    payload = {"model_cfg": _open_clip_model_cfg(config), "preprocess_cfg": preprocess_cfg(image_size)}
    payload["mmalign_tokenizer"] = dict(config.get("mmalign_tokenizer", {}))
    (out / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})  # one key: byte-identical files
    tokenizer.save_pretrained(out)


def load_shapeworld_clip(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a shipped tiny CLIP: ``(model, tokenizer, preprocess_info)``.

    ``model`` is an ``open_clip.CLIP`` in eval mode (``encode_image`` / ``encode_text``);
    ``tokenizer(texts) -> LongTensor (B, context_length)``; ``preprocess_info`` is the open_clip
    ``preprocess_cfg`` dict (``size``, ``mean``, ``std``, ``interpolation``) that :func:`preprocess`
    applies to image tensors in [0, 1].
    """
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    root = Path(path)
    cfg_path = root / CONFIG_NAME
    weights = root / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{root}: no {CONFIG_NAME}; not a shipped ShapeWorld CLIP directory")
    if not weights.is_file():
        raise FileNotFoundError(f"{root}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    payload = json.loads(cfg_path.read_text())
    model_cfg = payload.get("model_cfg")
    if not model_cfg or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{cfg_path}: missing model_cfg with embed_dim / vision_cfg / text_cfg")
    model = build_tiny_clip(model_cfg)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: state dict does not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model = model.to(device=device, dtype=dtype).eval()
    context_length = int(model_cfg["text_cfg"]["context_length"])
    if any((root / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        hf_tok = CLIPTokenizer.from_pretrained(str(root), model_max_length=context_length)
    else:  # rebuild offline from open_clip's BPE file
        num_merges = int(payload.get("mmalign_tokenizer", {}).get("num_merges", DEFAULT_NUM_MERGES))
        hf_tok = shapeworld_clip_tokenizer(num_merges, context_length).tokenizer
    if len(hf_tok) != int(model_cfg["text_cfg"]["vocab_size"]):
        raise ValueError(f"{root}: tokenizer has {len(hf_tok)} ids, text_cfg.vocab_size is {model_cfg['text_cfg']['vocab_size']}")
    tokenizer = ShapeWorldClipTokenizer(hf_tok, context_length)
    info = dict(payload.get("preprocess_cfg") or preprocess_cfg(int(model_cfg["vision_cfg"]["image_size"])))
    return model, tokenizer, info


def preprocess(images: Tensor, preprocess_info: dict[str, Any]) -> Tensor:
    """Images B,3,H,W in [0,1] -> the model's normalised input, differentiably (bilinear resize if needed)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images B,3,H,W in [0,1], got shape {tuple(images.shape)}")
    size = int(preprocess_info["size"] if not isinstance(preprocess_info["size"], (list, tuple)) else preprocess_info["size"][0])
    x = images
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(preprocess_info["mean"], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_info["std"], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_similarity(model: Any, tokenizer: Any, preprocess_info: dict[str, Any], images: Tensor, texts: Sequence[str]) -> Tensor:
    """Cosine similarity (B,) of each image with its text (differentiable w.r.t. ``images``)."""
    if len(texts) != images.shape[0]:
        raise ValueError(f"{len(texts)} texts for {images.shape[0]} images")
    device = next(model.parameters()).device
    img = model.encode_image(preprocess(images.to(device), preprocess_info), normalize=True)
    with torch.no_grad():
        txt = model.encode_text(tokenizer(list(texts)).to(device), normalize=True)
    return (img * txt).sum(-1)


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ShapeWorldClipTokenizer",
    "build_tiny_clip",
    "clip_similarity",
    "load_shapeworld_clip",
    "preprocess",
    "preprocess_cfg",
    "save_shapeworld_clip",
    "shapeworld_clip_tokenizer",
    "tiny_clip_config",
]

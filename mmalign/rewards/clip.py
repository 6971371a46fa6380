"""CLIP-family rewards: CLIPScore, PickScore, HPSv2 / v2.1, the LAION aesthetic predictor and the
goal-baseline CLIP reward.

All of them embed images (and, except the aesthetic predictor, prompts) with a CLIP model and apply a
small float32 head to the embeddings. One base class, :class:`ClipEmbeddingReward`, does the shared
work over a :class:`ClipBackbone`, of which there are two:

- :class:`HFClipBackbone`: a ``transformers.CLIPModel`` (CLIPScore, PickScore, aesthetic, goal-CLIP);
- :class:`OpenClipBackbone`: an ``open_clip`` CLIP model (HPSv2, as the original code uses).

Images are preprocessed in pure torch (:class:`~mmalign.rewards.preprocess.ImagePreprocess`), never by
a ``CLIPProcessor``, so gradients reach the input pixels: every reward here is differentiable. The
model runs in its own dtype (option ``dtype``); embeddings, cosines and heads are float32. Prompts are
tokenised to the model's 77-token context with a warning (never a silent cut) for longer prompts.

Every factory takes ``device``, ``dtype``, ``batch_size``, ``offline`` (None follows ``HF_HUB_OFFLINE``
/ ``MMALIGN_OFFLINE``), ``cache_dir``, and pre-built ``model=`` / ``tokenizer=`` objects instead of hub
ids (the tiny test builders in :mod:`mmalign.testing.clip_rewards` use those). Weights load once, when
the reward object is built; the models are frozen (eval mode, no parameter gradients).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import resolve_dtype, resolve_offline
from .base import Reward, ScoreBatch
from .preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess, warn_if_truncated



# ----------------------------------------------------------------------------- small helpers




def _where(offline: bool) -> str:
    return "local files only (offline: HF_HUB_OFFLINE / offline=True)" if offline else "the hub or local files"


def _hub_file(repo: str, filename: str, *, offline: bool, cache_dir: str | os.PathLike | None) -> str:
    """Path of ``filename`` in hub repo (or local directory) ``repo``; OSError (fast, no network when
    offline) if it cannot be had."""
    local = Path(repo) / filename
    if local.is_file():
        return str(local)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=offline, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes; all mean "not available"
        raise OSError(f"could not get {filename!r} of {repo!r} from {_where(offline)}: {type(err).__name__}: {err}") from err


def _load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a ``torch.save`` file, loaded with ``weights_only=True`` (no pickled code).
    Accepts plain state dicts and ``{"state_dict": ...}`` checkpoints; strips DDP's ``module.`` prefix."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors of many kinds
        raise OSError(f"could not load weights from {str(path)!r}: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise OSError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _pooled(out: Any) -> Tensor:
    """Projected features from ``get_image_features`` / ``get_text_features``: a tensor in transformers
    4, a ``BaseModelOutputWithPooling`` (projected ``pooler_output``) in transformers 5."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _square(size: Any, what: str) -> int:
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"{what}: non-square image size {tuple(size)} is not supported")
        size = size[0]
    return int(size)


def _hf_tokens(tokenizer: Any, texts: list[str], context_length: int) -> dict[str, Tensor]:
    """A transformers tokenizer's ids and mask, padded to the full context whatever the batch (the same
    token layout for a prompt alone or in a batch: batch-invariant scores); over-long texts are cut
    (callers warn first)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ----------------------------------------------------------------------------- backbones
class ClipBackbone(nn.Module):
    """A CLIP model seen as two encoders. ``encode_image`` takes preprocessed pixels B,3,S,S;
    ``encode_text`` takes strings. Both return float32 unnormalised embeddings."""

    image_size: int
    embed_dim: int
    context_length: int = 77
    tokenizer: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def encode_tokens(self, tokens: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} was built without a tokenizer: it cannot embed text")
        texts = list(texts)
        warn_if_truncated(self.tokenizer, texts, self.context_length)
        device = next(self.parameters()).device
        tokens = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        return self.encode_tokens(tokens).float()


class HFClipBackbone(ClipBackbone):
    """A ``transformers.CLIPModel`` and its tokenizer (tokenizer optional for image-only rewards)."""

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = _square(model.config.vision_config.image_size, "CLIP vision config")
        self.embed_dim = int(model.config.projection_dim)
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values.to(self.dtype))).float()

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return _hf_tokens(self.tokenizer, texts, self.context_length)

    def encode_tokens(self, tokens: dict[str, Tensor]) -> Tensor:
        return _pooled(self.model.get_text_features(**tokens))


class _OpenClipTokenizer:
    """open_clip's ``SimpleTokenizer`` behind the call convention :func:`warn_if_truncated` uses."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner = tokenizer

    def __call__(self, text: str, truncation: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.inner.sot_token_id, *self.inner.encode(text), self.inner.eot_token_id]}

    def __repr__(self) -> str:
        return f"_OpenClipTokenizer({type(self.inner).__name__})"


class OpenClipBackbone(ClipBackbone):
    """An ``open_clip`` CLIP model and a tokenizer: open_clip's own, or a ``transformers`` CLIP tokenizer
    (its padding is replaced by 0 so the ids are exactly open_clip's: sot, tokens, eot, 0...)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.hf_tokenizer = not hasattr(tokenizer, "sot_token_id")
        self.tokenizer = tokenizer if self.hf_tokenizer else _OpenClipTokenizer(tokenizer)
        self.image_size = _square(model.visual.image_size, "open_clip visual")
        self.embed_dim = int(model.visual.output_dim)
        self.context_length = int(model.context_length)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values.to(self.dtype)).float()

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        if self.hf_tokenizer:
            enc = _hf_tokens(self.tokenizer, texts, self.context_length)
            return {"text": enc["input_ids"] * enc["attention_mask"]}
        return {"text": self.tokenizer.inner(texts, context_length=self.context_length)}

    def encode_tokens(self, tokens: dict[str, Tensor]) -> Tensor:
        return self.model.encode_text(tokens["text"])


# ----------------------------------------------------------------------------- the rewards
class ClipEmbeddingReward(Reward):
    """Shared base of the CLIP rewards: preprocessing, embedding, provenance. Subclasses implement
    :meth:`score` from :meth:`image_embeddings` / :meth:`text_embeddings` (L2-normalised, float32)."""

    differentiable: ClassVar[bool] = True

    def __init__(self, backbone: ClipBackbone, *, preprocess: ImagePreprocess, batch_size: int = 16,
                 weights_id: str | None = None) -> None:
        super().__init__(batch_size=batch_size, weights_id=weights_id, preprocessing=preprocess.to_dict())
        self.backbone = backbone
        self.preprocess = preprocess
        backbone.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "ClipEmbeddingReward":
        """Reward models stay in eval mode (no dropout), whatever the enclosing module does."""
        return super().train(False)

    def stack_mixed(self, items: list[Tensor]) -> Tensor:
        # differently sized images: bring each to the model's input size with the reward's own policy
        return torch.cat([self.preprocess.resize(t[None].float()) for t in items])

    def image_embeddings(self, samples: Tensor) -> Tensor:
        """B,3,H,W in [0,1] -> B,D L2-normalised float32 image embeddings (differentiable)."""
        pixels = self.preprocess(samples.to(self.device))
        return F.normalize(self.backbone.encode_image(pixels), dim=-1)

    def text_embeddings(self, texts: Sequence[str]) -> Tensor:
        """Strings -> N,D L2-normalised float32 text embeddings (warns on prompts over the context)."""
        return F.normalize(self.backbone.encode_text(texts), dim=-1)

    def cosine(self, samples: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(image_i, prompt_i), float32, one per item."""
        return (self.image_embeddings(samples) * self.text_embeddings(prompts)).sum(-1)


class CLIPScore(ClipEmbeddingReward):
    """CLIPScore (Hessel et al. 2021, arXiv 2104.08718) in the torchmetrics convention:
    max(100 * cos(image, prompt), 0). Components: ``cosine`` (the raw cosine)."""

    name: ClassVar[str] = "clipscore"
    score_range: ClassVar[tuple[float | None, float | None]] = (0.0, 100.0)

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        cos = self.cosine(samples, prompts)
        return ScoreBatch((100.0 * cos).clamp(min=0.0), {"cosine": cos})


class PickScore(ClipEmbeddingReward):
    """PickScore (Kirstain et al. 2023, arXiv 2305.01569): logit_scale.exp() * cos(image, prompt)."""

    name: ClassVar[str] = "pickscore"

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        cos = self.cosine(samples, prompts)
        return ScoreBatch(self.backbone.logit_scale.float().exp() * cos, {"cosine": cos})


class HPSv2(ClipEmbeddingReward):
    """Human Preference Score v2 (Wu et al. 2023, arXiv 2306.09341): the cosine of an open_clip ViT-H-14
    fine-tuned on human preferences, images resized on the longest side and zero-padded. The cosine is
    taken in float32 (the original's autocast makes near-equal images tie)."""

    name: ClassVar[str] = "hpsv2"
    score_range: ClassVar[tuple[float | None, float | None]] = (-1.0, 1.0)

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        return ScoreBatch(self.cosine(samples, prompts))


class HPSv21(HPSv2):
    """HPS v2.1: HPSv2 with the v2.1 weights (same architecture and preprocessing)."""

    name: ClassVar[str] = "hpsv2.1"


class GoalBaselineCLIP(ClipEmbeddingReward):
    """Goal-baseline regularised CLIP reward (VLM-RM, Rocamonde et al. 2023, arXiv 2310.12921).

    With x the normalised image embedding, g the normalised prompt ("goal") embedding and b the
    normalised ``baseline`` prompt embedding, the image is partly projected (strength ``alpha``) onto the
    line through b and g: R = 1 - 0.5 * ||alpha * proj(x) + (1 - alpha) * x - g||^2. ``alpha = 0`` gives
    the plain cosine; ``alpha = 1`` keeps only the goal-vs-baseline direction. R lies in [-1, 1].
    Components: ``cosine`` (x.g), ``baseline_cosine`` (x.b). A prompt equal to the baseline (no
    direction) gets a NaN score and is reported invalid when ``alpha > 0``.
    """

    name: ClassVar[str] = "goal_clip"
    score_range: ClassVar[tuple[float | None, float | None]] = (-1.0, 1.0)

    def __init__(self, backbone: ClipBackbone, *, baseline: str = "a photo", alpha: float = 0.5, **kwargs: Any) -> None:
        if not isinstance(baseline, str) or not baseline.strip():
            raise ValueError(f"baseline must be a non-empty prompt, got {baseline!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(backbone, **kwargs)
        self.baseline = baseline
        self.alpha = float(alpha)

    def provenance(self) -> dict[str, Any]:
        return {**super().provenance(), "baseline": self.baseline, "alpha": self.alpha}

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        x = self.image_embeddings(samples)
        text = self.text_embeddings([*prompts, self.baseline])
        g, b = text[:-1], text[-1:]
        # the line through b and g is g + t * u (u: unit direction g - b); proj(x) - g = ((x - g).u) u
        u = F.normalize(g - b, dim=-1, eps=0.0) if self.alpha > 0 else torch.zeros_like(g)
        r = x - g
        moved = self.alpha * (r * u).sum(-1, keepdim=True) * u + (1.0 - self.alpha) * r
        scores = 1.0 - 0.5 * moved.pow(2).sum(-1)
        return ScoreBatch(scores, {"cosine": (x * g).sum(-1), "baseline_cosine": (x * b).sum(-1)})


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor v2 head (christophschuhmann/improved-aesthetic-predictor): linear
    layers 768-1024-128-64-16-1 with dropout between (no activations); ``layers.{0,2,4,6,7}`` are the
    published state-dict keys (``sac+logos+ava1-l14-linearMSE.pth``)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_file(cls, path: str | os.PathLike, input_size: int = 768) -> "AestheticMLP":
        """The head from a ``torch.save``d state dict with the published key names (weights_only load)."""
        head = cls(input_size)
        state = _load_state_dict(path)
        try:
            head.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{str(path)!r} is not an aesthetic-predictor head for {input_size}-d embeddings: {err}") from err
        return head.eval()


class AestheticScore(ClipEmbeddingReward):
    """LAION aesthetic predictor v2: :class:`AestheticMLP` on the L2-normalised CLIP ViT-L/14 image
    embedding (float32). About 1-10 for real images; needs no prompt."""

    name: ClassVar[str] = "aesthetic"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, backbone: ClipBackbone, head: AestheticMLP | str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(backbone, **kwargs)
        if not isinstance(head, nn.Module):
            head = AestheticMLP.from_file(head, input_size=backbone.embed_dim)
        self.head = head.float().eval().requires_grad_(False)

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        emb = self.image_embeddings(samples)
        head_dtype = next(self.head.parameters()).dtype
        return ScoreBatch(self.head(emb.to(head_dtype)).float().squeeze(-1))


# ----------------------------------------------------------------------------- loading
def _finish(reward: ClipEmbeddingReward, device: str | torch.device | None, dtype: torch.dtype | None) -> ClipEmbeddingReward:
    if dtype is not None:
        reward.backbone.to(dtype)  # heads stay float32
    if device is not None:
        reward.to(device)
    return reward.eval()


def _hf_image_stats(repo: str, *, offline: bool, cache_dir: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from a hub repo's ``preprocessor_config.json``; CLIP's (with a warning)
    when the file is not available."""
    import json

    try:
        cfg = json.loads(Path(_hub_file(repo, "preprocessor_config.json", offline=offline, cache_dir=cache_dir)).read_text())
        return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    except (OSError, ValueError) as err:
        warnings.warn(f"no preprocessor_config.json for {repo!r} ({err}); using CLIP's mean/std", stacklevel=3)
        return CLIP_MEAN, CLIP_STD


def _hf_backbone(model_id: str | None, *, model: nn.Module | None, tokenizer: Any, processor_id: str | None,
                 need_tokenizer: bool, dtype: torch.dtype | None, offline: bool | None, cache_dir: Any,
                 preprocess: ImagePreprocess | None) -> tuple[HFClipBackbone, ImagePreprocess, str]:
    """A :class:`HFClipBackbone`, its preprocessing (shortest-edge resize + centre crop to the model's
    image size) and the weights id. A pre-built ``model`` is used as it is (no hub look-up at all: its
    tokenizer must be given when prompts are needed); otherwise ``model_id`` (hub id or local directory)
    is loaded, with tokenizer and image mean/std from ``processor_id`` (default: ``model_id``)."""
    if model is not None:
        if tokenizer is None and need_tokenizer:
            raise ValueError("a pre-built model= needs its tokenizer= too")
        backbone = HFClipBackbone(model, tokenizer)
        mean, std = CLIP_MEAN, CLIP_STD
        weights_id = getattr(model.config, "_name_or_path", None) or "custom"
    else:
        import transformers

        off = resolve_offline(offline)
        # transformers 5 names the argument dtype (torch_dtype is deprecated there), 4.x torch_dtype
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            model = transformers.CLIPModel.from_pretrained(model_id, local_files_only=off, cache_dir=cache_dir, **{dtype_arg: dtype or torch.float32})
        except (OSError, ValueError) as err:
            raise OSError(f"could not load CLIP model {model_id!r} from {_where(off)}: {err}") from err
        source = processor_id or model_id
        if tokenizer is None and need_tokenizer:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=off, cache_dir=cache_dir)
            except (OSError, ValueError) as err:
                raise OSError(f"could not load the tokenizer of {source!r} from {_where(off)}: {err}") from err
        backbone = HFClipBackbone(model, tokenizer)
        mean, std = _hf_image_stats(source, offline=off, cache_dir=cache_dir) if preprocess is None else (CLIP_MEAN, CLIP_STD)
        weights_id = str(model_id)
    if preprocess is None:
        preprocess = ImagePreprocess("shortest_edge_crop", size=backbone.image_size, interpolation="bicubic", mean=mean, std=std)
    return backbone, preprocess, weights_id


def is_open_clip_dir(model_id: Any) -> bool:
    """A local open_clip model directory (``open_clip_config.json`` + weights, open_clip's hub layout)."""
    return model_id is not None and (Path(str(model_id)) / "open_clip_config.json").is_file()


def _open_clip_dir_backbone(path: str, *, tokenizer: Any, dtype: torch.dtype | None,
                            preprocess: ImagePreprocess | None) -> tuple[OpenClipBackbone, ImagePreprocess, str]:
    """An open_clip model from a local directory (``open_clip.create_model("local-dir:...")``), with the
    transformers CLIP tokenizer saved beside it (or open_clip's default tokenizer) and its preprocess_cfg."""
    import json

    import open_clip

    try:
        model = open_clip.create_model(f"local-dir:{path}", device="cpu", precision="fp32")
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise OSError(f"could not load the open_clip model in {path!r}: {err}") from err
    model = model.to(dtype or torch.float32)
    if tokenizer is None:
        if (Path(path) / "vocab.json").is_file() or (Path(path) / "tokenizer.json").is_file():
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=int(model.context_length))
        else:
            tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    backbone = OpenClipBackbone(model, tokenizer)
    if preprocess is None:
        cfg = json.loads((Path(path) / "open_clip_config.json").read_text()).get("preprocess_cfg", {})
        interp = cfg.get("interpolation", "bicubic")
        preprocess = ImagePreprocess(
            "longest_side_pad" if cfg.get("resize_mode") == "longest" else "shortest_edge_crop",
            size=backbone.image_size,
            interpolation=interp if interp in ("bicubic", "bilinear", "nearest", "area") else "bicubic",
            mean=tuple(cfg.get("mean", CLIP_MEAN)),
            std=tuple(cfg.get("std", CLIP_STD)),
        )
    return backbone, preprocess, str(path)


def _hf_reward(cls: type[ClipEmbeddingReward], model_id: str | None, *, model=None, tokenizer=None, processor_id=None,
               dtype=None, device=None, offline=None, cache_dir=None, batch_size: int = 16, preprocess=None,
               weights_id: str | None = None, weights_note: str | None = None, **extra: Any) -> ClipEmbeddingReward:
    dt = resolve_dtype(dtype)
    if model is None and is_open_clip_dir(model_id):  # e.g. the shipped ShapeWorld CLIP
        backbone, pre, wid = _open_clip_dir_backbone(str(model_id), tokenizer=tokenizer, dtype=dt, preprocess=preprocess)
        reward = cls(backbone, preprocess=pre, batch_size=batch_size, weights_id=weights_id or wid, **extra)
        return _finish(reward, device, dt)
    backbone, pre, wid = _hf_backbone(model_id, model=model, tokenizer=tokenizer, processor_id=processor_id,
                                      need_tokenizer="prompt" in cls.needs, dtype=dt, offline=offline,
                                      cache_dir=cache_dir, preprocess=preprocess)
    if weights_id is None:
        weights_id = wid if weights_note is None else f"{wid} + {weights_note}"
    reward = cls(backbone, preprocess=pre, batch_size=batch_size, weights_id=weights_id, **extra)
    return _finish(reward, device, dt)


def load_clipscore(model_id: str = "openai/clip-vit-large-patch14", **options: Any) -> CLIPScore:
    """CLIPScore with a transformers CLIP model (default ``openai/clip-vit-large-patch14``), or an
    open_clip model directory (``open_clip_config.json`` + weights, e.g. ``assets/shapeworld-clip``).

    Options: ``model``/``tokenizer`` (pre-built; then nothing is looked up on the hub),
    ``processor_id`` (tokenizer and image mean/std source, default ``model_id``), ``dtype``, ``device``,
    ``batch_size``, ``offline``, ``cache_dir``, ``preprocess`` (an :class:`ImagePreprocess` replacing
    the default), ``weights_id`` (provenance label).
    """
    return _hf_reward(CLIPScore, model_id, **options)


def load_pickscore(model_id: str = "yuvalkirstain/PickScore_v1",
                   processor_id: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", **options: Any) -> PickScore:
    """PickScore: ``yuvalkirstain/PickScore_v1`` weights, tokenizer and preprocessing of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Options as :func:`load_clipscore`."""
    return _hf_reward(PickScore, model_id, processor_id=processor_id, **options)


def load_goal_clip(model_id: str = "openai/clip-vit-large-patch14", *, baseline: str = "a photo",
                   alpha: float = 0.5, **options: Any) -> GoalBaselineCLIP:
    """Goal-baseline CLIP reward (VLM-RM) with baseline prompt ``baseline`` and projection strength
    ``alpha`` in [0, 1] (0: the plain cosine; the paper sweeps it; 0.5 is our default, not a published
    value). Options as :func:`load_clipscore`."""
    return _hf_reward(GoalBaselineCLIP, model_id, baseline=baseline, alpha=alpha, **options)


def load_aesthetic(model_id: str = "openai/clip-vit-large-patch14", *, head: AestheticMLP | None = None,
                   head_path: str | os.PathLike | None = None, head_id: str = "trl-lib/ddpo-aesthetic-predictor",
                   head_filename: str = "aesthetic-model.pth", **options: Any) -> AestheticScore:
    """LAION aesthetic predictor v2 on a CLIP ViT-L/14 image embedding.

    The head is ``head`` (a ready :class:`AestheticMLP`), else the state dict at ``head_path`` (e.g. the
    published ``sac+logos+ava1-l14-linearMSE.pth``), else ``head_filename`` of hub repo (or directory)
    ``head_id`` (TRL's copy of the same weights); files load with ``weights_only=True``. Other options
    as :func:`load_clipscore` (no tokenizer is needed).
    """
    note = None
    if head is None:  # the small file first: offline without it fails before the CLIP model loads
        if head_path is None:
            head_path = _hub_file(head_id, head_filename, offline=resolve_offline(options.get("offline")), cache_dir=options.get("cache_dir"))
            note = f"{head_id}/{head_filename}"
        else:
            note = str(head_path)
    return _hf_reward(AestheticScore, model_id, head=head if head is not None else Path(head_path), weights_note=note, **options)


_HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _load_hps(cls: type[HPSv2], version: str, *, model: nn.Module | None = None, tokenizer: Any = None,
              checkpoint: str | os.PathLike | None = None, repo_id: str = "xswu/HPSv2", arch: str = "ViT-H-14",
              dtype=None, device=None, offline=None, cache_dir=None, batch_size: int = 16,
              preprocess: ImagePreprocess | None = None, weights_id: str | None = None) -> HPSv2:
    dt = resolve_dtype(dtype)
    if model is None:
        off = resolve_offline(offline)
        filename = _HPS_FILES[version]
        # the checkpoint first: offline without it fails fast, before building a 1B-parameter model
        path = str(checkpoint) if checkpoint is not None else _hub_file(repo_id, filename, offline=off, cache_dir=cache_dir)
        state = _load_state_dict(path)
        import open_clip

        model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
        model.load_state_dict(state)
        weights_id = weights_id or (str(checkpoint) if checkpoint is not None else f"{repo_id}/{filename}")
    if tokenizer is None:
        import open_clip

        tokenizer = open_clip.get_tokenizer(arch)
    backbone = OpenClipBackbone(model, tokenizer)
    if preprocess is None:
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        preprocess = ImagePreprocess("longest_side_pad", size=backbone.image_size, interpolation="bicubic",
                                     mean=tuple(cfg.get("mean", CLIP_MEAN)), std=tuple(cfg.get("std", CLIP_STD)), pad_fill=0.0)
    reward = cls(backbone, preprocess=preprocess, batch_size=batch_size, weights_id=weights_id or "custom")
    return _finish(reward, device, dt)


def load_hpsv2(**options: Any) -> HPSv2:
    """HPSv2: open_clip ViT-H-14 with ``HPS_v2_compressed.pt`` of ``xswu/HPSv2`` (or ``checkpoint=``, a
    local file). Options: ``model``/``tokenizer`` (pre-built open_clip model; open_clip or transformers
    CLIP tokenizer), ``repo_id``, ``arch``, ``dtype``, ``device``, ``batch_size``, ``offline``,
    ``cache_dir``, ``preprocess``, ``weights_id``."""
    return _load_hps(HPSv2, "v2", **options)


def load_hpsv21(**options: Any) -> HPSv21:
    """HPSv2.1: as :func:`load_hpsv2` with ``HPS_v2.1_compressed.pt``."""
    return _load_hps(HPSv21, "v2.1", **options)


__all__ = [
    "AestheticMLP",
    "AestheticScore",
    "CLIPScore",
    "ClipBackbone",
    "ClipEmbeddingReward",
    "GoalBaselineCLIP",
    "HFClipBackbone",
    "HPSv2",
    "HPSv21",
    "OpenClipBackbone",
    "PickScore",
    "load_aesthetic",
    "load_clipscore",
    "load_goal_clip",
    "load_hpsv2",
    "load_hpsv21",
    "load_pickscore",
]

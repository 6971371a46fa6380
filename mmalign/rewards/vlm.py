"""VLM answer-token rewards on Qwen2-VL / Qwen2.5-VL (transformers classes; no remote code).

Every reward here asks a vision-language model a question about the sample and reads the model's
next-token distribution at the answer position, in ONE teacher-forced forward pass (no generation):

- ``vqascore``   P("Yes") to 'Does this figure show "{prompt}"? Please answer yes or no.' (VQAScore,
                 Lin et al. 2024);
- ``vlm_compare`` P("Yes") that the sample beats a reference image on stated criteria (RewardDance,
                 arXiv 2509.08826); optionally debiased by also asking with the images swapped;
- ``qalign``     softmax over the rating words {excellent, good, fair, poor, bad} after
                 "The quality of the image is", dotted with [1, .75, .5, .25, 0] (Q-Align, arXiv 2312.17090);
- ``video_vlm``  the yes-token question over frames sampled from a video: all frames as images in one
                 prompt (default), each frame asked separately and averaged, or Qwen's native video input;
- ``artifacts`` (in :mod:`mmalign.rewards.artifacts`) one yes/no question per artifact category.

All share :class:`VLMCore`: pure-torch pixel preprocessing (resize with the ``pixel_budget`` policy,
normalise with Qwen's mean/std, then the Qwen2-VL temporal/spatial patch flattening, see
:func:`qwen_patchify`) so gradients reach the input pixels; the chat prompt in the documented Qwen2-VL
format (identical to the model's chat template with ``add_generation_prompt=True``)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>*N<|vision_end|>{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer_prefix}

and float32 logits at the last position. Each image goes through the vision tower once per call even
when several questions are asked about it (its features are reused), then all questions go through the
language model in as few batched passes as ``max_sequences`` allows.

Yes-probability normalisation (``normalize``): ``"vocab"`` (default, VQAScore's convention) is the
softmax over the FULL vocabulary at the answer position, P(Yes) = softmax(logits)[Yes] (so P(Yes) +
P(No) can be < 1 when the model would answer otherwise); ``"yes_no"`` renormalises over the yes and no
tokens only, P = sigmoid(logit_Yes - logit_No). With several yes (or no) words their probabilities add.
Logits, softmax and scores are float32 whatever the model dtype.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import env_offline, resolve_dtype
from .base import Reward, ScoreBatch
from .preprocess import CLIP_MEAN, CLIP_STD, Interpolation, normalize, pixel_budget_size, resize_pixel_budget, warn_if_truncated

DEFAULT_VLM_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN_MEAN = CLIP_MEAN  # Qwen2-VL's image processor normalises with the OpenAI CLIP mean/std
QWEN_STD = CLIP_STD
DEFAULT_MAX_PIXELS = 448 * 448  # 256 LLM tokens per image at patch 14, merge 2 (Qwen's own default is ~1M pixels)
DEFAULT_MIN_PIXELS = 56 * 56  # Qwen2-VL's default
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # what Qwen2(.5)-VL's chat template inserts
DEFAULT_MAX_PROMPT_TOKENS = 512
VQASCORE_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'  # VQAScore
VIDEO_TEMPLATE = 'Does this video show "{prompt}"? Please answer yes or no.'
COMPARE_TEMPLATE = (
    'Both pictures were generated for the prompt "{prompt}". Is Picture 1 better than Picture 2 in terms of '
    "{criteria}? Please answer yes or no."
)
COMPARE_CRITERIA = ("alignment with the prompt", "visual quality", "aesthetics", "absence of artifacts")
QALIGN_TEMPLATE = "How would you rate the quality of this image?"  # Q-Align's quality prompt
QALIGN_ANSWER_PREFIX = "The quality of the image is"
QALIGN_LEVELS: dict[str, float] = {"excellent": 1.0, "good": 0.75, "fair": 0.5, "poor": 0.25, "bad": 0.0}

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
_SPECIAL_TEXT = (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, "<|endoftext|>")
Normalize = Literal["vocab", "yes_no"]


# ----------------------------------------------------------------------------- pixels -> Qwen2-VL patches
def qwen_patchify(frames: Tensor, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[Tensor, Tensor]:
    """Qwen2-VL's patch flattening in pure torch (differentiable).

    ``frames``: N,3,H,W (images) or N,T,3,H,W (clips), already resized (H, W multiples of
    ``patch_size * merge_size``) and normalised. Returns ``pixel_values`` (N * t * h * w, 3 * tp * p * p)
    and ``grid_thw`` (N, 3) long, laid out as ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` do:
    patches ordered (t, h/merge, w/merge, merge, merge), each flattened as (channel, tp, p, p). A single
    image is repeated ``temporal_patch_size`` times; a clip whose length is not a multiple of it is padded
    by repeating its last frame (as the video processor does).
    """
    if frames.ndim == 4:
        frames = frames[:, None].expand(-1, temporal_patch_size, -1, -1, -1)
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ValueError(f"expected frames N,3,H,W or N,T,3,H,W, got {tuple(frames.shape)}")
    n, t, c, h, w = frames.shape
    if pad := -t % temporal_patch_size:
        frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        t += pad
    factor = patch_size * merge_size
    if h % factor or w % factor:
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size * merge_size = {factor}")
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(n, gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # n, gt, gh/m, gw/m, m, m, c, tp, p, p
    pixel_values = x.reshape(n * gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    grid = torch.tensor([[gt, gh, gw]] * n, dtype=torch.long, device=frames.device)
    return pixel_values, grid


@dataclass(frozen=True)
class QwenVisionPreprocess:
    """Resize (``pixel_budget`` policy: aspect kept, sides multiples of patch * merge, area within
    [min_pixels, max_pixels]), normalise, patchify. Note: the sides are rounded as
    :func:`~mmalign.rewards.preprocess.pixel_budget_size` does (nearest multiple, then shrunk into the
    budget), which can differ by one multiple from Qwen's ``smart_resize`` for images above the budget."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_pixels: int = DEFAULT_MIN_PIXELS
    mean: tuple[float, float, float] = QWEN_MEAN
    std: tuple[float, float, float] = QWEN_STD
    interpolation: Interpolation = "bicubic"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def size_for(self, h: int, w: int) -> tuple[int, int]:
        return pixel_budget_size(h, w, self.max_pixels, self.min_pixels, self.factor)

    def resize(self, images: Tensor) -> Tensor:
        """...,3,H,W in [0,1] -> ...,3,H',W'."""
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        out = resize_pixel_budget(flat, self.max_pixels, self.min_pixels, self.factor, self.interpolation)
        return out.reshape(*lead, *out.shape[-3:])

    def __call__(self, visuals: Tensor) -> tuple[Tensor, Tensor]:
        """N,3,H,W or N,T,3,H,W in [0,1] -> (pixel_values, grid_thw)."""
        x = normalize(self.resize(visuals.float()), self.mean, self.std)
        return qwen_patchify(x, self.patch_size, self.merge_size, self.temporal_patch_size)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": "pixel_budget", **asdict(self)}


# ----------------------------------------------------------------------------- the shared core
@dataclass(frozen=True)
class VLMQuery:
    """One question: the visuals it shows (indices into the batch of visuals), the question text and
    the assistant's answer prefix (the answer token is read right after it)."""

    visuals: tuple[int, ...]
    question: str
    answer_prefix: str = ""


class VLMCore(nn.Module):
    """A Qwen2-VL-family model + tokenizer + preprocessing: builds chat sequences with image/video
    placeholders, runs one teacher-forced forward pass and returns float32 logits at the answer position.

    ``share_vision``: encode each visual once and reuse its features for every question about it (via the
    model's ``mm_encoder_outputs``; falls back to passing pixels per question on transformers without it).
    ``max_sequences``: at most this many sequences per language-model pass (None: all at once).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        vision: QwenVisionPreprocess,
        *,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
        share_vision: bool = True,
        max_sequences: int | None = None,
    ) -> None:
        super().__init__()
        for attr in ("model", "lm_head"):
            if not hasattr(model, attr):
                raise TypeError(f"expected a Qwen2-VL-style *ForConditionalGeneration model (with .{attr}), got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.vision = vision
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        if max_sequences is not None and max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1 or None, got {max_sequences}")
        self.max_sequences = max_sequences
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(cfg.video_token_id)
        for text, want in ((IMAGE_PAD, self.image_token_id), (VIDEO_PAD, self.video_token_id)):
            got = tokenizer.convert_tokens_to_ids(text)
            if got != want:
                raise ValueError(f"tokenizer maps {text} to id {got} but the model config expects {want}: mismatched tokenizer")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else getattr(cfg.text_config, "pad_token_id", None) or 0)
        params = set(inspect.signature(model.model.forward).parameters)
        self._accepts = params
        self.share_vision = share_vision and "mm_encoder_outputs" in params

    # ---------------------------------------------------------------- text
    def clean_text(self, texts: Sequence[str], what: str = "prompt") -> list[str]:
        """Remove chat/vision special tokens from user text (they would inject placeholders), warn about
        and cut texts longer than ``max_prompt_tokens`` tokens."""
        out = []
        stripped = 0
        for t in texts:
            clean = t
            for s in _SPECIAL_TEXT:
                clean = clean.replace(s, "")
            stripped += clean != t
            out.append(clean)
        if stripped:
            warnings.warn(f"{stripped} {what}(s) contained Qwen special tokens (<|...|>); they were removed", stacklevel=3)
        if self.max_prompt_tokens is None:
            return out
        warn_if_truncated(self.tokenizer, out, self.max_prompt_tokens, what)
        cut = []
        for t in out:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            cut.append(t if len(ids) <= self.max_prompt_tokens else self.tokenizer.decode(ids[: self.max_prompt_tokens]))
        return cut

    def chat_text(self, vision_tokens: Sequence[int], question: str, answer_prefix: str = "", *,
                  kind: Literal["image", "video"] = "image", vision_ids: bool = False) -> str:
        """The Qwen2-VL chat prompt up to the answer position. ``vision_tokens``: LLM tokens of each
        visual; ``vision_ids`` labels them "Picture 1: " ... as the chat template's ``add_vision_id`` does."""
        pad = IMAGE_PAD if kind == "image" else VIDEO_PAD
        label = "Picture" if kind == "image" else "Video"
        blocks = "".join(
            (f"{label} {i + 1}: " if vision_ids else "") + VISION_START + pad * n + VISION_END for i, n in enumerate(vision_tokens)
        )
        system = f"{IM_START}system\n{self.system_prompt}{IM_END}\n" if self.system_prompt else ""
        return f"{system}{IM_START}user\n{blocks}{question}{IM_END}\n{IM_START}assistant\n{answer_prefix}"

    def answer_token_id(self, word: str, answer_prefix: str = "") -> int:
        """The single token the model emits for ``word`` right after ``assistant\\n{answer_prefix}``
        (" word" with a space when the prefix does not end in whitespace). Raises if it is not one token."""
        context = f"assistant\n{answer_prefix}"
        sep = " " if answer_prefix and not answer_prefix[-1].isspace() else ""
        ctx = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(context + sep + word, add_special_tokens=False)["input_ids"]
        if full[: len(ctx)] != ctx or len(full) != len(ctx) + 1:
            raise ValueError(f"answer word {word!r} is not a single token after {context!r} for this tokenizer; choose another word")
        return int(full[-1])

    # ---------------------------------------------------------------- vision
    def vision_tokens(self, h: int, w: int, t: int = 1) -> int:
        """LLM tokens of one visual of t frames of size h x w (after resizing)."""
        nh, nw = self.vision.size_for(h, w)
        gt = math.ceil(t / self.vision.temporal_patch_size) if t > 1 else 1
        return gt * (nh // self.vision.patch_size) * (nw // self.vision.patch_size) // self.vision.merge_size**2

    def _encode(self, pixel_values: Tensor, grid: Tensor, kind: str) -> list[Tensor]:
        fn = self.model.get_image_features if kind == "image" else self.model.get_video_features
        out = fn(pixel_values, grid)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, Tensor):
            feats = torch.split(feats, (grid.prod(-1) // self.vision.merge_size**2).tolist())
        return list(feats)

    # ---------------------------------------------------------------- the forward pass
    def answer_logits(
        self,
        visuals: Tensor,
        queries: Sequence[VLMQuery],
        *,
        kind: Literal["image", "video"] = "image",
        vision_ids: bool = False,
        fps: float | None = None,
    ) -> Tensor:
        """float32 logits (Q, vocab) at the answer position of each query.

        ``visuals``: N,3,H,W images (``kind="image"``) or N,T,3,H,W clips (``kind="video"``) in [0,1].
        ``fps``: frame rate of the clips (Qwen2.5-VL's temporal positions); ignored for images.
        """
        if not queries:
            raise ValueError("no queries")
        device = next(self.model.parameters()).device
        visuals = visuals.to(device)
        pixel_values, grid = self.vision(visuals)
        tokens_per = (grid.prod(-1) // self.vision.merge_size**2).tolist()
        patches_per = grid.prod(-1).tolist()
        pstarts = torch.tensor([0] + patches_per).cumsum(0).tolist()
        feats = self._encode(pixel_values, grid, kind) if self.share_vision else None
        chunk = self.max_sequences or len(queries)
        out = []
        for s in range(0, len(queries), chunk):
            out.append(self._forward(queries[s : s + chunk], kind, vision_ids, tokens_per, grid, feats, pixel_values, pstarts, fps))
        return torch.cat(out)

    def _forward(self, queries, kind, vision_ids, tokens_per, grid, feats, pixel_values, pstarts, fps) -> Tensor:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        device = pixel_values.device
        texts = [self.chat_text([tokens_per[i] for i in q.visuals], q.question, q.answer_prefix, kind=kind, vision_ids=vision_ids) for q in queries]
        ids_list = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        pad_id = self.image_token_id if kind == "image" else self.video_token_id
        for q, ids in zip(queries, ids_list):
            want = sum(tokens_per[i] for i in q.visuals)
            got = sum(1 for t in ids if t == pad_id)
            if got != want:
                raise ValueError(f"tokenizer produced {got} vision placeholder tokens, expected {want}: it must map "
                                 f"{IMAGE_PAD if kind == 'image' else VIDEO_PAD} to one special token")
        length = max(len(x) for x in ids_list)
        input_ids = torch.full((len(ids_list), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids_list), length), dtype=torch.long)
        for r, ids in enumerate(ids_list):  # right padding: the answer position is each row's last real token
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        last = mask.sum(1) - 1
        order = [i for q in queries for i in q.visuals]  # visuals in order of appearance
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
        key = "image" if kind == "image" else "video"
        kwargs[f"{key}_grid_thw"] = grid[order]
        if "mm_token_type_ids" in self._accepts:
            tt = torch.zeros_like(input_ids, dtype=torch.int32)
            tt[input_ids == self.image_token_id] = 1
            tt[input_ids == self.video_token_id] = 2
            kwargs["mm_token_type_ids"] = tt * mask.to(tt.dtype)
        if kind == "video" and fps and "second_per_grid_ts" in self._accepts:
            kwargs["second_per_grid_ts"] = torch.full((len(order),), self.vision.temporal_patch_size / fps, device=device)
        if feats is not None:
            kwargs["mm_encoder_outputs"] = {key: BaseModelOutputWithPooling(pooler_output=tuple(feats[i] for i in order))}
        else:
            pv = torch.cat([pixel_values[pstarts[i] : pstarts[i + 1]] for i in order])
            kwargs["pixel_values" if kind == "image" else "pixel_values_videos"] = pv
        hidden = self.model.model(**kwargs).last_hidden_state
        h = hidden[torch.arange(hidden.shape[0], device=device), last]
        return self.model.lm_head(h).float()


def yes_probability(logits: Tensor, yes_ids: Sequence[int], no_ids: Sequence[int], normalize: Normalize = "vocab") -> tuple[Tensor, Tensor]:
    """(P(yes), P(no)) from answer-position logits (float32). ``"vocab"``: softmax over the full
    vocabulary (probabilities of several yes/no tokens add); ``"yes_no"``: renormalised over yes and no."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lse_yes = torch.logsumexp(logp[:, list(yes_ids)], dim=-1)
    lse_no = torch.logsumexp(logp[:, list(no_ids)], dim=-1)
    if normalize == "vocab":
        return lse_yes.exp(), lse_no.exp()
    if normalize == "yes_no":
        p = torch.sigmoid(lse_yes - lse_no)
        return p, 1 - p
    raise ValueError(f"normalize must be 'vocab' or 'yes_no', got {normalize!r}")


# ----------------------------------------------------------------------------- loading




def load_qwen_vl(model_id: str = DEFAULT_VLM_ID, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 offline: bool | None = None, cache_dir: str | None = None) -> tuple[nn.Module, Any, Any]:
    """``(model, tokenizer, image_processor or None)`` for a Qwen2-VL or Qwen2.5-VL checkpoint (hub id or
    local directory). ``offline`` (None: follow ``HF_HUB_OFFLINE`` / ``MMALIGN_OFFLINE``) loads from local
    files only; a missing checkpoint raises :class:`OSError` at once."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    if offline is None:
        offline = env_offline()
    where = "local files only (offline)" if offline else "the hub or local files"
    common = {"local_files_only": bool(offline), "cache_dir": cache_dir}
    try:
        config = AutoConfig.from_pretrained(model_id, **common)
    except (OSError, ValueError) as err:
        raise OSError(f"could not load VLM {model_id!r} from {where}: {err}") from err
    classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    if config.model_type not in classes:
        raise ValueError(f"{model_id!r} is a {config.model_type!r} model; VLM rewards support {sorted(classes)}")
    try:
        model = classes[config.model_type].from_pretrained(model_id, dtype=resolve_dtype(dtype), **common)
        tokenizer = AutoTokenizer.from_pretrained(model_id, **common)
    except (OSError, ValueError) as err:
        raise OSError(f"could not load VLM {model_id!r} from {where}: {err}") from err
    try:
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(model_id, **common)
    except Exception:  # noqa: BLE001 - optional: the defaults below are Qwen's
        image_processor = None
    if device is not None:
        model.to(device)
    return model, tokenizer, image_processor


def _vision_from(model: nn.Module, image_processor: Any, max_pixels: int | None, min_pixels: int | None,
                 mean: Sequence[float] | None, std: Sequence[float] | None, budget_from_processor: bool = True) -> QwenVisionPreprocess:
    """Patching from the model's vision config; mean/std from the image processor when there is one; the
    pixel budget from the options, else (``budget_from_processor``) the processor's, else the defaults."""
    vc = model.config.vision_config
    ip = image_processor if budget_from_processor else None
    size = getattr(ip, "size", None) or {}
    get = (lambda k: size.get(k) if isinstance(size, Mapping) else getattr(size, k, None))
    return QwenVisionPreprocess(
        patch_size=int(getattr(vc, "patch_size", 14)),
        merge_size=int(getattr(vc, "spatial_merge_size", 2)),
        temporal_patch_size=int(getattr(vc, "temporal_patch_size", 2)),
        max_pixels=int(max_pixels or (ip is not None and get("longest_edge")) or DEFAULT_MAX_PIXELS),
        min_pixels=int(min_pixels if min_pixels is not None else ((ip is not None and get("shortest_edge")) or DEFAULT_MIN_PIXELS)),
        mean=tuple(mean or getattr(image_processor, "image_mean", None) or QWEN_MEAN),  # type: ignore[arg-type]
        std=tuple(std or getattr(image_processor, "image_std", None) or QWEN_STD),  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------- the rewards
class VLMReward(Reward):
    """Base of the VLM rewards: builds (or takes) the model and the shared :class:`VLMCore`.

    Options common to all: ``model_id`` (default ``Qwen/Qwen2.5-VL-7B-Instruct``), ``device``, ``dtype``
    (model weights; logits and scores stay float32), ``batch_size``, ``offline`` (None follows
    HF_HUB_OFFLINE), ``cache_dir``, ``template``; ``model=`` with ``tokenizer=`` or ``processor=`` to
    use objects already built (tests; an explicit processor also gives the pixel budget and mean/std);
    ``max_pixels`` / ``min_pixels`` (pixel budget per image, default 448*448 / 56*56), ``image_mean`` /
    ``image_std`` (default Qwen's = OpenAI CLIP's), ``system_prompt`` (None to omit the system turn), ``max_prompt_tokens`` (longer
    prompts warn and are cut), ``share_vision``, ``max_sequences`` (see :class:`VLMCore`), ``weights_id``.
    """

    differentiable: ClassVar[bool] = True
    higher_is_better: ClassVar[bool] = True
    score_range: ClassVar[tuple[float | None, float | None]] = (0.0, 1.0)
    default_template: ClassVar[str] = VQASCORE_TEMPLATE

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        processor: Any = None,
        model_id: str = DEFAULT_VLM_ID,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        offline: bool | None = None,
        cache_dir: str | None = None,
        batch_size: int = 8,
        template: str | None = None,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
        share_vision: bool = True,
        max_sequences: int | None = None,
        weights_id: str | None = None,
    ) -> None:
        image_processor = getattr(processor, "image_processor", processor)
        given_processor = image_processor is not None
        if model is None:
            model, loaded_tok, loaded_ip = load_qwen_vl(model_id, device=device, dtype=dtype, offline=offline, cache_dir=cache_dir)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
            image_processor = image_processor if image_processor is not None else loaded_ip
            weights_id = weights_id or model_id
        else:
            dt = resolve_dtype(dtype)
            if device is not None or dt is not None:
                model.to(device=device, dtype=dt)
            weights_id = weights_id or getattr(model.config, "_name_or_path", None) or type(model).__name__
        if tokenizer is None:
            tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("a pre-built model needs tokenizer= (or processor= holding one)")
        # a checkpoint's own processor allows ~1-12M pixels per image; rewards default to 448*448 unless
        # a processor is passed explicitly or max_pixels / min_pixels are given
        vision = _vision_from(model, image_processor, max_pixels, min_pixels, image_mean, image_std, budget_from_processor=given_processor)
        core = VLMCore(model, tokenizer, vision, system_prompt=system_prompt, max_prompt_tokens=max_prompt_tokens,
                       share_vision=share_vision, max_sequences=max_sequences)
        super().__init__(batch_size=batch_size, weights_id=weights_id)
        self.template = template if template is not None else self.default_template
        self.core = core
        self.preprocessing = {
            "vision": vision.to_dict(),
            "model_class": type(model).__name__,
            "system_prompt": system_prompt,
            "template": self.template,
            "max_prompt_tokens": max_prompt_tokens,
        }

    def _questions(self, prompts: Sequence[str] | None, n: int, **fields: str) -> list[str]:
        prompts = self.core.clean_text(prompts) if prompts is not None else [""] * n
        return [self.template.format(prompt=p, **fields) for p in prompts]

    def stack_mixed(self, items: list[Tensor]) -> Tensor:
        """Images of different sizes are each resized with the pixel-budget policy; they are scored
        together when they land on one size (same aspect ratio), else score them in separate calls."""
        if self.modality != "image":
            return super().stack_mixed(items)
        sizes = {self.core.vision.size_for(*t.shape[-2:]) for t in items}
        if len(sizes) != 1:
            raise ValueError(f"{self.name}: images of different aspect ratios {sorted({tuple(t.shape) for t in items})} resize to "
                             f"different token grids {sorted(sizes)}; score them in separate calls")
        return torch.stack([self.core.vision.resize(t[None].float())[0] for t in items])

    def _grad_context(self, samples: Tensor):
        need = samples.requires_grad or any(p.requires_grad for p in self.core.model.parameters())
        return torch.set_grad_enabled(torch.is_grad_enabled() and need)


class _YesNoMixin:
    """Reads P(yes) / P(no) from answer logits: ``yes_words``, ``no_words``, ``normalize``."""

    core: VLMCore

    def _init_answer(self, yes_words: Sequence[str], no_words: Sequence[str], normalize: Normalize, answer_prefix: str = "") -> None:
        if normalize not in ("vocab", "yes_no"):
            raise ValueError(f"normalize must be 'vocab' or 'yes_no', got {normalize!r}")
        if not yes_words or not no_words:
            raise ValueError("yes_words and no_words must be non-empty")
        self.answer_prefix = answer_prefix
        self.yes_ids = [self.core.answer_token_id(w, answer_prefix) for w in yes_words]
        self.no_ids = [self.core.answer_token_id(w, answer_prefix) for w in no_words]
        self.normalize = normalize
        self.preprocessing.update({"yes_words": list(yes_words), "no_words": list(no_words), "normalize": normalize, "answer_prefix": answer_prefix})  # type: ignore[attr-defined]

    def _read(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return yes_probability(logits, self.yes_ids, self.no_ids, self.normalize)


class VQAScoreReward(_YesNoMixin, VLMReward):
    """VQAScore: P("Yes") for ``template`` (default 'Does this figure show "{prompt}"? Please answer yes
    or no.') about the image. Components: ``p_yes`` (the score), ``p_no``."""

    name = "vqascore"
    needs = frozenset({"prompt"})

    def __init__(self, *, yes_words: Sequence[str] = ("Yes",), no_words: Sequence[str] = ("No",), normalize: Normalize = "vocab",
                 answer_prefix: str = "", **options: Any) -> None:
        super().__init__(**options)
        self._init_answer(yes_words, no_words, normalize, answer_prefix)

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        questions = self._questions(prompts, samples.shape[0])
        queries = [VLMQuery((i,), q, self.answer_prefix) for i, q in enumerate(questions)]
        with self._grad_context(samples):
            p_yes, p_no = self._read(self.core.answer_logits(samples, queries))
        return ScoreBatch(p_yes, {"p_yes": p_yes, "p_no": p_no})


def _join_criteria(criteria: Sequence[str] | str) -> str:
    if isinstance(criteria, str):
        return criteria
    criteria = list(criteria)
    if not criteria:
        raise ValueError("criteria must not be empty")
    return criteria[0] if len(criteria) == 1 else ", ".join(criteria[:-1]) + " and " + criteria[-1]


class VLMCompareReward(_YesNoMixin, VLMReward):
    """RewardDance-style pairwise reward: the sample (Picture 1) and the reference (Picture 2) in one
    prompt, P("Yes") that Picture 1 is better on ``criteria`` (a list joined into the template's
    ``{criteria}``). ``swap=True`` also asks with the pictures swapped and averages
    P(yes | sample first) and 1 - P(yes | reference first), cancelling the model's position bias.
    Components: ``p_yes`` (sample first) and, with swap, ``p_yes_swapped``."""

    name = "vlm_compare"
    needs = frozenset({"prompt", "reference"})
    default_template = COMPARE_TEMPLATE

    def __init__(self, *, criteria: Sequence[str] | str = COMPARE_CRITERIA, swap: bool = False, yes_words: Sequence[str] = ("Yes",),
                 no_words: Sequence[str] = ("No",), normalize: Normalize = "vocab", answer_prefix: str = "", **options: Any) -> None:
        super().__init__(**options)
        self.criteria = _join_criteria(criteria)
        self.swap = swap
        self._init_answer(yes_words, no_words, normalize, answer_prefix)
        self.preprocessing.update({"criteria": self.criteria, "swap": swap})

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        if references is None:
            raise ValueError(f"{self.name} needs reference images")
        if references.shape[-2:] != samples.shape[-2:]:
            references = F.interpolate(references, size=samples.shape[-2:], mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        n = samples.shape[0]
        visuals = torch.cat([samples, references])  # sample i at i, its reference at n + i
        questions = self._questions(prompts, n, criteria=self.criteria)
        queries = [VLMQuery((i, n + i), q, self.answer_prefix) for i, q in enumerate(questions)]
        if self.swap:
            queries += [VLMQuery((n + i, i), q, self.answer_prefix) for i, q in enumerate(questions)]
        with self._grad_context(samples):
            p_yes, _ = self._read(self.core.answer_logits(visuals, queries, vision_ids=True))
        first = p_yes[:n]
        if not self.swap:
            return ScoreBatch(first, {"p_yes": first})
        swapped = p_yes[n:]
        return ScoreBatch(0.5 * (first + 1 - swapped), {"p_yes": first, "p_yes_swapped": swapped})


class QAlignReward(VLMReward):
    """Q-Align: softmax over the logits of the rating words after ``answer_prefix`` ("The quality of the
    image is"), dotted with their weights (default {excellent: 1, good: .75, fair: .5, poor: .25, bad: 0}).
    ``template`` (default "How would you rate the quality of this image?") needs no prompt; use e.g.
    "How would you rate the aesthetics of this image?" / "The aesthetics of the image is" for aesthetics.
    Components: ``p_<word>`` per level."""

    name = "qalign"
    needs = frozenset()
    default_template = QALIGN_TEMPLATE

    def __init__(self, *, levels: Mapping[str, float] | None = None, answer_prefix: str = QALIGN_ANSWER_PREFIX, **options: Any) -> None:
        super().__init__(**options)
        levels = dict(levels if levels is not None else QALIGN_LEVELS)
        if len(levels) < 2:
            raise ValueError("levels needs at least two rating words")
        self.answer_prefix = answer_prefix
        self.levels = list(levels)
        self.level_ids = [self.core.answer_token_id(w, answer_prefix) for w in self.levels]
        self.register_buffer("level_weights", torch.tensor(list(levels.values()), dtype=torch.float32), persistent=False)
        self.preprocessing.update({"levels": levels, "answer_prefix": answer_prefix})

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        question = self.template.format(prompt="")
        queries = [VLMQuery((i,), question, self.answer_prefix) for i in range(samples.shape[0])]
        with self._grad_context(samples):
            logits = self.core.answer_logits(samples, queries)
        probs = torch.softmax(logits[:, self.level_ids], dim=-1)  # float32
        scores = probs @ self.level_weights.to(probs.device)
        return ScoreBatch(scores, {f"p_{w}": probs[:, j] for j, w in enumerate(self.levels)})


# ----------------------------------------------------------------------------- video
FrameIndexFn = Callable[[int, "float | None"], Sequence[int]]


def uniform_frame_indices(num_frames: int, k: int) -> list[int]:
    """``k`` frame indices spread uniformly over ``num_frames`` (first and last included); all frames
    when ``k >= num_frames``."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if k >= num_frames:
        return list(range(num_frames))
    if k == 1:
        return [(num_frames - 1) // 2]
    return [round(i * (num_frames - 1) / (k - 1)) for i in range(k)]


class VideoVLMReward(_YesNoMixin, VLMReward):
    """The yes-token reward over frames sampled from a video (B,T,3,H,W).

    Frames: ``num_frames`` uniform (default 4) or ``frame_indices(T, fps) -> indices``. ``mode``:
    ``"images"`` (default) the frames as pictures in one prompt (template 'Does this video show
    "{prompt}"? ...'); ``"per_frame"`` each frame asked separately with the image template and the
    probabilities averaged (component ``p_yes_frames``, B,k); ``"video"`` Qwen's native video input
    (frames grouped by the temporal patch size; <|video_pad|> tokens).
    """

    name = "video_vlm"
    modality = "video"
    needs = frozenset({"prompt"})

    def __init__(self, *, num_frames: int = 4, frame_indices: FrameIndexFn | None = None,
                 mode: Literal["images", "per_frame", "video"] = "images", yes_words: Sequence[str] = ("Yes",),
                 no_words: Sequence[str] = ("No",), normalize: Normalize = "vocab", answer_prefix: str = "", **options: Any) -> None:
        if mode not in ("images", "per_frame", "video"):
            raise ValueError(f"mode must be 'images', 'per_frame' or 'video', got {mode!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if options.get("template") is None:
            options["template"] = VQASCORE_TEMPLATE if mode == "per_frame" else VIDEO_TEMPLATE
        super().__init__(**options)
        self.num_frames = num_frames
        self.frame_indices = frame_indices
        self.mode = mode
        self._init_answer(yes_words, no_words, normalize, answer_prefix)
        self.preprocessing.update({"mode": mode, "num_frames": num_frames,
                                   "frame_indices": "uniform" if frame_indices is None else repr(frame_indices)})

    def select_frames(self, num_frames: int, fps: float | None = None) -> list[int]:
        idx = uniform_frame_indices(num_frames, self.num_frames) if self.frame_indices is None else [int(i) for i in self.frame_indices(num_frames, fps)]
        if not idx or any(not 0 <= i < num_frames for i in idx):
            raise ValueError(f"frame indices {idx} out of range for a {num_frames}-frame video")
        return idx

    def score(self, samples, prompts, references, metadata, fps=None, **media_info) -> ScoreBatch:
        b, t = samples.shape[:2]
        idx = self.select_frames(t, fps)
        frames = samples[:, idx]  # B,k,3,H,W
        k = len(idx)
        questions = self._questions(prompts, b)
        with self._grad_context(samples):
            if self.mode == "per_frame":
                queries = [VLMQuery((i * k + j,), questions[i], self.answer_prefix) for i in range(b) for j in range(k)]
                p, _ = self._read(self.core.answer_logits(frames.reshape(b * k, *frames.shape[2:]), queries))
                per = p.reshape(b, k)
                return ScoreBatch(per.mean(1), {"p_yes": per.mean(1), "p_yes_frames": per})
            if self.mode == "images":
                queries = [VLMQuery(tuple(range(i * k, (i + 1) * k)), questions[i], self.answer_prefix) for i in range(b)]
                logits = self.core.answer_logits(frames.reshape(b * k, *frames.shape[2:]), queries, vision_ids=k > 1)
            else:
                sampled_fps = fps * k / t if fps else None
                queries = [VLMQuery((i,), questions[i], self.answer_prefix) for i in range(b)]
                logits = self.core.answer_logits(frames, queries, kind="video", fps=sampled_fps)
            p_yes, p_no = self._read(logits)
        return ScoreBatch(p_yes, {"p_yes": p_yes, "p_no": p_no})


# ----------------------------------------------------------------------------- factories
def load_vqascore(**options: Any) -> VQAScoreReward:
    """VQAScore on a Qwen2(.5)-VL model (see :class:`VQAScoreReward` and :class:`VLMReward` for options)."""
    return VQAScoreReward(**options)


def load_vlm_compare(**options: Any) -> VLMCompareReward:
    """RewardDance-style pairwise VLM reward (see :class:`VLMCompareReward`)."""
    return VLMCompareReward(**options)


def load_qalign(**options: Any) -> QAlignReward:
    """Q-Align expected rating (see :class:`QAlignReward`)."""
    return QAlignReward(**options)


def load_video_vlm(**options: Any) -> VideoVLMReward:
    """The yes-token reward over sampled video frames (see :class:`VideoVLMReward`)."""
    return VideoVLMReward(**options)


__all__ = [
    "DEFAULT_VLM_ID",
    "QAlignReward",
    "QwenVisionPreprocess",
    "VLMCompareReward",
    "VLMCore",
    "VLMQuery",
    "VLMReward",
    "VQAScoreReward",
    "VideoVLMReward",
    "load_qalign",
    "load_qwen_vl",
    "load_video_vlm",
    "load_vlm_compare",
    "load_vqascore",
    "qwen_patchify",
    "uniform_frame_indices",
    "yes_probability",
]

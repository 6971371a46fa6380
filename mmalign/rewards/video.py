"""Video rewards: any image reward over sampled frames (:class:`VideoFramesReward`) and the temporal
consistency of neighbouring frames' embeddings (:class:`TemporalConsistencyReward`).

Frame samplers are small pure functions ``(num_frames, k, *, seed=None) -> list[int]`` (sorted frame
indices), registered by name in :data:`FRAME_SAMPLERS`:

- ``uniform``: k evenly spaced frames including the first and the last (rounded half up);
- ``segmental``: the middle frame of each of k equal segments (InstructVideo's segmental video reward,
  Yuan et al. CVPR 2024, arXiv 2312.12490; its public code draws a random frame per segment (TSN), we
  take the deterministic middle);
- ``first_middle_last``: frames 0, (T-1)//2 and T-1 (k is ignored: always 3);
- ``random``: k distinct frames drawn with ``random.Random(seed)`` (with replacement only when k > T),
  sorted. The same seed gives the same indices for every video of the same length.

When T < k, ``uniform`` and ``segmental`` repeat frames so that there are always k of them.

Frame weights (:func:`frame_weights`): ``uniform`` (1/k each) or ``attenuated``: InstructVideo's
temporally attenuated reward (TAR), w_i = exp(-rate * |t_i - c|) for frame index t_i and video centre
c = (T-1)/2, normalised to sum 1 (VGen ``utils/reward/reward.py`` multiplies the per-frame rewards by
exp(-lambda_TAR * |t_i - T//2|) without normalising; normalising keeps the score on the image
reward's scale). ``rate`` is per frame; the default 0.1 is ours.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hub import resolve_dtype, resolve_offline
from .base import Reward, ScoreBatch
from .preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess
from .rules import nan_where

FrameSampler = Callable[..., list[int]]


# ----------------------------------------------------------------------------- frame samplers


def _check(num_frames: int, k: int) -> None:
    if int(num_frames) < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if int(k) < 1:
        raise ValueError(f"k (frames to sample) must be >= 1, got {k}")


def uniform_frames(num_frames: int, k: int, *, seed: int | None = None) -> list[int]:
    """k evenly spaced indices from 0 to T-1 inclusive, i * (T-1) / (k-1) rounded half up (k=1: the middle)."""
    _check(num_frames, k)
    t = int(num_frames)
    if k == 1:
        return [(t - 1) // 2]
    return [(2 * i * (t - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


def segmental_frames(num_frames: int, k: int, *, seed: int | None = None) -> list[int]:
    """The middle frame of each of k equal segments: floor((j + 1/2) * T / k), j = 0..k-1 (InstructVideo)."""
    _check(num_frames, k)
    t = int(num_frames)
    return [((2 * j + 1) * t) // (2 * k) for j in range(k)]


def first_middle_last_frames(num_frames: int, k: int = 3, *, seed: int | None = None) -> list[int]:
    """Frames 0, (T-1)//2 and T-1; ``k`` is ignored (always three indices)."""
    _check(num_frames, 1)
    t = int(num_frames)
    return [0, (t - 1) // 2, t - 1]


def random_frames(num_frames: int, k: int, *, seed: int | None = None) -> list[int]:
    """k sorted indices drawn by ``random.Random(seed)``: distinct when k <= T, else with replacement."""
    _check(num_frames, k)
    rng = random.Random(seed)
    t = int(num_frames)
    picks = rng.sample(range(t), k) if k <= t else rng.choices(range(t), k=k)
    return sorted(picks)


FRAME_SAMPLERS: dict[str, FrameSampler] = {
    "uniform": uniform_frames,
    "segmental": segmental_frames,
    "first_middle_last": first_middle_last_frames,
    "random": random_frames,
}


def get_frame_sampler(sampler: str | FrameSampler) -> FrameSampler:
    """A sampler by name (see :data:`FRAME_SAMPLERS`) or a callable as it is."""
    if callable(sampler):
        return sampler
    try:
        return FRAME_SAMPLERS[sampler]
    except KeyError:
        raise ValueError(f"unknown frame sampler {sampler!r} (one of {', '.join(FRAME_SAMPLERS)})") from None


def sample_frames(sampler: str | FrameSampler, num_frames: int, k: int, *, seed: int | None = None) -> list[int]:
    """Indices from ``sampler``, checked to be ints in [0, num_frames)."""
    idx = [int(i) for i in get_frame_sampler(sampler)(num_frames, k, seed=seed)]
    if not idx or min(idx) < 0 or max(idx) >= num_frames:
        raise ValueError(f"frame sampler {sampler!r} returned indices {idx} for a {num_frames}-frame video")
    return idx


# ----------------------------------------------------------------------------- frame weights


def frame_weights(indices: Sequence[int], num_frames: int, weighting: str | Sequence[float] = "uniform", *, rate: float = 0.1) -> Tensor:
    """Float32 weights (summing to 1) for the frames at ``indices`` of a ``num_frames``-frame video.

    ``uniform``: 1/k. ``attenuated``: exp(-rate * |t_i - (T-1)/2|) normalised (InstructVideo TAR, see the
    module docstring). A sequence of k non-negative numbers: those, normalised.
    """
    k = len(indices)
    if k == 0:
        raise ValueError("no frame indices")
    if isinstance(weighting, str):
        if weighting == "uniform":
            w = torch.ones(k, dtype=torch.float64)
        elif weighting in ("attenuated", "temporally_attenuated", "tar"):
            if rate < 0:
                raise ValueError(f"the attenuation rate must be >= 0, got {rate}")
            centre = (num_frames - 1) / 2
            w = torch.tensor([math.exp(-rate * abs(t - centre)) for t in indices], dtype=torch.float64)
        else:
            raise ValueError(f"unknown frame weighting {weighting!r} (uniform, attenuated, or k numbers)")
    else:
        w = torch.as_tensor(list(weighting), dtype=torch.float64)
        if w.shape != (k,):
            raise ValueError(f"{w.numel()} frame weights for {k} sampled frames")
        if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
            raise ValueError(f"frame weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return (w / w.sum()).float()


# ----------------------------------------------------------------------------- an image reward over frames


def _repeat(items: Sequence[Any] | None, k: int) -> list[Any] | None:
    return None if items is None else [x for x in items for _ in range(k)]


class VideoFramesReward(Reward):
    """Score videos ``B,T,3,H,W`` with an image reward on k sampled frames, weighted.

    The image reward is called once on the ``B*k`` selected frames (prompts, references and metadata
    repeated per frame; its own ``batch_size`` chunks that call). ``score = sum_i w_i * r(frame_i)``.
    Components: ``frame_scores`` (B,k) and each of the image reward's components averaged over the
    frames with the same weights. An item is invalid if any of its selected frames is, with that frame's
    reason. Needs, differentiability, direction and range are the image reward's.
    """

    name = "video_frames"
    modality = "video"

    def __init__(
        self,
        image_reward: Reward,
        *,
        sampler: str | FrameSampler = "segmental",
        k: int = 4,
        weighting: str | Sequence[float] = "uniform",
        rate: float = 0.1,
        seed: int | None = 0,
        batch_size: int = 16,
        name: str | None = None,
    ) -> None:
        if not isinstance(image_reward, Reward):
            raise TypeError(f"video_frames wraps a Reward, got {type(image_reward).__name__}")
        if image_reward.modality != "image":
            raise ValueError(f"video_frames needs an image reward, got {image_reward.name!r} of modality {image_reward.modality!r}")
        get_frame_sampler(sampler)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(weighting, str):
            frame_weights([0], 1, weighting, rate=rate)  # validates the name and rate
        else:
            weighting = [float(x) for x in weighting]
            frame_weights(list(range(len(weighting))), len(weighting), weighting)
        self.name = name or "video_frames"  # type: ignore[misc]
        self.needs = frozenset(image_reward.needs)  # type: ignore[misc]
        self.differentiable = bool(image_reward.differentiable)  # type: ignore[misc]
        self.higher_is_better = bool(image_reward.higher_is_better)  # type: ignore[misc]
        self.score_range = tuple(image_reward.score_range)  # type: ignore[misc]
        sampler_name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", repr(sampler))
        super().__init__(
            batch_size=batch_size,
            weights_id=image_reward.weights_id,
            preprocessing={
                "frames": {"sampler": sampler_name, "k": int(k), "seed": seed, "weighting": weighting, "rate": float(rate)},
                "image_reward": image_reward.name,
                "image_preprocessing": dict(image_reward.preprocessing),
            },
        )
        self.image_reward = image_reward
        self.sampler = sampler
        self.k = int(k)
        self.weighting = weighting
        self.rate = float(rate)
        self.seed = seed

    def frame_indices(self, num_frames: int) -> list[int]:
        """The frames scored in a ``num_frames``-frame video."""
        return sample_frames(self.sampler, num_frames, self.k, seed=self.seed)

    def weights(self, num_frames: int) -> Tensor:
        """The weights of :meth:`frame_indices` (float32, sum 1)."""
        return frame_weights(self.frame_indices(num_frames), num_frames, self.weighting, rate=self.rate)

    def frames_needed(self, num_frames: int) -> list[int]:
        """Only the sampled frames: a decoder may stop after the last of them."""
        return sorted(set(self.frame_indices(num_frames)))

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        # num_frames: the generated length when ``samples`` hold only a prefix of each video
        # (checked by Reward.forward to contain every frame read here)
        b = samples.shape[0]
        t = int(media_info.get("num_frames") or samples.shape[1])
        idx = self.frame_indices(t)
        k = len(idx)
        w = frame_weights(idx, t, self.weighting, rate=self.rate).to(samples.device)
        frames = samples[:, idx].reshape(b * k, *samples.shape[2:])
        refs = None
        if references is not None:
            ridx = idx if references.shape[1] == t else self.frame_indices(references.shape[1])
            refs = references[:, ridx].reshape(b * k, *references.shape[2:])
        out = self.image_reward(frames, _repeat(prompts, k), references=refs, metadata=_repeat(metadata, k))
        frame_scores = out.scores.reshape(b, k).to(torch.float32)
        valid = out.valid.reshape(b, k)
        reasons: list[str | None] = []
        for i in range(b):
            bad = [j for j in range(k) if not bool(valid[i, j])]
            reasons.append(None if not bad else f"frame {idx[bad[0]]}: {out.reasons[i * k + bad[0]]}")
        invalid = [r is not None for r in reasons]
        scores = nan_where((frame_scores * w).sum(1), invalid)
        comps: dict[str, Tensor] = {"frame_scores": frame_scores}
        for cname, value in out.components.items():
            v = value.reshape(b, k, *value.shape[1:]).float()
            key = cname if cname not in comps else f"{self.image_reward.name}_{cname}"
            comps[key] = nan_where((v * w.view(1, k, *[1] * (v.ndim - 2))).sum(1), invalid)
        unc = None
        if out.uncertainty is not None:
            unc = nan_where((out.uncertainty.reshape(b, k).float() * w).sum(1), invalid)
        return ScoreBatch(scores, comps, unc, reasons=reasons)


def load_video_frames(
    image_reward: str | Reward | Callable[..., Any] = "clipscore",
    *,
    sampler: str | FrameSampler = "segmental",
    k: int = 4,
    weighting: str | Sequence[float] = "uniform",
    rate: float = 0.1,
    seed: int | None = 0,
    batch_size: int = 16,
    name: str | None = None,
    **image_reward_options: Any,
) -> VideoFramesReward:
    """An image reward (registered name, Reward, or callable) over sampled frames of videos.

    ``image_reward_options`` (``device``, ``dtype``, ``offline``, ``cache_dir``, ``model``...) go to
    :func:`mmalign.load_reward` for the image reward.
    """
    from . import load_reward

    reward = load_reward(image_reward, **image_reward_options)
    return VideoFramesReward(reward, sampler=sampler, k=k, weighting=weighting, rate=rate, seed=seed, batch_size=batch_size, name=name)


# ----------------------------------------------------------------------------- temporal consistency


def _accepts_kw(module: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


class TemporalConsistencyReward(Reward):
    """Mean cosine similarity of neighbouring frames' image embeddings (no prompt needed).

    Frames (all of them, or those of ``sampler``/``k``) go through ``preprocess`` and the embedder
    (default CLIP ViT-L/14 ``CLIPVisionModelWithProjection``: its ``image_embeds``); score =
    mean_t cos(e_t, e_t+1) in [-1, 1]. Component ``pair_similarity``: B,T'-1. Differentiable w.r.t.
    pixels. A video with fewer than two (sampled) frames is invalid.
    """

    name = "temporal_consistency"
    modality = "video"
    needs = frozenset()
    differentiable = True
    higher_is_better = True
    score_range = (-1.0, 1.0)

    def __init__(
        self,
        model: nn.Module,
        *,
        preprocess: ImagePreprocess,
        weights_id: str | None = None,
        sampler: str | FrameSampler | None = None,
        k: int | None = None,
        seed: int | None = 0,
        frame_batch_size: int = 64,
        batch_size: int = 8,
    ) -> None:
        if sampler is not None:
            get_frame_sampler(sampler)
            if k is None:
                raise ValueError("temporal_consistency: a frame sampler needs k")
        sampler_name = sampler if sampler is None or isinstance(sampler, str) else getattr(sampler, "__name__", repr(sampler))
        super().__init__(
            batch_size=batch_size,
            weights_id=weights_id,
            preprocessing={"image": preprocess.to_dict(), "frames": {"sampler": sampler_name or "all", "k": k, "seed": seed},
                           "similarity": "mean cosine of neighbouring frames' embeddings"},
        )
        if frame_batch_size < 1:
            raise ValueError(f"frame_batch_size must be >= 1, got {frame_batch_size}")
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.sampler = sampler
        self.k = k
        self.seed = seed
        self.frame_batch_size = int(frame_batch_size)
        self._pixel_kw = _accepts_kw(model, "pixel_values")

    def train(self, mode: bool = True) -> "TemporalConsistencyReward":
        super().train(mode)
        self.model.eval()  # a frozen scorer: dropout / norm statistics stay in inference mode
        return self

    @property
    def model_dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def embed(self, frames: Tensor) -> Tensor:
        """N,3,H,W in [0,1] -> N,D float32 L2-normalised embeddings (differentiable)."""
        outs = []
        for start in range(0, frames.shape[0], self.frame_batch_size):
            x = self.preprocess(frames[start : start + self.frame_batch_size]).to(device=self.device, dtype=self.model_dtype)
            out = self.model(pixel_values=x) if self._pixel_kw else self.model(x)
            if not isinstance(out, Tensor):
                emb = getattr(out, "image_embeds", None)
                out = emb if emb is not None else out.pooler_output
            outs.append(F.normalize(out.float(), dim=-1))
        return torch.cat(outs)

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        b, t = samples.shape[:2]
        if self.sampler is not None:
            samples = samples[:, sample_frames(self.sampler, t, int(self.k), seed=self.seed)]
        n = samples.shape[1]
        if n < 2:
            nan = torch.full((b,), math.nan)
            return ScoreBatch(nan, {"pair_similarity": torch.full((b, 0), math.nan)},
                                         reasons=[f"temporal consistency needs at least 2 frames, got {n}"] * b)
        emb = self.embed(samples.reshape(b * n, *samples.shape[2:])).reshape(b, n, -1)
        sims = (emb[:, 1:] * emb[:, :-1]).sum(-1)
        return ScoreBatch(sims.mean(1), {"pair_similarity": sims})


def load_temporal_consistency(
    model_id: str = "openai/clip-vit-large-patch14",
    *,
    model: nn.Module | None = None,
    processor: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 8,
    offline: bool | None = None,
    cache_dir: str | None = None,
    sampler: str | FrameSampler | None = None,
    k: int | None = None,
    seed: int | None = 0,
    frame_batch_size: int = 64,
    image_size: int | None = None,
    weights_id: str | None = None,
) -> TemporalConsistencyReward:
    """Temporal consistency with a CLIP image embedder (``transformers.CLIPVisionModelWithProjection``).

    ``model``: a pre-built embedder (a CLIP vision model, or any module mapping normalised pixels
    ``N,3,S,S`` to embeddings); otherwise ``model_id`` is loaded (``offline=None`` follows
    ``HF_HUB_OFFLINE``). Preprocessing: shortest-edge resize + centre crop to the model's image size
    (or ``processor``'s crop size), CLIP mean/std (or the processor's).
    """
    torch_dtype = resolve_dtype(dtype)
    if model is None:
        from transformers import CLIPVisionModelWithProjection

        offline = resolve_offline(offline)
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(model_id, local_files_only=offline, cache_dir=cache_dir, dtype=torch_dtype)
        except (OSError, ValueError) as err:
            where = "local files only (offline)" if offline else "the hub or local files"
            raise OSError(f"temporal_consistency: could not load {model_id!r} from {where}: {err}") from err
        weights_id = weights_id or model_id
    else:
        weights_id = weights_id or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    if device is not None or torch_dtype is not None:
        model = model.to(device=device, dtype=torch_dtype)
    mean, std, size, interp = CLIP_MEAN, CLIP_STD, image_size, "bicubic"
    if processor is not None:
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        crop = getattr(processor, "crop_size", None) or {}
        shortest = (getattr(processor, "size", None) or {}).get("shortest_edge")
        size = size or crop.get("height") or shortest
    if size is None:
        config = getattr(model, "config", None)
        size = getattr(config, "image_size", None) or getattr(getattr(config, "vision_config", None), "image_size", None) or 224
    preprocess = ImagePreprocess(policy="shortest_edge_crop", size=int(size), interpolation=interp, mean=tuple(mean), std=tuple(std))
    return TemporalConsistencyReward(model, preprocess=preprocess, weights_id=weights_id, sampler=sampler, k=k, seed=seed,
                                     frame_batch_size=frame_batch_size, batch_size=batch_size)


__all__ = [
    "FRAME_SAMPLERS",
    "TemporalConsistencyReward",
    "VideoFramesReward",
    "first_middle_last_frames",
    "frame_weights",
    "get_frame_sampler",
    "load_temporal_consistency",
    "load_video_frames",
    "random_frames",
    "sample_frames",
    "segmental_frames",
    "uniform_frames",
]

"""The reward interface: :class:`Reward`, :class:`RewardOutput`, and wrapping plain callables.

A reward call takes canonical media (image ``B,3,H,W`` in [0,1]; video ``B,T,3,H,W`` plus fps; audio
``B,C,N`` in [-1,1] plus sample rate) or PIL images / numpy arrays / file paths, the prompts, and
optional references and metadata. It returns a :class:`RewardOutput`: float32 ``scores`` of shape B,
named ``components``, optional ``uncertainty``, a ``valid`` mask with a reason for every invalid item
(their score is NaN: never a silent 0 or -1), and provenance.

Subclasses implement :meth:`Reward.score`, which sees only valid items, already canonical, in chunks of
``batch_size``; the base class does input conversion, validation, batching and assembly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..media import load_media

Modality = Literal["image", "video", "audio"]
NEEDS = frozenset({"prompt", "reference", "metadata"})


class InvalidSampleError(ValueError):
    """Raised by :meth:`RewardOutput.raise_if_invalid` when some items could not be scored."""


@dataclass
class ScoreBatch:
    """What :meth:`Reward.score` returns for a chunk of n valid items."""

    scores: Tensor  # n float32
    components: dict[str, Tensor] = field(default_factory=dict)  # name -> n or n,... float32
    uncertainty: Tensor | None = None  # n
    reasons: list[str | None] | None = None  # n: why an item could not be scored (its score must be NaN)


@dataclass
class RewardOutput:
    """Scores of a batch of B items.

    scores:      B float32; NaN where ``valid`` is False.
    valid:       B bool.
    reasons:     B entries: None where valid, else why the item was not scored.
    components:  name -> B (or B,...) float32 (per criterion, per frame, ensemble member...).
    uncertainty: B float32 or None.
    provenance:  reward name, weights id, preprocessing, score range and direction.
    """

    scores: Tensor
    valid: Tensor
    reasons: list[str | None]
    components: dict[str, Tensor] = field(default_factory=dict)
    uncertainty: Tensor | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def all_valid(self) -> bool:
        return bool(self.valid.all())

    def raise_if_invalid(self) -> "RewardOutput":
        """Raise :class:`InvalidSampleError` listing invalid items and reasons; returns self otherwise."""
        bad = [(i, r) for i, r in enumerate(self.reasons) if r is not None]
        if bad:
            listing = "; ".join(f"item {i}: {r}" for i, r in bad[:10])
            more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
            raise InvalidSampleError(f"{self.provenance.get('reward', 'reward')}: {len(bad)} of {len(self)} items not scored: {listing}{more}")
        return self

    def rows(self) -> list[dict[str, Any]]:
        """One dict per item (score, validity, reason, scalar components) for tables and JSON."""
        out = []
        for i in range(len(self)):
            row: dict[str, Any] = {"score": float(self.scores[i]), "valid": bool(self.valid[i]), "reason": self.reasons[i]}
            for k, v in self.components.items():
                if v.ndim == 1:
                    row[k] = float(v[i])
            if self.uncertainty is not None:
                row["uncertainty"] = float(self.uncertainty[i])
            out.append(row)
        return out


def _check_texts(texts: Sequence[str] | str | None, batch: int, what: str) -> list[str] | None:
    if texts is None:
        return None
    if isinstance(texts, str):
        texts = [texts] * batch
    texts = list(texts)
    if len(texts) != batch:
        raise ValueError(f"{len(texts)} {what} for {batch} samples; give one per sample")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{what}: entries {bad[:5]} are not strings")
    return texts


class Reward(nn.Module):
    """Base class of every reward. Subclasses set the class attributes and implement :meth:`score`.

    Attributes declare what the reward is: ``modality``; ``needs`` (a subset of
    {"prompt", "reference", "metadata"}); ``differentiable`` (gradients reach the input pixels/waveform);
    ``higher_is_better`` and ``score_range``; ``preprocessing`` (a dict describing it, for provenance).
    """

    name: ClassVar[str] = "reward"
    modality: ClassVar[Modality] = "image"
    needs: ClassVar[frozenset[str]] = frozenset({"prompt"})
    differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True
    score_range: ClassVar[tuple[float | None, float | None]] = (None, None)

    def __init__(self, *, batch_size: int = 16, weights_id: str | None = None, preprocessing: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.weights_id = weights_id
        self.preprocessing = dict(preprocessing or {})
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(f"{type(self).__name__}.needs has unknown entries {sorted(unknown)}")

    # ------------------------------------------------------------------ to implement
    def score(
        self,
        samples: Tensor,
        prompts: list[str] | None,
        references: Tensor | None,
        metadata: list[dict[str, Any]] | None,
        **media_info: Any,
    ) -> ScoreBatch:
        """Score n valid canonical items (float32). Must be differentiable w.r.t. ``samples`` when
        :attr:`differentiable` is True."""
        raise NotImplementedError

    def frames_needed(self, num_frames: int) -> list[int] | None:
        """Video rewards: the sorted frame indices of a ``num_frames``-frame video this reward reads,
        or None for every frame (the default). A rollout may then decode only the prefix up to the
        last of them (exact for causal video VAEs) and pass ``num_frames=`` with it."""
        return None

    def check_frame_prefix(self, decoded: int, num_frames: int | None) -> None:
        """A video of ``decoded`` frames given for a ``num_frames``-frame one: ValueError unless this
        reward reads only frames inside that prefix."""
        if num_frames is None or decoded == num_frames:
            return
        if decoded > num_frames:
            raise ValueError(f"{self.name}: {decoded} decoded frames for num_frames={num_frames}")
        needed = self.frames_needed(num_frames)
        if needed is None:
            raise ValueError(f"{self.name} reads every frame of a {num_frames}-frame video, got only the first {decoded}")
        if max(needed) >= decoded:
            raise ValueError(f"{self.name} reads frame {max(needed)} of a {num_frames}-frame video, got only the first {decoded}")

    # ------------------------------------------------------------------ the call
    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def provenance(self) -> dict[str, Any]:
        return {
            "reward": self.name,
            "weights": self.weights_id,
            "modality": self.modality,
            "differentiable": self.differentiable,
            "higher_is_better": self.higher_is_better,
            "score_range": self.score_range,
            "preprocessing": self.preprocessing,
        }

    def forward(
        self,
        samples: Any,
        prompts: Sequence[str] | str | None = None,
        *,
        references: Any = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        fps: float | None = None,
        sample_rate: int | None = None,
        num_frames: int | None = None,
    ) -> RewardOutput:
        """Score a batch. See the module docstring for accepted inputs. ``num_frames`` (video): the
        length of the generated videos when ``samples`` hold only their first frames (see
        :meth:`frames_needed`)."""
        items, reasons = load_media(samples, self.modality, sample_rate=sample_rate)
        batch = len(items)
        if batch == 0:
            raise ValueError(f"{self.name}: no samples to score")
        if num_frames is not None:  # a prefix of each video: every frame read here must be in it
            for t in {int(x.shape[0]) for x in items if x.numel()}:
                self.check_frame_prefix(t, num_frames)
        prompts = _check_texts(prompts, batch, "prompts")
        if "prompt" in self.needs and prompts is None:
            raise ValueError(f"{self.name} needs prompts: pass one per sample")
        if "metadata" in self.needs and metadata is None:
            raise ValueError(f"{self.name} needs metadata: pass one dict per sample")
        if metadata is not None and len(metadata) != batch:
            raise ValueError(f"{len(metadata)} metadata entries for {batch} samples")
        refs = None
        if "reference" in self.needs:
            if references is None:
                raise ValueError(f"{self.name} needs reference samples: pass one per sample")
            refs, ref_reasons = load_media(references, self.modality, sample_rate=sample_rate)
            if len(refs) != batch:
                raise ValueError(f"{len(refs)} references for {batch} samples")
            reasons = [r or (f"reference: {rr}" if rr else None) for r, rr in zip(reasons, ref_reasons)]
        if prompts is not None and "prompt" in self.needs:
            reasons = [r or ("empty prompt" if not p.strip() else None) for r, p in zip(reasons, prompts)]
        valid_idx = [i for i, r in enumerate(reasons) if r is None]

        chunks: list[ScoreBatch] = []
        for start in range(0, len(valid_idx), self.batch_size):
            idx = valid_idx[start : start + self.batch_size]
            chunk = self._select(items, idx)
            ref_chunk = None if refs is None else self._select(refs, idx)
            out = self.score(
                chunk,
                None if prompts is None else [prompts[i] for i in idx],
                ref_chunk,
                None if metadata is None else [dict(metadata[i]) for i in idx],
                fps=fps,
                sample_rate=sample_rate,
                **({} if num_frames is None else {"num_frames": int(num_frames)}),
            )
            if out.scores.shape != (len(idx),):
                raise RuntimeError(f"{self.name}.score returned shape {tuple(out.scores.shape)} for {len(idx)} items")
            chunks.append(out)
        return self._assemble(batch, valid_idx, reasons, chunks)

    def _select(self, items: Tensor | list[Tensor], idx: list[int]) -> Tensor:
        """Rows ``idx`` as one float32 batch: an index into a batched tensor, or a stack of items."""
        if isinstance(items, Tensor):
            if len(idx) == items.shape[0]:
                return items
            return items[torch.tensor(idx, dtype=torch.long, device=items.device)]
        return self._stack([items[i] for i in idx])

    def _stack(self, items: list[Tensor]) -> Tensor:
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) == 1:
            return torch.stack(items).float()
        # differently sized images / clips: the reward's own preprocessing must bring them to one size
        return self.stack_mixed(items)

    def stack_mixed(self, items: list[Tensor]) -> Tensor:
        """Stack items of different sizes; rewards that resize override this via their preprocessing."""
        raise ValueError(f"{self.name}: samples of different shapes {sorted({tuple(t.shape) for t in items})} in one batch")

    def _assemble(self, batch: int, valid_idx: list[int], reasons: list[str | None], chunks: list[ScoreBatch]) -> RewardOutput:
        device = chunks[0].scores.device if chunks else torch.device("cpu")
        idx = torch.tensor(valid_idx, dtype=torch.long, device=device)

        def scatter(parts: list[Tensor]) -> Tensor:
            vals = torch.cat(parts).float()
            full = torch.full((batch, *vals.shape[1:]), math.nan, device=vals.device, dtype=torch.float32)
            return full.index_put((idx,), vals)  # out of place: keeps gradients of valid items

        scores = scatter([c.scores for c in chunks]) if chunks else torch.full((batch,), math.nan)
        components = {k: scatter([c.components[k] for c in chunks]) for k in (chunks[0].components if chunks else {})}
        unc = scatter([c.uncertainty for c in chunks]) if chunks and chunks[0].uncertainty is not None else None
        reasons = list(reasons)
        notes = [r for c in chunks for r in (c.reasons if c.reasons is not None else [None] * c.scores.shape[0])]
        for i, note in zip(valid_idx, notes):  # per-item reasons given by score()
            if note is not None:
                reasons[i] = note
        # a reward that produced NaN itself marks the item invalid rather than passing NaN on silently
        bad = ~torch.isfinite(scores.detach())
        for i in range(batch):
            if reasons[i] is None and bool(bad[i]):
                reasons[i] = f"{self.name} produced a non-finite score"
        valid = torch.tensor([r is None for r in reasons], dtype=torch.bool)
        return RewardOutput(scores, valid, reasons, components, unc, self.provenance())

    def extra_repr(self) -> str:
        return f"name={self.name!r}, modality={self.modality!r}, differentiable={self.differentiable}, weights={self.weights_id!r}"


class CallableReward(Reward):
    """Wrap a plain callable ``fn(samples, prompts, **metadata) -> scores`` (TRL style) as a :class:`Reward`.

    ``fn`` receives the canonical float32 batch of valid items and the prompts; extra keyword arguments
    are the metadata lists (one list per key). It returns a sequence/array/tensor of n floats.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        modality: Modality = "image",
        needs: Sequence[str] = ("prompt",),
        differentiable: bool = False,
        higher_is_better: bool = True,
        batch_size: int = 16,
    ) -> None:
        self.name = name or getattr(fn, "__name__", "callable")  # type: ignore[misc]
        self.modality = modality  # type: ignore[misc]
        self.needs = frozenset(needs)  # type: ignore[misc]
        self.differentiable = differentiable  # type: ignore[misc]
        self.higher_is_better = higher_is_better  # type: ignore[misc]
        # the qualified name, not repr(): provenance must not change from run to run (memory addresses)
        super().__init__(batch_size=batch_size, preprocessing={"callable": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"})
        self.fn = fn

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        kwargs: dict[str, Any] = {}
        if metadata:
            for key in metadata[0]:
                kwargs[key] = [m.get(key) for m in metadata]
        if references is not None:
            kwargs["references"] = references
        out = self.fn(samples, prompts, **kwargs)
        scores = out if isinstance(out, Tensor) else torch.as_tensor(list(out) if not hasattr(out, "shape") else out, dtype=torch.float32)
        scores = scores.reshape(-1).float()
        if scores.shape[0] != samples.shape[0]:
            raise ValueError(f"reward callable {self.name!r} returned {scores.shape[0]} scores for {samples.shape[0]} samples")
        return ScoreBatch(scores)


def frames_read_by(rewards: Sequence["Reward"], num_frames: int) -> list[int] | None:
    """The sorted union of the frames ``rewards`` read in a ``num_frames``-frame video
    (:meth:`Reward.frames_needed`); None when any of them reads every frame."""
    needed: set[int] = set()
    for r in rewards:
        idx = r.frames_needed(num_frames)
        if idx is None:
            return None
        needed.update(idx)
    return sorted(needed)


def as_reward(fn: Reward | Callable[..., Any], **options: Any) -> Reward:
    """A :class:`Reward` as it is, or a callable wrapped in :class:`CallableReward`."""
    if isinstance(fn, Reward):
        if options:
            raise TypeError("options apply only when wrapping a plain callable")
        return fn
    if not callable(fn):
        raise TypeError(f"a reward must be a Reward or a callable, got {type(fn).__name__}")
    return CallableReward(fn, **options)

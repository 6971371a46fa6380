"""Rule-based rewards: JPEG (in)compressibility (DDPO) and the hook for verifiable rewards.

- :class:`JpegSizeReward` (``jpeg_size``): the size in kB (1 kB = 1000 bytes) of each image encoded
  as JPEG at quality 95 with PIL; ``jpeg_compressibility`` is its negation. Both follow DDPO
  (Black et al. 2023, arXiv 2305.13301, ``ddpo_pytorch/rewards.py``). Not differentiable; need nothing.
- :class:`VerifiableReward` (``verifiable``): a user rule ``fn(sample, metadata) -> score`` or
  ``-> (score, {component: value})``, evaluated per item (or once per chunk with ``batched=True``).
  An exception inside ``fn`` marks that item invalid with the exception text as its reason: never a
  silent 0.

Per-item reasons travel in :attr:`ScoreBatch.reasons`; :func:`nan_where` blanks invalid scores.
"""
from __future__ import annotations

import inspect
import io
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .base import Modality, Reward, ScoreBatch

# ----------------------------------------------------------------------------- per-item reasons


def nan_where(scores: Tensor, invalid: Sequence[bool]) -> Tensor:
    """``scores`` with NaN at the invalid positions (out of place, keeps gradients elsewhere)."""
    if not any(invalid):
        return scores
    mask = torch.tensor(list(invalid), dtype=torch.bool, device=scores.device)
    while mask.ndim < scores.ndim:
        mask = mask[:, None]
    return torch.where(mask, torch.full_like(scores, math.nan), scores)


# ----------------------------------------------------------------------------- JPEG size (DDPO)


def jpeg_size_kb(image: Tensor, quality: int = 95) -> float:
    """Size in kB (bytes / 1000) of a 3,H,W image in [0,1] encoded as JPEG by PIL at ``quality``.

    Quantisation follows DDPO: ``(x * 255).round().clamp(0, 255)`` to uint8.
    """
    from PIL import Image

    arr = (image.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegSizeReward(Reward):
    """JPEG size in kB at quality 95 (DDPO "incompressibility"); ``negate=True`` gives compressibility.

    Component ``size_kb``: the (positive) size in both directions.
    """

    name = "jpeg_size"
    modality = "image"
    needs = frozenset()
    differentiable = False
    higher_is_better = True
    score_range = (0.0, None)

    def __init__(self, *, quality: int = 95, negate: bool = False, batch_size: int = 64) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        if negate:
            self.name = "jpeg_compressibility"  # type: ignore[misc]
            self.score_range = (None, 0.0)  # type: ignore[misc]
        super().__init__(
            batch_size=batch_size,
            weights_id=None,
            preprocessing={"encoder": "PIL JPEG", "quality": int(quality), "quantisation": "round(x*255) to uint8",
                           "unit": "kB = bytes/1000", "negated": bool(negate)},
        )
        self.quality = int(quality)
        self.negate = bool(negate)

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        sizes = torch.tensor([jpeg_size_kb(img, self.quality) for img in samples], dtype=torch.float32)
        return ScoreBatch(-sizes if self.negate else sizes, {"size_kb": sizes})


def load_jpeg_size(*, quality: int = 95, batch_size: int = 64, **unused: Any) -> JpegSizeReward:
    """JPEG size in kB at ``quality`` (DDPO incompressibility). ``device``/``dtype``/``offline``/
    ``cache_dir`` are accepted for a uniform reward API and ignored (no model)."""
    _ignore_model_options(unused, "jpeg_size")
    return JpegSizeReward(quality=quality, batch_size=batch_size)


def load_jpeg_compressibility(*, quality: int = 95, batch_size: int = 64, **unused: Any) -> JpegSizeReward:
    """Negated JPEG size in kB at ``quality`` (DDPO compressibility)."""
    _ignore_model_options(unused, "jpeg_compressibility")
    return JpegSizeReward(quality=quality, negate=True, batch_size=batch_size)


_MODEL_OPTIONS = {"device", "dtype", "offline", "cache_dir"}


def _ignore_model_options(options: Mapping[str, Any], what: str) -> None:
    unknown = sorted(set(options) - _MODEL_OPTIONS)
    if unknown:
        raise TypeError(f"{what}: unknown options {unknown}")


# ----------------------------------------------------------------------------- verifiable rewards


def _accepts(fn: Callable[..., Any], param: str) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return param in sig.parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _parse_result(value: Any) -> tuple[float, dict[str, float]]:
    """``score`` or ``(score, {name: value})`` -> (float, dict); raises on anything else."""
    comps: dict[str, float] = {}
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], Mapping):
            raise TypeError(f"a verifiable rule must return a number or (number, dict), got a {len(value)}-tuple")
        value, raw = value
        comps = {str(k): float(v.item() if isinstance(v, Tensor) else v) for k, v in raw.items()}
    if value is None:
        raise TypeError("the rule returned None instead of a score")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"the rule returned a tensor of shape {tuple(value.shape)} instead of one score")
        value = value.item()
    return float(value), comps


class VerifiableReward(Reward):
    """A verifiable rule as a reward: ``fn(sample, metadata) -> float | (float, {name: float})``.

    ``sample`` is one canonical float32 item (image ``3,H,W`` in [0,1], video ``T,3,H,W``, audio
    ``C,N``) and ``metadata`` its dict; if ``fn`` has a ``prompt`` parameter it also gets the item's
    prompt (``None`` when no prompts were given). With ``batched=True``, ``fn(samples, metadatas[,
    prompts=...])`` gets the chunk (a tensor ``n,...`` and a list of dicts) and returns n results.

    An exception raised by ``fn`` (or a result that is not a number, or is NaN/inf) marks the item
    invalid with the exception text as its reason; in batched mode the whole chunk. Components: the
    union of the names the rule returned, NaN where an item did not report one.
    """

    name = "verifiable"
    needs = frozenset({"metadata"})
    differentiable = False

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        modality: Modality = "image",
        batched: bool = False,
        needs: Sequence[str] = ("metadata",),
        higher_is_better: bool = True,
        score_range: tuple[float | None, float | None] = (None, None),
        batch_size: int = 64,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"verifiable: fn must be callable, got {type(fn).__name__}")
        if modality not in ("image", "video", "audio"):
            raise ValueError(f"unknown modality {modality!r}")
        self.name = name or getattr(fn, "__name__", None) or "verifiable"  # type: ignore[misc]
        self.modality = modality  # type: ignore[misc]
        self.needs = frozenset(needs)  # type: ignore[misc]
        self.higher_is_better = higher_is_better  # type: ignore[misc]
        self.score_range = tuple(score_range)  # type: ignore[misc]
        super().__init__(
            batch_size=batch_size,
            weights_id=None,
            preprocessing={"rule": getattr(fn, "__qualname__", repr(fn)), "module": getattr(fn, "__module__", None), "batched": bool(batched)},
        )
        self.fn = fn
        self.batched = bool(batched)
        self._pass_prompt = _accepts(fn, "prompt")

    def _call(self, *args: Any, prompt: Any) -> Any:
        return self.fn(*args, prompt=prompt) if self._pass_prompt else self.fn(*args)

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        n = samples.shape[0]
        metas = metadata if metadata is not None else [{} for _ in range(n)]
        results: list[tuple[float, dict[str, float]] | None] = [None] * n
        reasons: list[str | None] = [None] * n
        if self.batched:
            try:
                out = self._call(samples, metas, prompt=prompts)
                if isinstance(out, Tensor):
                    out = out.reshape(-1).tolist()
                out = list(out)
                if len(out) != n:
                    raise ValueError(f"the batched rule returned {len(out)} results for {n} samples")
            except Exception as err:  # noqa: BLE001 - any failure of user code marks the items invalid
                reasons = [f"rule raised {_describe(err)}"] * n
                out = [None] * n
            for i, value in enumerate(out):
                if reasons[i] is None:
                    results[i], reasons[i] = self._checked(value)
        else:
            for i in range(n):
                try:
                    value = self._call(samples[i], metas[i], prompt=None if prompts is None else prompts[i])
                except Exception as err:  # noqa: BLE001
                    reasons[i] = f"rule raised {_describe(err)}"
                    continue
                results[i], reasons[i] = self._checked(value)
        scores = torch.tensor([math.nan if r is None else r[0] for r in results], dtype=torch.float32)
        names: list[str] = []
        for r in results:
            for k in (r[1] if r is not None else {}):
                if k not in names:
                    names.append(k)
        comps = {k: torch.tensor([r[1].get(k, math.nan) if r is not None else math.nan for r in results], dtype=torch.float32) for k in names}
        return ScoreBatch(scores, comps, reasons=reasons)

    @staticmethod
    def _checked(value: Any) -> tuple[tuple[float, dict[str, float]] | None, str | None]:
        try:
            score, comps = _parse_result(value)
        except (TypeError, ValueError) as err:
            return None, f"rule returned an unusable result: {_describe(err)}"
        if not math.isfinite(score):
            return None, f"rule returned a non-finite score ({score})"
        return (score, comps), None


def load_verifiable(
    *,
    fn: Callable[..., Any] | None = None,
    name: str | None = None,
    modality: Modality = "image",
    batched: bool = False,
    needs: Sequence[str] = ("metadata",),
    higher_is_better: bool = True,
    score_range: tuple[float | None, float | None] = (None, None),
    batch_size: int = 64,
    **unused: Any,
) -> VerifiableReward:
    """A verifiable rule ``fn(sample, metadata) -> float | (float, dict)`` as a reward (see
    :class:`VerifiableReward`)."""
    if fn is None:
        raise TypeError("verifiable: pass fn=, the rule fn(sample, metadata) -> float | (float, dict)")
    _ignore_model_options(unused, "verifiable")
    return VerifiableReward(fn, name=name, modality=modality, batched=batched, needs=needs,
                            higher_is_better=higher_is_better, score_range=score_range, batch_size=batch_size)


__all__ = [
    "JpegSizeReward",
    "VerifiableReward",
    "jpeg_size_kb",
    "load_jpeg_compressibility",
    "load_jpeg_size",
    "load_verifiable",
    "nan_where",
]

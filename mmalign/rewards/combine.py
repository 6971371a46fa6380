"""Combining rewards: normalisers, weighted sums and ensembles.

Normalisers share one small interface (``fit`` on a calibration set, ``update`` with a batch, ``__call__``
to normalise a batch); every one takes the B scores of a batch (NaN where an item was not scored) with an
optional ``valid`` mask and per-item ``groups`` and returns B normalised scores, NaN where invalid:

=============  =====================================================================================
``none``       identity
``zscore``     fixed calibration z-score ``(s - mean) / std``: mean/std given, or fitted (``fit``) on a
               calibration set (population std)
``running``    running z-score: mean/variance updated per batch (Welford / Chan's parallel update);
               during the first ``warmup`` scores the batch's own mean/std stand in for the running ones
``group``      per-group z-score ``(s - mean_g) / (std_g + eps)`` (groups: group ids, else identical
               prompts; GRPO advantages, arXiv 2402.03300)
``rank``       rank within the batch mapped to [0, 1]; ties get their average rank (not differentiable)
=============  =====================================================================================

:class:`WeightedSum` (``load_weighted_sum``) adds weighted, normalised member scores;
:class:`Ensemble` (``load_ensemble``) aggregates members by mean, worst case (min) or
``mean - lam * var`` (uncertainty-weighted; Coste et al., arXiv 2310.02743) and reports the members'
spread as ``uncertainty``. Members are called once per batch; an item invalid in any member is invalid
in the combination, with that member's reason.

Members can be given as Reward objects, plain callables, registered names (``"clipscore"``), tiny
offline instances (``"tiny:clipscore"``), ``"package.module:factory"`` references, or mappings
``{"name": ..., "options": {...}}`` (see :func:`resolve_reward`).
"""
from __future__ import annotations

import copy
import importlib
import math
from typing import Any, Hashable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..media import load_media
from .base import Reward, RewardOutput, _check_texts, as_reward, frames_read_by

RewardSpec = Any  # Reward | callable | str | Mapping


# ----------------------------------------------------------------------------- building members
def resolve_reward(spec: RewardSpec, **options: Any) -> Reward:
    """A :class:`Reward` from a spec.

    - a Reward: returned as it is (no options);
    - a plain callable ``(samples, prompts, **metadata) -> scores``: wrapped in ``CallableReward``;
    - ``"tiny:NAME"``: ``mmalign.testing.tiny_reward(NAME, **options)`` (random tiny weights, offline);
    - ``"package.module:attr"``: a Reward subclass or a factory returning a Reward, called with options;
    - ``"NAME"``: the registered reward (``mmalign.load_reward(NAME, **options)``);
    - a mapping ``{"name": spec, "options": {...}}`` (or the options next to ``name``).
    """
    if isinstance(spec, Reward):
        if options:
            raise TypeError(f"options {sorted(options)} cannot apply to an already built reward {spec.name!r}")
        return spec
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"a reward mapping needs a 'name' key, got keys {sorted(spec)}")
        name = spec.pop("name")
        opts = dict(spec.pop("options", None) or {})
        opts.update(spec)
        opts.update(options)
        return resolve_reward(name, **opts)
    if isinstance(spec, str):
        name = spec.strip()
        if not name:
            raise ValueError("empty reward name")
        if name.startswith("tiny:"):
            from ..testing import tiny_reward

            return tiny_reward(name[len("tiny:"):], **options)
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                obj = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise ValueError(f"cannot import reward {name!r}: {err}") from None
            if not callable(obj):
                raise TypeError(f"{name!r} must be a Reward class or a factory returning a Reward, got {type(obj).__name__}")
            built = obj(**options)
            if not isinstance(built, Reward):
                raise TypeError(f"{name!r} must be a Reward class or a factory returning a Reward, got {type(built).__name__}")
            return built
        from . import load_reward

        return load_reward(name, **options)
    if callable(spec):
        return as_reward(spec, **options)
    raise TypeError(f"cannot build a reward from {type(spec).__name__} {spec!r}")


# ----------------------------------------------------------------------------- normalisers
def _mask(scores: Tensor, valid: Tensor | None) -> Tensor:
    finite = torch.isfinite(scores.detach())
    return finite if valid is None else (valid.to(finite.device).bool() & finite)


def _finite_values(scores: Tensor | Sequence[float], valid: Tensor | None = None) -> Tensor:
    s = torch.as_tensor(scores, dtype=torch.float64).detach().reshape(-1).cpu()
    return s[_mask(s, None if valid is None else valid.cpu())]


class Normalizer:
    """Common interface. Subclasses override what they need; the defaults are stateless no-ops."""

    kind: str = "none"
    #: differentiable w.r.t. the scores (an affine or smooth map)
    differentiable: bool = True
    #: ``update`` changes statistics (the combination calls it on every batch before normalising)
    online: bool = False

    def fit(self, scores: Tensor | Sequence[float], valid: Tensor | None = None) -> "Normalizer":
        """Fit statistics on a calibration set of scores (NaN / invalid entries ignored); returns self."""
        return self

    def update(self, scores: Tensor, valid: Tensor | None = None) -> None:
        """Fold a batch of scores into running statistics."""

    def __call__(self, scores: Tensor, valid: Tensor | None = None, groups: Sequence[Hashable] | None = None) -> Tensor:
        """Normalised scores (B), NaN where ``valid`` is False or the score is not finite."""
        mask = _mask(scores, valid)
        return torch.where(mask, scores, torch.full_like(scores, math.nan))

    def state(self) -> dict[str, Any]:
        """Parameters and statistics, for provenance."""
        return {"kind": self.kind}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.state().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class NoNormalizer(Normalizer):
    """Identity."""

    kind = "none"


def _affine(scores: Tensor, mask: Tensor, mean: float, std: float) -> Tensor:
    safe = torch.where(mask, scores, torch.zeros_like(scores))
    out = (safe - mean) / std
    return torch.where(mask, out, torch.full_like(out, math.nan))


class ZScore(Normalizer):
    """Fixed calibration z-score ``(s - mean) / max(std, eps)``.

    Give ``mean`` and ``std`` (e.g. published statistics of a reward on a prompt set), or call
    :meth:`fit` on calibration scores (population std, ddof 0). Calling it unfitted raises.
    """

    kind = "zscore"

    def __init__(self, mean: float | None = None, std: float | None = None, eps: float = 1e-8) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (then fit() on calibration scores)")
        if std is not None and not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean = None if mean is None else float(mean)
        self.std = None if std is None else float(std)
        self.eps = float(eps)

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, scores, valid=None) -> "ZScore":
        vals = _finite_values(scores, valid)
        if len(vals) < 2:
            raise ValueError(f"z-score calibration needs at least 2 valid scores, got {len(vals)}")
        self.mean = float(vals.mean())
        self.std = float(vals.std(unbiased=False))
        return self

    def __call__(self, scores, valid=None, groups=None) -> Tensor:
        if not self.fitted:
            raise RuntimeError("ZScore normaliser is not calibrated: give mean and std, or call fit() on calibration scores")
        return _affine(scores, _mask(scores, valid), self.mean, max(self.std, self.eps))

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": self.mean, "std": self.std, "eps": self.eps}


class RunningZScore(Normalizer):
    """Running z-score with Welford statistics merged per batch (Chan et al.'s parallel update).

    ``update(batch)`` folds the valid scores in; ``__call__`` normalises by the running mean and
    population std. Until ``warmup`` scores have been seen the running estimate is unreliable, so the
    batch's own mean and std are used instead (a batch of one item then maps to 0). ``frozen = True``
    stops updates (evaluation). ``fit`` seeds the statistics from a calibration set.
    """

    kind = "running"
    online = True

    def __init__(self, warmup: int = 32, eps: float = 1e-8) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = int(warmup)
        self.eps = float(eps)
        self.frozen = False
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count else math.nan

    def _merge(self, vals: Tensor) -> None:
        n_b = len(vals)
        if n_b == 0:
            return
        mean_b = float(vals.mean())
        m2_b = float(((vals - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    def fit(self, scores, valid=None) -> "RunningZScore":
        self.reset()
        self._merge(_finite_values(scores, valid))
        return self

    def update(self, scores, valid=None) -> None:
        if not self.frozen:
            self._merge(_finite_values(scores, valid))

    def __call__(self, scores, valid=None, groups=None) -> Tensor:
        mask = _mask(scores, valid)
        if self.count >= max(self.warmup, 1):
            return _affine(scores, mask, self.mean, max(self.std, self.eps))
        vals = scores.detach().double()[mask]
        if len(vals) == 0:
            return torch.full_like(scores, math.nan)
        return _affine(scores, mask, float(vals.mean()), max(float(vals.std(unbiased=False)), self.eps))

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "warmup": self.warmup, "count": self.count, "mean": self.mean,
                "std": None if not self.count else self.std}


class GroupZScore(Normalizer):
    """Per-group z-score ``(s - mean_g) / (std_g + eps)`` (population std, as GRPO implementations).

    ``groups`` are per-item keys (group ids or prompts); without them the batch is one group. A group
    with one valid item maps to 0. Stateless; differentiable (statistics are not detached).
    """

    kind = "group"

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def __call__(self, scores, valid=None, groups=None) -> Tensor:
        mask = _mask(scores, valid)
        keys = [0] * scores.shape[0] if groups is None else list(groups)
        if len(keys) != scores.shape[0]:
            raise ValueError(f"{len(keys)} group keys for {scores.shape[0]} scores")
        safe = torch.where(mask, scores, torch.zeros_like(scores))
        out = torch.full_like(scores, math.nan)
        index: dict[Hashable, list[int]] = {}
        for i, k in enumerate(keys):
            if bool(mask[i]):
                index.setdefault(k.item() if isinstance(k, Tensor) else k, []).append(i)
        for rows in index.values():
            idx = torch.tensor(rows, device=scores.device)
            vals = safe[idx]
            mean = vals.mean()
            std = ((vals - mean) ** 2).mean().sqrt() if len(rows) > 1 else vals.new_zeros(())
            out = out.index_put((idx,), (vals - mean) / (std + self.eps))
        return out

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "eps": self.eps}


class Rank(Normalizer):
    """Rank within the batch's valid items mapped to [0, 1] (lowest 0, highest 1); tied scores share the
    average of their ranks; a single valid item maps to 0.5. Not differentiable."""

    kind = "rank"
    differentiable = False

    def __call__(self, scores, valid=None, groups=None) -> Tensor:
        mask = _mask(scores, valid)
        out = torch.full(scores.shape, math.nan, dtype=torch.float32, device=scores.device)
        vals = scores.detach()[mask].double()
        n = len(vals)
        if n == 0:
            return out
        if n == 1:
            return out.masked_fill(mask, 0.5)
        less = (vals[None, :] < vals[:, None]).sum(1).double()
        equal = (vals[None, :] == vals[:, None]).sum(1).double()
        avg_rank = less + (equal - 1) / 2  # 0-based average rank
        out[mask] = (avg_rank / (n - 1)).float()
        return out


NORMALIZERS: dict[str, type[Normalizer]] = {
    "none": NoNormalizer,
    "zscore": ZScore,
    "running": RunningZScore,
    "group": GroupZScore,
    "rank": Rank,
}
_ALIASES = {"fixed": "zscore", "calibration": "zscore", "z": "zscore", "running_zscore": "running",
            "welford": "running", "group_zscore": "group", "per_prompt": "group", None: "none", "identity": "none"}


def make_normalizer(spec: str | Normalizer | Mapping[str, Any] | None) -> Normalizer:
    """A normaliser from a name (``none``, ``zscore``, ``running``, ``group``, ``rank``), a mapping
    ``{"kind": name, **arguments}`` (e.g. ``{"kind": "zscore", "mean": 1.2, "std": 0.3}``) or an instance
    (copied, so members never share statistics)."""
    if isinstance(spec, Normalizer):
        return copy.deepcopy(spec)
    kwargs: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        spec = kwargs.pop("kind", None)
    name = _ALIASES.get(spec, spec)
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normaliser {spec!r} (known: {', '.join(NORMALIZERS)})")
    try:
        return NORMALIZERS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"normaliser {name!r}: {err}") from None


# ----------------------------------------------------------------------------- combinations
def _unique_names(members: Sequence[Reward]) -> list[str]:
    names: list[str] = []
    for m in members:
        base, name, k = m.name, m.name, 1
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.append(name)
    return names


class CombinedReward(Reward):
    """Base of rewards built from member rewards: calls each member once on the whole batch.

    Inputs are loaded once (PIL, arrays, paths -> canonical tensors) and handed to every member.
    ``valid`` is the AND of the members'; an invalid item's reason is the loading problem or empty
    prompt if any, else the first failing member's reason prefixed by its name.
    """

    name = "combined"
    normalizers: list[Normalizer]

    def __init__(self, rewards: Sequence[RewardSpec], *, batch_size: int = 16) -> None:
        if isinstance(rewards, (str, Reward, Mapping)) or callable(rewards):
            rewards = [rewards]
        members = [resolve_reward(r) for r in rewards]
        if not members:
            raise ValueError(f"{self.name}: give at least one member reward")
        modalities = sorted({m.modality for m in members})
        if len(modalities) > 1:
            raise ValueError(f"{self.name}: members score different modalities {modalities}")
        self.modality = modalities[0]  # type: ignore[misc]
        self.needs = frozenset().union(*(m.needs for m in members))  # type: ignore[misc]
        super().__init__(batch_size=batch_size, preprocessing={})
        self.members = nn.ModuleList(members)
        self.member_names = _unique_names(members)
        self.preprocessing = {n: m.preprocessing for n, m in zip(self.member_names, members)}

    def frames_needed(self, num_frames: int) -> list[int] | None:
        """The union of the members' frames (None when any member reads every frame)."""
        return frames_read_by(self.members, num_frames)

    def _call_members(self, samples, prompts, references, metadata, fps, sample_rate, num_frames=None) -> tuple[list[RewardOutput], list[str | None], list[str] | None]:
        items, reasons = load_media(samples, self.modality, sample_rate=sample_rate)
        batch = len(items)
        if batch == 0:
            raise ValueError(f"{self.name}: no samples to score")
        prompts = _check_texts(prompts, batch, "prompts")
        if "prompt" in self.needs:
            if prompts is None:
                raise ValueError(f"{self.name} needs prompts: pass one per sample")
            reasons = [r or ("empty prompt" if not p.strip() else None) for r, p in zip(reasons, prompts)]
        if metadata is not None and len(metadata) != batch:
            raise ValueError(f"{len(metadata)} metadata entries for {batch} samples")
        # an unloadable item is replaced by a valid placeholder for members, and reported as unloadable
        shapes = [tuple(t.shape) for t, r in zip(items, reasons) if t.numel()]
        for i, t in enumerate(items):
            if t.numel() == 0 and shapes:
                items[i] = torch.zeros(shapes[0])
        outs = []
        for m in self.members:
            kw: dict[str, Any] = {"fps": fps, "sample_rate": sample_rate}
            if num_frames is not None:
                kw["num_frames"] = num_frames
            if "reference" in m.needs:
                kw["references"] = references
            if "metadata" in m.needs:
                kw["metadata"] = metadata
            out = m(items, prompts, **kw)
            if len(out) != batch:
                raise RuntimeError(f"member {m.name} returned {len(out)} scores for {batch} samples")
            outs.append(out)
        merged = list(reasons)
        for i in range(batch):
            if merged[i] is None:
                for name, out in zip(self.member_names, outs):
                    if out.reasons[i] is not None:
                        merged[i] = f"{name}: {out.reasons[i]}"
                        break
        return outs, merged, prompts

    @staticmethod
    def _groups(prompts: list[str] | None, metadata, batch: int) -> list[Hashable] | None:
        if metadata is not None and all(isinstance(m, Mapping) and "group_id" in m for m in metadata):
            return [m["group_id"] for m in metadata]
        return prompts

    def provenance(self) -> dict[str, Any]:
        prov = super().provenance()
        prov["members"] = {n: m.provenance() for n, m in zip(self.member_names, self.members)}
        return prov

    @torch.no_grad()
    def calibrate(self, samples, prompts=None, *, references=None, metadata=None, fps=None, sample_rate=None):
        """Fit every member's normaliser (``zscore``: mean/std; ``running``: seeds its statistics) on a
        calibration batch of the members' scores; returns self."""
        outs, _, _ = self._call_members(samples, prompts, references, metadata, fps, sample_rate)
        for nz, out in zip(self.normalizers, outs):
            nz.fit(out.scores, out.valid)
        return self

    def score(self, *args, **kwargs):  # pragma: no cover - forward is overridden
        raise NotImplementedError(f"{self.name} scores through forward(): it calls its members on the whole batch")


class WeightedSum(CombinedReward):
    """``sum_i w_i * normalise_i(r_i)``. Components: each member's normalised score (and, when
    normalising, its raw score as ``raw/<name>``).

    Weights apply to the scores as they are: give a lower-is-better member a negative weight.
    Differentiable iff every member is and the normaliser is (``rank`` is not).
    Group normalisation uses ``metadata[i]["group_id"]`` when every item has one, else identical prompts.
    """

    name = "weighted_sum"

    def __init__(self, rewards: Sequence[RewardSpec], weights: Sequence[float] | None = None,
                 normalize: Any = "none", *, batch_size: int = 16) -> None:
        super().__init__(rewards, batch_size=batch_size)
        n = len(self.members)
        weights = [1.0] * n if weights is None else [float(w) for w in weights]
        if len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} rewards; give one per reward")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        self.weights = weights
        specs = list(normalize) if isinstance(normalize, (list, tuple)) else [normalize] * n
        if len(specs) != n:
            raise ValueError(f"{len(specs)} normalisers for {n} rewards; give one, or one per reward")
        self.normalizers = [make_normalizer(s) for s in specs]
        self.normalize = [nz.kind for nz in self.normalizers]
        self.differentiable = all(m.differentiable for m in self.members) and all(nz.differentiable for nz in self.normalizers)  # type: ignore[misc]
        self.higher_is_better = True  # type: ignore[misc]

    def forward(self, samples, prompts=None, *, references=None, metadata=None, fps=None, sample_rate=None, num_frames=None) -> RewardOutput:
        outs, reasons, prompts = self._call_members(samples, prompts, references, metadata, fps, sample_rate, num_frames)
        batch = len(reasons)
        groups = self._groups(prompts, metadata, batch)
        valid = torch.tensor([r is None for r in reasons], dtype=torch.bool)
        device = outs[0].scores.device
        total = torch.zeros(batch, device=device)
        components: dict[str, Tensor] = {}
        raw: dict[str, Tensor] = {}
        for name, w, nz, out in zip(self.member_names, self.weights, self.normalizers, outs):
            s = out.scores.to(device)
            if nz.online:
                nz.update(s, out.valid)
            z = nz(s, out.valid, groups).to(device)
            components[name] = z.float()
            if nz.kind != "none":
                raw[f"raw/{name}"] = s.float()
            total = total + w * torch.where(valid.to(device), torch.nan_to_num(z, nan=0.0), torch.zeros_like(z))
        scores = torch.where(valid.to(device), total, torch.full_like(total, math.nan)).float()
        return RewardOutput(scores, valid, reasons, {**components, **raw}, None, self.provenance())

    def provenance(self) -> dict[str, Any]:
        prov = super().provenance()
        prov.update(weights=dict(zip(self.member_names, self.weights)),
                    normalize={n: nz.state() for n, nz in zip(self.member_names, self.normalizers)})
        return prov


Aggregate = Literal["mean", "min", "uncertainty"]


class Ensemble(CombinedReward):
    """Ensemble of reward models of one scale (e.g. seeds or variants of one reward model).

    ``aggregate``: ``mean``; ``min`` — worst case over members (for lower-is-better members, the max);
    ``uncertainty`` — ``mean - lam * var`` (uncertainty-weighted optimisation; ``mean + lam * var`` for
    lower-is-better members), both from Coste et al., arXiv 2310.02743. ``uncertainty`` of the output is
    the members' standard deviation (population); components are the member scores. Members may be
    normalised first (``normalize``, as in :class:`WeightedSum`).
    """

    name = "ensemble"

    def __init__(self, rewards: Sequence[RewardSpec], aggregate: Aggregate = "mean", lam: float = 1.0,
                 normalize: Any = "none", *, batch_size: int = 16) -> None:
        super().__init__(rewards, batch_size=batch_size)
        if aggregate not in ("mean", "min", "uncertainty"):
            raise ValueError(f"unknown ensemble aggregate {aggregate!r} (use mean, min or uncertainty)")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        directions = {m.higher_is_better for m in self.members}
        if len(directions) > 1:
            raise ValueError("ensemble members disagree on direction (higher_is_better); use a weighted sum with a negative weight")
        self.aggregate = aggregate
        self.lam = float(lam)
        n = len(self.members)
        specs = list(normalize) if isinstance(normalize, (list, tuple)) else [normalize] * n
        if len(specs) != n:
            raise ValueError(f"{len(specs)} normalisers for {n} rewards; give one, or one per reward")
        self.normalizers = [make_normalizer(s) for s in specs]
        self.higher_is_better = directions.pop()  # type: ignore[misc]
        self.differentiable = all(m.differentiable for m in self.members) and all(nz.differentiable for nz in self.normalizers)  # type: ignore[misc]

    def forward(self, samples, prompts=None, *, references=None, metadata=None, fps=None, sample_rate=None, num_frames=None) -> RewardOutput:
        outs, reasons, prompts = self._call_members(samples, prompts, references, metadata, fps, sample_rate, num_frames)
        batch = len(reasons)
        groups = self._groups(prompts, metadata, batch)
        valid = torch.tensor([r is None for r in reasons], dtype=torch.bool)
        device = outs[0].scores.device
        vmask = valid.to(device)
        normed = []
        for nz, out in zip(self.normalizers, outs):
            s = out.scores.to(device)
            if nz.online:
                nz.update(s, out.valid)
            normed.append(nz(s, out.valid, groups).to(device).float())
        stack = torch.stack([torch.where(vmask, torch.nan_to_num(z, nan=0.0), torch.zeros_like(z)) for z in normed])  # M,B
        mean = stack.mean(0)
        var = ((stack - mean) ** 2).mean(0)
        sign = 1.0 if self.higher_is_better else -1.0
        if self.aggregate == "mean":
            agg = mean
        elif self.aggregate == "min":
            agg = stack.min(0).values if self.higher_is_better else stack.max(0).values
        else:
            agg = mean - sign * self.lam * var
        nan = torch.full_like(agg, math.nan)
        scores = torch.where(vmask, agg, nan).float()
        unc = torch.where(vmask, var.detach().sqrt(), nan).float()
        components = {name: z for name, z in zip(self.member_names, normed)}
        return RewardOutput(scores, valid, reasons, components, unc, self.provenance())

    def provenance(self) -> dict[str, Any]:
        prov = super().provenance()
        prov.update(aggregate=self.aggregate, lam=self.lam,
                    normalize={n: nz.state() for n, nz in zip(self.member_names, self.normalizers)})
        return prov


def load_weighted_sum(rewards: Sequence[RewardSpec], weights: Sequence[float] | None = None,
                      normalize: Any = "none", batch_size: int = 16) -> WeightedSum:
    """Registered factory of ``weighted_sum``: ``sum_i w_i * normalise(r_i)`` (see :class:`WeightedSum`)."""
    return WeightedSum(rewards, weights, normalize, batch_size=batch_size)


def load_ensemble(rewards: Sequence[RewardSpec], aggregate: Aggregate = "mean", lam: float = 1.0,
                  normalize: Any = "none", batch_size: int = 16) -> Ensemble:
    """Registered factory of ``ensemble``: mean, worst case (min) or ``mean - lam * var`` (see :class:`Ensemble`)."""
    return Ensemble(rewards, aggregate, lam, normalize, batch_size=batch_size)


__all__ = ["CombinedReward", "Ensemble", "GroupZScore", "NORMALIZERS", "NoNormalizer", "Normalizer", "Rank",
           "RunningZScore", "WeightedSum", "ZScore", "load_ensemble", "load_weighted_sum", "make_normalizer",
           "resolve_reward"]

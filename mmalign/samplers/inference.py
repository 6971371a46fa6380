"""Inference-time alignment: spend compute at sampling time instead of training.

Four methods, all taking an adapter, prompts and rewards (a Reward, a callable, ``(reward, weight)``
pairs or reward configs, combined as ``total = sum_i w_i R_i``), all returning an
:class:`InferenceResult` (the best sample per prompt, its initial noise, its scores, the first sample
for before/after comparisons, and a per-iteration trace):

- :func:`best_of_n`: N samples per prompt, keep the highest total. Any reward (no gradients).
- :func:`optimize_noise`: ReNO (Eyring et al., arXiv 2406.04312). The initial noise ``z`` is the
  parameter; ``G(z)`` is the adapter's deterministic ODE sampler (a few steps) followed by the
  differentiable decode; the loss ``sum_i w_i (-R_i(G(z))) + lambda * (||z||^2/2 - (d-1) log ||z||)``
  (:func:`~mmalign.trainers.losses.reno_loss`) is minimised with SGD (Nesterov) or Adam, each sample's
  noise gradient clipped to ``max_grad_norm``, for a budget of iterations; the best sample seen (by
  total reward) is returned. Differentiable rewards only.
- :func:`search`: zero-order search over initial noises (Ma et al., arXiv 2501.09732): a pivot noise,
  candidates on a sphere around it (same norm, fixed cosine to the pivot), move the pivot to the best
  candidate when it beats it; or pure random search. A budget of reward calls per prompt. Any reward.
- :func:`reward_guided_sample`: reward guidance inside the adapter's own diffusers pipeline through
  :class:`~mmalign.rewards.hooks.RewardCallback` (the gradient of a differentiable reward of the
  predicted clean sample, added to the latents at each step, scaled).

Shapes: B prompts; latents ``B,*L`` in the pipeline's layout; media in the canonical layout of the
adapter's modality (image ``B,3,H,W`` in [0,1]). Results live on the CPU.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from ..models.base import Conditioning, ModelAdapter, check_negative_prompts, check_prompts
from ..trainers.losses import reno_loss, reno_regularizer
from .trajectory import SamplerConfig, sample, step

Log = Callable[[str], None] | None


# ============================================================================ configs
@dataclass
class BestOfNConfig:
    """Best-of-N: sample N candidates per prompt and keep the one with the highest weighted reward."""

    n: int = 8
    """Candidates per prompt (each from its own initial noise)."""
    batch_size: int | None = None
    """Samples per sampler call (None: all B*N at once). The noise is drawn up front, so the result
    does not depend on it."""

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"best_of_n.n must be an integer >= 1, got {self.n!r}")
        _check_batch_size(self.batch_size, "best_of_n.batch_size")


@dataclass
class NoiseOptConfig:
    """ReNO (arXiv 2406.04312): optimise the initial noise against differentiable rewards.

    Defaults are the paper's public settings: 50 iterations, SGD with Nesterov momentum 0.9, lr 5,
    gradient-norm clip 0.1, regulariser weight 0.01.
    """

    iterations: int = 50
    """Generate-and-score iterations (ReNO's n_iters): iteration 0 scores the initial noise and every
    iteration but the last is followed by one update of the noise (iterations - 1 updates)."""
    lr: float = 5.0
    """Learning rate of the noise optimizer."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """``sgd`` (with ``momentum`` / ``nesterov``, ReNO's default) or ``adam`` (eps ``adam_eps``)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum for SGD (needs momentum > 0)."""
    adam_eps: float = 1e-2
    """Adam's epsilon (ReNO uses 1e-2)."""
    max_grad_norm: float | None = 0.1
    """Clip each sample's noise gradient to this L2 norm (None: no clipping)."""
    reg_weight: float = 0.01
    """lambda of the norm regulariser ``||z||^2/2 - (d-1) log ||z||`` that keeps the noise on the
    typical shell of N(0, I) (0 turns it off)."""
    gradient_checkpointing: bool = False
    """Recompute each denoising step in the backward pass instead of storing its activations
    (less memory for large models and more steps, ~1 extra forward)."""

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"reno.iterations must be an integer >= 1, got {self.iterations!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"reno.lr must be a finite number > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"reno.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"reno.momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("reno.nesterov needs reno.momentum > 0 (set nesterov: false for plain SGD)")
        if not self.adam_eps > 0:
            raise ValueError(f"reno.adam_eps must be > 0, got {self.adam_eps}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"reno.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise ValueError(f"reno.reg_weight must be >= 0, got {self.reg_weight}")


@dataclass
class SearchConfig:
    """Search over initial noises with a budget of reward calls (arXiv 2501.09732)."""

    budget: int = 32
    """Samples scored per prompt, the first pivot included (the search stops exactly there)."""
    mode: Literal["zero_order", "random"] = "zero_order"
    """``zero_order``: candidates around the current pivot, which moves to a better candidate;
    ``random``: fresh Gaussian candidates every round (random search, i.e. best-of-budget)."""
    neighbors: int = 4
    """Candidates per round (the last round is cut to fit the budget)."""
    cosine: float = 0.95
    """Zero-order: cosine similarity of each candidate to the pivot; candidates keep the pivot's norm
    (a smaller value searches farther away)."""
    batch_size: int | None = None
    """Samples per sampler call (None: a whole round at once)."""

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"search.budget must be an integer >= 1, got {self.budget!r}")
        if isinstance(self.neighbors, bool) or not isinstance(self.neighbors, int) or self.neighbors < 1:
            raise ValueError(f"search.neighbors must be an integer >= 1, got {self.neighbors!r}")
        if self.mode not in ("zero_order", "random"):
            raise ValueError(f"search.mode must be 'zero_order' or 'random', got {self.mode!r}")
        if not -1 < self.cosine < 1:
            raise ValueError(f"search.cosine must be in (-1, 1), got {self.cosine}")
        _check_batch_size(self.batch_size, "search.batch_size")


@dataclass
class GuidanceConfig:
    """Reward guidance through :class:`~mmalign.rewards.hooks.RewardCallback` in the adapter's pipeline."""

    scale: float = 1.0
    """Step size: ``scale * dR/dx0_hat`` is added to the latents after every guided step."""
    max_grad_norm: float | None = None
    """Clip each sample's latent update to this L2 norm (None: no clipping)."""
    guidance_steps: list[int] | None = None
    """Step indices to guide at (None: every step)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"guidance.scale must be a finite number >= 0, got {self.scale}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"guidance.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


def _check_batch_size(value: int | None, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 or null, got {value!r}")


# ============================================================================ result
@dataclass
class InferenceResult:
    """The outcome of an inference-time method for B prompts (all tensors on the CPU).

    samples:         B,...   the best sample of each prompt (canonical media)
    noise:           B,*L    the initial noise it came from (ReNO: the optimised noise)
    scores:          B       its weighted reward total ``sum_i w_i R_i``
    reward_scores:   {label: B} each optimised reward's score of it
    best_index:      B       where in the trace it was found (iteration / candidate / reward call)
    initial_samples: B,...   the first sample (plain sampling of the first noise): "before"
    initial_scores:  B       its total
    trace:           {name: T,B} per iteration (ReNO), candidate (best-of-N), reward call (search) or
                     step (guidance): ``total``, each reward label, and the method's diagnostics
    weights:         {label: weight}
    reward_calls:    samples scored per prompt
    """

    method: str
    prompts: list[str]
    samples: Tensor
    noise: Tensor
    scores: Tensor
    reward_scores: dict[str, Tensor]
    best_index: Tensor
    initial_samples: Tensor
    initial_scores: Tensor
    trace: dict[str, Tensor]
    weights: dict[str, float]
    reward_calls: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def best_so_far(self) -> Tensor:
        """T,B running maximum of the trace's total (NaN entries skipped)."""
        total = torch.nan_to_num(self.trace["total"], nan=-math.inf)
        return torch.cummax(total, dim=0).values

    @staticmethod
    def cat(parts: Sequence["InferenceResult"]) -> "InferenceResult":
        """Join the results of consecutive prompt chunks (same method, rewards and trace length)."""
        if not parts:
            raise ValueError("InferenceResult.cat needs at least one part")
        first = parts[0]
        lengths = {tuple(len(v) for v in p.trace.values()) for p in parts}
        if len(lengths) != 1 or len({p.method for p in parts}) != 1:
            raise ValueError("InferenceResult.cat: parts differ in method or trace length")
        return InferenceResult(
            method=first.method,
            prompts=[q for p in parts for q in p.prompts],
            samples=torch.cat([p.samples for p in parts]),
            noise=torch.cat([p.noise for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            reward_scores={k: torch.cat([p.reward_scores[k] for p in parts]) for k in first.reward_scores},
            best_index=torch.cat([p.best_index for p in parts]),
            initial_samples=torch.cat([p.initial_samples for p in parts]),
            initial_scores=torch.cat([p.initial_scores for p in parts]),
            trace={k: torch.cat([p.trace[k] for p in parts], dim=1) for k in first.trace},
            weights=dict(first.weights),
            reward_calls=first.reward_calls,
            meta=dict(first.meta),
        )

    def trace_rows(self) -> list[dict[str, Any]]:
        """One JSON-able row per trace entry: ``{"index": t, name: [B values], "best_so_far": [B]}``."""
        best = self.best_so_far
        rows = []
        for t in range(self.trace["total"].shape[0]):
            row: dict[str, Any] = {"index": t}
            for name, values in self.trace.items():
                row[name] = [_num(v) for v in values[t].tolist()]
            row["best_so_far"] = [_num(v) for v in best[t].tolist()]
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        """Everything but the media and noise, as plain JSON data (NaN/inf -> null)."""
        return {
            "method": self.method,
            "prompts": list(self.prompts),
            "weights": dict(self.weights),
            "reward_calls_per_prompt": self.reward_calls,
            "best_index": self.best_index.tolist(),
            "best_total": [_num(v) for v in self.scores.tolist()],
            "initial_total": [_num(v) for v in self.initial_scores.tolist()],
            "best_rewards": {k: [_num(v) for v in t.tolist()] for k, t in self.reward_scores.items()},
            "trace": self.trace_rows(),
            "meta": self.meta,
        }


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


# ============================================================================ shared pieces
def _reward_set(rewards: Any):
    """A :class:`~mmalign.trainers.common.RewardSet` of the rewards to optimise.

    ``rewards``: a RewardSet (used as it is: its held-out rewards are not optimised), a Reward, a
    callable, a ``(reward, weight)`` pair, a reward config, or a list of those.
    """
    from ..trainers.common import RewardSet

    if isinstance(rewards, RewardSet):
        if not rewards.trained:
            raise ValueError("no reward given: the RewardSet has no reward to optimise (only held-out ones)")
        return rewards
    items = list(rewards) if isinstance(rewards, list) else [] if rewards is None else [rewards]
    if not items:
        raise ValueError("no reward given: inference-time methods need at least one reward to optimise")
    return RewardSet.build(items, [])


def _media_kwargs(adapter: ModelAdapter) -> dict[str, Any]:
    return {k: v for k, v in (("fps", adapter.fps), ("sample_rate", adapter.sample_rate)) if v is not None}


def _totals(outputs: dict[str, Any], entries: Sequence[Any], device: torch.device | str = "cpu") -> tuple[Tensor, dict[str, Tensor], list[str | None]]:
    """``sum_i w_i R_i`` per item (NaN where any reward could not score it), each reward's scores
    (graph kept) and, per item, the first reason it was not scored."""
    total = None
    per: dict[str, Tensor] = {}
    reasons: list[str | None] = []
    for e in entries:
        out = outputs[e.label]
        scores = out.scores.to(device)
        per[e.label] = scores
        total = e.weight * scores if total is None else total + e.weight * scores
        if not reasons:
            reasons = [None] * len(out.reasons)
        for i, r in enumerate(out.reasons):
            if r is not None and reasons[i] is None:
                reasons[i] = f"{e.label}: {r}"
    return total, per, reasons


def _expected_noise(adapter: ModelAdapter, noise: Tensor, batch: int, what: str = "noise") -> Tensor:
    expected = tuple(adapter.latent_shape(batch))
    if tuple(noise.shape) != expected:
        raise ValueError(f"{what} has shape {tuple(noise.shape)}, expected {expected} for {batch} prompts")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError(f"{what} contains NaN or inf")
    return noise.detach().float().to(adapter.device)


def _check_sampler(sampler: SamplerConfig | None, method: str) -> SamplerConfig:
    """The sampler to use (default: 8 ODE steps); one sample per prompt and noise."""
    sampler = sampler or SamplerConfig(method="ode", num_steps=8)
    if sampler.group_size != 1:
        raise ValueError(f"{method}: sampler.group_size must be 1 (each prompt gets its own noise; use best_of_n.n "
                         f"for several candidates), got {sampler.group_size}")
    return sampler


def _encode(adapter: ModelAdapter, prompts: list[str], negative: list[str] | None, sampler: SamplerConfig) -> Conditioning:
    guidance = adapter.default_guidance_scale if sampler.guidance_scale is None else sampler.guidance_scale
    with torch.no_grad():
        return adapter.encode_in_chunks(prompts, negative, guidance, sampler.micro_batch)


@contextmanager
def _frozen(*modules: Any) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter of ``modules`` (nn.Modules, or a pipeline's
    components) inside the block and restore it after: gradients go to the noise only, and no weight
    gradient is stored."""
    params = []
    for m in modules:
        if isinstance(m, torch.nn.Module):
            params.extend(m.parameters())
        elif hasattr(m, "components"):
            for c in m.components.values():
                if isinstance(c, torch.nn.Module):
                    params.extend(c.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def generate_from_noise(
    adapter: ModelAdapter,
    noise: Tensor,
    conditioning: Conditioning,
    sampler: SamplerConfig,
    *,
    gradient_checkpointing: bool = False,
) -> Tensor:
    """``G(z)``: deterministic ODE sampling from ``noise`` (B,*L) then decoding, differentiable w.r.t.
    ``noise``. The same computation as :func:`~mmalign.samplers.sample` with ``latents=noise`` and an
    ODE sampler (same ``micro_batch`` chunks), so its output equals that sample exactly.
    Returns media B,... (image ``B,3,H,W`` in [0,1])."""
    if sampler.method != "ode":
        raise ValueError(f"generate_from_noise needs a deterministic sampler (method 'ode'), got {sampler.method!r}")
    schedule = adapter.schedule(sampler.num_steps)
    x = noise.float()

    def one_step(x_k: Tensor, k: int) -> Tensor:
        out = adapter.denoise_in_chunks(x_k, schedule.timesteps[k], conditioning, sampler.micro_batch)
        return step(schedule, sampler, k, out, x_k).prev_sample

    for k in range(schedule.num_steps):
        if gradient_checkpointing and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            x = checkpoint(one_step, x, k, use_reentrant=False)
        else:
            x = one_step(x, k)
    return adapter.decode(x)


def noise_neighbors(noise: Tensor, k: int, cosine: float, generator: torch.Generator | None = None) -> Tensor:
    """``k`` noises around each row of ``noise`` (B,*L) -> B,k,*L: each has the row's L2 norm and
    cosine similarity ``cosine`` to it (a random direction on the sphere at that angle), so candidates
    stay on the typical shell of N(0, I) (zero-order search, arXiv 2501.09732)."""
    if not -1 < cosine < 1:
        raise ValueError(f"cosine must be in (-1, 1), got {cosine}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b = noise.shape[0]
    flat = noise.detach().reshape(b, -1).double().cpu()
    norm = flat.norm(dim=1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("noise_neighbors: a noise row is all zeros (no direction to search around)")
    u = flat / norm  # B,D unit pivots
    gen_device = generator.device if generator is not None else torch.device("cpu")
    v = torch.randn((b, k, flat.shape[1]), generator=generator, device=gen_device, dtype=torch.float64).cpu()
    v = v - (v @ u.unsqueeze(-1)) * u.unsqueeze(1)  # remove the component along the pivot
    w = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)  # B,k,D unit, orthogonal to u
    out = norm.unsqueeze(1) * (cosine * u.unsqueeze(1) + math.sqrt(1 - cosine**2) * w)
    return out.to(noise.dtype).reshape(b, k, *noise.shape[1:]).to(noise.device)


def _score_rows(
    adapter: ModelAdapter,
    prompt_index: list[int],
    prompts: list[str],
    noises: Tensor,
    conditioning: Conditioning,
    sampler: SamplerConfig,
    reward_set: Any,
    generator: torch.Generator | None,
    batch_size: int | None,
) -> tuple[Tensor, Tensor, dict[str, Tensor], list[str | None]]:
    """Sample rows (prompt ``prompt_index[r]``, initial noise ``noises[r]``) and score them.
    Returns media (CPU), totals (R), per-reward scores (R each) and per-row reasons."""
    rows = len(prompt_index)
    size = batch_size or rows
    media, totals, reasons = [], [], []
    per: dict[str, list[Tensor]] = {}
    for start in range(0, rows, size):
        idx = prompt_index[start : start + size]
        chunk_prompts = [prompts[i] for i in idx]
        rollout = sample(adapter, chunk_prompts, replace(sampler, record_x0=False, decode=True),
                         latents=noises[start : start + size], generator=generator,
                         conditioning=conditioning.select(idx))
        out = reward_set.score(rollout.samples, chunk_prompts, which="trained", **_media_kwargs(adapter))
        total, scores, why = _totals(out, reward_set.trained)
        media.append(rollout.samples.detach().cpu())
        totals.append(total.detach().cpu())
        reasons += why
        for k, v in scores.items():
            per.setdefault(k, []).append(v.detach().cpu())
    return torch.cat(media), torch.cat(totals), {k: torch.cat(v) for k, v in per.items()}, reasons


def _best_per_prompt(totals: Tensor) -> tuple[Tensor, Tensor]:
    """totals: B,C (NaN = invalid) -> (best value B, index B); the first maximum wins ties."""
    filled = torch.nan_to_num(totals, nan=-math.inf)
    value, index = filled.max(dim=1)
    return value, index


def _all_invalid_error(method: str, prompts: list[str], totals: Tensor, reasons: list[list[str | None]]) -> None:
    bad = [i for i in range(totals.shape[0]) if not bool(torch.isfinite(totals[i]).any())]
    if bad:
        i = bad[0]
        why = next((r for r in reasons[i] if r), "non-finite total")
        raise ValueError(f"{method}: no candidate of prompt {i} ({prompts[i]!r}) could be scored: {why}")


# ============================================================================ best-of-N
def best_of_n(
    adapter: ModelAdapter,
    prompts: Sequence[str] | str,
    rewards: Any,
    n: int = 8,
    sampler: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    *,
    batch_size: int | None = None,
    negative_prompts: Sequence[str] | str | None = None,
) -> InferenceResult:
    """Sample ``n`` candidates per prompt and keep the one with the highest ``sum_i w_i R_i``.

    All B*n initial noises are drawn from ``generator`` first (prompt-major: candidate j of prompt i
    is row i*n + j), so the result is deterministic per seed and independent of ``batch_size``.
    Any reward works (nothing is differentiated). A candidate some reward could not score is never
    chosen; a prompt with no scorable candidate is an error naming the reward and reason.
    ``trace["total"]`` is n,B: every candidate's total (the "all scores").
    """
    cfg = BestOfNConfig(n=n, batch_size=batch_size)
    prompts = check_prompts(prompts)
    negative = check_negative_prompts(negative_prompts, len(prompts))
    sampler = _check_sampler(sampler, "best_of_n")
    reward_set = _reward_set(rewards)
    b = len(prompts)
    conditioning = _encode(adapter, prompts, negative, sampler)
    noise = adapter.init_noise(b * cfg.n, generator)
    index = [i for i in range(b) for _ in range(cfg.n)]
    media, totals, per, reasons = _score_rows(adapter, index, prompts, noise, conditioning, sampler, reward_set,
                                              generator, cfg.batch_size)
    totals_bn = totals.reshape(b, cfg.n)
    _all_invalid_error("best_of_n", prompts, totals_bn, [reasons[i * cfg.n : (i + 1) * cfg.n] for i in range(b)])
    _, best = _best_per_prompt(totals_bn)
    rows = torch.arange(b) * cfg.n + best
    first = torch.arange(b) * cfg.n
    trace = {"total": totals_bn.T.contiguous(), **{k: v.reshape(b, cfg.n).T.contiguous() for k, v in per.items()}}
    return InferenceResult(
        method="best_of_n", prompts=prompts, samples=media[rows], noise=noise.detach().cpu()[rows],
        scores=totals[rows], reward_scores={k: v[rows] for k, v in per.items()}, best_index=best,
        initial_samples=media[first], initial_scores=totals[first], trace=trace,
        weights={e.label: e.weight for e in reward_set.trained}, reward_calls=cfg.n,
        meta={"n": cfg.n, "sampler": sampler.method, "num_steps": sampler.num_steps},
    )


# ============================================================================ ReNO
def optimize_noise(
    adapter: ModelAdapter,
    prompts: Sequence[str] | str,
    rewards: Any,
    config: NoiseOptConfig | None = None,
    sampler: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
    negative_prompts: Sequence[str] | str | None = None,
    log: Log = None,
) -> InferenceResult:
    """ReNO: optimise each prompt's initial noise against differentiable rewards (arXiv 2406.04312).

    For ``it`` in ``0 .. iterations-1``: ``x = G(z)`` (:func:`generate_from_noise`: ``sampler``'s ODE
    steps, guidance and decode, with gradients), score every reward, record the trace, keep the best
    sample seen per prompt (by ``total = sum_i w_i R_i``, the regulariser excluded, as in ReNO), then,
    except after the last iteration, take one optimizer step on
    ``loss = sum_B [sum_i w_i (-R_i) + lambda * reg(z)]`` with each row's gradient clipped to
    ``max_grad_norm``. The loss is summed over prompts so every noise gets exactly its own single-prompt
    gradient (batching prompts changes nothing but speed).

    Trace (``iterations``,B): ``total``, each reward, ``reg`` (the regulariser), ``noise_norm``,
    ``grad_norm`` (before clipping), ``clipped_grad_norm`` and ``update_norm`` (``||z_{t+1} - z_t||``; 0 at
    the last iteration). ``initial_samples`` is iteration 0, i.e. plain ODE sampling of the initial noise.

    Raises ValueError naming the reward when one is not differentiable, and naming the reward and
    reason when a sample cannot be scored.
    """
    config = config or NoiseOptConfig()
    prompts = check_prompts(prompts)
    negative = check_negative_prompts(negative_prompts, len(prompts))
    sampler = _check_sampler(sampler, "optimize_noise")
    if sampler.method != "ode":
        raise ValueError(f"optimize_noise (ReNO) differentiates a deterministic generator G(z): sampler.method must be "
                         f"'ode', got {sampler.method!r}")
    reward_set = _reward_set(rewards)
    not_diff = [e.label for e in reward_set.trained if not e.reward.differentiable]
    if not_diff:
        raise ValueError(f"optimize_noise (ReNO) backpropagates through its rewards, but {', '.join(map(repr, not_diff))} "
                         f"{'is' if len(not_diff) == 1 else 'are'} not differentiable; use a differentiable reward "
                         "(e.g. clipscore) and score the others as report rewards, or use best_of_n / search")
    b = len(prompts)
    conditioning = _encode(adapter, prompts, negative, sampler)
    z0 = adapter.init_noise(b, generator) if noise is None else _expected_noise(adapter, noise, b)
    z = z0.detach().clone().requires_grad_(True)
    if config.optimizer == "sgd":
        opt = torch.optim.SGD([z], lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    else:
        opt = torch.optim.Adam([z], lr=config.lr, eps=config.adam_eps)
    entries = reward_set.trained
    weights = [e.weight for e in entries]
    trace: dict[str, list[Tensor]] = {}
    best_total = torch.full((b,), -math.inf)
    best_index = torch.zeros(b, dtype=torch.long)
    best_media: Tensor | None = None
    best_noise = z0.detach().cpu().clone()
    best_scores: dict[str, Tensor] = {}
    initial_media = initial_total = None
    media_kwargs = _media_kwargs(adapter)

    def record(name: str, value: Tensor) -> None:
        trace.setdefault(name, []).append(value.detach().float().cpu())

    with _frozen(adapter.pipeline, *[e.reward for e in reward_set.entries]):
        for it in range(config.iterations):
            with torch.enable_grad():
                media = generate_from_noise(adapter, z, conditioning, sampler,
                                            gradient_checkpointing=config.gradient_checkpointing)
                outs = reward_set.score(media, prompts, which="trained", grad=True, **media_kwargs)
                total, per, reasons = _totals(outs, entries, z.device)
                bad = [(i, r) for i, r in enumerate(reasons) if r is not None]
                if bad:
                    i, r = bad[0]
                    raise ValueError(f"optimize_noise: iteration {it}, prompt {i} ({prompts[i]!r}) could not be scored "
                                     f"by reward {r}")
                reg = reno_regularizer(z)
                # ReNO (arXiv 2406.04312): sum_i w_i * (-R_i(G(z))) + lambda * reg(z); reno_loss averages over B
                loss = reno_loss([per[e.label] for e in entries], weights, z, config.reg_weight) * b
            media_cpu = media.detach().cpu()
            total_cpu = total.detach().float().cpu()
            if it == 0:
                initial_media, initial_total = media_cpu.clone(), total_cpu.clone()
                best_media = media_cpu.clone()
                best_scores = {k: v.detach().float().cpu().clone() for k, v in per.items()}
            better = total_cpu > best_total
            if bool(better.any()):
                best_total = torch.where(better, total_cpu, best_total)
                best_index[better] = it
                best_media[better] = media_cpu[better]
                best_noise[better] = z.detach().cpu()[better]
                for k, v in per.items():
                    best_scores[k][better] = v.detach().float().cpu()[better]
            record("total", total_cpu)
            for k, v in per.items():
                record(k, v)
            record("reg", reg)
            record("noise_norm", z.detach().flatten(1).norm(dim=1))
            if it == config.iterations - 1:
                for name in ("grad_norm", "clipped_grad_norm", "update_norm"):
                    record(name, torch.zeros(b))
            else:
                (grad,) = torch.autograd.grad(loss, z)
                norms = grad.flatten(1).norm(dim=1)
                if config.max_grad_norm is not None:  # per-sample clip_grad_norm_ (ReNO clips its single noise)
                    factor = (config.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
                    grad = grad * factor.view(-1, *[1] * (grad.ndim - 1))
                before = z.detach().clone()
                z.grad = grad
                opt.step()
                opt.zero_grad(set_to_none=True)
                record("grad_norm", norms)
                record("clipped_grad_norm", grad.flatten(1).norm(dim=1))
                record("update_norm", (z.detach() - before).flatten(1).norm(dim=1))
            if log is not None:
                log(f"reno iteration {it}: total mean {float(total_cpu.mean()):.4f}, best mean {float(best_total.mean()):.4f}, "
                    f"|z| mean {float(trace['noise_norm'][-1].mean()):.2f} (sqrt(d) = {math.sqrt(z[0].numel()):.2f})")
    return InferenceResult(
        method="reno", prompts=prompts, samples=best_media, noise=best_noise, scores=best_total,
        reward_scores=best_scores, best_index=best_index, initial_samples=initial_media, initial_scores=initial_total,
        trace={k: torch.stack(v) for k, v in trace.items()}, weights={e.label: e.weight for e in entries},
        reward_calls=config.iterations,
        meta={"iterations": config.iterations, "optimizer": config.optimizer, "lr": config.lr,
              "max_grad_norm": config.max_grad_norm, "reg_weight": config.reg_weight, "num_steps": sampler.num_steps,
              "noise_dim": int(z[0].numel())},
    )


# ============================================================================ search
def search(
    adapter: ModelAdapter,
    prompts: Sequence[str] | str,
    rewards: Any,
    config: SearchConfig | None = None,
    sampler: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
    negative_prompts: Sequence[str] | str | None = None,
    log: Log = None,
) -> InferenceResult:
    """Search over initial noises with exactly ``config.budget`` reward calls per prompt (arXiv 2501.09732).

    Call 0 scores the pivot (``noise`` or a draw from ``generator``). Each round then scores up to
    ``neighbors`` candidates per prompt (the last round is cut to the remaining budget):
    ``zero_order`` draws them with :func:`noise_neighbors` around the pivot and moves the pivot to the
    round's best candidate when its total beats the best so far (hill climbing); ``random`` draws fresh
    N(0, I) noises. Any reward works. ``trace["total"]`` is budget,B: every call's total, in order.
    """
    config = config or SearchConfig()
    prompts = check_prompts(prompts)
    negative = check_negative_prompts(negative_prompts, len(prompts))
    sampler = _check_sampler(sampler, "search")
    reward_set = _reward_set(rewards)
    b = len(prompts)
    conditioning = _encode(adapter, prompts, negative, sampler)
    pivot = adapter.init_noise(b, generator) if noise is None else _expected_noise(adapter, noise, b)
    media, totals, per, reasons = _score_rows(adapter, list(range(b)), prompts, pivot, conditioning, sampler,
                                              reward_set, generator, config.batch_size)
    trace_total, trace_per, trace_round = [totals], {k: [v] for k, v in per.items()}, [torch.zeros(b)]
    best_total = torch.nan_to_num(totals.clone(), nan=-math.inf)
    best_index = torch.zeros(b, dtype=torch.long)
    best_media, best_noise = media.clone(), pivot.detach().cpu().clone()
    best_scores = {k: v.clone() for k, v in per.items()}
    all_reasons: list[list[str | None]] = [[r] for r in reasons]
    calls, rnd = 1, 0
    while calls < config.budget:
        rnd += 1
        k = min(config.neighbors, config.budget - calls)
        if config.mode == "zero_order":
            cands = noise_neighbors(pivot, k, config.cosine, generator)  # B,k,*L
        else:
            cands = adapter.init_noise(b * k, generator).reshape(b, k, *pivot.shape[1:])
        index = [i for i in range(b) for _ in range(k)]
        c_media, c_tot, c_per, c_reasons = _score_rows(adapter, index, prompts, cands.flatten(0, 1), conditioning,
                                                       sampler, reward_set, generator, config.batch_size)
        tot_bk = c_tot.reshape(b, k)
        value, j = _best_per_prompt(tot_bk)
        better = value > best_total
        rows = torch.arange(b) * k + j
        if bool(better.any()):
            best_total = torch.where(better, value, best_total)
            best_index[better] = (calls + j)[better]
            best_media[better] = c_media[rows][better]
            best_noise[better] = cands.detach().cpu()[torch.arange(b), j][better]
            for name, v in c_per.items():
                best_scores[name][better] = v[rows][better]
            if config.mode == "zero_order":
                pivot = pivot.clone()
                pivot[better.to(pivot.device)] = cands[torch.arange(b), j][better.to(pivot.device)]
        for jj in range(k):
            trace_total.append(tot_bk[:, jj])
            trace_round.append(torch.full((b,), float(rnd)))
            for name, v in c_per.items():
                trace_per[name].append(v.reshape(b, k)[:, jj])
        for i in range(b):
            all_reasons[i] += c_reasons[i * k : (i + 1) * k]
        calls += k
        if log is not None:
            log(f"search round {rnd}: {calls}/{config.budget} calls, best mean {float(best_total.mean()):.4f}")
    trace_t = torch.stack(trace_total)
    _all_invalid_error("search", prompts, trace_t.T, all_reasons)
    return InferenceResult(
        method="search", prompts=prompts, samples=best_media, noise=best_noise, scores=best_total,
        reward_scores=best_scores, best_index=best_index, initial_samples=media, initial_scores=totals,
        trace={"total": trace_t, **{k: torch.stack(v) for k, v in trace_per.items()}, "round": torch.stack(trace_round)},
        weights={e.label: e.weight for e in reward_set.trained}, reward_calls=calls,
        meta={"budget": config.budget, "mode": config.mode, "neighbors": config.neighbors, "cosine": config.cosine,
              "rounds": rnd},
    )


# ============================================================================ reward guidance
def reward_guided_sample(
    adapter: ModelAdapter,
    prompts: Sequence[str] | str,
    rewards: Any,
    config: GuidanceConfig | None = None,
    sampler: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
    negative_prompts: Sequence[str] | str | None = None,
) -> InferenceResult:
    """Reward guidance: run the adapter's own diffusers pipeline with a
    :class:`~mmalign.rewards.hooks.RewardCallback` that adds ``scale * dR/dx0_hat`` to the latents at
    every (chosen) step, R = ``sum_i w_i R_i`` (a ``weighted_sum`` reward when there are several).

    Image families whose pipeline scheduler the callback can invert (FlowMatchEuler, Euler, DDIM).
    ``initial_samples`` is the unguided ODE sample of the same noise (mmalign's sampler, which matches
    the pipeline); ``trace`` (steps,B) holds the guidance reward of each step's predicted clean sample.
    """
    from ..rewards.combine import load_weighted_sum
    from ..rewards.hooks import RewardCallback

    config = config or GuidanceConfig()
    prompts = check_prompts(prompts)
    negative = check_negative_prompts(negative_prompts, len(prompts))
    sampler = _check_sampler(sampler, "reward_guided_sample")
    if sampler.method != "ode":
        raise ValueError(f"reward guidance runs the pipeline's deterministic sampler: sampler.method must be 'ode', "
                         f"got {sampler.method!r}")
    if adapter.modality != "image":
        raise ValueError(f"reward guidance through the pipeline supports image models, not {adapter.modality}")
    reward_set = _reward_set(rewards)
    entries = reward_set.trained
    not_diff = [e.label for e in entries if not e.reward.differentiable]
    if not_diff and config.scale > 0:
        raise ValueError(f"reward guidance needs differentiable rewards; {', '.join(map(repr, not_diff))} "
                         f"{'is' if len(not_diff) == 1 else 'are'} not")
    if len(entries) == 1 and entries[0].weight == 1.0:
        guide = entries[0].reward
    else:
        guide = load_weighted_sum(rewards=[e.reward for e in entries], weights=[e.weight for e in entries])
    b = len(prompts)
    z = adapter.init_noise(b, generator) if noise is None else _expected_noise(adapter, noise, b)
    metadata = None
    if "metadata" in guide.needs or any("metadata" in e.reward.needs for e in entries):
        metadata = [{"prompt": p, "group_id": i, **{k: v for e in entries for k, v in e.metadata.items()}}
                    for i, p in enumerate(prompts)]
    cb = RewardCallback(guide, prompts, lr=config.scale, guidance_steps=config.guidance_steps,
                        max_grad_norm=config.max_grad_norm, initial_latents=z, adapter=adapter, metadata=metadata)
    guidance = adapter.default_guidance_scale if sampler.guidance_scale is None else sampler.guidance_scale
    kwargs: dict[str, Any] = {"num_inference_steps": sampler.num_steps, "guidance_scale": guidance,
                              "latents": z.clone(), "output_type": "pt", "callback_on_step_end": cb}
    if hasattr(adapter, "image_size"):
        kwargs["height"], kwargs["width"] = adapter.image_size()
    if negative is not None:
        kwargs["negative_prompt"] = negative
    pipe = adapter.pipeline
    pipe.set_progress_bar_config(disable=True)
    with _frozen(pipe, *[e.reward for e in reward_set.entries]):
        guided = pipe(prompts, **kwargs).images.detach().float().cpu()
    plain = sample(adapter, prompts, replace(sampler, record_x0=False), latents=z, generator=generator).samples.cpu()
    media_kwargs = _media_kwargs(adapter)
    total, per, _ = _totals(reward_set.score(guided, prompts, which="trained", **media_kwargs), entries)
    total0, _, _ = _totals(reward_set.score(plain, prompts, which="trained", **media_kwargs), entries)
    steps = cb.scores_by_step()
    return InferenceResult(
        method="reward_guidance", prompts=prompts, samples=guided, noise=z.detach().cpu(), scores=total.detach().cpu(),
        reward_scores={k: v.detach().cpu() for k, v in per.items()},
        best_index=torch.full((b,), max(len(cb.steps) - 1, 0), dtype=torch.long), initial_samples=plain,
        initial_scores=total0.detach().cpu(), trace={"total": steps}, weights={e.label: e.weight for e in entries},
        reward_calls=len(cb.steps) + 1,
        meta={"scale": config.scale, "steps": cb.steps, "num_steps": sampler.num_steps},
    )


METHODS = {"best_of_n": best_of_n, "reno": optimize_noise, "search": search, "reward_guidance": reward_guided_sample}

__all__ = [
    "METHODS",
    "BestOfNConfig",
    "GuidanceConfig",
    "InferenceResult",
    "NoiseOptConfig",
    "SearchConfig",
    "best_of_n",
    "generate_from_noise",
    "noise_neighbors",
    "optimize_noise",
    "reward_guided_sample",
    "search",
]

"""Group-relative advantages (GRPO) from scalar rewards; pure tensor math, float32.

Shapes: ``B`` = the whole gathered batch (every process's samples); ``group_ids`` (B,) long says which
samples share a prompt (a GRPO group). Advantages are computed on the full batch by the caller, then
sliced back per process.

Conventions (documented here once):

* standard deviations are *population* std (``ddof=0``, numpy's default), as in Flow-GRPO's
  per-prompt stat tracker (``np.std``);
* ``eps`` is added to the std (not under a square root): ``(r - mean) / (std + eps)``;
* a group whose rewards are all equal (zero std, or a group of one sample) gets advantage exactly 0,
  whatever ``std`` mode: its centred rewards are 0, and that is enforced exactly rather than left to
  float32 rounding of the group mean;
* NaN / inf rewards raise ``ValueError`` naming the items: a reward model that failed on a sample must
  not silently give it advantage 0.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["group", "global", "none"]
AggregateMode = Literal["sum_then_normalize", "normalize_then_sum"]

__all__ = ["group_advantages", "aggregate_rewards", "group_stats"]


def _check_rewards(rewards: Tensor, name: str = "rewards") -> Tensor:
    """float32 1-D copy of ``rewards``; ValueError naming the non-finite items."""
    if not isinstance(rewards, Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"{name} must be 1-D (B,), got shape {tuple(rewards.shape)}")
    r = rewards.detach().float()
    bad = ~torch.isfinite(r)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        vals = [float(r[i]) for i in idx[:10]]
        more = f" (+{len(idx) - 10} more)" if len(idx) > 10 else ""
        raise ValueError(
            f"{name}: non-finite (NaN/inf) reward at items {idx[:10]}{more}: {vals}; "
            "a failed reward must not silently become advantage 0"
        )
    return r


def _check_group_ids(group_ids: Tensor, n: int) -> Tensor:
    if not isinstance(group_ids, Tensor):
        group_ids = torch.as_tensor(group_ids)
    if group_ids.ndim != 1 or group_ids.shape[0] != n:
        raise ValueError(f"group_ids must have shape ({n},) like rewards, got {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer (long) tensor, got {group_ids.dtype}")
    return group_ids.long()


def group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample statistics of each sample's group: ``(mean, std, constant)``, each (B,).

    rewards:   B    float
    group_ids: B    long; any integer labels (need not be contiguous or sorted)
    returns    mean B, population std B (float32), constant B bool (all rewards of the group equal)
    """
    r = _check_rewards(rewards)
    g = _check_group_ids(group_ids, r.shape[0]).to(r.device)
    _, inv, counts = torch.unique(g, return_inverse=True, return_counts=True)
    k = counts.shape[0]
    cnt = counts.to(r.dtype)
    mean_g = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / cnt
    centred = r - mean_g[inv]
    # population variance of the group: E[(r - mean)^2]  (numpy np.std, ddof=0, as Flow-GRPO's tracker)
    var_g = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, inv, centred**2) / cnt
    hi = torch.full((k,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    lo = torch.full((k,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    return mean_g[inv], var_g.sqrt()[inv], (hi == lo)[inv]


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std: StdMode = "group",
    eps: float = 1e-4,
    clip: float | None = 5.0,
) -> Tensor:
    """GRPO advantages: each reward centred on its group's mean, scaled by a std, then clipped.

    rewards:   B   scalar reward per sample (any float dtype; computed in float32)
    group_ids: B   long, samples of one prompt share an id
    returns    B   float32 advantages, detached (advantages are constants of the policy loss)

    std:  ``"group"``  A = (r - mean_g) / (std_g + eps)      per-group std (DanceGRPO / GRPO)
          ``"global"`` A = (r - mean_g) / (std_all + eps)    std of the whole batch (Flow-GRPO ``global_std``)
          ``"none"``   A = r - mean_g                        (Dr. GRPO-style: no std division)
    clip: advantages clamped to [-clip, clip] (Flow-GRPO ``adv_clip_max`` = 5); ``None`` disables it.

    A group of one sample (or whose rewards are all equal) gets advantage 0 in every mode: it carries
    no relative signal. With ``std="group"`` this is also why a zero-std group does not blow up:
    0 / (0 + eps) = 0.
    Raises ValueError on NaN/inf rewards (naming the items), bad shapes, or an unknown ``std`` mode.
    """
    if std not in ("group", "global", "none"):
        raise ValueError(f"unknown std mode {std!r} (use 'group', 'global' or 'none')")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    r = _check_rewards(rewards)
    mean, std_g, constant = group_stats(r, group_ids)
    # GRPO group-relative baseline: r - mean of its group (Shao et al. 2024, arXiv 2402.03300)
    centred = torch.where(constant, torch.zeros_like(r), r - mean)
    if std == "group":
        adv = centred / (std_g + eps)  # Flow-GRPO / DanceGRPO per-prompt (r - mean) / (std + eps)
    elif std == "global":
        adv = centred / (r.std(unbiased=False) + eps)  # Flow-GRPO global_std: std over the whole batch
    else:
        adv = centred
    adv = torch.where(constant, torch.zeros_like(adv), adv)  # exact 0 even with eps=0 (no 0/0)
    if clip is not None:
        adv = adv.clamp(-clip, clip)  # Flow-GRPO clips advantages to [-adv_clip_max, adv_clip_max]
    return adv


def aggregate_rewards(
    rewards: dict[str, Tensor],
    weights: dict[str, float],
    group_ids: Tensor,
    *,
    mode: AggregateMode = "sum_then_normalize",
    **group_advantages_kwargs,
) -> Tensor:
    """Advantages (B,) of a multi-reward GRPO batch.

    rewards:   name -> B  raw reward of each scorer
    weights:   name -> float  (exactly the same names as ``rewards``; 0 allowed)
    group_ids: B long
    mode:
      ``"sum_then_normalize"``  A = group_advantages(sum_i w_i r_i)  -- Flow-GRPO's public code
                                (its ``multi_score`` weighted ``"avg"`` goes to the stat tracker).
      ``"normalize_then_sum"``  A = clip(sum_i w_i group_advantages_noclip(r_i))  -- decoupled
                                per-reward normalisation (GDPO-style): a reward on a large scale cannot
                                drown the others, each contributes in units of its own group std.
                                Each reward is normalised *without* clipping; the clip (``clip=``,
                                default 5) is applied once to the weighted sum.
    ``group_advantages_kwargs`` (std, eps, clip) go to :func:`group_advantages`.
    Raises ValueError when the names of ``rewards`` and ``weights`` differ (unknown or missing weight),
    on an empty dict, mismatched lengths, or NaN rewards (naming the reward and the items).
    """
    if mode not in ("sum_then_normalize", "normalize_then_sum"):
        raise ValueError(f"unknown mode {mode!r} (use 'sum_then_normalize' or 'normalize_then_sum')")
    if not rewards:
        raise ValueError("aggregate_rewards: no rewards given")
    missing = sorted(set(rewards) - set(weights))
    unknown = sorted(set(weights) - set(rewards))
    if missing or unknown:
        raise ValueError(
            f"aggregate_rewards: reward/weight names differ: no weight for {missing}, "
            f"weight for unknown reward(s) {unknown} (rewards: {sorted(rewards)})"
        )
    checked = {name: _check_rewards(r, name=f"rewards[{name!r}]") for name, r in rewards.items()}
    sizes = {name: r.shape[0] for name, r in checked.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"aggregate_rewards: rewards have different batch sizes {sizes}")
    names = sorted(checked)
    if mode == "sum_then_normalize":
        total = sum(float(weights[n]) * checked[n] for n in names)  # Flow-GRPO multi_score weighted avg
        return group_advantages(total, group_ids, **group_advantages_kwargs)
    clip = group_advantages_kwargs.pop("clip", 5.0)
    per_reward = [group_advantages(checked[n], group_ids, clip=None, **group_advantages_kwargs) for n in names]
    # decoupled normalisation: each reward normalised in its group, then weighted sum (GDPO-style)
    adv = sum(float(weights[n]) * a for n, a in zip(names, per_reward))
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        adv = adv.clamp(-clip, clip)
    return adv

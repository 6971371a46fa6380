"""Pure loss functions of the trainers (GRPO/PPO, DPO family, PRDP, reward-weighted regression, ReNO).

Every function casts its inputs to float32 (bf16 log-ratios overflow; Flow-GRPO computes in float32
too), keeps the autograd graph of the inputs that are meant to be trained, and raises ``ValueError``
naming the offending argument when an input contains NaN. Losses are scalars averaged over the batch;
functions returning ``(loss, stats)`` give detached 0-d float32 tensors in ``stats`` (log them with
``float(v)``).

Shape letters: ``B`` batch, ``S`` denoising steps, ``*L`` any latent layout (``C,H,W``, ``T,C,H,W``, ...).

Which inputs are constants (detached here, so a caller cannot leak gradients into them by accident):
the old / rollout log-probs and the advantages of PPO, the reference-model errors / log-probs of the
DPO losses, the rewards of PRDP, and the weights of reward-weighted regression.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ppo_clip_loss",
    "ratio_normalize",
    "latent_kl",
    "diffusion_dpo_loss",
    "d3po_loss",
    "prdp_loss",
    "rwr_weights",
    "weighted_denoising_loss",
    "reno_regularizer",
    "reno_loss",
    "denoising_loss",
    "flow_matching_target",
    "diffusion_target",
]

Stats = dict[str, Tensor]


# ----------------------------------------------------------------------------- input checks
def _f32(name: str, x: Tensor | float, fn: str) -> Tensor:
    """``x`` as float32 (graph kept); ValueError naming ``name`` if it contains NaN."""
    t = x if isinstance(x, Tensor) else torch.as_tensor(x)
    t = t.float()
    nan = torch.isnan(t.detach())
    if bool(nan.any()):
        where = nan.reshape(nan.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if nan.ndim else []
        at = f" at batch items {where[:10]}" if where else ""
        raise ValueError(f"{fn}: {name} contains NaN{at}")
    return t


def _same_shape(fn: str, **tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{fn}: shapes differ {shapes}")


def _batch_1d(fn: str, **tensors: Tensor) -> None:
    for k, v in tensors.items():
        if v.ndim != 1:
            raise ValueError(f"{fn}: {k} must be 1-D (B,), got shape {tuple(v.shape)}")
    _same_shape(fn, **tensors)


def _positive(fn: str, name: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")


# ----------------------------------------------------------------------------- GRPO / PPO
def ratio_normalize(
    log_ratio: Tensor,
    timestep_ids: Tensor | None = None,
    *,
    divide_std: bool = False,
    target_std: float = 1.0,
    eps: float = 1e-8,
    detach_stats: bool = False,
) -> Tensor:
    """GRPO-Guard's regulated clipping (arXiv 2510.22319): re-centre log pi_theta/pi_old per timestep.

    log_ratio:    B    log pi_theta(x_next|x) - log pi_old(x_next|x) of the samples at one (or several) steps
    timestep_ids: B    long, optional: which denoising step each row belongs to; the statistics are
                       taken per step. ``None``: the whole batch is one step (the usual call, one
                       ``ppo_clip_loss`` per timestep as in Flow-GRPO's inner loop).
    returns       B    float32 normalised log-ratio; exponentiate it to get the regulated ratio.

    What it corrects: for a Gaussian step, log r = eps.(mu_theta - mu_old)/s - ||mu_theta - mu_old||^2 / (2 s^2)
    (s = the step std). The second term is <= 0 and grows like 1/s^2, so as soon as the policy moves,
    the ratio's mean drifts below 1, most at the low-noise (late) steps. The clip window [1-c, 1+c] is
    then one-sided: positive-advantage samples almost never reach 1+c, so over-confident positive
    updates are never clipped (the "implicit over-optimisation" GRPO-Guard reports) while negative ones
    are clipped too often. Subtracting the per-step batch mean puts the log-ratio back at 0 (ratio
    centred on 1); ``divide_std=True`` also rescales each step's log-ratios to std ``target_std``, so one
    clip range means the same thing at every step (its variance otherwise differs by orders of
    magnitude across steps; choose ``clip_range`` on the ``target_std`` scale then).

    The paper removes the drift analytically (adding ||mu_theta - mu_old||^2 / (2 s^2), then scaling by s);
    this is the estimator that needs only log-probs: the batch mean / std of the log-ratio at that step.
    Statistics keep their gradient by default (like the paper's analytic term, which depends on theta);
    ``detach_stats=True`` treats them as constants, so only the clip decision changes.
    A step with a single sample is centred to 0. Population std (ddof=0); ``eps`` floors the std.
    """
    fn = "ratio_normalize"
    lr = _f32("log_ratio", log_ratio, fn)
    if lr.ndim != 1:
        raise ValueError(f"{fn}: log_ratio must be 1-D (B,), got shape {tuple(lr.shape)}")
    _positive(fn, "target_std", target_std)
    if timestep_ids is None:
        inv = torch.zeros(lr.shape[0], dtype=torch.long, device=lr.device)
    else:
        if not isinstance(timestep_ids, Tensor) or timestep_ids.shape != lr.shape:
            raise ValueError(f"{fn}: timestep_ids must be a tensor of shape {tuple(lr.shape)}")
        _, inv = torch.unique(timestep_ids.to(lr.device).long(), return_inverse=True)
    k = int(inv.max()) + 1 if lr.numel() else 0
    stats_src = lr.detach() if detach_stats else lr
    cnt = torch.zeros(k, dtype=lr.dtype, device=lr.device).index_add_(0, inv, torch.ones_like(lr))
    mean = torch.zeros(k, dtype=lr.dtype, device=lr.device).index_add(0, inv, stats_src) / cnt
    centred = lr - mean[inv]  # GRPO-Guard RatioNorm: re-centre the per-step log-ratio at 0 (ratio mean -> 1)
    if not divide_std:
        return centred
    c_src = stats_src - mean[inv]
    var = torch.zeros(k, dtype=lr.dtype, device=lr.device).index_add(0, inv, c_src**2) / cnt
    std = torch.sqrt(var.clamp_min(eps**2))  # clamp, not +eps: no inf gradient of sqrt at 0
    return centred / std[inv] * target_std  # GRPO-Guard: step-consistent ratio scale across timesteps


def ppo_clip_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    *,
    normalize_ratio: bool = False,
    timestep_ids: Tensor | None = None,
    normalize_std: bool = False,
) -> tuple[Tensor, Stats]:
    """PPO clipped surrogate (Schulman et al. 2017) as used by DDPO / Flow-GRPO / DanceGRPO.

    log_prob:     B   log pi_theta of the recorded step under the current parameters (with graph)
    old_log_prob: B   log pi_old recorded at sampling time (detached)
    advantages:   B   (detached)
    clip_range:   c > 0 (Flow-GRPO uses ~1e-4 because its log-probs are averaged over latent dims)
    returns       (loss 0-d, stats)

    ratio = exp(lp - old);  loss = mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))).
    ``normalize_ratio=True`` replaces lp - old by :func:`ratio_normalize` of it (GRPO-Guard; per
    ``timestep_ids`` if given, ``normalize_std`` -> ``divide_std``) before exponentiating.

    stats (detached, 0-d):
      ratio_mean, ratio_max, ratio_min  of the ratio actually clipped (normalised if normalize_ratio)
      clip_frac          fraction of samples where clipping is *active*: the clipped branch wins, so the
                         sample's gradient is exactly 0 (A > 0 and ratio > 1+c, or A < 0 and ratio < 1-c)
      out_of_range_frac  fraction with |ratio - 1| > c whatever the sign of A (what DDPO / Flow-GRPO log
                         as ``clipfrac``)
      approx_kl          mean(0.5 * (lp - old)^2) on the raw log-ratio (DDPO / Flow-GRPO estimator)
      raw_ratio_mean     mean exp(lp - old) before normalisation (only when normalize_ratio)
    """
    fn = "ppo_clip_loss"
    lp = _f32("log_prob", log_prob, fn)
    old = _f32("old_log_prob", old_log_prob, fn).detach()
    adv = _f32("advantages", advantages, fn).detach()
    _batch_1d(fn, log_prob=lp, old_log_prob=old, advantages=adv)
    _positive(fn, "clip_range", clip_range)
    raw = lp - old
    log_ratio = ratio_normalize(raw, timestep_ids, divide_std=normalize_std) if normalize_ratio else raw
    ratio = torch.exp(log_ratio)  # importance ratio pi_theta / pi_old (PPO, arXiv 1707.06347)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()  # PPO-clip: pessimistic max of the two negated surrogates
    with torch.no_grad():
        active = ((adv > 0) & (ratio > 1.0 + clip_range)) | ((adv < 0) & (ratio < 1.0 - clip_range))
        stats: Stats = {
            "ratio_mean": ratio.mean(),
            "ratio_max": ratio.max(),
            "ratio_min": ratio.min(),
            "clip_frac": active.float().mean(),
            "out_of_range_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": (0.5 * raw**2).mean(),  # DDPO/Flow-GRPO approx_kl = 0.5 * mean((lp - old)^2)
        }
        if normalize_ratio:
            stats["raw_ratio_mean"] = torch.exp(raw).mean()
    return loss, {k: v.detach() for k, v in stats.items()}


def latent_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """Flow-GRPO's KL between the policy's and the reference's Gaussian step (same std).

    mean:     B,*L  mean of the policy step (with graph)
    ref_mean: B,*L  mean of the reference step (e.g. the adapter with LoRA disabled)
    std:      0-d or B   the step std s (``StepOutput.std``; sigma_t * sqrt(-dt) for Flow-GRPO), > 0
    returns   B     KL(N(mean, s^2 I) || N(ref_mean, s^2 I)) per sample, *averaged* over latent dims:
                    mean_L((mean - ref_mean)^2) / (2 s^2)

    Averaged, not summed, over the latent dimensions, as the public Flow-GRPO code does (its log-probs
    are averaged too, so beta ~ 0.04 is on that scale); the exact KL is this times the number of
    latent elements. The trainer multiplies by beta and averages over the batch.
    """
    fn = "latent_kl"
    m = _f32("mean", mean, fn)
    r = _f32("ref_mean", ref_mean, fn)
    s = _f32("std", std, fn)
    _same_shape(fn, mean=m, ref_mean=r)
    if m.ndim == 0:
        raise ValueError(f"{fn}: mean must have a batch dimension")
    b = m.shape[0]
    if not (s.ndim == 0 or tuple(s.shape) == (b,)):
        raise ValueError(f"{fn}: std must be 0-d or ({b},), got shape {tuple(s.shape)}")
    if bool((s.detach() <= 0).any()):
        raise ValueError(f"{fn}: std must be > 0 (a deterministic step has no KL)")
    sq = ((m - r) ** 2).reshape(b, -1).mean(dim=1)
    return sq / (2 * s.detach() ** 2)  # Flow-GRPO: ||mu - mu_ref||^2 (mean over dims) / (2 std^2)


# ----------------------------------------------------------------------------- preference losses
def _dpo_stats(inside: Tensor, reward_w: Tensor, reward_l: Tensor) -> Stats:
    with torch.no_grad():
        # Diffusion-DPO public code: acc = P(inside > 0) + 0.5 * P(inside == 0)
        acc = (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()
        return {
            "implicit_acc": acc,
            "reward_margin": inside.mean(),
            "reward_chosen": reward_w.mean(),
            "reward_rejected": reward_l.mean(),
        }


def diffusion_dpo_loss(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float
) -> tuple[Tensor, Stats]:
    """Diffusion-DPO (Wallace et al., arXiv 2311.12908).

    err_w, err_l:         B  per-sample denoising MSE of the policy on the chosen (w) / rejected (l)
                             sample, at a shared (t, noise) per pair (:func:`denoising_loss`):
                             epsilon-MSE for diffusion (beta ~ 5000 for SD), velocity-MSE for flow
                             matching (Flow-DPO, beta ~ 100 in public code)
    ref_err_w, ref_err_l: B  the same for the frozen reference (detached)
    returns (loss 0-d, stats)

    inside = -beta/2 * ((err_w - ref_err_w) - (err_l - ref_err_l));  loss = mean(-log sigmoid(inside)).
    At equal errors inside = 0 and loss = log 2.
    stats: implicit_acc (fraction with inside > 0, ties count 1/2), reward_margin = mean(inside),
    reward_chosen = mean(-beta/2 (err_w - ref_err_w)), reward_rejected likewise for l.
    """
    fn = "diffusion_dpo_loss"
    ew, el = _f32("err_w", err_w, fn), _f32("err_l", err_l, fn)
    rw, rl = _f32("ref_err_w", ref_err_w, fn).detach(), _f32("ref_err_l", ref_err_l, fn).detach()
    _batch_1d(fn, err_w=ew, err_l=el, ref_err_w=rw, ref_err_l=rl)
    _positive(fn, "beta", beta)
    reward_w = -0.5 * beta * (ew - rw)
    reward_l = -0.5 * beta * (el - rl)
    inside = reward_w - reward_l  # Diffusion-DPO eq. 14: -beta/2 [(e_w - e_ref_w) - (e_l - e_ref_l)]
    loss = -F.logsigmoid(inside).mean()
    return loss, _dpo_stats(inside, reward_w, reward_l)


def d3po_loss(
    logp_w: Tensor,
    logp_l: Tensor,
    ref_logp_w: Tensor,
    ref_logp_l: Tensor,
    beta: float,
    *,
    clip_range: float | None = None,
) -> tuple[Tensor, Stats]:
    """D3PO (Yang et al., arXiv 2311.13231): DPO applied at each denoising step of a trajectory pair.

    logp_w, logp_l:         B or B,S  log pi_theta of the preferred / dispreferred trajectory's step(s)
    ref_logp_w, ref_logp_l: same      log pi_ref of the same steps (the sampling-time policy; detached)
    returns (loss 0-d, stats)

    loss = mean over all (pair, step) of -log sigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l))):
    every step is its own DPO term (each step of the pair shares the pair's preference label).
    ``clip_range=c`` (optional, the public code's ``train.eps``) first clamps each per-step ratio
    pi_theta/pi_ref to [1-c, 1+c], i.e. the log-ratio to [log(1-c), log(1+c)]; ``None`` = the paper's
    formula. stats: implicit_acc, reward_margin = mean(inside), reward_chosen/rejected = mean(beta * log-ratio).
    """
    fn = "d3po_loss"
    lw, ll = _f32("logp_w", logp_w, fn), _f32("logp_l", logp_l, fn)
    rw, rl = _f32("ref_logp_w", ref_logp_w, fn).detach(), _f32("ref_logp_l", ref_logp_l, fn).detach()
    _same_shape(fn, logp_w=lw, logp_l=ll, ref_logp_w=rw, ref_logp_l=rl)
    if lw.ndim not in (1, 2):
        raise ValueError(f"{fn}: inputs must be (B,) or (B,S), got {tuple(lw.shape)}")
    _positive(fn, "beta", beta)
    _positive(fn, "clip_range", clip_range, allow_none=True)
    ratio_w, ratio_l = lw - rw, ll - rl
    if clip_range is not None:  # D3PO public code: clamp(exp(lp - ref), 1 - eps, 1 + eps)
        lo, hi = math.log(max(1.0 - clip_range, 1e-12)), math.log(1.0 + clip_range)
        ratio_w, ratio_l = ratio_w.clamp(lo, hi), ratio_l.clamp(lo, hi)
    reward_w, reward_l = beta * ratio_w, beta * ratio_l
    inside = reward_w - reward_l  # D3PO eq. 10: beta * (log pi/pi_ref (w) - log pi/pi_ref (l)) per step
    loss = -F.logsigmoid(inside).mean()
    return loss, _dpo_stats(inside, reward_w, reward_l)


def prdp_loss(
    log_ratio_a: Tensor,
    log_ratio_b: Tensor,
    reward_a: Tensor,
    reward_b: Tensor,
    beta: float,
    clip_range: float | None,
    *,
    old_log_ratio_a: Tensor | None = None,
    old_log_ratio_b: Tensor | None = None,
) -> tuple[Tensor, Stats]:
    """PRDP (Deng et al., arXiv 2402.08714): reward-difference prediction with proximal updates.

    log_ratio_a, log_ratio_b:         B,S  per-step r_t = log pi_theta(x_{t-1}|x_t) - log pi_ref(x_{t-1}|x_t)
                                           of two samples a, b of one prompt (with graph; a B vector is S = 1)
    old_log_ratio_a, old_log_ratio_b: B,S  the same under the sampling policy: log pi_old - log pi_ref
                                           (constants, detached). None (both): zeros, i.e. the reference
                                           *is* the sampling policy and log_ratio = log pi_theta - log pi_old
    reward_a, reward_b:               B    their rewards (detached)
    beta:                             > 0  KL-regularisation strength
    clip_range:                       eps > 0 or None: the per-step proximal clip, see below
    returns (loss 0-d, stats)

    pred      = beta * (sum_s r_s(a) - sum_s r_s(b))
    pred_clip = beta * (sum_s c_s(a) - sum_s c_s(b)),   c_s = old_s + clamp(r_s - old_s, -eps, eps)
    loss      = mean_B max((pred - dr)^2, (pred_clip - dr)^2),   dr = reward_a - reward_b

    That is the paper's eqs. 14 and 16-21: each step's log pi_theta / pi_old (= r_s - old_s) is clipped to
    [-eps, eps] and, as in PPO, the larger of the clipped and unclipped squared errors is minimised (an
    upper bound of the unclipped loss: a step that moved too far still gets a gradient when moving back
    lowers the error). ``clip_range=None``: loss = mean (pred - dr)^2 (eq. 14 without proximal updates).
    The paper writes the error as (pred / beta - dr / beta)^2; this is beta^2 times it (same minimiser):
    the regression of beta * log-ratio difference onto the reward difference.
    stats: pred_mean, target_mean (mean dr), clip_frac (fraction of per-step |r_s - old_s| > eps, of a
    and b; 0 without clipping), clipped_loss_frac (fraction of pairs whose clipped error is the larger:
    their clipped steps pass no gradient), pred_target_corr (Pearson correlation of pred and dr over the
    batch; NaN when B < 2 or either is constant, e.g. pred at the first update when pi_ref = pi_old).
    """
    fn = "prdp_loss"
    la, lb = _f32("log_ratio_a", log_ratio_a, fn), _f32("log_ratio_b", log_ratio_b, fn)
    ra, rb = _f32("reward_a", reward_a, fn).detach(), _f32("reward_b", reward_b, fn).detach()
    if (old_log_ratio_a is None) != (old_log_ratio_b is None):
        raise ValueError(f"{fn}: give both old_log_ratio_a and old_log_ratio_b, or neither")
    if la.ndim == 1:
        la = la.unsqueeze(1)
    if lb.ndim == 1:
        lb = lb.unsqueeze(1)
    if la.ndim != 2:
        raise ValueError(f"{fn}: log_ratio_a must be (B,S) or (B,), got {tuple(log_ratio_a.shape)}")
    _same_shape(fn, log_ratio_a=la, log_ratio_b=lb)
    if old_log_ratio_a is None:
        oa = ob = torch.zeros_like(la.detach())
    else:
        oa = _f32("old_log_ratio_a", old_log_ratio_a, fn).detach().to(la.device).reshape(la.shape[0], -1)
        ob = _f32("old_log_ratio_b", old_log_ratio_b, fn).detach().to(la.device).reshape(lb.shape[0], -1)
        _same_shape(fn, log_ratio_a=la, old_log_ratio_a=oa, old_log_ratio_b=ob)
    _batch_1d(fn, reward_a=ra, reward_b=rb)
    if ra.shape[0] != la.shape[0]:
        raise ValueError(f"{fn}: {ra.shape[0]} rewards for {la.shape[0]} log-ratio rows")
    _positive(fn, "beta", beta)
    _positive(fn, "clip_range", clip_range, allow_none=True)
    target = (ra - rb).to(la.device)
    pred = beta * (la.sum(dim=1) - lb.sum(dim=1))  # PRDP eq. 10-11: beta * (r_hat(a) - r_hat(b)), summed over steps
    err = (pred - target) ** 2  # PRDP eq. 14: squared error against the reward difference
    if clip_range is not None:
        # PRDP eq. 20: each step's log pi_theta/pi_old = r_s - old_s clipped to [-eps, eps] around pi_old
        ca = oa + (la - oa).clamp(-clip_range, clip_range)
        cb = ob + (lb - ob).clamp(-clip_range, clip_range)
        pred_clip = beta * (ca.sum(dim=1) - cb.sum(dim=1))  # eq. 21
        err_clip = (pred_clip - target) ** 2  # eq. 17
        loss = torch.maximum(err, err_clip).mean()  # eq. 18: the larger of the unclipped and clipped errors
        with torch.no_grad():
            clip_frac = torch.cat([(la - oa).abs() > clip_range, (lb - ob).abs() > clip_range]).float().mean()
            clipped_loss_frac = (err_clip > err).float().mean()
    else:
        loss = err.mean()
        clip_frac = clipped_loss_frac = torch.zeros((), device=la.device)
    with torch.no_grad():
        p, t = pred.detach(), target
        pc, tc = p - p.mean(), t - t.mean()
        denom = torch.sqrt((pc**2).sum() * (tc**2).sum())
        corr = (pc * tc).sum() / denom if p.numel() > 1 and float(denom) > 0 else torch.full((), float("nan"), device=p.device)
    stats = {"pred_mean": pred.mean(), "target_mean": target.mean(), "clip_frac": clip_frac,
             "clipped_loss_frac": clipped_loss_frac, "pred_target_corr": corr}
    return loss, {k: v.detach() for k, v in stats.items()}


# ----------------------------------------------------------------------------- reward-weighted regression
def rwr_weights(
    rewards: Tensor,
    *,
    kind: Literal["exp", "normalized", "rank", "topk"] = "exp",
    tau: float = 1.0,
    max_weight: float | None = None,
    top_k: int | None = None,
) -> Tensor:
    """Per-sample weights of reward-weighted regression (LiFT, BATON), mean 1 before capping; detached.

    rewards: B    returns B float32, >= 0
    kind:
      ``"exp"``         w = B * softmax(r / tau) = exp(r / tau) / mean(exp(r / tau)) (stable: max subtracted)
      ``"normalized"``  w = (r - min r) / mean(r - min r): min-shifted rewards scaled to mean 1
                        (the worst sample gets 0); all-equal rewards give all ones. ``tau`` unused.
      ``"rank"``        w = 2 * rank / (B + 1), rank 1 (lowest) .. B (highest), ties share their average
                        rank. ``tau`` unused.
      ``"topk"``        RAFT (arXiv 2304.06767) reward-ranked filtering: w = B / k for the ``top_k`` = k
                        highest rewards, 0 for the rest (equal rewards: the earlier item first). ``tau`` unused.
    max_weight: if given, weights are clamped to it *after* normalisation and not renormalised (so the
                cap really bounds each sample's weight; the mean may then fall below 1).
    """
    fn = "rwr_weights"
    r = _f32("rewards", rewards, fn).detach()
    if r.ndim != 1 or r.numel() == 0:
        raise ValueError(f"{fn}: rewards must be a non-empty 1-D (B,) tensor, got {tuple(r.shape)}")
    if bool(torch.isinf(r).any()):
        raise ValueError(f"{fn}: rewards contain inf")
    _positive(fn, "max_weight", max_weight, allow_none=True)
    b = r.shape[0]
    if kind == "exp":
        _positive(fn, "tau", tau)
        w = b * torch.softmax(r / tau, dim=0)  # RWR (Peters & Schaal 2007): w ∝ exp(r / tau), mean 1
    elif kind == "normalized":
        s = r - r.min()
        w = torch.ones_like(r) if float(s.sum()) == 0.0 else s / s.mean()  # LiFT/BATON-style r normalised
    elif kind == "rank":
        less = (r.unsqueeze(0) < r.unsqueeze(1)).float().sum(dim=1)
        ties = (r.unsqueeze(0) == r.unsqueeze(1)).float().sum(dim=1) - 1
        rank = 1 + less + 0.5 * ties  # average rank, 1-based
        w = 2 * rank / (b + 1)  # rank weights scaled to mean 1 (mean rank = (B+1)/2)
    elif kind == "topk":
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= b:
            raise ValueError(f"{fn}: top_k must be an integer in [1, {b}] for kind 'topk', got {top_k!r}")
        order = torch.sort(r, descending=True, stable=True).indices[:top_k]
        w = torch.zeros_like(r)
        w[order] = b / top_k  # RAFT: keep the k best samples (weights mean 1)
    else:
        raise ValueError(f"{fn}: unknown kind {kind!r} (use 'exp', 'normalized', 'rank' or 'topk')")
    if max_weight is not None:
        w = w.clamp(max=max_weight)
    return w


def weighted_denoising_loss(per_sample_loss: Tensor, weights: Tensor) -> Tensor:
    """Reward-weighted denoising loss: mean_B(w * l) (weights detached: they are constants).

    per_sample_loss: B  (e.g. :func:`denoising_loss`, with graph)   weights: B  (:func:`rwr_weights`)
    returns 0-d
    """
    fn = "weighted_denoising_loss"
    l = _f32("per_sample_loss", per_sample_loss, fn)
    w = _f32("weights", weights, fn).detach()
    _batch_1d(fn, per_sample_loss=l, weights=w)
    return (w * l).mean()  # RWR: E[w(r) * ||model - target||^2]


# ----------------------------------------------------------------------------- ReNO (noise optimisation)
def reno_regularizer(z: Tensor) -> Tensor:
    """ReNO's norm prior on the initial noise (Eyring et al., arXiv 2406.04312).

    z:       B,*L  the optimised initial noise (with graph)
    returns  B     ||z||^2 / 2 - (d - 1) * log ||z||, d = number of elements per sample

    It is -log of the chi density of ||z|| for z ~ N(0, I_d) (up to a constant): minimal at
    ||z|| = sqrt(d - 1), the typical norm of Gaussian noise, so optimised noise stays in-distribution.
    +inf at z = 0.
    """
    fn = "reno_regularizer"
    zf = _f32("z", z, fn)
    if zf.ndim < 1 or zf.shape[0] == 0:
        raise ValueError(f"{fn}: z must be (B,*L), got {tuple(zf.shape)}")
    flat = zf.reshape(zf.shape[0], -1)
    d = flat.shape[1]
    norm = flat.norm(dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm)  # ReNO eq.: ||z||^2/2 - (d-1) log ||z||


def reno_loss(rewards: list[Tensor], weights: list[float], z: Tensor, lam: float) -> Tensor:
    """ReNO objective, averaged over the batch: mean_B(sum_i w_i * (-R_i) + lam * reg(z)).

    rewards: list of B  differentiable rewards R_i(G(z)) (graph kept)
    weights: list of floats, one per reward
    z:       B,*L   lam: >= 0 (ReNO uses ~0.01)
    returns 0-d
    """
    fn = "reno_loss"
    if len(rewards) != len(weights) or not rewards:
        raise ValueError(f"{fn}: need one weight per reward, got {len(rewards)} rewards, {len(weights)} weights")
    if lam < 0:
        raise ValueError(f"{fn}: lam must be >= 0, got {lam}")
    reg = reno_regularizer(z)
    total = lam * reg
    for i, (r, w) in enumerate(zip(rewards, weights)):
        ri = _f32(f"rewards[{i}]", r, fn)
        _batch_1d(fn, **{f"rewards[{i}]": ri, "reg(z)": reg})
        total = total + float(w) * (-ri)  # ReNO: sum_i w_i * (-R_i(G(z))) + lambda * reg(z)
    return total.mean()


# ----------------------------------------------------------------------------- denoising losses and targets
def denoising_loss(model_output: Tensor, target: Tensor, reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """Per-sample MSE of a denoiser: reduce_L (model_output - target)^2.

    model_output, target: B,*L    returns B float32 (``"mean"`` over latent dims, or ``"sum"``)
    """
    fn = "denoising_loss"
    o = _f32("model_output", model_output, fn)
    t = _f32("target", target, fn)
    _same_shape(fn, model_output=o, target=t)
    if o.ndim == 0:
        raise ValueError(f"{fn}: inputs need a batch dimension")
    sq = ((o - t) ** 2).reshape(o.shape[0], -1)
    if reduction == "mean":
        return sq.mean(dim=1)
    if reduction == "sum":
        return sq.sum(dim=1)
    raise ValueError(f"{fn}: unknown reduction {reduction!r} (use 'mean' or 'sum')")


def flow_matching_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Velocity target of rectified flow, diffusers convention: noise - x0 (B,*L, float32).

    x_sigma = (1 - sigma) * x0 + sigma * noise, so d x_sigma / d sigma = noise - x0 (SD3 / FLUX training).
    """
    fn = "flow_matching_target"
    x, n = _f32("x0", x0, fn), _f32("noise", noise, fn)
    _same_shape(fn, x0=x, noise=n)
    return n - x  # rectified flow velocity target (diffusers train_dreambooth_sd3: noise - model_input)


def diffusion_target(
    x0: Tensor,
    noise: Tensor,
    alphas_cumprod_t: Tensor | float,
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
) -> Tensor:
    """Training target of a diffusion denoiser (B,*L, float32).

    x0, noise:        B,*L
    alphas_cumprod_t: float, 0-d or B   alpha_bar_t in (0, 1] of each row's timestep
    prediction_type:  ``"epsilon"`` -> noise;  ``"v_prediction"`` -> sqrt(a) noise - sqrt(1-a) x0
                      (diffusers ``get_velocity``);  ``"sample"`` -> x0
    """
    fn = "diffusion_target"
    x, n = _f32("x0", x0, fn), _f32("noise", noise, fn)
    _same_shape(fn, x0=x, noise=n)
    a = _f32("alphas_cumprod_t", alphas_cumprod_t, fn).to(x.device)
    if a.ndim == 1:
        if x.ndim == 0 or a.shape[0] != x.shape[0]:
            raise ValueError(f"{fn}: alphas_cumprod_t has {a.shape[0]} rows for a batch of shape {tuple(x.shape)}")
        a = a.reshape(-1, *([1] * (x.ndim - 1)))
    elif a.ndim != 0:
        raise ValueError(f"{fn}: alphas_cumprod_t must be a float, 0-d or (B,), got {tuple(a.shape)}")
    if bool(((a <= 0) | (a > 1)).any()):
        raise ValueError(f"{fn}: alphas_cumprod_t must be in (0, 1]")
    if prediction_type == "epsilon":
        return n.clone()  # DDPM: eps-prediction target is the noise
    if prediction_type == "v_prediction":
        return torch.sqrt(a) * n - torch.sqrt(1 - a) * x  # Salimans & Ho 2022 v = sqrt(a) eps - sqrt(1-a) x0
    if prediction_type == "sample":
        return x.clone()
    raise ValueError(f"{fn}: unknown prediction_type {prediction_type!r} (use 'epsilon', 'v_prediction' or 'sample')")

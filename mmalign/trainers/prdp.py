"""PRDP: proximal reward-difference prediction (Deng et al., CVPR 2024, arXiv 2402.08714).

PRDP turns KL-regularised reward maximisation into a regression: for two trajectories a, b of one
prompt, the model's scaled log-likelihood ratio against a reference policy should predict their reward
difference, beta * (r_hat(a) - r_hat(b)) = r(a) - r(b) with r_hat = sum_t log pi_theta(x_t-1|x_t) /
pi_ref(x_t-1|x_t); a model that predicts every difference exactly is the optimum of
E[r] - beta * KL(pi_theta || pi_ref) (the paper's Theorem). It is trained online: samples come from a
snapshot pi_old of the model, refreshed every step, and updates are proximal: each step's log
pi_theta / pi_old is clipped to [-eps, eps] and the larger of the clipped and unclipped squared errors is
minimised (:func:`~mmalign.trainers.losses.prdp_loss`, eqs. 14-21).

One training step:

1. draw ``prompts_per_step`` prompts (the same draw on every process; each takes its slice) and sample
   ``group_size`` SDE trajectories per prompt (:meth:`Trainer.sample_groups`: each group from its own
   generator, the GRPO sampler conventions: the log-prob of every stochastic step is recorded);
2. score them (trained and held-out rewards), gather; the trained rewards' weighted sum, optionally
   normalised per group or over the batch (``reward_norm``), is the regression target's reward;
3. pairs within each group: all ``G (G - 1) / 2`` of them, or ``num_pairs`` distinct random ones per group
   (drawn from a generator seeded by (seed, step, group));
4. ``reference: pretrained`` (the paper): log pi_ref of every recorded transition, once per rollout,
   with the LoRA disabled (or the frozen initial weights under full finetuning); ``reference: sampling``:
   pi_ref = pi_old, the log-ratio is taken against the sampling policy itself;
5. ``num_inner_epochs`` passes over the rollout (several updates on one batch of samples: this is what
   makes it proximal optimisation rather than one regression step), each in ``num_minibatches``
   minibatches of whole groups. Per minibatch, the exact gradient of the PRDP loss is accumulated one
   denoising step at a time: a no-grad pass recomputes every trained step's log pi_theta (the same
   ``micro_batch`` as sampling: before the first update these equal the recorded ones bit for bit, so the
   log-ratio to pi_old is exactly 0), :func:`prdp_loss` on those values gives d loss / d log pi_theta of
   every (row, step); then each step is recomputed with its graph and ``sum(coefficient * log pi_theta)``
   is backpropagated. The sum of those is the gradient of the loss (chain rule), with one step's
   activations in memory instead of every step's, at the price of one extra no-grad forward per step.
   One optimizer update every ``gradient_accumulation_steps`` minibatches.

Scale: ``beta`` multiplies log-ratios on the scale of ``sampler.log_prob_reduction``. This trainer
defaults to ``sum`` (the exact trajectory log-density the paper's derivation needs); with ``mean``
(Flow-GRPO's per-dimension average) the log-ratios are divided by the number of latent elements, so
beta must be that many times larger for the same regularisation, and ``clip_range`` that much smaller.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from ..models.base import Conditioning
from ..samplers import SamplerConfig, log_prob
from ..types import Rollout
from .advantages import aggregate_rewards
from .common import PromptSource, TrainConfig, Trainer, make_generator, tensor_stats
from .losses import prdp_loss


@dataclass
class PRDPConfig:
    """PRDP hyperparameters (the paper: 16 samples per prompt, all pairs, beta 10, several updates per batch)."""

    prompts_per_step: int = 2
    """Prompts per step over all processes (a multiple of the number of processes)."""
    group_size: int = 4
    """Samples per prompt (>= 2: pairs are formed within a prompt's group); the paper uses 8-16."""
    pairs: Literal["all", "random"] = "all"
    """Pairs per group: every pair i < j (the paper's Algorithm 1), or ``num_pairs`` distinct random ones."""
    num_pairs: int = 4
    """Random pairs per group when ``pairs: random`` (at most group_size * (group_size - 1) / 2)."""
    beta: float = 10.0
    """KL-regularisation strength: beta * (log-ratio difference) regresses onto the reward difference (paper: 10;
    on the scale of ``sampler.log_prob_reduction``, see the module docstring)."""
    clip_range: float | None = 1.0
    """Proximal clip eps of each step's log pi_theta / pi_old (paper eq. 20); null = no proximal updates. On
    the scale of ``sampler.log_prob_reduction`` (sum: nats of the whole latent)."""
    reference: Literal["pretrained", "sampling"] = "pretrained"
    """The pi_ref of the log-ratios: ``pretrained`` = the initial model (LoRA disabled / frozen copy): the
    paper's KL-regularised objective, one extra no-grad pass per rollout; ``sampling`` = the snapshot that
    sampled the batch (pi_ref = pi_old: each step regularises towards the previous policy)."""
    reward_norm: Literal["none", "group", "global"] = "none"
    """Reward differences: raw (the paper), divided by the group's reward std, or by the batch's."""
    reward_eps: float = 1e-4
    """Added to the std when ``reward_norm`` divides by it."""
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """Several trained rewards: normalise their weighted sum, or normalise each then sum (``reward_norm``)."""
    num_inner_epochs: int = 4
    """Passes over each rollout batch (the paper makes K gradient updates per sampled batch)."""
    num_minibatches: int = 1
    """Minibatches of whole groups each process splits its rollout into per inner epoch."""
    shuffle: bool = True
    """Shuffle this process's groups before splitting them into minibatches, every inner epoch."""

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "num_pairs", "num_inner_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (PRDP regresses differences of pairs of one prompt), got {self.group_size}")
        if self.pairs == "random" and self.num_pairs > self.group_size * (self.group_size - 1) // 2:
            raise ValueError(f"num_pairs {self.num_pairs} exceeds the {self.group_size * (self.group_size - 1) // 2} "
                             f"distinct pairs of a group of {self.group_size}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.clip_range is not None and not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0 or null, got {self.clip_range}")
        if self.reward_eps < 0:
            raise ValueError(f"reward_eps must be >= 0, got {self.reward_eps}")


@dataclass(kw_only=True)
class PRDPTrainConfig(TrainConfig):
    """``mmalign train`` with ``algorithm: prdp``."""

    algorithm: str = "prdp"
    """Must be ``prdp`` for this config."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(
        method="flow_grpo", num_steps=10, record_x0=False, log_prob_reduction="sum"))
    """Rollout sampler: a stochastic one (flow_grpo / dance / cps for flow models, ddim with eta > 0 / ddpm for
    diffusion models); its guidance is used when sampling and when recomputing log-probs. Default
    ``log_prob_reduction: sum`` (exact densities, as PRDP's derivation assumes)."""
    prdp: PRDPConfig = field(default_factory=PRDPConfig)
    """PRDP hyperparameters."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm != "prdp":
            raise ValueError(f"algorithm must be 'prdp' for a PRDP config, got {self.algorithm!r}")
        s, p = self.sampler, self.prdp
        if s.method == "ode" or (s.method == "ddim" and s.eta == 0):
            raise ValueError(f"sampler.method: PRDP needs a stochastic sampler (flow_grpo, dance or cps for flow models; "
                             f"ddim with eta > 0 or ddpm for diffusion models), got {s.method!r}"
                             + (" with eta 0" if s.method == "ddim" else ""))
        if s.method in ("flow_grpo", "dance", "cps") and s.noise_level == 0 and not getattr(s, "noise_levels", None):
            raise ValueError("sampler.noise_level: 0 makes every step deterministic; PRDP needs trajectory densities")
        if s.group_size != 1:
            raise ValueError("sampler.group_size: set the group size in prdp.group_size (sampler.group_size stays 1)")
        if not s.decode:
            raise ValueError("sampler.decode: rewards score decoded samples; keep it true")
        if s.micro_batch is not None and p.group_size % s.micro_batch:
            raise ValueError(f"prdp.group_size {p.group_size} must be a multiple of sampler.micro_batch {s.micro_batch} "
                             "(sampling chunks then match training chunks exactly)")
        if p.num_minibatches % self.gradient_accumulation_steps:
            raise ValueError(f"prdp.num_minibatches {p.num_minibatches} must be a multiple of gradient_accumulation_steps "
                             f"{self.gradient_accumulation_steps}")


# ============================================================================ shared with other trainers


def score_rollout(trainer: Trainer, rollout: Rollout, step: int) -> tuple[dict[str, Tensor], Tensor, dict[str, Any]]:
    """Score this process's samples with every reward of ``trainer`` and gather the full batch.

    Returns ``(scores, group_ids, metrics)``: the trained rewards' scores ``{label: N}`` over all
    processes (rank order), the group ids (N,), and ``reward/<label>/...``, ``held_out/<label>/...``
    statistics with ``samples``. A sample that a trained reward could not score (NaN, unreadable...)
    raises ValueError on every process naming the sample (index, prompt, group) and the reason.
    """
    adapter = trainer.adapter
    outs = trainer.rewards.score(rollout.samples, rollout.prompts, categories=rollout.meta.get("categories"),
                                 group_ids=rollout.group_ids, fps=adapter.fps, sample_rate=adapter.sample_rate,
                                 num_frames=rollout.meta.get("num_frames"))
    b = rollout.batch_size
    group_ids = trainer.gather(rollout.group_ids)
    metrics: dict[str, Any] = {"samples": int(group_ids.numel())}
    scores: dict[str, Tensor] = {}
    valid = torch.ones(group_ids.numel(), dtype=torch.bool)
    problems: list[str] = []
    for e in trainer.rewards.entries:
        o = outs[e.label]
        s = trainer.gather(o.scores.detach().float().cpu())
        ok = trainer.gather((o.valid & torch.isfinite(o.scores.detach().float().cpu()).to(o.valid.device)).float().cpu()) > 0.5
        kind = "held_out" if e.held_out else "reward"
        metrics.update(tensor_stats(s, f"{kind}/{e.label}"))
        if not bool(ok.all()):
            metrics[f"{kind}/{e.label}/invalid"] = int((~ok).sum())
        if not e.held_out:
            scores[e.label], valid = s, valid & ok
            for i in range(b):
                if not bool(o.valid[i]) or not math.isfinite(float(o.scores[i])):
                    reason = o.reasons[i] if i < len(o.reasons) and o.reasons[i] else f"score {float(o.scores[i])}"
                    problems.append(f"sample {trainer.rank * b + i} (prompt {rollout.prompts[i]!r}, group "
                                    f"{int(rollout.group_ids[i])}): {e.label}: {reason}")
    if not bool(valid.all()):
        bad = int((~valid).sum())
        shown = "; ".join(problems[:5]) or "on another process: " + ", ".join(
            f"sample {i}" for i in (~valid).nonzero().flatten().tolist()[:5])
        raise ValueError(f"step {step + 1}: {bad} of {valid.numel()} samples have no valid trained reward ({shown}); "
                         "fix or drop the reward (a sample without a reward cannot be regressed or weighted)")
    return scores, group_ids, metrics


def mean_finite(values: Sequence[float]) -> float | None:
    """Mean of the finite values, None when there is none."""
    v = [x for x in values if math.isfinite(x)]
    return sum(v) / len(v) if v else None


# ============================================================================ the trainer


class PRDPTrainer(Trainer):
    """PRDP (see the module docstring): ``PRDPTrainer(load_train_config("configs/train_prdp_embedded.yaml")).fit()``."""

    config_class = PRDPTrainConfig

    # ------------------------------------------------------------------ setup
    def check_setup(self, rewards: Sequence[Any] | None) -> None:
        cfg, p = self.cfg, self.cfg.prdp
        if not (cfg.rewards if rewards is None else rewards):
            raise ValueError("rewards: PRDP needs at least one trained reward, e.g. rewards: [{name: pickscore}]")
        if p.prompts_per_step % self.world_size:
            raise ValueError(f"prdp.prompts_per_step {p.prompts_per_step} must be a multiple of the number of processes {self.world_size}")
        groups = p.prompts_per_step // self.world_size
        if groups % p.num_minibatches:
            raise ValueError(f"{groups} groups per process do not split into prdp.num_minibatches={p.num_minibatches} "
                             "(minibatches hold whole groups: pairs are within a group)")
        if cfg.sampler.micro_batch is None:
            self.log("sampler.micro_batch is null: denoiser batches differ between sampling and training, so log-ratios "
                     "to the sampling policy start ~1e-7 away from 0 (set sampler.micro_batch for exact ones)")
        self.prompt_source = PromptSource(cfg.prompts)

    def updates_per_step(self) -> int:
        p = self.cfg.prdp
        return p.num_inner_epochs * p.num_minibatches // self.cfg.gradient_accumulation_steps

    # ------------------------------------------------------------------ pieces of a step
    def group_pairs(self, step: int, group_ids: Sequence[int]) -> list[list[tuple[int, int]]]:
        """The pairs (i, j), i < j, indices within the group, of each group (one list per group id)."""
        p = self.cfg.prdp
        every = [(i, j) for i in range(p.group_size) for j in range(i + 1, p.group_size)]
        if p.pairs == "all":
            return [every for _ in group_ids]
        out = []
        for gid in group_ids:
            pick = torch.randperm(len(every), generator=make_generator(self.cfg.seed, "pairs", step, int(gid)))[: p.num_pairs]
            out.append(sorted(every[i] for i in pick.tolist()))
        return out

    def pair_rewards(self, scores: dict[str, Tensor], group_ids: Tensor) -> Tensor:
        """The reward each sample contributes to pair differences (N,): the trained rewards' weighted sum,
        centred per group (differences are unchanged) and divided by a std when ``reward_norm`` says so."""
        p = self.cfg.prdp
        weights = {e.label: e.weight for e in self.rewards.trained}
        std = {"none": "none", "group": "group", "global": "global"}[p.reward_norm]
        return aggregate_rewards(scores, weights, group_ids, mode=p.reward_aggregation, std=std, eps=p.reward_eps, clip=None)

    def minibatch_gradient(
        self, sub: Rollout, cond: Conditioning, base_log_probs: Tensor, rewards: Tensor, pairs: Tensor,
        steps: list[int], sampler: SamplerConfig,
    ) -> dict[str, float]:
        """Accumulate the gradient of the PRDP loss of one minibatch (``self.backward``), one step at a time.

        sub:            the minibatch's rows (whole groups), b rows
        base_log_probs: b,S  log pi_ref of the recorded transitions at ``steps`` (= the recorded log pi_old
                        when the reference is the sampling policy)
        rewards:        b    each row's (normalised) reward
        pairs:          P,2  long row indices into the minibatch
        Returns the loss and its statistics at the weights before this minibatch's backward.
        """
        p = self.cfg.prdp
        dev = self.adapter.device
        old = sub.log_probs[:, steps].to(dev).float()
        base = base_log_probs.to(dev).float()
        # pass 1: values of every trained step under the current weights, no graph
        with torch.no_grad(), self.autocast():
            cur = log_prob(self.adapter, sub, steps, conditioning=cond, config=sampler).log_probs.float()
        leaf = (cur - base).detach().requires_grad_(True)  # r_t = log pi_theta - log pi_ref, per (row, step)
        ia, ib = pairs[:, 0].to(dev), pairs[:, 1].to(dev)
        old_ratio = old - base  # log pi_old - log pi_ref (0 when the reference is the sampling policy)
        r = rewards.to(dev)
        with torch.enable_grad():
            loss, stats = prdp_loss(leaf[ia], leaf[ib], r[ia], r[ib], p.beta, p.clip_range,
                                    old_log_ratio_a=old_ratio[ia], old_log_ratio_b=old_ratio[ib])
            (coeff,) = torch.autograd.grad(loss, leaf)  # d loss / d log pi_theta(row, step)
        # pass 2: each step with its graph; sum_t coeff_t * log pi_theta_t has the loss's gradient
        for j, k in enumerate(steps):
            c = coeff[:, j]
            if not bool((c != 0).any()):  # every pair's clipped branch won and this step is clipped everywhere
                continue
            with self.autocast():
                new = log_prob(self.adapter, sub, [k], conditioning=cond, config=sampler)
            self.backward((c.detach() * new.log_probs[:, 0].float()).sum())
        dev_old = (cur - old).abs()
        return {"loss": float(loss.detach()), "pred_mean": float(stats["pred_mean"]), "target_mean": float(stats["target_mean"]),
                "clip_frac": float(stats["clip_frac"]), "clipped_loss_frac": float(stats["clipped_loss_frac"]),
                "pred_target_corr": float(stats["pred_target_corr"]),
                "log_ratio_abs_mean": float(dev_old.mean()), "log_ratio_abs_max": float(dev_old.max())}

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict[str, Any]:
        cfg, p, adapter = self.cfg, self.cfg.prdp, self.adapter
        sampler = dataclasses.replace(cfg.sampler, group_size=p.group_size)

        # 1. rollouts: the global prompt draw is the same everywhere; this process samples its slice
        drawn = self.prompt_source.draw(p.prompts_per_step, make_generator(cfg.seed, "prompts", step))
        local, _ = self.shard([(i, c, q) for i, (c, q) in enumerate(drawn)])
        rollout = self.sample_groups(step, local, sampler)
        b, g = rollout.batch_size, p.group_size
        steps = [k for k in range(rollout.num_steps) if bool(rollout.stochastic[k])]

        # 2. rewards of the full batch (gathered), this process's slice
        scores, group_ids, metrics = score_rollout(self, rollout, step)
        rewards_all = self.pair_rewards(scores, group_ids)
        rewards = rewards_all[self.rank * b: (self.rank + 1) * b]

        # 3. pairs within each local group (row indices local to the group)
        local_gids = [int(gid) for gid, _, _ in local]
        pairs_per_group = self.group_pairs(step, local_gids)
        n_pairs = sum(len(x) for x in pairs_per_group)
        diffs = torch.tensor([float(rewards[gi * g + i] - rewards[gi * g + j])
                              for gi, prs in enumerate(pairs_per_group) for i, j in prs])
        metrics.update({"pairs": n_pairs * self.world_size, "timesteps": len(steps),
                        "reward_diff_abs_mean": float(diffs.abs().mean())})

        # 4. conditioning as when sampling; the reference's log-probs of every recorded transition
        with torch.no_grad(), self.autocast():
            cond_all = adapter.encode_in_chunks(rollout.prompts, rollout.negative_prompts, rollout.meta["guidance_scale"], sampler.micro_batch)
        if p.reference == "pretrained":
            with self.reference(), self.autocast():
                base_all = log_prob(adapter, rollout, steps, conditioning=cond_all, config=sampler).log_probs.float().cpu()
            kl = (rollout.log_probs[:, steps].float().cpu() - base_all).sum(dim=1)  # sum_t log pi_old / pi_ref of samples of pi_old
            metrics["kl_ref"] = float(self.gather(kl).mean())
        else:
            base_all = rollout.log_probs[:, steps].float().cpu()

        # 5. inner epochs over minibatches of whole groups
        n_groups = b // g
        per_mb = n_groups // p.num_minibatches
        sums: dict[str, list[float]] = defaultdict(list)
        corr_last: list[float] = []
        first_dev, updates = 0.0, []
        for epoch in range(p.num_inner_epochs):
            order = (torch.randperm(n_groups, generator=make_generator(cfg.seed, "shuffle", step, epoch, self.rank))
                     if p.shuffle else torch.arange(n_groups)).tolist()
            for m in range(p.num_minibatches):
                chosen = order[m * per_mb: (m + 1) * per_mb]
                rows = torch.tensor([gi * g + i for gi in chosen for i in range(g)], dtype=torch.long)
                pairs = torch.tensor([(n * g + i, n * g + j) for n, gi in enumerate(chosen) for i, j in pairs_per_group[gi]],
                                     dtype=torch.long)
                stats = self.minibatch_gradient(rollout.select(rows), cond_all.select(rows), base_all[rows], rewards[rows],
                                                pairs, steps, sampler)
                if not updates:  # before the first update: the recomputed log-probs must equal the recorded ones
                    first_dev = max(first_dev, stats["log_ratio_abs_max"])
                for key, v in stats.items():
                    if key != "pred_target_corr":
                        sums[key].append(v)
                if epoch == p.num_inner_epochs - 1:
                    corr_last.append(stats["pred_target_corr"])
                self._accum += 1
                if self._accum % cfg.gradient_accumulation_steps == 0:
                    updates.append(self.optimizer_step())
        agg = {k: (max(v) if k.endswith("_max") else sum(v) / len(v)) for k, v in sums.items()}
        agg["first_log_ratio_max_dev"] = first_dev
        agg["grad_norm"] = sum(u["grad_norm"] for u in updates) / len(updates)
        corr = mean_finite(corr_last)
        metrics.update(self.mean_over_processes(agg))
        if corr is not None:  # undefined while every prediction is equal (e.g. the first epoch with reference: sampling)
            metrics["pred_target_corr"] = corr
        metrics["lr"] = updates[0]["lr"]
        metrics["updates"] = len(updates)
        return metrics

"""GRPO for flow and diffusion models: Flow-GRPO (arXiv 2505.05470), DanceGRPO (arXiv 2505.07818),
DDPO-style diffusion GRPO, Flow-GRPO-Fast / MixGRPO windows and GRPO-Guard ratio normalisation.

One training step:

1. draw ``prompts_per_step`` prompts (the same draw on every process; each takes its slice) and sample
   ``group_size`` trajectories per prompt with the SDE sampler (each group from its own seeded
   generator, so rows do not depend on how prompts are split over processes);
2. score every sample with the trained rewards (and the held-out ones, only logged);
3. gather rewards and group ids from all processes, compute group advantages on the full batch
   (:func:`~mmalign.trainers.advantages.aggregate_rewards`), take this process's slice;
4. ``num_inner_epochs`` passes over the rollout in ``num_minibatches`` minibatches: for each trained
   timestep, recompute the log-prob of the recorded transition under the current weights
   (:func:`mmalign.samplers.log_prob`, same ``micro_batch`` and guidance as sampling, so the first
   ratio is exactly 1), PPO clipped loss (:func:`~mmalign.trainers.losses.ppo_clip_loss`) plus
   ``beta`` times the latent-mean KL to the reference policy (:func:`~mmalign.trainers.losses.latent_kl`,
   reference = LoRA disabled), backward per timestep; one optimizer update every
   ``gradient_accumulation_steps`` minibatches.

Partial chains (InstructVideo, arXiv 2312.12490): with ``sampler.start_step: k0`` and
``grpo.partial_chain_dataset``, each step draws records ``{prompt, image|video}`` from the dataset, encodes
their media with the frozen VAE, noises them to step k0 and samples only the last ``num_steps - k0``
steps: rollouts cost about ``(num_steps - k0) / num_steps`` of whole chains, and every recorded step
is trainable as usual.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import torch
from torch import Tensor

from ..models.base import Conditioning
from ..samplers import SamplerConfig, log_prob, random_sde_window
from ..types import Rollout
from .advantages import aggregate_rewards
from .common import PromptSource, TrainConfig, Trainer, decoded_media_shape, fit_media, make_generator, read_media_dataset, tensor_stats
from .losses import latent_kl, ppo_clip_loss


@dataclass
class GRPOConfig:
    """GRPO hyperparameters (defaults: Flow-GRPO's, except the group size)."""

    prompts_per_step: int = 2
    """Prompts per step over all processes (a multiple of the number of processes)."""
    group_size: int = 4
    """Samples per prompt (a GRPO group); Flow-GRPO uses 16-24."""
    num_inner_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 1
    """Minibatches each process splits its rollout into per inner epoch (rows per minibatch must be a
    multiple of sampler.micro_batch)."""
    shuffle: bool = True
    """Shuffle this process's rows before splitting them into minibatches, every inner epoch."""
    clip_range: float = 1e-4
    """PPO clip range (Flow-GRPO 1e-4: its log-probs are averaged over latent dimensions)."""
    normalize_ratio: bool = False
    """GRPO-Guard: re-centre each timestep's log-ratios on 0 before clipping."""
    beta: float = 0.0
    """Weight of the KL to the reference policy in latent-mean space (Flow-GRPO 0.04; DanceGRPO 0)."""
    adv_std: Literal["group", "global", "none"] = "group"
    """Advantage scale: the group's std, the whole batch's std (Flow-GRPO global_std), or none."""
    adv_eps: float = 1e-4
    """Added to the std of the advantage denominator."""
    adv_clip: float | None = 5.0
    """Clip advantages to [-adv_clip, adv_clip]; null = no clipping."""
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """Several rewards: normalise their weighted sum (Flow-GRPO), or normalise each then sum (GDPO-style)."""
    timestep_fraction: float = 1.0
    """Train on a random subset of this fraction of the stochastic steps each step (1: all of them)."""
    sde_window_size: int | None = None
    """Flow-GRPO-Fast / MixGRPO: a random window of this many SDE steps per training step (ODE
    elsewhere; only window steps are trained). null = ``sampler.sde_window`` (fixed) or every step."""
    sde_window_max_start: int | None = None
    """Latest start step of the random window; null = any start that fits."""
    on_invalid_reward: Literal["raise", "zero_advantage"] = "raise"
    """A sample a trained reward could not score: stop with its reason, or give it advantage 0 (its
    reward then taken as its group's mean of the valid ones)."""
    partial_chain_dataset: str | None = None
    """With ``sampler.start_step > 0`` (InstructVideo partial chains): a JSONL file of
    ``{"prompt": ..., "image"|"video": path[, "category": ...]}`` lines (paths relative to the file);
    each step's prompts are drawn from it and their groups start from its media noised to
    ``start_step``. Media must have the model's frame count; frames are resized to its size."""

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "group_size", "num_inner_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.clip_range <= 0:
            raise ValueError(f"clip_range must be > 0, got {self.clip_range}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.adv_eps < 0:
            raise ValueError(f"adv_eps must be >= 0, got {self.adv_eps}")
        if self.adv_clip is not None and self.adv_clip <= 0:
            raise ValueError(f"adv_clip must be > 0 or null, got {self.adv_clip}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.sde_window_size is not None and self.sde_window_size < 1:
            raise ValueError(f"sde_window_size must be >= 1 or null, got {self.sde_window_size}")
        if self.sde_window_max_start is not None and self.sde_window_max_start < 0:
            raise ValueError(f"sde_window_max_start must be >= 0 or null, got {self.sde_window_max_start}")


@dataclass(kw_only=True)
class GRPOTrainConfig(TrainConfig):
    """``mmalign train`` with ``algorithm: grpo``."""

    algorithm: str = "grpo"
    """Must be ``grpo`` for this config."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="flow_grpo", num_steps=10, record_x0=False))
    """Rollout sampler: flow_grpo / dance / cps (flow models) or ddim with eta > 0 / ddpm (diffusion).
    Its guidance_scale is used when sampling *and* when recomputing log-probs (CFG on or off at training)."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """GRPO hyperparameters."""
    supports_partial_chain: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        expected = type(self).__dataclass_fields__["algorithm"].default  # "grpo" here; subclasses set their own
        if self.algorithm != expected:
            raise ValueError(f"algorithm must be {expected!r} for a {type(self).__name__}, got {self.algorithm!r}")
        s, g = self.sampler, self.grpo
        if s.method == "ode" or (s.method == "ddim" and s.eta == 0):
            raise ValueError(f"sampler.method: GRPO needs a stochastic sampler (flow_grpo, dance or cps for flow models; "
                             f"ddim with eta > 0 or ddpm for diffusion models), got {s.method!r}"
                             + (" with eta 0" if s.method == "ddim" else ""))
        if s.start_step > 0 and not g.partial_chain_dataset:
            raise ValueError(f"sampler.start_step {s.start_step}: a partial chain starts from clean media; set "
                             "grpo.partial_chain_dataset (a JSONL of {prompt, image|video} lines)")
        if g.partial_chain_dataset and s.start_step == 0:
            raise ValueError("grpo.partial_chain_dataset is used only by partial chains: set sampler.start_step > 0")
        if s.method in ("flow_grpo", "dance", "cps") and s.noise_level == 0:
            raise ValueError("sampler.noise_level: 0 makes every step deterministic; GRPO needs noise")
        if s.group_size != 1:
            raise ValueError("sampler.group_size: set the group size in grpo.group_size (sampler.group_size stays 1)")
        if not s.decode:
            raise ValueError("sampler.decode: rewards score decoded samples; keep it true")
        if g.sde_window_size is not None:
            if s.sde_window is not None:
                raise ValueError("give either sampler.sde_window (a fixed window) or grpo.sde_window_size (a random one), not both")
            if g.sde_window_size > s.num_steps - s.start_step:
                raise ValueError(f"grpo.sde_window_size {g.sde_window_size} exceeds the {s.num_steps - s.start_step} sampled steps "
                                 f"(sampler.num_steps {s.num_steps}, start_step {s.start_step})")
        if s.micro_batch is not None and g.group_size % s.micro_batch:
            raise ValueError(f"grpo.group_size {g.group_size} must be a multiple of sampler.micro_batch {s.micro_batch} "
                             "(sampling chunks then match training chunks exactly)")
        if g.num_minibatches % self.gradient_accumulation_steps:
            raise ValueError(f"grpo.num_minibatches {g.num_minibatches} must be a multiple of gradient_accumulation_steps "
                             f"{self.gradient_accumulation_steps}")


class GRPOTrainer(Trainer):
    """Flow-GRPO / DanceGRPO / diffusion GRPO (see the module docstring).

    ``GRPOTrainer(load_train_config("configs/train_grpo_tiny.yaml")).fit()``; metrics per step in
    ``history`` and ``<out>/metrics.jsonl``.
    """

    config_class = GRPOTrainConfig

    # ------------------------------------------------------------------ setup checks
    def check_setup(self, rewards: Sequence[Any] | None) -> None:
        cfg, g = self.cfg, self.cfg.grpo
        if not (cfg.rewards if rewards is None else rewards):
            raise ValueError("rewards: GRPO needs at least one trained reward, e.g. rewards: [{name: pickscore}]")
        if g.prompts_per_step % self.world_size:
            raise ValueError(f"grpo.prompts_per_step {g.prompts_per_step} must be a multiple of the number of processes {self.world_size}")
        rows = g.prompts_per_step // self.world_size * g.group_size
        if rows % g.num_minibatches:
            raise ValueError(f"{rows} rollout rows per process do not split into grpo.num_minibatches={g.num_minibatches}")
        mb, micro = rows // g.num_minibatches, cfg.sampler.micro_batch
        if micro is not None and mb % micro:
            raise ValueError(f"minibatches of {mb} rows are not a multiple of sampler.micro_batch {micro}: the first "
                             "ratio would not be exactly 1 (change grpo.num_minibatches or sampler.micro_batch)")
        if micro is None:
            self.log("sampler.micro_batch is null: denoiser batches differ between sampling and training, so PPO "
                     "ratios start ~1e-7 away from 1 (set sampler.micro_batch for bit-exact ratios)")
        self.prompt_source = PromptSource(cfg.prompts)

    def setup(self) -> None:
        self.chain_records = None
        if self.cfg.sampler.start_step > 0:
            self.chain_records = read_media_dataset(self.cfg.grpo.partial_chain_dataset, self.adapter.modality,
                                                    "grpo.partial_chain_dataset")
            self.log(f"partial chains from step {self.cfg.sampler.start_step} of {self.cfg.sampler.num_steps}: "
                     f"{len(self.chain_records)} records from {self.cfg.grpo.partial_chain_dataset}")
            self._media_size = decoded_media_shape(self.adapter)

    def updates_per_step(self) -> int:
        g = self.cfg.grpo
        return g.num_inner_epochs * g.num_minibatches // self.cfg.gradient_accumulation_steps

    # ------------------------------------------------------------------ pieces of a step
    def step_sampler(self, step: int) -> SamplerConfig:
        """The sampler of step ``step``: the group size, and the random SDE window when configured."""
        s, g = self.cfg.sampler, self.cfg.grpo
        s = dataclasses.replace(s, group_size=g.group_size)
        if g.sde_window_size is not None:
            window = random_sde_window(s.num_steps, g.sde_window_size, make_generator(self.cfg.seed, "sde_window", step),
                                       max_start=g.sde_window_max_start, min_start=s.start_step)
            s = dataclasses.replace(s, sde_window=window)
        return s

    def trained_timesteps(self, stochastic: Tensor, step: int) -> list[int]:
        """Stochastic steps trained at ``step``: all, or a random ``timestep_fraction`` of them (the same
        subset on every process)."""
        steps = [k for k in range(len(stochastic)) if bool(stochastic[k])]
        frac = self.cfg.grpo.timestep_fraction
        if frac < 1 and len(steps) > 1:
            n = max(1, round(frac * len(steps)))
            pick = torch.randperm(len(steps), generator=make_generator(self.cfg.seed, "timesteps", step))[:n]
            steps = sorted(steps[i] for i in pick.tolist())
        return steps

    def advantages(self, scores: dict[str, Tensor], valid: Tensor, group_ids: Tensor, reasons: list[str]) -> Tensor:
        """Advantages of the full (gathered) batch from the trained rewards' scores."""
        g = self.cfg.grpo
        if not bool(valid.all()):
            bad = int((~valid).sum())
            if g.on_invalid_reward == "raise":
                shown = "; ".join(reasons[:5]) or "see the other processes"
                raise ValueError(f"step {self.step + 1}: {bad} of {valid.numel()} samples were not scored by a trained reward "
                                 f"({shown}); set grpo.on_invalid_reward=zero_advantage to train on the rest")
            filled = {}
            for label, s in scores.items():
                s = s.clone()
                for gid in group_ids.unique():
                    rows = group_ids == gid
                    ok = rows & valid
                    s[rows & ~valid] = s[ok].mean() if bool(ok.any()) else 0.0
                filled[label] = s
            scores = filled
        weights = {e.label: e.weight for e in self.rewards.trained}
        adv = aggregate_rewards(scores, weights, group_ids, mode=g.reward_aggregation, std=g.adv_std, eps=g.adv_eps, clip=g.adv_clip)
        return torch.where(valid, adv, torch.zeros_like(adv))

    def score_samples(self, rollout: Rollout) -> tuple[dict[str, Tensor], Tensor, Tensor, list[str], dict[str, Any]]:
        """Score this process's final samples with every reward and gather the full batch.

        Returns ``(scores, valid, group_ids, reasons, metrics)``: the trained rewards' scores
        ``{label: B}`` and their validity (B,) bool, the group ids (B,), the reasons of invalid scores,
        and the reward metrics (``reward/<label>/...``, ``held_out/<label>/...``, ``samples``).
        """
        outs = self.rewards.score(rollout.samples, rollout.prompts, categories=rollout.meta["categories"],
                                  group_ids=rollout.group_ids, fps=self.adapter.fps, sample_rate=self.adapter.sample_rate,
                                  num_frames=rollout.meta.get("num_frames"))
        group_ids = self.gather(rollout.group_ids)
        metrics: dict[str, Any] = {"samples": int(group_ids.numel())}
        scores, valid = {}, torch.ones(group_ids.numel(), dtype=torch.bool)
        for e in self.rewards.entries:
            o = outs[e.label]
            s = self.gather(o.scores.detach().float().cpu())
            ok = self.gather(o.valid.float().cpu()) > 0.5
            metrics.update(tensor_stats(s, f"{'held_out' if e.held_out else 'reward'}/{e.label}"))
            if not bool(ok.all()):
                metrics[f"{'held_out' if e.held_out else 'reward'}/{e.label}/invalid"] = int((~ok).sum())
            if not e.held_out:
                scores[e.label], valid = s, valid & ok
        reasons = [f"{e.label}: {r}" for e in self.rewards.trained for r in outs[e.label].reasons if r is not None]
        return scores, valid, group_ids, reasons, metrics

    def step_advantages(self, step: int, rollout: Rollout, sampler: SamplerConfig, steps: list[int],
                        conditioning: Conditioning) -> tuple[Tensor, dict[str, Any]]:
        """Advantages of this process's rows at every step, (b, K), and the step's reward metrics.

        GRPO: the group advantage of each sample's final reward, the same at every step (broadcast).
        Only the columns of the trained ``steps`` are used; ``conditioning`` is the rollout's encoded
        prompts (for subclasses that run the model, e.g. DenseGRPO's per-step completions).
        """
        scores, valid, group_ids, reasons, metrics = self.score_samples(rollout)
        adv_all = self.advantages(scores, valid, group_ids, reasons)
        metrics["advantage/abs_mean"] = float(adv_all.abs().mean())
        b = rollout.batch_size
        adv = adv_all[self.rank * b: (self.rank + 1) * b].to(self.adapter.device)
        return adv[:, None].expand(b, rollout.num_steps), metrics

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict[str, Any]:
        cfg, g, adapter = self.cfg, self.cfg.grpo, self.adapter
        sampler = self.step_sampler(step)

        # 1. rollouts: the global prompt draw is the same everywhere; this process samples its slice
        if self.chain_records is None:
            drawn = self.prompt_source.draw(g.prompts_per_step, make_generator(cfg.seed, "prompts", step))
            local, _ = self.shard([(i, c, p) for i, (c, p) in enumerate(drawn)])
            rollout = self.sample_groups(step, local, sampler)
        else:
            rollout = self.sample_partial_chains(step, sampler)
        b = rollout.batch_size
        steps = self.trained_timesteps(rollout.stochastic, step)
        with torch.no_grad(), self.autocast():  # encoded exactly as when sampling (same chunks, same guidance)
            cond_all = adapter.encode_in_chunks(rollout.prompts, rollout.negative_prompts, rollout.meta["guidance_scale"], sampler.micro_batch)

        # 2. rewards on this process's samples; 3. gather, advantages on the full batch, take our slice (b, K)
        adv, metrics = self.step_advantages(step, rollout, sampler, steps, cond_all)

        # 4. PPO updates on recomputed log-probs of the trained timesteps
        metrics["timesteps"] = len(steps)
        if sampler.sde_window is not None:
            metrics["sde_window_start"] = sampler.sde_window[0]
        mb = b // g.num_minibatches
        sums: dict[str, list[float]] = defaultdict(list)
        first_dev, updates = 0.0, []
        for epoch in range(g.num_inner_epochs):
            order = (torch.randperm(b, generator=make_generator(cfg.seed, "shuffle", step, epoch, self.rank))
                     if g.shuffle else torch.arange(b))
            for m in range(g.num_minibatches):
                rows = order[m * mb: (m + 1) * mb]
                sub, cond, adv_mb = rollout.select(rows), cond_all.select(rows), adv[rows.to(adv.device)]
                for k in steps:
                    loss, stats = self.timestep_loss(sub, cond, adv_mb[:, k], k, sampler)
                    self.backward(loss, scale=1.0 / len(steps))
                    for key, v in stats.items():
                        sums[key].append(v)
                    if not updates:  # before the first update: the recomputed log-probs must equal the recorded ones
                        first_dev = max(first_dev, stats["ratio_max_dev"])
                self._accum += 1
                if self._accum % cfg.gradient_accumulation_steps == 0:
                    updates.append(self.optimizer_step())
        agg = {k: (max(v) if k.endswith("_max") or k.endswith("_dev") else sum(v) / len(v)) for k, v in sums.items()}
        agg["first_ratio_max_dev"] = first_dev
        agg["grad_norm"] = sum(u["grad_norm"] for u in updates) / len(updates)
        metrics.update(self.mean_over_processes(agg))
        metrics["lr"] = updates[0]["lr"]
        metrics["updates"] = len(updates)
        return metrics

    def sample_partial_chains(self, step: int, sampler: SamplerConfig) -> Rollout:
        """This process's groups of a partial-chain step: records drawn from the dataset (the same draw on
        every process), their media encoded and noised to ``sampler.start_step``, then sampled from there."""
        n, want = len(self.chain_records), self.cfg.grpo.prompts_per_step
        gen = make_generator(self.cfg.seed, "prompts", step)
        idx = torch.randperm(n, generator=gen)[:want] if want <= n else torch.randint(0, n, (want,), generator=gen)
        local, _ = self.shard(list(enumerate(idx.tolist())))
        recs = [self.chain_records[i] for _, i in local]
        media = torch.stack([fit_media(r, self.adapter.modality, self._media_size) for r in recs])
        with torch.no_grad(), self.autocast():
            clean = self.adapter.encode_media(media.to(self.adapter.device)).float()
        return self.sample_groups(step, [(gi, r.category, r.prompt) for (gi, _), r in zip(local, recs)], sampler,
                                  clean_latents=clean)

    def timestep_loss(self, sub, cond, adv: Tensor, k: int, sampler: SamplerConfig) -> tuple[Tensor, dict[str, float]]:
        """PPO clipped loss (+ beta * KL to the reference) of the minibatch ``sub`` at step ``k``."""
        g = self.cfg.grpo
        with self.autocast():
            new = log_prob(self.adapter, sub, [k], conditioning=cond, config=sampler)
        lp = new.log_probs[:, 0]
        old = sub.log_probs[:, k].to(lp.device)
        loss, st = ppo_clip_loss(lp, old, adv, g.clip_range, normalize_ratio=g.normalize_ratio)
        stats = {"policy_loss": float(loss.detach()), "ratio_mean": float(st["ratio_mean"]), "ratio_max": float(st["ratio_max"]),
                 "clip_frac": float(st["clip_frac"]), "approx_kl": float(st["approx_kl"]),
                 "ratio_max_dev": float((torch.exp(lp.detach() - old) - 1).abs().max())}
        if g.beta > 0:
            with self.reference(), self.autocast():
                ref = log_prob(self.adapter, sub, [k], conditioning=cond, config=sampler)
            kl = latent_kl(new.means[:, 0], ref.means[:, 0], new.stds[0]).mean()
            loss = loss + g.beta * kl
            stats["kl"] = float(kl.detach())
        stats["loss"] = float(loss.detach())
        return loss, stats


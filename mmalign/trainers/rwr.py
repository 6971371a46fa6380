"""Reward-weighted regression: the model's own denoising loss, weighted by a function of the reward.

LiFT (arXiv 2412.04814) and BATON (arXiv 2402.00290) finetune a generator with a reward-weighted
denoising (diffusion / flow-matching) loss; RAFT (arXiv 2304.06767) is its top-k special case (keep the
best samples, weight 1); the weights w(r) of classic RWR (Peters & Schaal 2007) are exp(r / T)
normalised. No log-probabilities, no SDE: any sampler works, and the data can be a scored dataset.

Two modes (``rwr.mode``):

- ``online``: per step, draw ``prompts_per_step`` prompts and sample ``group_size`` images each with the
  training sampler (ODE or SDE; :meth:`Trainer.sample_groups`), score them (trained and held-out rewards,
  gathered over processes), weight them (below); the final latents are the regression data.
- ``dataset``: a scored dataset, JSONL lines ``{"prompt": ..., "image": "path", "reward": ...}`` (image
  paths relative to the JSONL file; optional ``category``). Weights are computed once over the whole
  dataset (or per prompt); per step ``batch_size`` records are drawn, their images read with
  :func:`mmalign.media.load_media` and encoded to latents (:meth:`ModelAdapter.encode_images`, the VAE
  posterior mean).

Weights (:func:`~mmalign.trainers.losses.rwr_weights`, mean 1 within their scope): ``exp`` (w = exp(r / T)
/ mean, a softmax over the scope times its size), ``normalized``, ``rank`` or ``topk`` (RAFT); scope
``group`` = per prompt (online: the prompt's samples; dataset: records sharing a prompt) or ``batch``
(online: the step's samples; dataset: the whole dataset). ``standardize`` first maps rewards to
(r - mean) / std within the scope, so the temperature is in units of the reward's spread.

Regression, ``num_inner_epochs`` passes over the batch in ``num_minibatches`` minibatches, each with
``timesteps_per_sample`` noise draws per sample: a random point of the adapter's own schedule of
``num_train_timesteps`` steps (its shift / spacing) and Gaussian noise re-noise the data latents x0;
flow models: x_t = (1 - sigma) x0 + sigma * noise, target noise - x0
(:func:`~mmalign.trainers.losses.flow_matching_target`); diffusion models: x_t = sqrt(a) x0 +
sqrt(1 - a) noise, target by the scheduler's prediction type
(:func:`~mmalign.trainers.losses.diffusion_target`). Loss = mean_B(w * ||model(x_t, t) - target||^2)
(:func:`~mmalign.trainers.losses.weighted_denoising_loss`) + ``prior_weight`` * the squared distance
to the reference model's prediction at the same inputs (prior preservation: the pretrained model's
behaviour where the weights say nothing). The prediction is conditional only (``train_guidance_scale``
1). Every random draw comes from generators seeded by (seed, step, ...), so resuming is exact.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from ..samplers import SamplerConfig
from .advantages import aggregate_rewards, group_advantages
from .common import MediaRecord, PromptSource, TrainConfig, Trainer, decoded_media_shape, fit_media, make_generator, read_media_dataset, tensor_stats
from .losses import denoising_loss, diffusion_target, flow_matching_target, rwr_weights, weighted_denoising_loss
from .prdp import score_rollout


@dataclass
class RWRConfig:
    """Reward-weighted regression hyperparameters."""

    mode: Literal["online", "dataset"] = "online"
    """``online``: regress on the model's own scored samples; ``dataset``: on a scored JSONL dataset."""
    prompts_per_step: int = 2
    """Online: prompts per step over all processes (a multiple of the number of processes)."""
    group_size: int = 8
    """Online: samples per prompt."""
    dataset: str | None = None
    """Dataset mode: JSONL file of ``{"prompt", "image", "reward"}`` lines (image paths relative to the file)."""
    batch_size: int = 8
    """Dataset mode: records per step over all processes (a multiple of the number of processes)."""
    resize: bool = False
    """Dataset mode: resize (shorter side) and centre-crop images to the model's size; false = an image of
    another size is an error naming the record."""
    weighting: Literal["exp", "normalized", "rank", "topk"] = "exp"
    """Reward -> weight: exp(r / temperature) normalised (RWR), min-shifted rewards normalised, rank, or
    top-k filtering (RAFT)."""
    weight_scope: Literal["group", "batch"] = "group"
    """Where weights are normalised (mean 1): per prompt, or over the batch (dataset mode: the whole dataset)."""
    temperature: float = 1.0
    """T of ``exp`` weights, > 0 (in reward units, or in stds with ``standardize``); lower = greedier."""
    standardize: bool = True
    """Map rewards to (r - mean) / (std + 1e-6) within the scope before weighting (only ``exp`` depends on it)."""
    top_k: int = 1
    """``topk``: samples kept per scope (weight scope size / k each, 0 for the rest)."""
    max_weight: float | None = None
    """Clamp weights to this after normalisation (null: no cap)."""
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """Online, several trained rewards: weight their weighted sum, or standardise each (per group) then sum."""
    timesteps_per_sample: int = 1
    """Noise draws (timestep + noise) per sample per minibatch pass."""
    num_train_timesteps: int = 1000
    """Points of the grid noise levels are drawn from uniformly: flow models, the adapter's own schedule of this
    many steps (its shift); diffusion models, this many evenly spaced training timesteps of the scheduler
    (its ``alphas_cumprod`` table: all of them at 1000, the usual DDPM training)."""
    train_guidance_scale: float | None = 1.0
    """Guidance of the trained prediction: 1 = the conditional prediction (supervised finetuning); FLUX-style
    embedded guidance takes it as its guidance input; null = the sampler's guidance scale."""
    prior_weight: float = 0.0
    """Weight of the prior-preservation term: mean squared distance between the model's and the reference
    (pretrained) model's predictions at the same noisy inputs."""
    num_inner_epochs: int = 1
    """Passes over each batch (several gradient steps per rollout batch)."""
    num_minibatches: int = 1
    """Minibatches each process splits its batch into per inner epoch."""
    shuffle: bool = True
    """Shuffle this process's rows before splitting them into minibatches, every inner epoch."""

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "group_size", "batch_size", "top_k", "timesteps_per_sample",
                     "num_train_timesteps", "num_inner_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_weight is not None and not self.max_weight > 0:
            raise ValueError(f"max_weight must be > 0 or null, got {self.max_weight}")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if self.train_guidance_scale is not None and self.train_guidance_scale < 0:
            raise ValueError(f"train_guidance_scale must be >= 0 or null, got {self.train_guidance_scale}")
        if self.mode == "dataset" and not self.dataset:
            raise ValueError("dataset: mode 'dataset' needs a JSONL file of {prompt, image, reward} lines")
        if self.mode == "online" and self.weighting == "topk" and self.weight_scope == "group" and self.top_k > self.group_size:
            raise ValueError(f"top_k {self.top_k} exceeds group_size {self.group_size} (topk per group)")


@dataclass(kw_only=True)
class RWRTrainConfig(TrainConfig):
    """``mmalign train`` with ``algorithm: rwr``."""

    algorithm: str = "rwr"
    """Must be ``rwr`` for this config."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="ode", num_steps=10, record_x0=False))
    """Online rollout sampler (any method: ODE or SDE; no log-probabilities are used), and the evaluation sampler."""
    rwr: RWRConfig = field(default_factory=RWRConfig)
    """Reward-weighted regression hyperparameters."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm != "rwr":
            raise ValueError(f"algorithm must be 'rwr' for an RWR config, got {self.algorithm!r}")
        s, r = self.sampler, self.rwr
        if s.group_size != 1:
            raise ValueError("sampler.group_size: set the group size in rwr.group_size (sampler.group_size stays 1)")
        if r.mode == "online" and not s.decode:
            raise ValueError("sampler.decode: rewards score decoded samples; keep it true")
        if r.num_minibatches % self.gradient_accumulation_steps:
            raise ValueError(f"rwr.num_minibatches {r.num_minibatches} must be a multiple of gradient_accumulation_steps "
                             f"{self.gradient_accumulation_steps}")


# ============================================================================ the scored dataset


def training_schedule(adapter, num_points: int):
    """The noise levels denoising-loss training draws from, as a :class:`~mmalign.models.base.Schedule`
    (only ``timesteps`` and ``sigmas`` / ``alphas_cumprod`` of the first K points are used).

    flow:      ``adapter.schedule(num_points)`` (the pipeline's own sigmas, shift included).
    diffusion: the scheduler's training table: ``num_points`` evenly spaced integer timesteps of
               [0, num_train_timesteps) with their ``alphas_cumprod`` (the sampling schedule's last step
               can lie outside the table when every timestep is used).
    """
    from ..models.base import Schedule

    kind = adapter.schedule(2)
    if kind.kind == "flow":
        return adapter.schedule(num_points)
    table = adapter.pipeline.scheduler.alphas_cumprod.detach().float().cpu()
    n = min(num_points, table.shape[0])
    t = torch.linspace(0, table.shape[0] - 1, n).round().long().unique()
    return Schedule(kind="diffusion", timesteps=t, prediction_type=kind.prediction_type,
                    alphas_cumprod=torch.cat([table[t], torch.ones(1)]))


# ============================================================================ the trainer


class RWRTrainer(Trainer):
    """Reward-weighted regression (see the module docstring):
    ``RWRTrainer(load_train_config("configs/train_rwr_embedded.yaml")).fit()``."""

    config_class = RWRTrainConfig

    # ------------------------------------------------------------------ setup
    def check_setup(self, rewards: Sequence[Any] | None) -> None:
        cfg, r = self.cfg, self.cfg.rwr
        trained = cfg.rewards if rewards is None else rewards
        if r.mode == "online":
            if not trained:
                raise ValueError("rewards: online RWR needs at least one trained reward, e.g. rewards: [{name: pickscore}]")
            if r.prompts_per_step % self.world_size:
                raise ValueError(f"rwr.prompts_per_step {r.prompts_per_step} must be a multiple of the number of processes {self.world_size}")
            rows = r.prompts_per_step // self.world_size * r.group_size
            self.prompt_source = PromptSource(cfg.prompts)
            self.records: list[MediaRecord] = []
        else:
            if trained:
                raise ValueError("rewards: dataset mode trains on the dataset's rewards; list rewards to watch under "
                                 "held_out_rewards (they score the evaluation samples)")
            if r.batch_size % self.world_size:
                raise ValueError(f"rwr.batch_size {r.batch_size} must be a multiple of the number of processes {self.world_size}")
            rows = r.batch_size // self.world_size
            self.records = read_media_dataset(r.dataset, "image", "rwr.dataset", scored=True)
            self.log(f"rwr dataset: {len(self.records)} records from {r.dataset}")
        if rows % r.num_minibatches:
            raise ValueError(f"{rows} rows per process do not split into rwr.num_minibatches={r.num_minibatches}")

    def setup(self) -> None:
        r = self.cfg.rwr
        self.noise_schedule = training_schedule(self.adapter, r.num_train_timesteps)  # the grid noise levels are drawn from
        if r.mode == "dataset":
            if self.adapter.modality != "image":
                raise ValueError(f"rwr dataset mode reads images; {self.adapter.family} makes {self.adapter.modality}")
            rewards = torch.tensor([x.reward for x in self.records])
            ids = {p: i for i, p in enumerate(dict.fromkeys(x.prompt for x in self.records))}
            group_ids = torch.tensor([ids[x.prompt] for x in self.records])
            self.dataset_weights = self.weights(rewards, group_ids)
            self.media_size = decoded_media_shape(self.adapter)  # what the dataset's images must match

    def updates_per_step(self) -> int:
        r = self.cfg.rwr
        return r.num_inner_epochs * r.num_minibatches // self.cfg.gradient_accumulation_steps

    def eval_prompts(self) -> list[tuple[str, str]]:
        """Dataset mode without evaluation or training prompts: the dataset's first distinct prompts."""
        e = self.cfg.eval
        if self.cfg.rwr.mode == "dataset" and not (e.prompts_file or e.prompts or self.cfg.prompts.file or self.cfg.prompts.prompts):
            items = list(dict.fromkeys((x.category, x.prompt) for x in self.records))
            return items[: e.max_prompts]
        return super().eval_prompts()

    # ------------------------------------------------------------------ pieces
    def weights(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """Per-sample weights (N,) of rewards (N,) in their scope (``weight_scope``), mean 1 per scope."""
        r = self.cfg.rwr
        scope = group_ids if r.weight_scope == "group" else torch.zeros_like(group_ids)
        rewards = rewards.float()
        if r.standardize:
            # (r - mean) / (std + eps) within the scope; a constant scope maps to 0 (equal weights)
            rewards = group_advantages(rewards, scope, std="group", eps=1e-6, clip=None)
        w = torch.empty_like(rewards)
        for gid in scope.unique():
            rows = scope == gid
            k = min(r.top_k, int(rows.sum())) if r.weighting == "topk" else None
            w[rows] = rwr_weights(rewards[rows], kind=r.weighting, tau=r.temperature, max_weight=r.max_weight, top_k=k)
        return w

    def renoise(self, x0: Tensor, generators: Sequence[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
        """Noisy inputs, timesteps and regression targets for clean latents x0 (B,*L): a uniform point of
        the adapter's ``num_train_timesteps``-step schedule per row, and standard-normal noise, each row
        drawn from its own generator (keyed by its global row: the same draws on any number of processes)."""
        sched = self.noise_schedule
        b = x0.shape[0]
        if len(generators) != b:
            raise ValueError(f"renoise: {len(generators)} generators for {b} rows")
        k = torch.cat([torch.randint(0, sched.num_steps, (1,), generator=g) for g in generators])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(x0.device)
        view = (b,) + (1,) * (x0.ndim - 1)
        t = sched.timesteps[k.to(sched.timesteps.device)].to(x0.device)
        if sched.kind == "flow":
            sigma = sched.sigmas[k.to(sched.sigmas.device)].to(x0.device).view(view)
            x_t = (1 - sigma) * x0 + sigma * noise  # rectified flow: x_sigma = (1 - sigma) x0 + sigma noise
            target = flow_matching_target(x0, noise)
        else:
            a = sched.alphas_cumprod[k.to(sched.alphas_cumprod.device)].to(x0.device)
            x_t = a.sqrt().view(view) * x0 + (1 - a).sqrt().view(view) * noise  # DDPM forward q(x_t | x0)
            target = diffusion_target(x0, noise, a, sched.prediction_type)
        return x_t, t, target

    def regress(self, x0: Tensor, cond, weights: Tensor, generators: Sequence[torch.Generator]) -> dict[str, float]:
        """Backward the weighted denoising loss (and prior term) of one minibatch, ``timesteps_per_sample``
        noise draws from each row's generator; returns its statistics. Rows of weight 0 are skipped when
        there is no prior term."""
        r, adapter = self.cfg.rwr, self.adapter
        n = x0.shape[0]
        if r.prior_weight == 0:
            keep = (weights > 0).nonzero().flatten()
            if 0 < keep.numel() < n:  # (all zero: kept as they are, a zero loss with the usual statistics)
                x0, cond, weights = x0[keep.to(x0.device)], cond.select(keep), weights[keep]
                generators = [generators[i] for i in keep.tolist()]
        stats: dict[str, list[float]] = defaultdict(list)
        micro = self.cfg.sampler.micro_batch
        for _ in range(r.timesteps_per_sample):
            x_t, t, target = self.renoise(x0, generators)
            with self.autocast():
                out = adapter.denoise_in_chunks(x_t, t, cond, micro)
            per_sample = denoising_loss(out, target)
            # weighted mean over the minibatch's n rows (skipped rows have weight 0)
            loss = weighted_denoising_loss(per_sample, weights.to(per_sample.device)) * (x0.shape[0] / n)
            stats["denoising_loss"].append(float(per_sample.detach().mean()))
            if r.prior_weight > 0:
                with self.reference(), self.autocast():
                    ref = adapter.denoise_in_chunks(x_t, t, cond, micro)
                prior = denoising_loss(out, ref.detach()).mean()  # prior preservation: stay near the pretrained prediction
                loss = loss + r.prior_weight * prior
                stats["prior_loss"].append(float(prior.detach()))
            stats["loss"].append(float(loss.detach()))
            self.backward(loss, scale=1.0 / r.timesteps_per_sample)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    # ------------------------------------------------------------------ batches of the two modes
    def online_batch(self, step: int) -> tuple[Tensor, Any, Tensor, dict[str, Any]]:
        """Sample, score and weight this step's rollouts: (x0 b,*L, conditioning, weights b, metrics)."""
        cfg, r = self.cfg, self.cfg.rwr
        sampler = dataclasses.replace(cfg.sampler, group_size=r.group_size)
        drawn = self.prompt_source.draw(r.prompts_per_step, make_generator(cfg.seed, "prompts", step))
        local, _ = self.shard([(i, c, p) for i, (c, p) in enumerate(drawn)])
        rollout = self.sample_groups(step, local, sampler)
        b = rollout.batch_size
        scores, group_ids, metrics = score_rollout(self, rollout, step)
        weights_cfg = {e.label: e.weight for e in self.rewards.trained}
        if r.reward_aggregation == "sum_then_normalize" or len(scores) == 1:
            total = sum(weights_cfg[k] * scores[k] for k in sorted(scores))  # the trained rewards' weighted sum
        else:  # each reward standardised in its group, then the weighted sum (GDPO-style)
            total = aggregate_rewards(scores, weights_cfg, group_ids, mode="normalize_then_sum", std="group", eps=1e-6, clip=None)
        w_all = self.weights(total, group_ids)
        x0 = rollout.final_latents.float()
        with torch.no_grad(), self.autocast():
            cond = self.adapter.encode_in_chunks(rollout.prompts, None, self.train_guidance(), sampler.micro_batch)
        return x0, cond, w_all[self.rank * b: (self.rank + 1) * b], metrics

    def dataset_batch(self, step: int) -> tuple[Tensor, Any, Tensor, dict[str, Any]]:
        """This step's records: (x0 b,*L encoded by the VAE, conditioning, weights b, metrics)."""
        cfg, r = self.cfg, self.cfg.rwr
        n = len(self.records)
        gen = make_generator(cfg.seed, "records", step)
        idx = (torch.randperm(n, generator=gen)[: r.batch_size] if r.batch_size <= n
               else torch.randint(0, n, (r.batch_size,), generator=gen))
        local, _ = self.shard(idx.tolist())
        recs = [self.records[i] for i in local]
        fitted = [fit_media(x, "image", self.media_size, resize_option=None if r.resize else "rwr.resize") for x in recs]
        with torch.no_grad(), self.autocast():
            x0 = self.adapter.encode_images(torch.stack(fitted).to(self.adapter.device)).float()
            cond = self.adapter.encode_in_chunks([x.prompt for x in recs], None, self.train_guidance(), cfg.sampler.micro_batch)
        weights = self.dataset_weights[torch.tensor(local)]
        rewards = self.gather(torch.tensor([x.reward for x in recs]))
        metrics: dict[str, Any] = {"samples": int(rewards.numel()), **tensor_stats(rewards, "reward/dataset")}
        return x0, cond, weights, metrics

    def train_guidance(self) -> float:
        """Guidance of the trained prediction: ``rwr.train_guidance_scale``, else the sampler's."""
        g = self.cfg.rwr.train_guidance_scale
        if g is None:
            g = self.cfg.sampler.guidance_scale
        return float(self.adapter.default_guidance_scale if g is None else g)

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> dict[str, Any]:
        cfg, r = self.cfg, self.cfg.rwr
        x0, cond, weights, metrics = self.online_batch(step) if r.mode == "online" else self.dataset_batch(step)
        b = x0.shape[0]
        w_all = self.gather(weights.float().cpu())
        metrics.update({"weight/max": float(w_all.max()), "weight/min": float(w_all.min()),
                        # effective sample size fraction (sum w)^2 / (N sum w^2): 1 = uniform, 1/N = one sample
                        "weight/ess_frac": float(w_all.sum() ** 2 / (w_all.numel() * (w_all**2).sum()).clamp_min(1e-12))})
        mb = b // r.num_minibatches
        sums: dict[str, list[float]] = defaultdict(list)
        updates = []
        for epoch in range(r.num_inner_epochs):
            order = (torch.randperm(b, generator=make_generator(cfg.seed, "shuffle", step, epoch, self.rank))
                     if r.shuffle else torch.arange(b))
            # one generator per row, keyed by its global index: the same noise on any number of processes
            gens = [make_generator(cfg.seed, "renoise", step, epoch, self.rank * b + i) for i in range(b)]
            for m in range(r.num_minibatches):
                rows = order[m * mb: (m + 1) * mb]
                stats = self.regress(x0[rows.to(x0.device)], cond.select(rows), weights[rows], [gens[i] for i in rows.tolist()])
                for key, v in stats.items():
                    sums[key].append(v)
                self._accum += 1
                if self._accum % cfg.gradient_accumulation_steps == 0:
                    updates.append(self.optimizer_step())
        agg = {k: sum(v) / len(v) for k, v in sums.items()}
        agg["grad_norm"] = sum(u["grad_norm"] for u in updates) / len(updates)
        metrics.update(self.mean_over_processes(agg))
        metrics["lr"] = updates[0]["lr"]
        metrics["updates"] = len(updates)
        return metrics

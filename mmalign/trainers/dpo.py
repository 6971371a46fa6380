"""Preference optimisation of diffusion and flow models: Diffusion-DPO (arXiv 2311.12908) and Flow-DPO
(arXiv 2501.13918) on offline preference pairs, and online pairs ranked by a reward from the policy's own
samples, trained with D3PO's per-step objective (arXiv 2311.13231) or with Diffusion-DPO.

**Offline** (``dpo.mode: offline``; data = a preference set, :func:`mmalign.rewards.judge.load_preferences`:
JSONL lines ``{"prompt": ..., "chosen": path, "rejected": path}`` with paths relative to the JSONL file,
or a folder of pair directories). One training step:

1. the next ``pairs_per_step`` pairs of the set (a fresh seeded permutation every epoch, so which pairs
   a step sees is a function of the step alone: resuming continues exactly), each process its slice;
   pairs labelled ``tie`` are left out (they prefer nothing);
2. chosen and rejected images loaded, resized (aspect kept, centre crop) to the model's image size and
   encoded by the adapter's VAE (:meth:`~mmalign.models.base.ModelAdapter.encode_images`, posterior mean,
   cached);
3. one noise and one timestep per pair, shared by its chosen and rejected image; the per-sample
   denoising MSE of the policy and, without gradients, of the reference (``Trainer.reference()``: the
   LoRA-disabled denoiser, so no second copy in memory; the frozen initial weights under full
   finetuning) against the family's target: the velocity ``noise - x0`` for flow models (Flow-DPO),
   epsilon or v for diffusion models;
4. :func:`~mmalign.trainers.losses.diffusion_dpo_loss`, one backward per micro-batch
   (``gradient_accumulation_steps`` of them), one optimizer update.

**Online** (``dpo.mode: online``): ``group_size`` samples for each of ``prompts_per_step`` prompts with the
sampler, scored by the trained rewards (their weighted sum); in each group the best sample is *chosen*
and the worst *rejected* (groups whose reward gap is at most ``min_reward_gap`` are skipped). Then

- ``online_objective: d3po``: DPO at every trained denoising step of the pair's recorded trajectories,
  on the recomputed step log-probs (:func:`mmalign.samplers.log_prob`) against the reference's
  (``d3po_reference``: the sampling-time policy, i.e. the recorded log-probs, as D3PO's public code,
  or the LoRA-disabled base), :func:`~mmalign.trainers.losses.d3po_loss`; needs a stochastic sampler;
- ``online_objective: diffusion_dpo``: the pair's final latents taken as x0 of chosen / rejected, then
  step 3-4 of the offline mode.

:func:`build_pairs` (CLI: ``python -m mmalign.trainers.dpo make-pairs``) writes an offline pair set from
any model and reward: it samples each prompt several times, scores, and keeps best vs worst.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from ..models.base import Conditioning
from ..rewards.judge import PreferenceDataError, load_preferences
from ..rewards.preprocess import resize_cover_crop
from ..samplers import SamplerConfig, log_prob
from .common import PromptSource, RewardSet, TrainConfig, Trainer, make_generator, tensor_stats
from .losses import d3po_loss, denoising_loss, diffusion_dpo_loss, diffusion_target, flow_matching_target

__all__ = ["DPOConfig", "DPOTrainConfig", "DPOTrainer", "PreferenceData", "build_pairs", "load_image",
           "resize_center_crop", "main"]


# ============================================================================ config


@dataclass
class DPOConfig:
    """Preference-optimisation hyperparameters (offline Diffusion/Flow-DPO, online D3PO / Diffusion-DPO)."""

    mode: Literal["offline", "online"] = "offline"
    """``offline``: train on the preference set ``data``; ``online``: pairs from the policy's own samples,
    ranked by the trained rewards."""
    data: str | None = None
    """Offline: the preference set, a JSONL file (one ``{"prompt", "chosen", "rejected"}`` object per line,
    image paths relative to the file; optional ``category``, ``tie``) or a folder of pair directories
    (``prompt.txt``, ``chosen.<ext>``, ``rejected.<ext>``)."""
    pairs_per_step: int = 4
    """Offline: preference pairs per training step over all processes (a multiple of processes x
    gradient_accumulation_steps)."""
    beta: float | None = None
    """DPO temperature. null = the usual value of the objective: Diffusion-DPO 5000 for diffusion models
    (epsilon-MSE scale, SD1.5 in arXiv 2311.12908) and 100 for flow models (velocity-MSE, Flow-DPO
    public code); D3PO 0.1 (log-probs averaged over latent dimensions)."""
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    """Diffusion-DPO training timesteps: uniform over the training grid (Diffusion-DPO), or logit-normal
    in the grid position (SD3 training's density)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Std of the logit-normal timestep density."""
    num_train_timesteps: int = 1000
    """Flow models: size of the training grid of noise levels (the adapter's own shifted schedule with
    this many steps). Diffusion models use the scheduler's ``num_train_timesteps`` timesteps."""
    random_flip: bool = False
    """Offline: flip each pair (chosen and rejected together) horizontally with probability 1/2."""
    cache_latents: bool = True
    """Offline: keep encoded pair latents in CPU memory (encode each image once); turn off for large
    sets at high resolution."""
    verify_images: bool = True
    """Offline: open every image of the set at start-up, so a corrupt file stops the run before training
    (named with its pair's line) rather than mid-way."""
    prompts_per_step: int = 2
    """Online: prompts per step over all processes (a multiple of the number of processes)."""
    group_size: int = 4
    """Online: samples per prompt; the best and the worst make the pair."""
    min_reward_gap: float = 0.0
    """Online: skip groups whose best-minus-worst reward is not above this (ties prefer nothing)."""
    online_objective: Literal["d3po", "diffusion_dpo"] = "d3po"
    """Online: ``d3po`` (per-step DPO on the recorded transitions' log-probs) or ``diffusion_dpo`` (the
    pair's final latents as offline data)."""
    d3po_reference: Literal["sampling", "base"] = "sampling"
    """D3PO reference log-probs: ``sampling`` = recorded at sampling time (the policy before this
    update, D3PO's public code), ``base`` = recomputed by the reference policy (LoRA disabled)."""
    d3po_clip_range: float | None = None
    """D3PO: clamp each per-step ratio pi/pi_ref to [1-c, 1+c] (the public code's ``train.eps``); null =
    the paper's unclipped loss."""
    timestep_fraction: float = 1.0
    """D3PO: train on a random subset of this fraction of the stochastic steps each step (1: all)."""
    on_invalid_reward: Literal["raise", "skip"] = "raise"
    """Online: a sample a trained reward could not score: stop with its reason, or leave it out of its
    group's ranking."""

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online"):
            raise ValueError(f"mode must be 'offline' or 'online', got {self.mode!r}")
        for name in ("pairs_per_step", "prompts_per_step", "num_train_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a pair needs two samples), got {self.group_size}")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be > 0 or null, got {self.beta}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.min_reward_gap < 0:
            raise ValueError(f"min_reward_gap must be >= 0, got {self.min_reward_gap}")
        if self.d3po_clip_range is not None and not 0 < self.d3po_clip_range < 1:
            raise ValueError(f"d3po_clip_range must be in (0, 1) or null, got {self.d3po_clip_range}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")


@dataclass(kw_only=True)
class DPOTrainConfig(TrainConfig):
    """``mmalign train`` with ``algorithm: dpo``."""

    algorithm: str = "dpo"
    """Must be ``dpo`` for this config."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="flow_grpo", num_steps=10, record_x0=False))
    """Online: the sampler of the groups (D3PO needs a stochastic one: flow_grpo / dance / cps for flow
    models, ddim with eta > 0 / ddpm for diffusion models); its guidance_scale is used when sampling and
    when recomputing D3PO log-probs. Offline: only evaluation uses it (as ODE)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO hyperparameters."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm != "dpo":
            raise ValueError(f"algorithm must be 'dpo' for a DPO config, got {self.algorithm!r}")
        s, d = self.sampler, self.dpo
        if s.group_size != 1:
            raise ValueError("sampler.group_size: set the group size in dpo.group_size (sampler.group_size stays 1)")
        if d.mode == "online":
            if not s.decode:
                raise ValueError("sampler.decode: rewards score decoded samples; keep it true")
            if d.online_objective == "d3po":
                if s.method == "ode" or (s.method == "ddim" and s.eta == 0):
                    raise ValueError("sampler.method: D3PO trains on the log-probs of stochastic steps (flow_grpo, dance or cps "
                                     f"for flow models; ddim with eta > 0 or ddpm for diffusion), got {s.method!r}"
                                     + (" with eta 0" if s.method == "ddim" else ""))
                if s.method in ("flow_grpo", "dance", "cps") and s.noise_level == 0:
                    raise ValueError("sampler.noise_level: 0 makes every step deterministic; D3PO needs noise")
        elif not d.data:
            raise ValueError("dpo.data: offline DPO needs a preference set (a pairs.jsonl file or a folder of pairs); "
                             "build one with `python -m mmalign.trainers.dpo make-pairs`, or set dpo.mode: online")
        elif d.pairs_per_step % self.gradient_accumulation_steps:
            raise ValueError(f"dpo.pairs_per_step {d.pairs_per_step} must be a multiple of gradient_accumulation_steps "
                             f"{self.gradient_accumulation_steps}")


# ============================================================================ images and preference data


def load_image(path: str | os.PathLike, where: str = "") -> Tensor:
    """An image file as 3,H,W float32 in [0, 1] (RGB); :class:`PreferenceDataError` naming ``where`` and
    the file when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL raises several kinds on corrupt files
        raise PreferenceDataError(f"{where + ': ' if where else ''}cannot read image {str(path)!r} "
                                  f"({type(err).__name__}: {err})") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def resize_center_crop(images: Tensor, size: tuple[int, int]) -> Tensor:
    """B,3,h,w in [0,1] -> B,3,H,W: scaled (bicubic, antialiased, aspect kept) until it covers (H, W),
    then centre-cropped; clamped to [0, 1]."""
    return resize_cover_crop(images, size, "bicubic").clamp(0, 1)


def pixel_size(adapter: Any) -> tuple[int, int]:
    """(height, width) in pixels of the images ``adapter`` makes (and encodes)."""
    if hasattr(adapter, "image_size"):
        return tuple(int(v) for v in adapter.image_size())
    if getattr(adapter, "height", None) and getattr(adapter, "width", None):
        return int(adapter.height), int(adapter.width)
    raise ValueError(f"{adapter.family}: cannot tell the model's image size (no image_size(), height or width)")


class PreferenceData:
    """The offline pairs of a run: read with :func:`~mmalign.rewards.judge.load_preferences`, checked (an
    empty prompt or an unreadable image is an error naming the pair's line), ties left out, and visited
    in a seeded permutation per epoch."""

    def __init__(self, path: str | os.PathLike, *, seed: int = 0, verify_images: bool = True,
                 log: Callable[[str], None] = print) -> None:
        data = load_preferences(path)  # FileNotFoundError / PreferenceDataError (missing files, bad lines, empty set)
        pairs, ties = [], 0
        for p in data.pairs:
            if not p.prompt.strip():
                raise PreferenceDataError(f"{p.source}: empty prompt (every pair needs the prompt its images answer)")
            if p.tie:
                ties += 1
                continue
            pairs.append(p)
        if not pairs:
            raise PreferenceDataError(f"{path}: all {len(data.pairs)} pairs are labelled tie: nothing to prefer")
        if ties:
            log(f"{path}: left out {ties} pairs labelled tie (they prefer neither image)")
        if verify_images:
            for p in pairs:
                for key in ("chosen", "rejected"):
                    load_image(getattr(p, key), f"{p.source} ({key})")
        self.path, self.pairs, self.seed = Path(path), pairs, seed
        self._perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def index_at(self, position: int) -> int:
        """The pair index at global position ``position`` of the training stream: epoch
        ``position // len`` visits every pair once, in a permutation seeded by (seed, epoch)."""
        epoch, pos = divmod(int(position), len(self.pairs))
        if self._perm is None or self._perm[0] != epoch:
            order = torch.randperm(len(self.pairs), generator=make_generator(self.seed, "dpo_epoch", epoch)).tolist()
            self._perm = (epoch, order)
        return self._perm[1][pos]

    def images(self, index: int) -> tuple[Tensor, Tensor]:
        """Chosen and rejected image (3,H,W in [0,1]) of pair ``index``."""
        p = self.pairs[index]
        return load_image(p.chosen, f"{p.source} (chosen)"), load_image(p.rejected, f"{p.source} (rejected)")


# ============================================================================ the trainer


@dataclass
class TrainingTimesteps:
    """The timesteps Diffusion-DPO draws from: N entries of denoiser ``timesteps`` with their noise level
    (``sigmas`` for flow models, ``alphas_cumprod`` for diffusion models)."""

    kind: Literal["flow", "diffusion"]
    prediction_type: str
    timesteps: Tensor  # N
    sigmas: Tensor | None = None  # N (flow)
    alphas_cumprod: Tensor | None = None  # N (diffusion)

    def __len__(self) -> int:
        return len(self.timesteps)


def training_timesteps(adapter: Any, num_train_timesteps: int) -> TrainingTimesteps:
    """Flow models: the adapter's own (shifted) schedule with ``num_train_timesteps`` steps, without its
    terminal 0 (as diffusers' SD3 training indexes ``scheduler.timesteps``). Diffusion models: every
    training timestep 0..T-1 of the scheduler with its ``alphas_cumprod``."""
    sched = adapter.schedule(1)
    if sched.kind == "flow":
        full = adapter.schedule(num_train_timesteps)
        return TrainingTimesteps("flow", "flow", full.timesteps.float().cpu(), sigmas=full.sigmas[:-1].float().cpu())
    table = getattr(adapter.pipeline.scheduler, "alphas_cumprod", None)
    if table is None:
        raise ValueError(f"{adapter.family}: the scheduler has no alphas_cumprod table to draw training timesteps from")
    table = torch.as_tensor(table, dtype=torch.float32).cpu()
    return TrainingTimesteps("diffusion", sched.prediction_type, torch.arange(len(table)), alphas_cumprod=table)


class DPOTrainer(Trainer):
    """Offline Diffusion-DPO / Flow-DPO and online D3PO / Diffusion-DPO (see the module docstring).

    ``DPOTrainer(load_train_config("configs/train_dpo_embedded.yaml")).fit()``; metrics per step in
    ``history`` and ``<out>/metrics.jsonl``: ``loss``, ``implicit_acc`` (pairs whose implicit reward
    prefers the chosen sample; ties count 1/2), ``implicit_reward_margin`` / ``_chosen`` / ``_rejected``,
    ``grad_norm``, ``lr``; Diffusion-DPO adds the policy's and reference's denoising errors
    (``model_err_chosen`` ...); online adds ``reward/<label>/...`` stats, ``pairs`` and ``pair_reward_gap``.
    """

    config_class = DPOTrainConfig

    # ------------------------------------------------------------------ setup
    def check_setup(self, rewards: Sequence[Any] | None) -> None:
        cfg, d = self.cfg, self.cfg.dpo
        if d.mode == "online":
            if not (cfg.rewards if rewards is None else rewards):
                raise ValueError("rewards: online DPO ranks samples by a trained reward; give at least one, "
                                 "e.g. rewards: [{name: shapeeval}]")
            if d.prompts_per_step % self.world_size:
                raise ValueError(f"dpo.prompts_per_step {d.prompts_per_step} must be a multiple of the number of processes {self.world_size}")
            self.prompt_source = PromptSource(cfg.prompts)
            self.data = None
        else:
            if d.pairs_per_step % (self.world_size * cfg.gradient_accumulation_steps):
                raise ValueError(f"dpo.pairs_per_step {d.pairs_per_step} must be a multiple of processes x gradient_accumulation_steps "
                                 f"({self.world_size} x {cfg.gradient_accumulation_steps})")
            self.data = PreferenceData(d.data, seed=cfg.seed, verify_images=d.verify_images, log=self.log)
            self.log(f"preference set {d.data}: {len(self.data)} pairs")

    def setup(self) -> None:
        d = self.cfg.dpo
        if d.mode == "offline" and self.adapter.modality != "image":
            raise ValueError(f"dpo.mode offline: preference images need an image model, {self.adapter.family} makes {self.adapter.modality}")
        self.grid = training_timesteps(self.adapter, d.num_train_timesteps)
        objective = "diffusion_dpo" if d.mode == "offline" else d.online_objective
        self.objective = objective
        if d.beta is not None:
            self.beta = float(d.beta)
        elif objective == "d3po":
            self.beta = 0.1
        else:
            self.beta = 100.0 if self.grid.kind == "flow" else 5000.0
        self._latent_cache: dict[tuple[int, bool], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ Diffusion-DPO pieces
    def draw_noise_and_timestep(self, latent_shape: Sequence[int], key: tuple) -> tuple[Tensor, int]:
        """The noise (``*L``) and grid index shared by a pair, from a generator seeded by (seed, key)."""
        d = self.cfg.dpo
        gen = make_generator(self.cfg.seed, "dpo_noise", *key)
        noise = torch.randn(tuple(latent_shape), generator=gen)
        n = len(self.grid)
        if d.timestep_sampling == "uniform":
            idx = int(torch.randint(0, n, (1,), generator=gen))
        else:  # logit-normal density (SD3 training, diffusers compute_density_for_timestep_sampling)
            u = torch.sigmoid(d.logit_mean + d.logit_std * torch.randn((), generator=gen))
            idx = min(int(float(u) * n), n - 1)
        return noise, idx

    def noisy_latents(self, x0: Tensor, noise: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Noised latents x_t (B,*L), the denoiser's training target (B,*L) and the timesteps (B) of
        grid indices ``idx`` (B)."""
        g = self.grid
        view = (-1,) + (1,) * (x0.ndim - 1)
        idx = idx.cpu()
        t = g.timesteps[idx].to(x0.device)
        if g.kind == "flow":
            s = g.sigmas[idx].to(x0.device).view(view)
            xt = (1 - s) * x0 + s * noise  # rectified flow: x_sigma = (1 - sigma) x0 + sigma * noise (SD3, arXiv 2403.03206)
            return xt, flow_matching_target(x0, noise), t
        a = g.alphas_cumprod[idx].to(x0.device)
        xt = a.sqrt().view(view) * x0 + (1 - a).sqrt().view(view) * noise  # DDPM q(x_t | x_0) (arXiv 2006.11239)
        return xt, diffusion_target(x0, noise, a, g.prediction_type), t

    def preference_errors(self, x0_w: Tensor, x0_l: Tensor, cond: Conditioning, keys: Sequence[tuple]) -> dict[str, Tensor]:
        """Per-pair denoising MSE (B each) of the policy (with graph) and the reference on chosen (w) and
        rejected (l) latents (B,*L), at one shared noise and timestep per pair (seeded by ``keys``)."""
        n = x0_w.shape[0]
        drawn = [self.draw_noise_and_timestep(x0_w.shape[1:], key) for key in keys]
        noise = torch.stack([z for z, _ in drawn]).to(x0_w.device)
        idx = torch.tensor([i for _, i in drawn], dtype=torch.long)
        xt, target, t = self.noisy_latents(torch.cat([x0_w, x0_l]).float(), torch.cat([noise, noise]), torch.cat([idx, idx]))
        both = Conditioning.cat([cond, cond])
        with self.autocast():
            pred = self.adapter.denoise(xt, t, both)
        err = denoising_loss(pred, target)
        with self.reference(), self.autocast():
            ref_err = denoising_loss(self.adapter.denoise(xt, t, both), target)
        return {"err_w": err[:n], "err_l": err[n:], "ref_err_w": ref_err[:n], "ref_err_l": ref_err[n:], "grid_index": idx}

    def diffusion_dpo_chunk(self, x0_w: Tensor, x0_l: Tensor, prompts: list[str], keys: Sequence[tuple]) -> tuple[Tensor, dict[str, float]]:
        """Diffusion-DPO loss (0-d, with graph) and stats of one micro-batch of pairs."""
        with torch.no_grad(), self.autocast():
            cond = self.adapter.encode_prompts(prompts, guidance_scale=1.0)  # trained conditional, as Diffusion-DPO
        e = self.preference_errors(x0_w, x0_l, cond, keys)
        loss, st = diffusion_dpo_loss(e["err_w"], e["err_l"], e["ref_err_w"], e["ref_err_l"], self.beta)
        stats = {"loss": float(loss.detach()), "implicit_acc": float(st["implicit_acc"]),
                 "implicit_reward_margin": float(st["reward_margin"]), "implicit_reward_chosen": float(st["reward_chosen"]),
                 "implicit_reward_rejected": float(st["reward_rejected"]),
                 "model_err_chosen": float(e["err_w"].detach().mean()), "model_err_rejected": float(e["err_l"].detach().mean()),
                 "ref_err_chosen": float(e["ref_err_w"].mean()), "ref_err_rejected": float(e["ref_err_l"].mean())}
        return loss, stats

    # ------------------------------------------------------------------ offline data
    def pair_latents(self, indices: Sequence[int], positions: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Encoded chosen and rejected latents (B,*L each, on the model's device) of pairs ``indices``
        (flipped per ``positions`` when ``random_flip``)."""
        d, size = self.cfg.dpo, pixel_size(self.adapter)
        out_w, out_l = [], []
        for index, pos in zip(indices, positions):
            flip = d.random_flip and bool(torch.rand((), generator=make_generator(self.cfg.seed, "dpo_flip", pos)) < 0.5)
            key = (index, flip)
            if key not in self._latent_cache:
                w, l = self.data.images(index)
                imgs = torch.stack([resize_center_crop(w[None], size)[0], resize_center_crop(l[None], size)[0]])
                if flip:
                    imgs = imgs.flip(-1)
                lat = self.adapter.encode_images(imgs.to(self.adapter.device)).float()
                pair = (lat[0], lat[1])
                if not d.cache_latents:
                    out_w.append(pair[0]), out_l.append(pair[1])
                    continue
                self._latent_cache[key] = (pair[0].cpu(), pair[1].cpu())
            w_lat, l_lat = self._latent_cache[key]
            out_w.append(w_lat.to(self.adapter.device)), out_l.append(l_lat.to(self.adapter.device))
        return torch.stack(out_w), torch.stack(out_l)

    # ------------------------------------------------------------------ steps
    def train_step(self, step: int) -> dict[str, Any]:
        return self.online_step(step) if self.cfg.dpo.mode == "online" else self.offline_step(step)

    def offline_step(self, step: int) -> dict[str, Any]:
        cfg, d = self.cfg, self.cfg.dpo
        positions, _ = self.shard(list(range(step * d.pairs_per_step, (step + 1) * d.pairs_per_step)))
        ga = cfg.gradient_accumulation_steps
        per = len(positions) // ga
        sums: dict[str, float] = defaultdict(float)
        for c in range(ga):
            chunk = positions[c * per: (c + 1) * per]
            indices = [self.data.index_at(p) for p in chunk]
            x0_w, x0_l = self.pair_latents(indices, chunk)
            loss, stats = self.diffusion_dpo_chunk(x0_w, x0_l, [self.data.pairs[i].prompt for i in indices],
                                                   [("offline", p) for p in chunk])
            self.backward(loss)
            for k, v in stats.items():
                sums[k] += v * len(chunk)
        update = self.optimizer_step()
        metrics: dict[str, Any] = self._pooled(sums, len(positions))
        metrics.update(pairs=d.pairs_per_step, samples=2 * d.pairs_per_step, epoch=step * d.pairs_per_step // len(self.data),
                       grad_norm=update["grad_norm"], lr=update["lr"], beta=self.beta)
        return metrics

    def _pooled(self, sums: dict[str, float], count: int) -> dict[str, float]:
        """Pair-weighted means of ``sums`` (each a sum of stat x pairs) over all processes; empty when no
        process had a pair. ``log_ratio_abs_max`` is a max, not a mean."""
        keys = sorted(self._stat_keys())
        vec = torch.tensor([sums.get(k, 0.0) for k in keys] + [float(count)], dtype=torch.float64)
        peak = torch.tensor([sums.get("log_ratio_abs_max", 0.0)], dtype=torch.float64)
        if self.world_size > 1:
            vec = self.gather(vec[None].to(self.accelerator.device)).cpu().sum(0)
            peak = self.gather(peak[None].to(self.accelerator.device)).cpu().max(0).values
        total = float(vec[-1])
        if total == 0:
            return {}
        out = {k: float(vec[i]) / total for i, k in enumerate(keys) if k != "log_ratio_abs_max"}
        if self.objective == "d3po":
            out["log_ratio_abs_max"] = float(peak[0])
        return out

    def _stat_keys(self) -> list[str]:
        common = ["loss", "implicit_acc", "implicit_reward_margin", "implicit_reward_chosen", "implicit_reward_rejected"]
        if self.objective == "d3po":
            return common + ["log_ratio_abs_max"]
        return common + ["model_err_chosen", "model_err_rejected", "ref_err_chosen", "ref_err_rejected"]

    # ------------------------------------------------------------------ online
    def online_sampler(self) -> SamplerConfig:
        return dataclasses.replace(self.cfg.sampler, group_size=self.cfg.dpo.group_size)

    def trained_timesteps(self, stochastic: Tensor, step: int) -> list[int]:
        """D3PO's trained steps at ``step``: every stochastic step, or a seeded ``timestep_fraction`` of them."""
        steps = [k for k in range(len(stochastic)) if bool(stochastic[k])]
        frac = self.cfg.dpo.timestep_fraction
        if frac < 1 and len(steps) > 1:
            n = max(1, round(frac * len(steps)))
            pick = torch.randperm(len(steps), generator=make_generator(self.cfg.seed, "dpo_timesteps", step))[:n]
            steps = sorted(steps[i] for i in pick.tolist())
        return steps

    def select_pairs(self, combined: Tensor, valid: Tensor, group_ids: Tensor) -> tuple[list[int], list[int], list[float], list[int], int]:
        """Best (chosen) and worst (rejected) row of every group with a reward gap above
        ``min_reward_gap``: (chosen rows, rejected rows, gaps, group ids, skipped groups)."""
        w_rows, l_rows, gaps, gids, skipped = [], [], [], [], 0
        for gid in dict.fromkeys(group_ids.tolist()):
            rows = ((group_ids == gid) & valid).nonzero().flatten()
            if len(rows) < 2:
                skipped += 1
                continue
            r = combined[rows]
            gap = float(r.max() - r.min())
            if not gap > self.cfg.dpo.min_reward_gap:
                skipped += 1
                continue
            w_rows.append(int(rows[int(r.argmax())])), l_rows.append(int(rows[int(r.argmin())]))
            gaps.append(gap), gids.append(int(gid))
        return w_rows, l_rows, gaps, gids, skipped

    def online_step(self, step: int) -> dict[str, Any]:
        cfg, d, adapter = self.cfg, self.cfg.dpo, self.adapter
        sampler = self.online_sampler()
        drawn = self.prompt_source.draw(d.prompts_per_step, make_generator(cfg.seed, "prompts", step))
        local, _ = self.shard([(i, c, p) for i, (c, p) in enumerate(drawn)])
        rollout = self.sample_groups(step, local, sampler)
        b = rollout.batch_size

        outs = self.rewards.score(rollout.samples, rollout.prompts, categories=rollout.meta["categories"],
                                  group_ids=rollout.group_ids, fps=adapter.fps, sample_rate=adapter.sample_rate,
                                  num_frames=rollout.meta.get("num_frames"))
        metrics: dict[str, Any] = {"samples": d.prompts_per_step * d.group_size}
        combined, valid = torch.zeros(b), torch.ones(b, dtype=torch.bool)
        reasons = []
        for e in self.rewards.entries:
            o = outs[e.label]
            s, ok = o.scores.detach().float().cpu(), o.valid.cpu().bool()
            prefix = f"{'held_out' if e.held_out else 'reward'}/{e.label}"
            metrics.update(tensor_stats(self.gather(s), prefix))
            n_bad = int(self.gather((~ok).float()).sum())
            if n_bad:
                metrics[f"{prefix}/invalid"] = n_bad
            if not e.held_out:
                combined += e.weight * torch.where(ok, s, torch.zeros_like(s))
                valid &= ok
                reasons += [f"{e.label}: {r}" for r in o.reasons if r is not None]
        if not bool(valid.all()) and d.on_invalid_reward == "raise":
            raise ValueError(f"step {step + 1}: {int((~valid).sum())} of {b} samples were not scored by a trained reward "
                             f"({'; '.join(reasons[:5])}); set dpo.on_invalid_reward=skip to rank the rest")

        w_rows, l_rows, gaps, gids, skipped = self.select_pairs(combined, valid, rollout.group_ids)
        counts = self.gather(torch.tensor([float(len(w_rows)), float(skipped)]))
        counts = counts.view(-1, 2).sum(0)
        metrics["pairs"], metrics["skipped_groups"] = int(counts[0]), int(counts[1])
        if int(counts[0]):
            gap_sum = self.gather(torch.tensor([float(sum(gaps))])).sum()
            metrics["pair_reward_gap"] = float(gap_sum) / int(counts[0])

        n = len(w_rows)
        ga = cfg.gradient_accumulation_steps
        sums: dict[str, float] = defaultdict(float)
        bounds = np.linspace(0, n, ga + 1).round().astype(int).tolist()
        for c in range(ga):
            lo, hi = bounds[c], bounds[c + 1]
            if hi <= lo:
                continue
            cw, cl = w_rows[lo:hi], l_rows[lo:hi]
            if self.objective == "d3po":
                loss_stats = self.d3po_chunk(rollout, cw, cl, sampler, step, scale=ga * (hi - lo) / n)
            else:
                final = rollout.final_latents
                loss, loss_stats = self.diffusion_dpo_chunk(final[cw].to(adapter.device), final[cl].to(adapter.device),
                                                            [rollout.prompts[i] for i in cw],
                                                            [("online", step, g) for g in gids[lo:hi]])
                self.backward(loss, scale=ga * (hi - lo) / n)
            for k, v in loss_stats.items():
                sums[k] = max(sums[k], v) if k == "log_ratio_abs_max" else sums[k] + v * (hi - lo)
        update = self.optimizer_step()  # every process takes part (gradients are averaged), with or without pairs
        metrics.update(self._pooled(sums, n))
        metrics.update(grad_norm=update["grad_norm"], lr=update["lr"], beta=self.beta)
        return metrics

    def d3po_chunk(self, rollout, w_rows: list[int], l_rows: list[int], sampler: SamplerConfig, step: int,
                   scale: float) -> dict[str, float]:
        """D3PO on one micro-batch of pairs: one backward per trained step (graph freed in between)."""
        d, adapter = self.cfg.dpo, self.adapter
        n = len(w_rows)
        sub = rollout.select(w_rows + l_rows)
        with torch.no_grad(), self.autocast():  # encoded exactly as when sampling (same chunks, same guidance)
            cond = adapter.encode_in_chunks(sub.prompts, sub.negative_prompts, sub.meta["guidance_scale"], sampler.micro_batch)
        steps = self.trained_timesteps(sub.stochastic, step)
        sums: dict[str, float] = defaultdict(float)
        peak = 0.0
        for k in steps:
            with self.autocast():
                lp = log_prob(adapter, sub, [k], conditioning=cond, config=sampler).log_probs[:, 0]
            recorded = sub.log_probs[:, k].to(lp.device)
            peak = max(peak, float((lp.detach() - recorded).abs().max()))
            if d.d3po_reference == "sampling":
                ref = recorded
            else:
                with self.reference(), self.autocast():
                    ref = log_prob(adapter, sub, [k], conditioning=cond, config=sampler).log_probs[:, 0]
            loss, st = d3po_loss(lp[:n], lp[n:], ref[:n], ref[n:], self.beta, clip_range=d.d3po_clip_range)
            self.backward(loss, scale=scale / len(steps))
            sums["loss"] += float(loss.detach()) / len(steps)
            sums["implicit_acc"] += float(st["implicit_acc"]) / len(steps)
            sums["implicit_reward_margin"] += float(st["reward_margin"]) / len(steps)
            sums["implicit_reward_chosen"] += float(st["reward_chosen"]) / len(steps)
            sums["implicit_reward_rejected"] += float(st["reward_rejected"]) / len(steps)
        sums["log_ratio_abs_max"] = peak  # |log pi_theta - recorded| before this step's update: 0 with micro_batch fixed
        return dict(sums)


# ============================================================================ building an offline pair set


def build_pairs(
    adapter: Any,
    reward: Any,
    prompts: Sequence[str | tuple[str, str]],
    out: str | os.PathLike,
    *,
    samples_per_prompt: int = 4,
    sampler: SamplerConfig | None = None,
    min_gap: float = 0.0,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write a preference set ``out/pairs.jsonl`` (+ ``out/images/*.png``) from a model and a reward.

    Each prompt (a string, or ``(category, prompt)``) is sampled ``samples_per_prompt`` times (distinct
    noise, generator seeded by (seed, prompt index); ``sampler`` default: 10-step ODE) and scored; the
    best sample (in the reward's direction) is ``chosen``, the worst ``rejected``. Prompts whose gap is not
    above ``min_gap``, or with fewer than two scored samples, are skipped. Lines:
    ``{"prompt", "chosen", "rejected", "category", "chosen_score", "rejected_score", "reward"}`` with
    image paths relative to ``out`` (what :func:`~mmalign.rewards.judge.load_preferences` reads).
    ``reward``: a Reward, a callable, or a :class:`~mmalign.jobs.RewardConfig`. Returns counts and the path.
    """
    from ..media import save_image
    from ..samplers import sample

    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be >= 2 (a pair needs two samples), got {samples_per_prompt}")
    if adapter.modality != "image":
        raise ValueError(f"build_pairs writes image pairs; {adapter.family} makes {adapter.modality}")
    items = [("all", p) if isinstance(p, str) else (str(p[0]), str(p[1])) for p in prompts]
    if not items:
        raise ValueError("build_pairs: the prompt list is empty")
    empty = [i for i, (_, p) in enumerate(items) if not p.strip()]
    if empty:
        raise ValueError(f"build_pairs: prompts {empty[:5]} are empty")
    rewards = RewardSet.build([], [reward], device=adapter.device)  # as held out: the direction is handled here (sign)
    entry = rewards.entries[0]
    sign = 1.0 if entry.reward.higher_is_better else -1.0
    base = sampler or SamplerConfig(method="ode", num_steps=10, record_x0=False, micro_batch=None)
    base = dataclasses.replace(base, group_size=samples_per_prompt, same_noise_in_group=False, decode=True, record_x0=False)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines, ties, invalid, gaps = [], 0, 0, []
    for i, (category, prompt) in enumerate(items):
        rollout = sample(adapter, [prompt], base, generator=make_generator(seed, "make_pairs", i))
        o = rewards.score(rollout.samples, rollout.prompts, categories=[category] * rollout.batch_size,
                          group_ids=rollout.group_ids)[entry.label]
        ok = o.valid.cpu().bool()
        if int(ok.sum()) < 2:
            invalid += 1
            continue
        rows = ok.nonzero().flatten()
        s = o.scores.detach().float().cpu()[rows] * sign
        gap = float(s.max() - s.min())
        if not gap > min_gap:
            ties += 1
            continue
        best, worst = int(rows[int(s.argmax())]), int(rows[int(s.argmin())])
        names = {}
        for key, row in (("chosen", best), ("rejected", worst)):
            names[key] = f"images/{i:05d}_{key}.png"
            save_image(rollout.samples[row].float().cpu(), out / names[key])
        gaps.append(gap)
        lines.append({"prompt": prompt, "chosen": names["chosen"], "rejected": names["rejected"], "category": category,
                      "chosen_score": float(o.scores[best]), "rejected_score": float(o.scores[worst]), "reward": entry.label})
        if (i + 1) % 25 == 0:
            log(f"{i + 1}/{len(items)} prompts, {len(lines)} pairs")
    path = out / "pairs.jsonl"
    tmp = out / ".pairs.jsonl.tmp"
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)
    report = {"path": str(path), "prompts": len(items), "pairs": len(lines), "skipped_ties": ties,
              "skipped_unscored": invalid, "mean_gap": float(np.mean(gaps)) if gaps else math.nan}
    log(f"wrote {len(lines)} pairs to {path} ({ties} prompts without a reward gap, {invalid} without two scored samples)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmalign.trainers.dpo make-pairs --model M --reward R --prompts FILE --out DIR``."""
    from ..jobs import RewardConfig, read_prompt_suite
    from ..loading import load_model

    parser = argparse.ArgumentParser(prog="python -m mmalign.trainers.dpo", description="DPO utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    mp = sub.add_parser("make-pairs", help="sample prompts, score with a reward, write best-vs-worst pairs (pairs.jsonl + PNGs)")
    mp.add_argument("--model", required=True, help="tiny:<family>, a pipeline directory (e.g. assets/shapeworld-sd3) or an HF id")
    mp.add_argument("--family", default=None, help="model family when --model is an HF id that is not a family default")
    mp.add_argument("--reward", required=True, help="reward name (e.g. shapeeval, clipscore, tiny:verifiable)")
    mp.add_argument("--reward-options", default="{}", help="JSON object of reward options")
    mp.add_argument("--prompts", required=True, help="prompt suite: category<TAB>prompt lines or plain prompts")
    mp.add_argument("--out", required=True, help="output directory (pairs.jsonl, images/)")
    mp.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    mp.add_argument("--num-steps", type=int, default=10, help="ODE sampling steps (default 10)")
    mp.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the family's)")
    mp.add_argument("--min-gap", type=float, default=0.0, help="keep pairs whose reward gap is above this (default 0)")
    mp.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--device", default="cpu")
    mp.add_argument("--dtype", default=None, help="model dtype (float32, bfloat16, float16)")
    mp.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.reward_options)
        if not isinstance(options, dict):
            raise ValueError("--reward-options must be a JSON object")
        if args.threads:
            torch.set_num_threads(args.threads)
        items = read_prompt_suite(args.prompts)[: args.max_prompts]
        adapter = load_model(args.model, family=args.family, torch_dtype=args.dtype, device=args.device, seed=args.seed)
        sampler = SamplerConfig(method="ode", num_steps=args.num_steps, guidance_scale=args.guidance_scale,
                                record_x0=False, micro_batch=None)
        with torch.no_grad():
            report = build_pairs(adapter, RewardConfig(args.reward, options, args.device), items, args.out,
                                 samples_per_prompt=args.samples, sampler=sampler, min_gap=args.min_gap, seed=args.seed,
                                 log=lambda text: print(text, file=sys.stderr))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))  # the report on stdout, progress on stderr
    return 0


if __name__ == "__main__":
    sys.exit(main())

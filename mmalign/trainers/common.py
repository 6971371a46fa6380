"""Training machinery every trainer shares: configs, model setup, optimisation, distribution,
checkpoints, logging and evaluation.

A trainer (``grpo.py``, later DPO, PRDP, DenseGRPO, RWR, reward backprop) is a subclass of
:class:`Trainer` that sets ``config_class`` (a :class:`TrainConfig` subclass adding its own section)
and implements :meth:`Trainer.train_step`; everything else comes from here, as plain pieces it calls:

==========================  =========================================================================
``Trainer.__init__``        accelerate (1 CPU, 1 GPU, N processes), model, LoRA or full finetuning,
                            gradient checkpointing, AdamW with per-group learning rates, LR warmup
                            and decay, EMA, rewards, prompts, logger, checkpoints, ``resume``
``autocast()``              mixed precision ("no" / "bf16" / "fp16") for rollouts *and* training
``backward(loss)``          one micro-batch's loss, scaled by ``1 / gradient_accumulation_steps``
``optimizer_step()``        averages gradients over processes, clips, steps, LR schedule, EMA
``reference()``             the reference policy: LoRA disabled, or the frozen copy (full finetuning)
``sample_groups(...)``      seeded rollouts per prompt, identical whatever the number of processes
``gather(...)``             every process's rows, in rank order (group advantages need them all)
``rewards.score(...)``      trained and held-out rewards on the same samples (:class:`RewardSet`)
``evaluate(step)``          fixed prompts and seeds: sample grid PNG + eval rewards in the JSONL
``save_checkpoint(step)``   weights (LoRA only when LoRA), EMA, optimizer, scheduler, RNG, step,
                            ``extra_state()`` of the algorithm;
                            written atomically (temp dir, fsync, ``os.replace``, then ``latest``)
``fit()``                   the loop: train_step, logging, eval, checkpoints, progress bar
==========================  =========================================================================

Why gradients are averaged by hand rather than by DDP: the adapter calls its denoiser inside the
diffusers pipeline (``pipeline.transformer``), so a DDP wrapper would never see the forward pass;
one all-reduce of the trainable gradients before clipping is the same update, and it also works
across reference passes (LoRA disabled) and gradient checkpointing.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ..jobs import ModelConfig, RewardConfig, _jsonable, read_prompt_suite
from ..samplers import SamplerConfig
from ..types import Rollout

# ============================================================================ configs


@dataclass
class LoRAConfig:
    """LoRA on the denoiser, or full finetuning."""

    enabled: bool = True
    """Train a LoRA (True) or every denoiser weight (False: full finetuning; the reference policy is then
    a frozen copy of the initial weights, kept in memory)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float | None = None
    """LoRA alpha (update scale alpha / rank); None = rank."""
    target_modules: list[str] | None = None
    """Module names the LoRA attaches to (peft ``target_modules``); None = the family's defaults."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty: give module names, or null for the family's defaults")


@dataclass
class ParamGroupConfig:
    """Parameters whose names match a pattern, with their own learning rate / weight decay."""

    match: str
    """Regular expression searched in each trainable parameter's name (the first matching group wins)."""
    lr: float | None = None
    """Learning rate of the group; None = optim.lr."""
    weight_decay: float | None = None
    """Weight decay of the group; None = optim.weight_decay."""

    def __post_init__(self) -> None:
        try:
            re.compile(self.match)
        except re.error as err:
            raise ValueError(f"match {self.match!r} is not a regular expression: {err}") from None
        if self.lr is not None and self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")


@dataclass
class OptimConfig:
    """AdamW, gradient clipping and the learning-rate schedule (counted in optimizer updates)."""

    lr: float = 1e-4
    """Learning rate (after warmup)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-4
    """AdamW (decoupled) weight decay."""
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    """Per-parameter-group overrides, e.g. ``[{match: 'attn\\.to_q', lr: 1e-5}]``; the rest use lr."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (after averaging over processes); None = no clipping."""
    warmup_steps: int = 0
    """Optimizer updates of linear warmup from lr / warmup_steps to lr."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """LR after warmup: constant, or linear / cosine decay to ``min_lr_ratio * lr`` at the last update."""
    min_lr_ratio: float = 0.0
    """Final LR of the linear / cosine decay, as a fraction of lr."""

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights."""

    enabled: bool = False
    """Keep an EMA copy (float32) of the trained weights, saved with checkpoints."""
    decay: float = 0.99
    """EMA decay per update: ema = decay * ema + (1 - decay) * weights."""
    every: int = 1
    """Optimizer updates between EMA updates."""
    use_for_eval: bool = True
    """Evaluate with the EMA weights (swapped in for the evaluation only)."""

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


@dataclass
class CheckpointConfig:
    """When to write checkpoints and how many to keep."""

    every: int = 0
    """Save every N training steps (0: only at the end)."""
    keep_last: int = 2
    """Keep the newest N checkpoints (0: keep all)."""
    save_final: bool = True
    """Save after the last step."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 0:
            raise ValueError("every and keep_last must be >= 0")


@dataclass
class LoggingConfig:
    """Where metrics go: stdout, ``<out>/metrics.jsonl``, TensorBoard and W&B (when installed and enabled)."""

    every: int = 1
    """Print and record training metrics every N steps."""
    stdout: bool = True
    """Print a line per logged step (main process only)."""
    jsonl: bool = True
    """Append every logged step (and eval) to ``<out>/metrics.jsonl``."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to ``<out>/tensorboard`` (needs the tensorboard package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package and a login)."""
    wandb_project: str = "mmalign"
    """W&B project name."""
    run_name: str | None = None
    """Run name for W&B / TensorBoard; None = the output directory's name."""
    progress: bool | None = None
    """tqdm progress bar over steps; None = only when stderr is a terminal."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")


@dataclass
class EvalConfig:
    """Evaluation during training: fixed prompts and seeds, ODE sampling, a grid PNG and eval rewards."""

    every: int = 0
    """Evaluate every N training steps (0: never)."""
    at_start: bool = True
    """Also evaluate before the first step (the baseline), when every > 0 and not resuming."""
    prompts: list[str] = field(default_factory=list)
    """Evaluation prompts (used when prompts_file is null)."""
    prompts_file: str | None = None
    """A prompt suite (``category<TAB>prompt`` lines, e.g. the held-out split); null = ``prompts``, or the
    first training prompts when that is empty too."""
    max_prompts: int | None = 8
    """Use at most this many evaluation prompts."""
    seeds: list[int] = field(default_factory=lambda: [1000, 1001])
    """One sample per prompt and seed (the grid's rows are seeds)."""
    num_steps: int | None = None
    """Sampling steps; null = the training sampler's num_steps."""
    guidance_scale: float | None = None
    """Guidance scale; null = the training sampler's."""
    method: Literal["ode", "train"] = "ode"
    """``ode``: deterministic sampling (Euler / DDIM eta 0); ``train``: the training sampler (SDE)."""
    upscale: int = 4
    """Nearest-neighbour upscaling of the saved grid."""
    batch_size: int | None = 32
    """Prompts sampled together per seed (null = all at once); one generator per seed runs through the
    chunks, so a run's evaluations are comparable with each other."""
    by_category: bool = True
    """Also log each reward (and its components, e.g. shapeeval's ``strict``) per prompt category
    (``eval/<reward>/cat/<category>``) when the prompts come from a suite with categories."""
    report: bool = True
    """At the end of ``fit``: ``report.json`` (first vs last evaluation), ``curves.png``, ``before.png`` /
    ``after.png`` (see :mod:`mmalign.trainers.report`)."""
    report_targets: dict[str, float] = field(default_factory=dict)
    """Metrics whose gap to a target the report measures, e.g. ``{"eval/shapeeval:strict/mean": 1.0}``
    (gap closed = (last - first) / (target - first))."""

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or null, got {self.batch_size}")
        if self.every < 0:
            raise ValueError(f"every must be >= 0, got {self.every}")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or null, got {self.max_prompts}")
        if self.upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {self.upscale}")


@dataclass
class PromptsConfig:
    """Training prompts: a prompt suite file (its train split) or an inline list."""

    file: str | None = None
    """Prompt suite file: ``category<TAB>prompt`` lines or plain prompts (``#`` comments skipped)."""
    prompts: list[str] = field(default_factory=list)
    """Inline prompts (used when file is null)."""
    categories: list[str] | None = None
    """Train only on these categories of the suite; null = all."""


@dataclass
class TrainRewardConfig(RewardConfig):
    """A reward of a training run (name / options / device as in ``mmalign score``), with a weight."""

    weight: float = 1.0
    """Weight of this reward in the trained combination (ignored for held-out rewards). Use a negative
    weight to lower a reward."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Extra metadata given with every sample to rewards that read metadata (e.g. the ``verifiable``
    rule's ``target_color``); each item also gets its prompt, category and group_id."""


@dataclass(kw_only=True)
class TrainConfig:
    """What every ``mmalign train`` config holds; trainers subclass it and add their own section."""

    algorithm: str
    """Training algorithm (``mmalign list trainers``), e.g. ``grpo``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to train (``device: auto`` = this process's accelerator device)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA or full finetuning."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, gradient clipping, learning-rate schedule."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the trained weights."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="ode", num_steps=10))
    """Sampler of rollouts (and, as ODE, of evaluation)."""
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    """Training prompts."""
    rewards: list[TrainRewardConfig] = field(default_factory=list)
    """Trained rewards, combined with their weights."""
    held_out_rewards: list[TrainRewardConfig] = field(default_factory=list)
    """Rewards scored on the same samples and logged, never trained on (watch for reward hacking)."""
    max_steps: int = 100
    """Training steps (one step = one rollout batch and its updates, for on-policy trainers)."""
    max_minutes: float | None = None
    """Wall-clock budget of the training loop: no new step starts after this many minutes (the final
    evaluation, checkpoint and report still run); null = none. Runs stopped by it are not step-for-step
    reproducible on another machine: prefer max_steps, use this as a cap."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are summed before one optimizer update."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """accelerate mixed precision for rollouts and training (trained weights stay float32)."""
    gradient_checkpointing: bool = False
    """Recompute denoiser activations in the backward pass (less memory, more compute)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How N processes share the work. ``ddp``: every process holds the whole denoiser and the trained
    gradients are averaged over processes. ``fsdp``: the denoiser is sharded with FSDP2
    (``torch.distributed.fsdp.fully_shard``, one unit per block of its ``nn.ModuleList``s, then the
    root): parameters, gradients and optimizer state are split over processes and gathered block by
    block in each forward, for models too large for one device. Checkpoints hold full (unsharded)
    tensors either way, so a run resumes on any number of processes. One process: no effect."""
    seed: int = 0
    """Seed of everything: prompts, rollout noise, tiny model weights, LoRA init."""
    threads: int | None = None
    """torch CPU threads (``torch.set_num_threads``); null = torch's default. Toy models on a busy CPU
    run far faster with 1."""
    out: str = "runs/train"
    """Output directory: metrics.jsonl, checkpoints/, eval/."""
    resume: str | None = None
    """Resume from ``latest`` (this out's newest checkpoint; starts fresh when there is none), a
    checkpoint directory, or a run directory."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint frequency and retention."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics destinations."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""

    #: whether ``sampler.start_step > 0`` (an InstructVideo partial chain) is supported by this algorithm
    supports_partial_chain: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.sampler.start_step > 0 and not type(self).supports_partial_chain:
            raise ValueError(f"sampler.start_step {self.sampler.start_step}: partial chains are supported by algorithm "
                             f"grpo only; {self.algorithm} samples whole chains (set sampler.start_step: 0)")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 or null, got {self.max_minutes}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if not self.out:
            raise ValueError("out must be a directory path")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")
        if (self.eval.method == "train" and self.sampler.noise_levels is not None
                and self.eval.num_steps not in (None, self.sampler.num_steps)):
            raise ValueError(f"eval.num_steps {self.eval.num_steps} differs from sampler.num_steps {self.sampler.num_steps}, but "
                             "sampler.noise_levels has one level per training step: use eval.method: ode or the training num_steps")


def trainer_class(algorithm: str) -> type["Trainer"]:
    """The registered trainer class of ``algorithm`` (importing its module)."""
    from . import TRAINERS  # noqa: F401  (registers the trainers)
    from ..registry import RegistryError

    try:
        return TRAINERS.get(algorithm)
    except RegistryError as err:
        raise ConfigError(f"algorithm: {err}") from None


def load_train_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A training config from YAML + ``key.sub=value`` overrides, typed by its ``algorithm``'s config
    class (strict: unknown keys and bad values raise :class:`ConfigError` naming the key)."""
    data = apply_overrides(copy.deepcopy(load_yaml(path) if path is not None else {}), overrides)
    algorithm = data.get("algorithm")
    if algorithm is None:
        from . import TRAINERS

        raise ConfigError(f"missing required config key(s) algorithm (one of: {', '.join(TRAINERS.names())})")
    if not isinstance(algorithm, str):
        raise ConfigError(f"algorithm: expected str, got {type(algorithm).__name__} {algorithm!r}")
    return from_dict(trainer_class(algorithm).config_class, data)


_UNION: type | None = None


def train_config_class() -> type:
    """One dataclass holding every registered trainer's config fields (``mmalign.cli.config_kinds``'s
    ``train`` kind, so ``load_config(cls, "configs/train_x.yaml")`` works for any algorithm).

    Built from the registered trainers' ``config_class`` by inheritance; its validation builds the
    config of the chosen ``algorithm`` (running that class's checks) and rejects sections that belong
    to another algorithm.
    """
    global _UNION
    if _UNION is not None:
        return _UNION
    from . import TRAINERS

    classes = list(dict.fromkeys(trainer_class(n).config_class for n in TRAINERS.names()))
    # a config class that another one extends (GRPO under DenseGRPO) is already in its bases: keeping
    # both could make the method resolution order inconsistent (base listed before subclass)
    classes = [c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)]

    def __post_init__(self) -> None:
        cls = trainer_class(self.algorithm).config_class
        own = {f.name for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(self):
            if f.name in own:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if getattr(self, f.name) != default:
                raise ValueError(f"section {f.name!r} does not apply to algorithm {self.algorithm!r}")
        cls(**{n: getattr(self, n) for n in own})  # the algorithm's own validation

    _UNION = dataclasses.make_dataclass(
        "TrainJobConfig", [], bases=tuple(classes) or (TrainConfig,), kw_only=True,
        namespace={"__post_init__": __post_init__, "__doc__": "Any registered trainer's config (dispatch on algorithm)."},
    )
    _UNION.__module__ = __name__
    return _UNION


# ============================================================================ small helpers


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``seed`` and keys (purpose, step, index...): the same on every process and
    for every number of processes, so a row's randomness depends only on what the row is."""
    ints = [int(seed) % 2**32] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) % 2**32 for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0]) % 2**63


def make_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` (CPU: the same numbers on every device)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


@torch.no_grad()
def decoded_media_shape(adapter) -> tuple[int, ...]:
    """The shape of one decoded sample (image 3,H,W; video T,3,H,W; audio C,N), from decoding zero latents:
    the size dataset media must be brought to."""
    return tuple(adapter.decode(torch.zeros(adapter.latent_shape(1), device=adapter.device)).shape[1:])


@dataclass
class MediaRecord:
    """One line of a prompt + media dataset (GRPO partial chains, RWR's scored dataset): the prompt,
    its media file, its reward when the dataset is scored, a category, and ``file.jsonl:LINE``."""

    prompt: str
    media: Path
    category: str
    source: str
    reward: float | None = None


def read_media_dataset(path: str | os.PathLike, modality: str, what: str, *, scored: bool = False) -> list[MediaRecord]:
    """Records of a JSONL file of ``{"prompt": ..., "<modality>": path[, "reward": x][, "category": ...]}``
    lines (``modality`` image or video; ``reward`` required when ``scored``). ``what`` names the option
    in errors. ValueError naming the file and line of a bad one (missing key, wrong type, missing media
    file, non-finite reward); FileNotFoundError for a missing file."""
    from ..rewards.judge import _resolve_media, read_jsonl_objects

    if modality not in ("image", "video"):
        raise NotImplementedError(f"{what}: datasets hold images or videos; this model makes {modality}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} does not exist")
    records = []
    for where, rec in read_jsonl_objects(path, ("prompt", modality) + (("reward",) if scored else ())):
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise ValueError(f"{where}: prompt must be a non-empty string")
        if not isinstance(rec[modality], str):
            raise ValueError(f"{where}: {modality} must be a file path string")
        reward = None
        if scored:
            reward = rec["reward"]
            if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
                raise ValueError(f"{where}: reward must be a finite number, got {reward!r}")
            reward = float(reward)
        category = rec.get("category", "all")
        if not isinstance(category, str):
            raise ValueError(f"{where}: category must be a string, got {type(category).__name__}")
        media = _resolve_media(path.parent, rec[modality], where, modality)
        records.append(MediaRecord(rec["prompt"], media, category, where, reward))
    if not records:
        raise ValueError(f"{what}: {path} holds no records")
    return records


def fit_image(image: Tensor, height: int, width: int) -> Tensor:
    """3,h,w -> 3,height,width: resize the shorter side (bilinear, antialiased), then centre-crop."""
    from ..rewards.preprocess import resize_cover_crop

    return resize_cover_crop(image, (height, width), "bilinear").clamp(0, 1)


def fit_media(record: MediaRecord, modality: str, size: tuple[int, ...], *, resize_option: str | None = None) -> Tensor:
    """The record's media at the model's ``size`` (image 3,H,W; video T,3,H,W), in [0, 1]: frames resized
    (shorter side, then centre crop); a video's frame count must match. ``resize_option``: the name of a
    switched-off option that would allow resizing; when given, a size mismatch is an error naming it."""
    from ..media import load_media

    (item,), (why,) = load_media([record.media], modality)
    if why is not None:
        raise ValueError(f"{record.source}: {modality} {str(record.media)!r} cannot be used: {why}")
    if modality == "video" and item.shape[0] != size[0]:
        raise ValueError(f"{record.source}: video {str(record.media)!r} has {item.shape[0]} frames, the model makes {size[0]}")
    height, width = size[-2:]
    if tuple(item.shape[-2:]) != (height, width):
        if resize_option is not None:
            raise ValueError(f"{record.source}: {modality} {str(record.media)!r} is {item.shape[-1]}x{item.shape[-2]}, the model "
                             f"makes {width}x{height} (resize the data, or set {resize_option}: true)")
        item = torch.stack([fit_image(f, height, width) for f in item]) if modality == "video" else fit_image(item, height, width)
    return item


def cat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Concatenate rollouts of one sampler config along the batch (per-row fields joined; the
    schedule, step flags and meta taken from the first). ``group_ids`` are kept as they are."""
    if not parts:
        raise ValueError("cat_rollouts: nothing to concatenate")
    first = parts[0]
    for p in parts[1:]:
        if p.num_steps != first.num_steps or not torch.equal(p.stochastic, first.stochastic):
            raise ValueError("cat_rollouts: rollouts differ in steps or SDE window")

    def cat(name: str) -> Tensor | None:
        vals = [getattr(p, name) for p in parts]
        if any(v is None for v in vals):
            return None
        return torch.cat(vals)

    negs = [p.negative_prompts for p in parts]
    return dataclasses.replace(
        first,
        prompts=[q for p in parts for q in p.prompts],
        negative_prompts=None if any(n is None for n in negs) else [q for n in negs for q in n],
        latents=cat("latents"), log_probs=cat("log_probs"), samples=cat("samples"), x0_pred=cat("x0_pred"),
        noise=cat("noise"), group_ids=cat("group_ids"), meta=dict(first.meta),
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old or the new content, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2-sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor behind a sharded parameter (a collective: every process must call it), or ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def like_param(full: Tensor, p: Tensor) -> Tensor:
    """``full`` (a whole tensor, the same on every process) laid out like parameter ``p``: this
    process's shard as a DTensor when ``p`` is sharded, else ``full`` on ``p``'s device and dtype."""
    full = full.to(device=p.device if not is_sharded(p) else p.to_local().device, dtype=p.dtype)
    if is_sharded(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements)
    return full


def shard_module(module: nn.Module) -> int:
    """FSDP2-shard ``module`` over the default process group: each element of its outermost
    ``nn.ModuleList``s (transformer/UNet blocks) becomes one unit, gathered only for its own forward,
    then the root takes the remaining weights. Returns the number of units. In place: the object
    stays the one the diffusers pipeline calls."""
    from torch.distributed.fsdp import fully_shard

    blocks: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                blocks.extend(b for b in child if any(True for _ in b.parameters()))
            else:
                visit(child)

    visit(module)
    for b in blocks:
        fully_shard(b)
    fully_shard(module)
    return len(blocks) + 1


@contextmanager
def swapped_weights(params: Sequence[nn.Parameter], tensors: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily give ``params`` the values of ``tensors``; restored on exit. Plain parameters are
    re-pointed (no copy when dtypes match); sharded ones are copied in place, because FSDP gathers
    from its own shard storage, not from whatever ``.data`` points at."""
    if any(is_sharded(p) for p in params):
        with torch.no_grad():
            saved_values = [p.detach().clone() for p in params]
            try:
                for p, t in zip(params, tensors):
                    p.copy_(t)
                yield
            finally:
                for p, v in zip(params, saved_values):
                    p.copy_(v)
        return
    saved = [p.data for p in params]
    try:
        for p, t in zip(params, tensors):
            p.data = t if t.dtype == p.dtype and t.device == p.device else t.to(device=p.device, dtype=p.dtype)
        yield
    finally:
        for p, s in zip(params, saved):
            p.data = s


class EMA:
    """Float32 exponential moving average of named parameters."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params: Sequence[tuple[str, nn.Parameter]]) -> None:
        for n, p in named_params:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)  # ema = d * ema + (1 - d) * p

    def swapped_in(self, named_params: Sequence[tuple[str, nn.Parameter]]):
        """Context: the parameters hold the EMA weights inside the block."""
        return swapped_weights([p for _, p in named_params], [self.shadow[n] for n, _ in named_params])


def build_optimizer(named_params: Sequence[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``named_params`` with ``cfg.param_groups`` (first matching pattern wins; a pattern that
    matches nothing raises, naming it)."""
    if not named_params:
        raise ValueError("no trainable parameters")
    buckets: list[list[nn.Parameter]] = [[] for _ in cfg.param_groups]
    rest: list[nn.Parameter] = []
    for name, p in named_params:
        for i, g in enumerate(cfg.param_groups):
            if re.search(g.match, name):
                buckets[i].append(p)
                break
        else:
            rest.append(p)
    groups = []
    for i, (g, ps) in enumerate(zip(cfg.param_groups, buckets)):
        if not ps:
            raise ValueError(f"optim.param_groups[{i}].match {g.match!r} matches no trainable parameter "
                             f"(e.g. {named_params[0][0]!r})")
        groups.append({"params": ps, "lr": cfg.lr if g.lr is None else g.lr,
                       "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay, "name": g.match})
    if rest:
        groups.append({"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "default"})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(update: int, cfg: OptimConfig, total_updates: int) -> float:
    """LR multiplier of optimizer update ``update`` (0-based): linear warmup, then the schedule."""
    if cfg.warmup_steps and update < cfg.warmup_steps:
        return (update + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_updates - cfg.warmup_steps - 1)
    progress = min(1.0, max(0.0, (update - cfg.warmup_steps) / span))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def reward_series(label: str, out: Any) -> dict[str, Tensor]:
    """The per-item series an evaluation reports of one reward's output (float32, CPU): ``label`` -> the
    scores, ``label:<component>`` -> each scalar component (1-D, one value per item)."""
    series = {label: out.scores.detach().float().cpu()}
    for name, comp in (out.components or {}).items():
        if isinstance(comp, Tensor) and comp.dim() == 1 and comp.numel() == out.scores.numel():
            series[f"{label}:{name}"] = comp.detach().float().cpu()
    return series


def eval_reward_metrics(label: str, out: Any, categories: Sequence[str] | None = None) -> dict[str, Any]:
    """Evaluation metrics of one reward's :class:`~mmalign.rewards.RewardOutput`: ``eval/<label>/...``
    stats of the scores, ``eval/<label>:<component>/mean`` per scalar component, the invalid count, and
    with ``categories`` (one per item, more than one distinct) ``.../cat/<category>`` means. Invalid items
    (NaN) are left out of means."""
    m: dict[str, Any] = {}
    valid = out.valid.bool().cpu()
    for key, vals in reward_series(label, out).items():
        ok = vals[valid]
        if key == label:
            m.update(tensor_stats(ok, f"eval/{key}") if ok.numel() else {f"eval/{key}/mean": float("nan")})
        else:
            m[f"eval/{key}/mean"] = float(ok.mean()) if ok.numel() else float("nan")
        if categories is not None and len(set(categories)) > 1:
            per_cat = []
            for cat in sorted(set(categories)):
                rows = torch.tensor([c == cat for c in categories]) & valid
                if bool(rows.any()):
                    m[f"eval/{key}/cat/{cat}"] = float(vals[rows].mean())
                    per_cat.append(m[f"eval/{key}/cat/{cat}"])
            # GenEval's overall score: the mean over categories (suites are rarely balanced)
            m[f"eval/{key}/category_mean"] = sum(per_cat) / len(per_cat) if per_cat else float("nan")
    m[f"eval/{label}/invalid"] = int((~valid).sum())
    return m


def eval_sample_rows(outs: Any, prompts: Sequence[str], categories: Sequence[str], seeds: Sequence[int]) -> str:
    """JSONL text, one line per evaluated sample: ``{"index", "prompt", "category", "seed", "<label>": score,
    "<label>:<component>": value, ...}`` for every reward in ``outs`` (label -> RewardOutput); ``index`` is
    the prompt's position in the evaluation's prompt list (a prompt listed twice is two samples); invalid
    scores are written as null. Read back by :func:`mmalign.trainers.report.read_eval_scores`."""
    positions: dict[int, int] = {}
    rows: list[dict[str, Any]] = []
    for p, c, s in zip(prompts, categories, seeds):
        index = positions.get(int(s), 0)
        positions[int(s)] = index + 1
        rows.append({"index": index, "prompt": p, "category": c, "seed": int(s)})
    for label, out in outs.items():
        valid = out.valid.bool().cpu().tolist()
        for key, vals in reward_series(label, out).items():
            for row, v, ok in zip(rows, vals.tolist(), valid):
                row[key] = v if ok and math.isfinite(v) else None
    return "".join(json.dumps(r) + "\n" for r in rows)


def seed_diversity(samples: Tensor, num_prompts: int) -> float:
    """Sample diversity: the mean root-mean-square pixel difference between samples of the same prompt
    drawn with different seeds (``samples``: S*P,... in seed-major order). 0 = every seed gives the same
    sample (collapse)."""
    s = samples.float().reshape(-1, num_prompts, *samples.shape[1:])
    n = s.shape[0]
    if n < 2:
        raise ValueError("seed_diversity needs samples from at least two seeds")
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            d = (s[i] - s[j]).flatten(1).pow(2).mean(1).sqrt()
            total += float(d.mean())
            pairs += 1
    return total / pairs


def tensor_stats(x: Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}/mean|std|min|max`` of the finite values of ``x`` (population std)."""
    v = x.detach().float().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return {f"{prefix}/{k}": float("nan") for k in ("mean", "std", "min", "max")}
    return {f"{prefix}/mean": float(v.mean()), f"{prefix}/std": float(v.std(unbiased=False)),
            f"{prefix}/min": float(v.min()), f"{prefix}/max": float(v.max())}


# ============================================================================ prompts and rewards


class PromptSource:
    """The training prompts as (category, prompt) pairs, drawn per step by a seeded generator."""

    def __init__(self, cfg: PromptsConfig) -> None:
        if cfg.file:
            items = read_prompt_suite(cfg.file)
        else:
            items = [("all", p) for p in cfg.prompts]
        if cfg.categories is not None:
            known = sorted({c for c, _ in items})
            unknown = sorted(set(cfg.categories) - set(known))
            if unknown:
                raise ValueError(f"prompts.categories {unknown} not in the suite (categories: {known})")
            items = [(c, p) for c, p in items if c in cfg.categories]
        if not items:
            raise ValueError("no training prompts: set prompts.file (a prompt suite) or prompts.prompts")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def draw(self, n: int, generator: torch.Generator) -> list[tuple[str, str]]:
        """``n`` items: distinct while the suite has enough, with repeats otherwise."""
        if n <= len(self.items):
            idx = torch.randperm(len(self.items), generator=generator)[:n]
        else:
            idx = torch.randint(0, len(self.items), (n,), generator=generator)
        return [self.items[i] for i in idx.tolist()]


@dataclass
class RewardEntry:
    """One built reward of a run."""

    label: str
    reward: Any  # mmalign.rewards.Reward
    weight: float = 1.0
    held_out: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


class RewardSet:
    """The trained rewards (with weights) and the held-out ones, scored on the same samples."""

    def __init__(self, entries: Sequence[RewardEntry]) -> None:
        labels = [e.label for e in entries]
        dup = sorted({l for l in labels if labels.count(l) > 1})
        if dup:
            raise ValueError(f"reward labels {dup} appear twice")
        self.entries = list(entries)

    @classmethod
    def build(cls, trained: Sequence[Any], held_out: Sequence[Any], device: str | torch.device = "cpu") -> "RewardSet":
        """From :class:`TrainRewardConfig` items, or Reward objects / callables / ``(reward, weight)``
        pairs (Python API); ``device: auto`` rewards go to ``device``."""
        from ..jobs import build_reward
        from ..rewards import as_reward

        entries: list[RewardEntry] = []
        seen: dict[str, int] = {}
        for held, items in ((False, trained), (True, held_out)):
            for item in items:
                weight, metadata = 1.0, {}
                if isinstance(item, RewardConfig):
                    rc = item if item.device != "auto" else dataclasses.replace(item, device=str(device))
                    reward = build_reward(rc)
                    weight = getattr(item, "weight", 1.0)
                    metadata = dict(getattr(item, "metadata", {}) or {})
                else:
                    if isinstance(item, tuple):
                        item, weight = item
                    reward = as_reward(item)
                label = str(getattr(reward, "name", "reward"))
                seen[label] = seen.get(label, 0) + 1
                if seen[label] > 1:
                    label = f"{label}#{seen[label] - 1}"
                if "reference" in reward.needs:
                    raise ValueError(f"reward {label!r} needs reference samples, which on-policy training does not have")
                if not held and not reward.higher_is_better and weight > 0:
                    warnings.warn(f"reward {label!r} is lower-is-better but has a positive weight: training raises it "
                                  "(give it a negative weight to lower it)", stacklevel=2)
                entries.append(RewardEntry(label, reward, float(weight), held, metadata))
        return cls(entries)

    @property
    def trained(self) -> list[RewardEntry]:
        return [e for e in self.entries if not e.held_out]

    @property
    def held_out(self) -> list[RewardEntry]:
        return [e for e in self.entries if e.held_out]

    def frames_needed(self, num_frames: int) -> int:
        """How many leading frames of a ``num_frames``-frame video every reward of the set reads
        (``num_frames`` unless each one reads only some frames, e.g. frame-sampled image rewards)."""
        from ..rewards.base import frames_read_by

        idx = frames_read_by([e.reward for e in self.entries], num_frames)
        return int(num_frames) if not idx else idx[-1] + 1

    def score(
        self,
        samples: Tensor,
        prompts: Sequence[str],
        *,
        categories: Sequence[str] | None = None,
        group_ids: Tensor | None = None,
        fps: float | None = None,
        sample_rate: int | None = None,
        num_frames: int | None = None,
        grad: bool = False,
        which: Literal["all", "trained", "held_out"] = "all",
    ) -> dict[str, Any]:
        """``{label: RewardOutput}`` for the chosen rewards (no gradients unless ``grad``). ``num_frames``:
        the generated video length when ``samples`` hold only a prefix (:meth:`frames_needed`)."""
        outputs = {}
        entries = {"all": self.entries, "trained": self.trained, "held_out": self.held_out}[which]
        for e in entries:
            meta = None
            if "metadata" in e.reward.needs:
                meta = [{"prompt": p, "category": None if categories is None else categories[i],
                         "group_id": None if group_ids is None else int(group_ids[i]), **e.metadata}
                        for i, p in enumerate(prompts)]
            kwargs = {k: v for k, v in (("fps", fps), ("sample_rate", sample_rate), ("num_frames", num_frames)) if v is not None}
            with torch.enable_grad() if grad else torch.no_grad():
                x = samples.to(e.reward.device)
                outputs[e.label] = e.reward(x, list(prompts), metadata=meta, **kwargs)
        return outputs


# ============================================================================ logging


class MetricsLogger:
    """Per-step metrics to stdout, ``metrics.jsonl``, and TensorBoard / W&B when installed and enabled.
    Only the main process writes."""

    SHOWN = ("loss", "kl", "clip_frac", "grad_norm", "lr", "samples_per_s")

    def __init__(self, out: Path, cfg: LoggingConfig, *, enabled: bool, run_config: dict[str, Any] | None = None,
                 print_fn: Callable[[str], None] = print) -> None:
        self.cfg, self.enabled, self.print = cfg, enabled, print_fn
        self.path = out / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        name = cfg.run_name or out.name
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                print_fn("logging.tensorboard is on but tensorboard is not installed: skipping it")
        if cfg.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, name=name, dir=str(out), config=run_config or {})
            except ImportError:
                print_fn("logging.wandb is on but wandb is not installed: skipping it")

    def set_aside_previous_run(self) -> Path | None:
        """A run starting from step 0 in a directory that holds an earlier run's ``metrics.jsonl``: move that
        file to ``metrics.previous-N.jsonl`` (kept, never overwritten) so this run's report and curves read
        only this run. Returns the new path of the old file, or None."""
        if not self.enabled or not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        n = 1
        while (target := self.path.with_name(f"metrics.previous-{n}.jsonl")).exists():
            n += 1
        self.path.rename(target)
        return target

    def log(self, metrics: dict[str, Any], step: int, kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (Tensor, np.floating, np.integer)) else v) for k, v in metrics.items()}
        if self.cfg.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(_jsonable({"kind": kind, "step": step, "time": round(time.time(), 3), **clean})) + "\n")
        if self.cfg.stdout:
            shown = [k for k in clean if k in self.SHOWN or k.endswith("/mean")]
            parts = [f"{k} {_fmt(clean[k])}" for k in shown]
            self.print(f"[{kind}] step {step}  " + "  ".join(parts))
        numeric = {f"{kind}/{k}": v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4g}"
    return str(v)


# ============================================================================ the trainer


class Trainer:
    """Base of every trainer: builds the shared machinery from a :class:`TrainConfig`; subclasses set
    :attr:`config_class` and implement :meth:`train_step` (and :meth:`updates_per_step` if they make
    more than one optimizer update per step).

    Python API: ``Trainer(cfg, adapter=..., rewards=[reward_or_callable | (reward, weight)],
    held_out_rewards=[...])`` uses given objects instead of building them from the config.
    """

    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    CHECKPOINT_FORMAT: ClassVar[int] = 1

    def __init__(
        self,
        config: TrainConfig,
        *,
        adapter: Any = None,
        rewards: Sequence[Any] | None = None,
        held_out_rewards: Sequence[Any] | None = None,
        accelerator: Any = None,
        log: Callable[[str], None] = print,
    ) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.cfg = config
        self._print = log
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.accelerator = accelerator or self._make_accelerator()
        self.out = Path(config.out)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.check_setup(rewards)
        self._seed_everything(derive_seed(config.seed, "setup"))  # the same on every process: same LoRA init
        self.adapter = adapter if adapter is not None else self._load_model()
        self._setup_trainable()
        self.optimizer = self.accelerator.prepare(build_optimizer(self.named_trainable, config.optim))
        total = max(1, config.max_steps * self.updates_per_step())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            lambda u: lr_factor(u, config.optim, total))
        self.ema = EMA(self.named_trainable, config.ema.decay) if config.ema.enabled else None
        self.rewards = RewardSet.build(config.rewards if rewards is None else rewards,
                                       config.held_out_rewards if held_out_rewards is None else held_out_rewards,
                                       device=self.accelerator.device)
        self.generators: dict[str, torch.Generator] = {}  # stateful generators of a subclass: saved in checkpoints
        self.step = 0  # completed training steps
        self.updates = 0  # optimizer updates so far
        self._accum = 0  # micro-batches since the last update
        self.history: list[dict[str, Any]] = []
        self.logger = MetricsLogger(self.out, config.logging, enabled=self.is_main, run_config=to_dict(config), print_fn=self.log)
        if self.is_main:  # the resolved config beside the run's outputs (``mmalign report`` reads its targets)
            import yaml

            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        self.ckpt_dir = self.out / "checkpoints"
        self.setup()
        if config.resume:
            path = self.resolve_checkpoint(config.resume)
            if path is None:
                self.log(f"resume={config.resume!r}: no checkpoint under {self.ckpt_dir} yet, starting from step 0")
            else:
                self.load_checkpoint(path)
        if self.step == 0:
            moved = self.logger.set_aside_previous_run()
            if moved is not None:
                self.log(f"{self.out / 'metrics.jsonl'} held an earlier run's metrics: moved to {moved.name}")

    # ------------------------------------------------------------------ hooks for subclasses
    def check_setup(self, rewards: Sequence[Any] | None) -> None:
        """Checks that need the config and the Python-API overrides, before the model loads."""

    def setup(self) -> None:
        """Build what the algorithm needs once the shared pieces exist (before resuming: generators put
        in ``self.generators`` here get their checkpointed state back)."""

    def updates_per_step(self) -> int:
        """Optimizer updates per training step (for the LR schedule's length)."""
        return 1

    def train_step(self, step: int) -> dict[str, Any]:
        """One training step (``step`` = completed steps before it); returns its metrics."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Algorithm state beyond weights, optimizer, schedule and RNG (e.g. an adaptive noise schedule),
        as tensors and plain data, the same on every process: saved in each checkpoint as
        ``extra_state.pt`` (when not empty) and given back to :meth:`load_extra_state` on resume."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (called by :meth:`load_checkpoint`)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no extra state, but the checkpoint has {sorted(state)}")

    # ------------------------------------------------------------------ setup
    def _make_accelerator(self):
        from accelerate import Accelerator

        device = self.cfg.model.device
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        accelerator = Accelerator(mixed_precision=self.cfg.mixed_precision, cpu=cpu)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != accelerator.num_processes:  # e.g. a launcher started N processes that did not join one group
            raise RuntimeError(f"the launcher started {launched} processes but accelerate sees {accelerator.num_processes}: "
                               "they would train independently (on CPU launch with torchrun, or model.device: cpu)")
        return accelerator

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        """Whether the denoiser is FSDP-sharded (``parallel: fsdp`` with more than one process)."""
        return self.cfg.parallel == "fsdp" and self.world_size > 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def log(self, text: str) -> None:
        """Print on the main process (through tqdm when a bar is active)."""
        if self.is_main:
            bar = getattr(self, "_bar", None)
            (bar.write if bar is not None else self._print)(text)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _load_model(self):
        from ..loading import load_model

        m = self.cfg.model
        device = str(self.accelerator.device) if m.device == "auto" else m.device
        adapter = load_model(m.name, family=m.family, torch_dtype=m.dtype, device=device, offline=m.offline,
                             cache_dir=m.cache_dir, adapter_kwargs=m.adapter, seed=self.cfg.seed)
        self.log(f"loaded {adapter!r} from {m.name} on {device} ({self.world_size} process{'es' if self.world_size > 1 else ''})")
        return adapter

    def _setup_trainable(self) -> None:
        cfg, adapter = self.cfg, self.adapter
        den = adapter.denoiser
        if cfg.lora.enabled:
            adapter.add_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
            self._reference_weights = None
        else:
            adapter.freeze()
            den.requires_grad_(True)
        # dropout off: rollouts and recomputed log-probs must be the same function (ratio exactly 1)
        den.eval()
        self.named_trainable = [(n, p) for n, p in den.named_parameters() if p.requires_grad]
        if not self.named_trainable:
            raise ValueError("no trainable parameters (check lora.target_modules)")
        for _, p in self.named_trainable:  # float32 master weights under mixed precision / half pipelines
            if p.dtype != torch.float32:
                p.data = p.data.float()
        if cfg.gradient_checkpointing:
            if not hasattr(den, "enable_gradient_checkpointing"):
                raise ValueError(f"{type(den).__name__} does not support gradient checkpointing")
            den.enable_gradient_checkpointing()
        if self.sharded:
            units = shard_module(den)
            self.named_trainable = [(n, p) for n, p in den.named_parameters() if p.requires_grad]
            self.log(f"FSDP: denoiser sharded over {self.world_size} processes in {units} units")
        if not cfg.lora.enabled:
            # the reference policy: a frozen copy of the initial weights (this process's shards under
            # FSDP), swapped in by reference()
            self._reference_weights = [p.detach().clone() for _, p in self.named_trainable]
        n = sum(p.numel() for _, p in self.named_trainable)
        self.log(f"training {'LoRA' if cfg.lora.enabled else 'all'} weights: {n:,} parameters in {len(self.named_trainable)} tensors")

    @property
    def trainable_params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable]

    # ------------------------------------------------------------------ training primitives
    def autocast(self):
        """Mixed-precision context for rollouts and training forwards alike (same numerics in both)."""
        return self.accelerator.autocast() if self.cfg.mixed_precision != "no" else nullcontext()

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy inside the block, without gradients: LoRA disabled, or (full
        finetuning) the frozen initial weights swapped in."""
        with torch.no_grad():
            if self._reference_weights is None:
                with self.adapter.disable_lora():
                    yield
            else:
                with swapped_weights(self.trainable_params, self._reference_weights):
                    yield

    def backward(self, loss: Tensor, scale: float = 1.0) -> None:
        """Backward of one micro-batch's loss (its mean), scaled by ``scale / gradient_accumulation_steps``."""
        self.accelerator.backward(loss * (scale / self.cfg.gradient_accumulation_steps))

    def _average_gradients(self) -> None:
        if self.world_size == 1 or self.sharded:  # FSDP reduce-scatters averaged gradients itself
            return
        from accelerate.utils import reduce

        params = self.trainable_params
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        flat = reduce(flat, "mean")
        offset = 0
        for p in params:
            n = p.numel()
            g = flat[offset: offset + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += n

    def optimizer_step(self) -> dict[str, float]:
        """Average gradients over processes, clip, step AdamW and the LR schedule, update the EMA.
        Returns ``{"grad_norm", "lr"}`` (the LR this update used). Raises on a non-finite gradient
        norm (except under fp16, whose loss scaler skips such steps)."""
        self._average_gradients()
        max_norm = self.cfg.optim.max_grad_norm
        norm = self.accelerator.clip_grad_norm_(self.trainable_params, max_norm if max_norm is not None else float("inf"))
        norm = float(norm)
        if not math.isfinite(norm) and self.cfg.mixed_precision != "fp16":
            raise FloatingPointError(f"non-finite gradient norm ({norm}) at step {self.step + 1}, update {self.updates + 1}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.ema is not None and self.updates % self.cfg.ema.every == 0:
            self.ema.update(self.named_trainable)
        return {"grad_norm": norm, "lr": lr}

    def gather(self, x: Tensor) -> Tensor:
        """Every process's rows of ``x`` concatenated in rank order (x itself with one process)."""
        if self.world_size == 1:
            return x
        return self.accelerator.gather(x.contiguous().to(self.accelerator.device)).to(x.device)

    def mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over processes (one collective); max for keys ending in ``_max``."""
        if self.world_size == 1 or not metrics:
            return metrics
        from accelerate.utils import gather

        keys = sorted(metrics)
        vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        allv = gather(vec[None]).cpu()
        return {k: float(allv[:, i].max() if k.endswith("_max") or k.endswith("max_dev") else allv[:, i].mean()) for i, k in enumerate(keys)}

    def shard(self, items: Sequence[Any]) -> tuple[list[Any], int]:
        """This process's contiguous slice of a global list (its length must divide evenly) and its
        offset."""
        n = len(items)
        if n % self.world_size:
            raise ValueError(f"{n} items do not split over {self.world_size} processes")
        per = n // self.world_size
        return list(items[self.rank * per: (self.rank + 1) * per]), self.rank * per

    @torch.no_grad()
    def sample_groups(self, step: int, items: Sequence[tuple[int, str, str]], sampler: SamplerConfig, *,
                      purpose: str = "rollout", clean_latents: Tensor | None = None) -> Rollout:
        """Sample ``sampler.group_size`` trajectories for each ``(global_index, category, prompt)``, each
        group from its own generator seeded by (seed, step, purpose, global_index): the rows are the
        same however the prompts are split over processes. ``group_ids`` = global indices;
        ``meta["categories"]`` = each row's category. ``clean_latents`` (one row per item): a partial
        chain's starting points (``sampler.start_step > 0``)."""
        from ..samplers import sample

        frames = self.reward_frame_prefix() if sampler.decode else None
        run = sampler if frames is None else dataclasses.replace(sampler, decode=False)
        parts = []
        for i, (gidx, _, prompt) in enumerate(items):
            clean = None if clean_latents is None else clean_latents[i: i + 1]
            with self.autocast():
                r = sample(self.adapter, [prompt], run, generator=make_generator(self.cfg.seed, purpose, step, gidx),
                           clean_latents=clean)
                if frames is not None:  # decode only the frames the rewards read (exact: causal VAE)
                    r.samples = self.adapter.decode_prefix(r.final_latents, frames[0])
            r.group_ids = torch.full((r.batch_size,), int(gidx), dtype=torch.long)
            parts.append(r)
        rollout = cat_rollouts(parts)
        rollout.meta["categories"] = [c for _, c, _ in items for _ in range(sampler.group_size)]
        if frames is not None:
            rollout.meta["num_frames"] = frames[1]  # pass as num_frames= when scoring rollout.samples
        return rollout

    def reward_frame_prefix(self) -> tuple[int, int] | None:
        """``(decoded, total)`` when rollouts of this video model need decode only their first
        ``decoded`` of ``total`` frames: the VAE decodes causally and every trained and held-out reward
        reads only frames inside that prefix; else None (decode everything)."""
        if not hasattr(self, "_frame_prefix"):
            self._frame_prefix = None
            if self.adapter.modality == "video" and self.adapter.causal_frame_decoding:
                total = decoded_media_shape(self.adapter)[0]
                needed = self.rewards.frames_needed(total)
                if needed < total:
                    self._frame_prefix = (needed, total)
                    self.log(f"rollouts decode frames 0-{needed - 1} of {total}: every reward reads only those")
        return self._frame_prefix

    # ------------------------------------------------------------------ evaluation
    def eval_prompts(self) -> list[tuple[str, str]]:
        e = self.cfg.eval
        if e.prompts_file:
            items = read_prompt_suite(e.prompts_file)
        elif e.prompts:
            items = [("all", p) for p in e.prompts]
        else:
            items = list(PromptSource(self.cfg.prompts).items)
        return items[: e.max_prompts]

    def eval_sampler(self) -> SamplerConfig:
        e, s = self.cfg.eval, self.cfg.sampler
        base = dataclasses.replace(s, group_size=1, same_noise_in_group=False, record_x0=False, decode=True, start_step=0)
        if e.method == "ode":
            base = dataclasses.replace(base, method="ode", sde_window=None, noise_levels=None)
        return dataclasses.replace(base, num_steps=e.num_steps or s.num_steps,
                                   guidance_scale=s.guidance_scale if e.guidance_scale is None else e.guidance_scale)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Sample the eval prompts once per seed (main process; others wait), score with every reward,
        save ``<out>/eval/step_XXXXXXXX.png`` (rows = seeds) and log ``eval/<reward>/mean...``."""
        metrics: dict[str, Any] = {}
        # under FSDP every process runs the same sampling (each forward gathers the shards of all)
        if self.is_main or self.sharded:
            from ..samplers import sample

            items = self.eval_prompts()
            cats, prompts = [c for c, _ in items], [p for _, p in items]
            sampler = self.eval_sampler()
            t0 = time.perf_counter()
            ema = self.ema.swapped_in(self.named_trainable) if self.ema is not None and self.cfg.ema.use_for_eval else nullcontext()
            media = []
            chunk = self.cfg.eval.batch_size or len(prompts)
            with ema, self.autocast():
                for seed in self.cfg.eval.seeds:
                    gen = torch.Generator().manual_seed(seed)
                    parts = [sample(self.adapter, prompts[i: i + chunk], sampler, generator=gen).samples.float().cpu()
                             for i in range(0, len(prompts), chunk)]
                    media.append(torch.cat(parts))
        if self.is_main:
            from ..media import image_grid, save_image, save_media

            samples = torch.cat(media)
            all_prompts = prompts * len(self.cfg.eval.seeds)
            all_cats = cats * len(self.cfg.eval.seeds)
            outs = self.rewards.score(samples, all_prompts, categories=all_cats,
                                      fps=self.adapter.fps, sample_rate=self.adapter.sample_rate)
            for label, o in outs.items():
                metrics.update(eval_reward_metrics(label, o, all_cats if self.cfg.eval.by_category else None))
            if len(self.cfg.eval.seeds) > 1:
                metrics["eval/diversity/pixel_rms"] = seed_diversity(samples, len(prompts))
            path = self.out / "eval" / f"step_{step:08d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            all_seeds = [s for s in self.cfg.eval.seeds for _ in prompts]
            # per-sample scores: the report pairs them across evaluations (same prompt and seed) for a paired SE
            atomic_write_text(path.with_suffix(".scores.jsonl"),
                              eval_sample_rows(outs, all_prompts, all_cats, all_seeds))
            modality = self.adapter.modality
            if modality == "image":
                save_image(image_grid(samples, ncols=len(prompts)), path.with_suffix(".png"), self.cfg.eval.upscale)
            elif modality == "video":
                mid = samples[:, samples.shape[1] // 2]
                save_image(image_grid(mid, ncols=len(prompts)), path.with_suffix(".png"), self.cfg.eval.upscale)
            else:
                save_media(samples[: len(prompts)], modality, path, sample_rate=self.adapter.sample_rate)
            metrics["eval_seconds"] = round(time.perf_counter() - t0, 3)
            self.logger.log(metrics, step, kind="eval")
        self.accelerator.wait_for_everyone()
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _rng_state(self) -> dict[str, Any]:
        """Python, numpy, torch (CPU, CUDA) and the trainer's generators, as tensors and plain data."""
        version, mt, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": [version, list(mt), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                 "torch": torch.get_rng_state(), "generators": {k: g.get_state() for k, g in self.generators.items()}}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        for k, s in state.get("generators", {}).items():
            if k in self.generators:
                self.generators[k].set_state(s)

    def save_checkpoint(self, step: int | None = None) -> Path:
        """Write ``<out>/checkpoints/step_XXXXXXXX`` atomically and point ``latest`` at it.

        Everything goes into ``.tmp-step_XXXXXXXX`` in the same directory (each process adds its RNG
        state), is fsynced, then renamed with ``os.replace``; ``latest`` is rewritten the same way
        afterwards. A crash at any point leaves the previous checkpoint complete and ``latest`` on it.
        """
        from safetensors.torch import save_file

        step = self.step if step is None else step
        name = f"step_{step:08d}"
        final, tmp = self.ckpt_dir / name, self.ckpt_dir / f".tmp-{name}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        rng_path = tmp / f"rng_state_{self.rank}.pt"
        torch.save(self._rng_state(), rng_path)
        _fsync_file(rng_path)
        self.accelerator.wait_for_everyone()
        # whole tensors (collectives under FSDP: every process takes part, the main one writes)
        trained = {n: full_tensor(t.detach()).float().contiguous().cpu() for n, t in self.named_trainable}
        ema_shadow = ({n: full_tensor(t).float().contiguous().cpu() for n, t in self.ema.shadow.items()}
                      if self.ema is not None else None)
        optimizer_state = self._optimizer_state()
        if self.is_main:
            files = {"trained.safetensors": lambda p: save_file(trained, str(p)),
                     "optimizer.pt": lambda p: torch.save(optimizer_state, p),
                     "scheduler.pt": lambda p: torch.save(self.scheduler.state_dict(), p)}
            extra = self.extra_state()
            if extra:
                files["extra_state.pt"] = lambda p: torch.save(extra, p)
            if self.ema is not None:
                files["ema.safetensors"] = lambda p: save_file(ema_shadow, str(p))
            for fname, write in files.items():
                write(tmp / fname)
                _fsync_file(tmp / fname)
            state = {"format": self.CHECKPOINT_FORMAT, "step": step, "updates": self.updates, "algorithm": self.cfg.algorithm,
                     "world_size": self.world_size, "parallel": self.cfg.parallel if self.sharded else "ddp",
                     "lora": self.cfg.lora.enabled,
                     "trained_tensors": len(self.named_trainable), "config": to_dict(self.cfg)}
            (tmp / "trainer_state.json").write_text(json.dumps(_jsonable(state), indent=2))  # written last: the completeness mark
            _fsync_file(tmp / "trainer_state.json")
            _fsync_dir(tmp)
            old = self.ckpt_dir / f".old-{name}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            atomic_write_text(self.ckpt_dir / "latest", name + "\n")
            shutil.rmtree(old, ignore_errors=True)
            self._prune_checkpoints(keep=final)
        self.accelerator.wait_for_everyone()
        return final

    def _raw_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict; under FSDP the full (unsharded) one, keyed by parameter name."""
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.adapter.denoiser, self._raw_optimizer(),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state(self, state: dict[str, Any], path: Path) -> None:
        groups = state.get("param_groups") or [{}]
        by_name = any(isinstance(i, str) for g in groups for i in g.get("params", []))  # FSDP's full state: names
        if by_name != self.sharded:
            saved, now = ("FSDP", "DDP (or one process)") if by_name else ("DDP (or one process)", "FSDP")
            raise ValueError(f"checkpoint {path} holds a {saved} optimizer state but this run uses {now}: "
                             f"resume with the same parallel setting (parallel: {'fsdp' if by_name else 'ddp'})")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.adapter.denoiser, self._raw_optimizer(), optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)

    def _prune_checkpoints(self, keep: Path) -> None:
        n = self.cfg.checkpoint.keep_last
        if not n:
            return
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if (p / "trainer_state.json").is_file())
        for p in done[:-n]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def resolve_checkpoint(self, spec: str | os.PathLike) -> Path | None:
        """``latest`` (this run's, None when there is none), a checkpoint dir, or a run dir (its latest)."""
        if str(spec) == "latest":
            pointer = self.ckpt_dir / "latest"
            if not pointer.is_file():
                return None
            name = pointer.read_text().strip()
            # re-saving a step moves the old copy aside for a moment: a crash then leaves it as .old-<name>
            for cand in (self.ckpt_dir / name, self.ckpt_dir / f".old-{name}"):
                if (cand / "trainer_state.json").is_file():
                    return cand
            done = sorted(p for p in self.ckpt_dir.glob("step_*") if (p / "trainer_state.json").is_file())
            return done[-1] if done else None
        p = Path(spec)
        if (p / "checkpoints" / "latest").is_file():
            p = p / "checkpoints" / (p / "checkpoints" / "latest").read_text().strip()
        if not (p / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume: {str(p)!r} is not a complete checkpoint (no trainer_state.json)")
        return p

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore weights, EMA, optimizer, LR schedule, RNG states and step from ``path``."""
        from safetensors.torch import load_file

        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("algorithm") != self.cfg.algorithm:
            raise ValueError(f"checkpoint {path} is from algorithm {state.get('algorithm')!r}, this run is {self.cfg.algorithm!r}")
        if state.get("lora") != self.cfg.lora.enabled:
            raise ValueError(f"checkpoint {path} was {'LoRA' if state.get('lora') else 'full'} training; this run is not")
        weights = load_file(str(path / "trained.safetensors"))
        names = [n for n, _ in self.named_trainable]
        missing, extra = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        if missing or extra:
            raise ValueError(f"checkpoint {path} does not match the trained parameters (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in self.named_trainable:
                p.copy_(like_param(weights[n], p))
        if self.ema is not None and (path / "ema.safetensors").is_file():
            shadow = load_file(str(path / "ema.safetensors"))
            self.ema.shadow = {n: like_param(shadow[n], p).float() for n, p in self.named_trainable}
        self._load_optimizer_state(torch.load(path / "optimizer.pt", map_location="cpu" if self.sharded else self.accelerator.device,
                                              weights_only=True), path)
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = path / f"rng_state_{self.rank}.pt"
        if not rng.is_file():
            warnings.warn(f"{path} has no RNG state for process {self.rank} (saved with {state.get('world_size')} processes): using process 0's")
            rng = path / "rng_state_0.pt"
        self._set_rng_state(torch.load(rng, weights_only=True))
        if (path / "extra_state.pt").is_file():
            self.load_extra_state(torch.load(path / "extra_state.pt", map_location="cpu", weights_only=True))
        elif self.extra_state():
            raise ValueError(f"checkpoint {path} has no extra_state.pt, but {type(self).__name__} keeps state "
                             f"{sorted(self.extra_state())} that resuming needs")
        self.step, self.updates = int(state["step"]), int(state["updates"])
        self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ the loop
    def fit(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train until ``max_steps`` completed steps (default: the config's); returns the metrics of
        the steps run here (also in ``self.history``)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        end = cfg.max_steps if max_steps is None else max_steps
        progress = cfg.logging.progress if cfg.logging.progress is not None else sys.stderr.isatty()
        evaluate = cfg.eval.every > 0
        if evaluate and cfg.eval.at_start and self.step == 0 and end > 0:
            self.evaluate(0)
        self._bar = tqdm(total=end, initial=self.step, disable=not (progress and self.is_main), desc=cfg.algorithm, dynamic_ncols=True)
        started = time.perf_counter()
        try:
            while self.step < end:
                if cfg.max_minutes is not None and self.out_of_time(started):
                    self.log(f"max_minutes={cfg.max_minutes:g} reached after {self.step} steps: stopping early")
                    if evaluate and self.step > 0 and self.step % cfg.eval.every != 0:
                        self.evaluate(self.step)  # the last evaluation is of the final weights
                    every = cfg.checkpoint.every
                    if self.step > 0 and cfg.checkpoint.save_final and not (every and self.step % every == 0):
                        self.save_checkpoint()
                    break
                t0 = time.perf_counter()
                metrics = self.train_step(self.step)
                self.step += 1
                metrics["step_seconds"] = round(time.perf_counter() - t0, 4)
                if "samples" in metrics:
                    metrics["samples_per_s"] = metrics["samples"] / max(metrics["step_seconds"], 1e-9)
                metrics["world_size"] = self.world_size
                self.history.append(metrics)
                if self.step % cfg.logging.every == 0 or self.step == end:
                    self.logger.log(metrics, self.step)
                self._bar.update(1)
                if evaluate and (self.step % cfg.eval.every == 0 or self.step == end):
                    self.evaluate(self.step)
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or (self.step == end and cfg.checkpoint.save_final):
                    self.save_checkpoint()
        finally:
            self._bar.close()
            self._bar = None
        if evaluate and cfg.eval.report and self.is_main:
            try:
                from .report import write_report

                rep = write_report(self.out, targets=cfg.eval.report_targets)
                self.log(f"report: {self.out / 'report.json'}" + (f", curves: {self.out / rep['curves']}" if rep.get("curves") else ""))
                for key, row in rep["eval"].items():
                    if "gap_closed" in row:
                        self.log(f"  {key}: {row['before']:.4g} -> {row['after']:.4g} (target {row['target']:g}: "
                                 f"{100 * row['gap_closed']:.1f}% of the gap closed)")
            except ValueError as err:  # e.g. no evaluation logged yet in this output directory
                self.log(f"no report: {err}")
        return self.history

    def out_of_time(self, started: float) -> bool:
        """Whether ``max_minutes`` have passed since ``started`` (the same answer on every process)."""
        over = torch.tensor([float(time.perf_counter() - started > 60.0 * self.cfg.max_minutes)])
        return bool(self.gather(over).max() > 0)

    def close(self) -> None:
        """Flush and close the loggers (TensorBoard, W&B)."""
        self.logger.close()

"""Benchmarks that print numbers (``mmalign bench <name>``). Not timed tests: run them, read them.

``rollout``: wall time of the plain diffusers ``pipeline(...)`` call vs mmalign's recorded sampler on the
same model, steps, batch and initial latents (median over repeats, after a warm-up), and the ratio.

``rewards``: throughput of ``reward(images, prompts)`` (input checks, batching, preprocessing,
tokenisation, assembly) vs the bare CLIP forward on the same, already preprocessed, tensors.

Shipped ``configs/bench_*.yaml`` files name their benchmark and hold its settings in a section::

    name: rewards
    rewards: {batch_size: 16}
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch


@dataclass
class RolloutBenchConfig:
    """``mmalign bench rollout``: recording overhead of mmalign's sampler vs the plain pipeline."""

    family: str = "sd3"
    """Tiny family built in code (sd, sdxl, sd3, flux, ...); ignored when ``model`` is given."""
    model: str | None = None
    """A pipeline directory or HF id to benchmark instead (e.g. assets/shapeworld-sd3)."""
    max_sequence_length: int | None = None
    """SD3 / FLUX: text tokens of the T5 part (null: the model's own default, e.g. 1 for the shipped
    ShapeWorld SD3; 256 = the pipeline default)."""
    model_overrides: dict[str, Any] = field(
        default_factory=lambda: {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32,
                                 "caption_projection_dim": 128, "sample_size": 32, "pos_embed_max_size": 32}
    )
    """Overrides of the tiny builder: the default makes a small-but-not-trivial SD3 (64x64 pixels, 4 blocks of width 128)."""
    num_steps: int = 10
    """Denoising steps per rollout."""
    batch_size: int = 4
    """Prompts per rollout."""
    guidance_scale: float = 4.5
    """CFG scale (the pipeline and mmalign both run the cond/uncond batch)."""
    repeats: int = 5
    """Timed repeats of each variant (after one warm-up); the median is reported."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    json_out: str | None = None
    """Also write the numbers to this JSON file."""
    partial_chain_start: int | None = None
    """Also time an InstructVideo partial chain (the SDE rollout started at this step from source media:
    VAE-encode the media, noise them to the step, sample the remaining steps) against the whole SDE chain."""
    decode_frames: int | None = None
    """Video models: also time the SDE rollout decoding only its first this-many frames (what a trainer
    does when every reward reads only those: ``ModelAdapter.decode_prefix``) against decoding them all."""

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("repeats, num_steps and batch_size must be >= 1")
        if self.partial_chain_start is not None and not 0 < self.partial_chain_start < self.num_steps:
            raise ValueError(f"partial_chain_start must be in [1, num_steps={self.num_steps}), got {self.partial_chain_start}")
        if self.decode_frames is not None and self.decode_frames < 1:
            raise ValueError(f"decode_frames must be >= 1, got {self.decode_frames}")


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: allocator, kernels, lazy init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _interleaved_seconds(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Time each variant once per round, rounds repeated: slow drifts of a shared machine's load hit
    every variant alike instead of biasing whichever ran during a busy spell."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def run_rollout_bench(cfg: RolloutBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from .samplers import SamplerConfig, sample
    from .testing import tiny_adapter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.model:
        from .loading import load_model

        kwargs = {"max_sequence_length": cfg.max_sequence_length} if cfg.max_sequence_length else None
        adapter = load_model(cfg.model, adapter_kwargs=kwargs)
    else:
        adapter = tiny_adapter(cfg.family, **cfg.model_overrides)
        if cfg.max_sequence_length:
            adapter.max_sequence_length = cfg.max_sequence_length
    pipe = adapter.pipeline
    seq = {"max_sequence_length": adapter.max_sequence_length} if hasattr(adapter, "max_sequence_length") else {}
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in adapter.denoiser.parameters())
    prompts = [f"prompt number {i}: a red circle left of a blue square" for i in range(cfg.batch_size)]
    latents = adapter.init_noise(cfg.batch_size, torch.Generator().manual_seed(0))
    log(f"rollout bench: {cfg.model or cfg.family} denoiser {params / 1e6:.2f}M params, latents {tuple(latents.shape)}, "
        + (f"{seq['max_sequence_length']} T5 tokens, " if seq else "") +
        f"{cfg.num_steps} steps, batch {cfg.batch_size}, guidance {cfg.guidance_scale}, "
        f"{torch.get_num_threads()} threads, {cfg.repeats} repeats")

    @torch.no_grad()
    def plain():
        return pipe(prompts, num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                    latents=latents.clone(), output_type="pt", **seq)

    def ours(**kw):
        return lambda: sample(adapter, prompts, SamplerConfig(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, **kw),
                              latents=latents.clone(), generator=torch.Generator().manual_seed(1))

    sde = "flow_grpo" if adapter.schedule(1).kind == "flow" else "ddim"
    variants = {
        "pipeline(...) plain": plain,
        "mmalign ode, recorded (micro_batch=None)": ours(method="ode", micro_batch=None),
        f"mmalign {sde} sde + log-probs (micro_batch=None)": ours(method=sde, micro_batch=None),
        "mmalign ode, batch-invariant (micro_batch=1)": ours(method="ode", micro_batch=1),
    }
    cheaper: list[tuple[str, str, str]] = []  # (summary key, variant, what it is)
    if cfg.partial_chain_start:
        with torch.no_grad():
            media = adapter.decode(latents)  # stand-in source media of the model's size (cost does not depend on content)

        def partial():
            with torch.no_grad():
                clean = adapter.encode_media(media)
            return sample(adapter, prompts, SamplerConfig(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                                                          method=sde, micro_batch=None, start_step=cfg.partial_chain_start),
                          latents=latents.clone(), clean_latents=clean, generator=torch.Generator().manual_seed(1))

        name = f"mmalign {sde} partial chain from step {cfg.partial_chain_start} (+ VAE encode)"
        variants[name] = partial
        cheaper.append(("partial_chain_time_fraction", name,
                        f"partial chain ({cfg.num_steps - cfg.partial_chain_start} of {cfg.num_steps} steps, VAE encode included)"))
    if cfg.decode_frames:
        if adapter.modality != "video":
            raise ValueError(f"decode_frames is for video models; {cfg.model or cfg.family} makes {adapter.modality}")

        def prefix():
            r = sample(adapter, prompts, SamplerConfig(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, method=sde,
                                                       micro_batch=None, decode=False),
                       latents=latents.clone(), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                return adapter.decode_prefix(r.final_latents, cfg.decode_frames)

        name = f"mmalign {sde} sde, decoding frames 0-{cfg.decode_frames - 1} only"
        variants[name] = prefix
        how = "causal VAE: a latent prefix" if adapter.causal_frame_decoding else "not causal: all, then cut"
        cheaper.append(("prefix_decode_time_fraction", name, f"decoding {cfg.decode_frames} frames ({how})"))
    results = {}
    base = None
    for name, fn in variants.items():
        med, times = _median_seconds(fn, cfg.repeats)
        base = med if base is None else base
        results[name] = {"median_s": med, "times_s": times, "ratio_vs_pipeline": med / base}
        log(f"  {name:55s} median {med * 1000:8.1f} ms   ratio {med / base:5.3f}")
    overhead = results["mmalign ode, recorded (micro_batch=None)"]["ratio_vs_pipeline"] - 1
    log(f"recording overhead (same batching as the pipeline): {overhead * 100:+.1f}%")
    summary = {"config": cfg.__dict__, "denoiser_params": params, "results": results, "recording_overhead": overhead}
    whole = results[f"mmalign {sde} sde + log-probs (micro_batch=None)"]["median_s"]
    for key, name, what in cheaper:  # the cheaper rollouts against the whole SDE rollout they replace
        part = results[name]["median_s"]
        summary[key] = part / whole
        log(f"{what}: {part / whole * 100:.1f}% of the whole SDE rollout's time (saves {(1 - part / whole) * 100:.1f}%)")
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _default_bench_clip() -> dict[str, Any]:
    return {
        "projection_dim": 256,
        "vision_config": {"image_size": 224, "patch_size": 32, "hidden_size": 256, "intermediate_size": 1024,
                          "num_attention_heads": 8, "num_hidden_layers": 4},
        "text_config": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 8, "num_hidden_layers": 4},
    }


@dataclass
class RewardsBenchConfig:
    """``mmalign bench rewards``: overhead of ``reward(images, prompts)`` over the bare model forward."""

    reward: Literal["clipscore", "pickscore"] = "clipscore"
    """CLIP-family reward (transformers CLIPModel backbone) built on random weights in code."""
    clip: dict[str, Any] = field(default_factory=_default_bench_clip)
    """CLIPConfig overrides of the tiny CLIP builder: the default is a small-but-not-trivial ViT-B/32-like
    model at 224 px (4 layers of width 256 per tower)."""
    image_size: int = 224
    """Side of the input images. At the model's input size (224) preprocessing is only the mean/std
    normalisation; a larger side adds the reward's bicubic resize to the measured overhead."""
    batch_size: int = 16
    """Images (and prompts) per call."""
    repeats: int = 10
    """Timed repeats of each variant (after one warm-up); the median is reported."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default)."""
    json_out: str | None = None
    """Also write the numbers to this JSON file."""

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.batch_size < 1 or self.image_size < 1:
            raise ValueError("repeats, batch_size and image_size must be >= 1")


def run_rewards_bench(cfg: RewardsBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch.nn.functional as F

    from .rewards.clip import load_clipscore, load_pickscore
    from .testing.clip_rewards import tiny_clip_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = tiny_clip_model(0, **cfg.clip)
    loader = {"clipscore": load_clipscore, "pickscore": load_pickscore}[cfg.reward]
    reward = loader(model=model, tokenizer=tok, batch_size=cfg.batch_size, weights_id="bench (random weights)").eval()
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    images = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=g)
    prompts = [f"prompt number {i}: a red circle left of a blue square" for i in range(cfg.batch_size)]
    backbone = reward.backbone
    with torch.no_grad():
        pixels = reward.preprocess(images)  # the very tensors the reward feeds its model
        tokens = backbone.tokenize(prompts)
    log(f"rewards bench: {cfg.reward} on a random CLIP of {params / 1e6:.1f}M params "
        f"(model input {tuple(pixels.shape[1:])}), images {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, "
        f"{torch.get_num_threads()} threads, {cfg.repeats} repeats")

    @torch.no_grad()
    def bare():
        img = F.normalize(_bench_pooled(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        txt = F.normalize(_bench_pooled(model.get_text_features(**tokens)).float(), dim=-1)
        cos = (img * txt).sum(-1)
        return (100 * cos).clamp(min=0) if cfg.reward == "clipscore" else model.logit_scale.exp() * cos

    @torch.no_grad()
    def full():
        return reward(images, prompts).scores

    @torch.no_grad()
    def prep():
        reward.preprocess(images)
        backbone.tokenize(prompts)

    torch.testing.assert_close(full(), bare(), rtol=1e-4, atol=1e-4)  # the same computation
    variants = {"bare model forward (preprocessed tensors)": bare, "reward(images, prompts)": full,
                "  of which preprocessing + tokenisation": prep}
    timed = _interleaved_seconds(variants, cfg.repeats)
    results = {}
    base = None
    for name, times in timed.items():
        med = statistics.median(times)
        base = med if base is None else base
        results[name] = {"median_s": med, "times_s": times, "ratio_vs_bare": med / base,
                         "images_per_s": cfg.batch_size / med}
        log(f"  {name:45s} median {med * 1000:8.1f} ms   {cfg.batch_size / med:8.1f} img/s   ratio {med / base:5.3f}")
    overhead = results["reward(images, prompts)"]["ratio_vs_bare"] - 1
    prep_share = results["  of which preprocessing + tokenisation"]["ratio_vs_bare"]
    log(f"reward-call overhead over the bare forward: {overhead * 100:+.1f}% (target < 10%); "
        f"preprocessing + tokenisation alone: {prep_share * 100:.1f}%")
    summary = {"config": cfg.__dict__, "model_params": params, "results": results, "overhead": overhead,
               "preprocessing_share": prep_share}
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _bench_pooled(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


#: name -> (config class, runner)
BENCHMARKS: dict[str, tuple[type, Callable[..., Any]]] = {
    "rollout": (RolloutBenchConfig, run_rollout_bench),
    "rewards": (RewardsBenchConfig, run_rewards_bench),
}


@dataclass
class BenchConfig:
    """A ``configs/bench_*.yaml`` file: which benchmark it runs, and that benchmark's settings."""

    name: Literal["rollout", "rewards"]
    """The benchmark (``mmalign bench --config FILE`` runs it)."""
    rollout: RolloutBenchConfig = field(default_factory=RolloutBenchConfig)
    """Settings of ``mmalign bench rollout``."""
    rewards: RewardsBenchConfig = field(default_factory=RewardsBenchConfig)
    """Settings of ``mmalign bench rewards``."""


def load_bench_config(name: str | None, path: str | None = None, overrides: Sequence[str] = ()) -> tuple[str, Any]:
    """(benchmark name, its config) from an optional YAML file plus ``key=value`` overrides.

    A file with a top-level ``name`` is a :class:`BenchConfig` (validated whole; the named section is
    used); any other file holds the settings of benchmark ``name`` directly.
    """
    import copy

    from .config import ConfigError, apply_overrides, from_dict, load_yaml

    data = load_yaml(path) if path is not None else {}
    if "name" in data:
        suite = from_dict(BenchConfig, data)  # strict: every section must be valid
        if name is not None and name != suite.name:
            raise ConfigError(f"config file {path!r} is for benchmark {suite.name!r}, not {name!r}")
        name = suite.name
        section = copy.deepcopy(data.get(name) or {})
    else:
        if name is None:
            raise ConfigError(f"config file {path!r} has no 'name' key: say which benchmark to run ({', '.join(BENCHMARKS)})")
        section = copy.deepcopy(data)
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r} (known: {', '.join(sorted(BENCHMARKS))})")
    cfg_cls = BENCHMARKS[name][0]
    return name, from_dict(cfg_cls, apply_overrides(section, overrides))

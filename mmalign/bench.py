"""Benchmarks that print numbers (``mmalign bench <name>``). Not timed tests: run them, read them.

``rollout``: wall time of the plain diffusers ``pipeline(...)`` call vs mmalign's recorded sampler on the
same model, steps, batch and initial latents (median over repeats, after a warm-up), and the ratio.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class RolloutBenchConfig:
    """``mmalign bench rollout``: recording overhead of mmalign's sampler vs the plain pipeline."""

    family: str = "sd3"
    """Tiny family built in code (sd, sdxl, sd3, flux, ...)."""
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

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("repeats, num_steps and batch_size must be >= 1")


def _median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: allocator, kernels, lazy init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_rollout_bench(cfg: RolloutBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from .samplers import SamplerConfig, sample
    from .testing import tiny_adapter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    adapter = tiny_adapter(cfg.family, **cfg.model_overrides)
    pipe = adapter.pipeline
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in adapter.denoiser.parameters())
    prompts = [f"prompt number {i}: a red circle left of a blue square" for i in range(cfg.batch_size)]
    latents = adapter.init_noise(cfg.batch_size, torch.Generator().manual_seed(0))
    log(f"rollout bench: {cfg.family} denoiser {params / 1e6:.2f}M params, latents {tuple(latents.shape)}, "
        f"{cfg.num_steps} steps, batch {cfg.batch_size}, guidance {cfg.guidance_scale}, "
        f"{torch.get_num_threads()} threads, {cfg.repeats} repeats")

    @torch.no_grad()
    def plain():
        return pipe(prompts, num_inference_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                    latents=latents.clone(), output_type="pt")

    def ours(**kw):
        return lambda: sample(adapter, prompts, SamplerConfig(num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, **kw),
                              latents=latents.clone(), generator=torch.Generator().manual_seed(1))

    variants = {
        "pipeline(...) plain": plain,
        "mmalign ode, recorded (micro_batch=None)": ours(method="ode", micro_batch=None),
        "mmalign flow_grpo sde + log-probs (micro_batch=None)": ours(method="flow_grpo", micro_batch=None)
        if adapter.schedule(1).kind == "flow" else ours(method="ddim", micro_batch=None),
        "mmalign ode, batch-invariant (micro_batch=1)": ours(method="ode", micro_batch=1),
    }
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
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


#: name -> (config class, runner)
BENCHMARKS: dict[str, tuple[type, Callable[..., Any]]] = {"rollout": (RolloutBenchConfig, run_rollout_bench)}

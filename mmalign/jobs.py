"""Job configs and runners behind the CLI (``mmalign sample`` ...), usable from Python too."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import to_dict
from .samplers import SamplerConfig

DEFAULT_PROMPTS = [
    "a red circle left of a blue square",
    "three green triangles",
    "a yellow star above a purple hexagon",
    "two blue circles",
]


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name: str = "tiny:sd3"
    """``tiny:<family>`` (tiny random pipeline built in code), a local pipeline directory, or an HF id."""
    family: str | None = None
    """Adapter family (sd, sdxl, sd3, flux, wan, cogvideox, audioldm); read from model_index.json when None."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype of the pipeline (sampling math stays float32)."""
    device: str = "cpu"
    """torch device for the pipeline."""
    offline: bool | None = None
    """Load from local files only; None follows HF_HUB_OFFLINE / MMALIGN_OFFLINE."""
    cache_dir: str | None = None
    """HF cache directory for downloads."""
    adapter: dict[str, Any] = field(default_factory=dict)
    """Extra adapter arguments (height, width, num_frames, audio_length_in_s, ...)."""


@dataclass
class SampleJobConfig:
    """``mmalign sample``: sample prompts with a recorded trajectory and write media + a grid."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to sample from."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(num_steps=8))
    """The sampler (method, steps, guidance, SDE window...)."""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Prompts to sample (ignored when prompts_file is set)."""
    prompts_file: str | None = None
    """A text file with one prompt per line (blank lines and #-comments skipped)."""
    batch_size: int = 4
    """Prompts per sampler call."""
    seed: int = 0
    """Seed for the initial noise and SDE noise (and tiny model weights)."""
    out: str = "runs/sample"
    """Output directory (grid.png, per-sample media, samples.json)."""
    upscale: int = 4
    """Integer nearest-neighbour upscaling of saved images (tiny models make tiny images)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {self.upscale}")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {str(p)!r} does not exist")
    prompts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {str(p)!r} holds no prompts")
    return prompts


def run_sample(cfg: SampleJobConfig, log=print) -> dict[str, Any]:
    """Run ``mmalign sample``; returns a summary (paths, timings)."""
    from .loading import load_model
    from .media import image_grid, save_image, save_media
    from .models.base import check_prompts
    from .samplers import sample

    prompts = check_prompts(read_prompts(cfg.prompts_file) if cfg.prompts_file else cfg.prompts)
    m = cfg.model
    adapter = load_model(m.name, family=m.family, torch_dtype=m.dtype, device=m.device, offline=m.offline,
                         cache_dir=m.cache_dir, adapter_kwargs=m.adapter, seed=cfg.seed)
    log(f"loaded {adapter!r} from {m.name}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    all_samples, records = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        rollout = sample(adapter, chunk, cfg.sampler, generator=gen)
        all_samples.append(rollout.samples.cpu())
        for i, p in enumerate(rollout.prompts):
            lp = rollout.log_probs[i]
            records.append({"index": len(records), "prompt": p,
                            "log_prob_sum": float(lp[rollout.stochastic].sum()) if bool(rollout.stochastic.any()) else None})
        log(f"sampled {start + len(chunk)}/{len(prompts)} prompts")
    seconds = time.perf_counter() - t0
    samples = torch.cat(all_samples)
    paths = save_media(samples, adapter.modality, out, sample_rate=adapter.sample_rate, fps=adapter.fps, upscale=cfg.upscale)
    grid_path = None
    if adapter.modality in ("image", "video"):
        frames = samples if adapter.modality == "image" else samples[:, [0, samples.shape[1] // 2, -1]].flatten(0, 1)
        ncols = None if adapter.modality == "image" else 3
        grid_path = save_image(image_grid(frames, ncols=ncols), out / "grid.png", cfg.upscale)
    for rec, path in zip(records, paths):
        rec["file"] = path.name
    summary = {"model": m.name, "family": adapter.family, "modality": adapter.modality, "seconds": round(seconds, 3),
               "grid": None if grid_path is None else str(grid_path), "samples": records, "config": to_dict(cfg)}
    (out / "samples.json").write_text(json.dumps(summary, indent=2))
    log(f"wrote {len(paths)} samples{'' if grid_path is None else ' and ' + str(grid_path)} in {seconds:.1f}s")
    return summary

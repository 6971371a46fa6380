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
from .samplers.inference import BestOfNConfig, GuidanceConfig, NoiseOptConfig, SearchConfig

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
    threads: int | None = None
    """torch CPU threads (None: torch's default). On a busy CPU, 1 avoids OpenMP threads spinning against
    each other (tiny models slow down many times over)."""
    inference: InferenceConfig = field(default_factory=lambda: InferenceConfig())
    """Inference-time alignment against rewards (best_of_n, reno, search, reward_guidance); ``method: none``
    samples plainly. ``batch_size`` prompts are optimised together, each with its own noise."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.upscale < 1:
            raise ValueError(f"upscale must be >= 1, got {self.upscale}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")


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
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    m = cfg.model
    adapter = load_model(m.name, family=m.family, torch_dtype=m.dtype, device=m.device, offline=m.offline,
                         cache_dir=m.cache_dir, adapter_kwargs=m.adapter, seed=cfg.seed)
    log(f"loaded {adapter!r} from {m.name}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.inference.method != "none":
        return run_inference_sample(cfg, adapter, prompts, out, log)
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


# ----------------------------------------------------------------------------- rewards: score, eval
@dataclass
class RewardConfig:
    """Which reward to build."""

    name: str
    """A registered reward (``clipscore``), ``tiny:<name>`` (tiny random weights, offline),
    or ``package.module:factory``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of the reward's factory (e.g. ``{rewards: [tiny:jpeg_size, tiny:clipscore], weights: [1, 0.5]}``)."""
    device: str = "cpu"
    """torch device for the reward model."""


def build_reward(cfg: RewardConfig):
    """The reward a :class:`RewardConfig` names, on its device, in eval mode."""
    from .rewards.combine import resolve_reward

    reward = resolve_reward(cfg.name, **cfg.options)
    return reward.to(cfg.device).eval()


# ----------------------------------------------------------------------------- sample: inference-time alignment
@dataclass
class InferenceRewardConfig(RewardConfig):
    """A reward optimised at sampling time (name / options / device as in ``mmalign score``), with a weight."""

    weight: float = 1.0
    """Weight w_i in the optimised total ``sum_i w_i R_i`` (negative lowers a reward)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Extra metadata given with every sample to rewards that read metadata (each also gets its prompt)."""


@dataclass
class InferenceConfig:
    """``mmalign sample`` with inference-time alignment: search or optimise the initial noise of each
    prompt against rewards, write the best samples, ``trace.json`` and a before/after report."""

    method: Literal["none", "best_of_n", "reno", "search", "reward_guidance"] = "none"
    """``best_of_n``: N candidates per prompt, keep the best; ``reno``: optimise the noise by gradient
    (ReNO, differentiable rewards only); ``search``: zero-order / random search over noises with a budget
    of reward calls; ``reward_guidance``: reward gradient added at every step; ``none``: plain sampling."""
    rewards: list[InferenceRewardConfig] = field(default_factory=list)
    """Rewards to optimise, combined as ``sum_i w_i R_i``."""
    report_rewards: list[RewardConfig] = field(default_factory=list)
    """Rewards only reported, before (first sample) vs after (best sample), e.g. the ``shapeeval`` verifier."""
    best_of_n: BestOfNConfig = field(default_factory=BestOfNConfig)
    """Settings of ``best_of_n``."""
    reno: NoiseOptConfig = field(default_factory=NoiseOptConfig)
    """Settings of ``reno`` (sampler.method must be ode; few steps are the paper's setting)."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """Settings of ``search``."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """Settings of ``reward_guidance``."""
    plot: bool = True
    """Also plot the trace to ``trace.png`` (when matplotlib is installed; skipped with a message otherwise)."""

    def __post_init__(self) -> None:
        if self.method != "none" and not self.rewards:
            raise ValueError(f"inference.method {self.method!r} needs at least one reward in inference.rewards "
                             "(e.g. --reward clipscore, or rewards: [{name: clipscore, options: {...}}])")


_TRACE_AXIS = {"reno": "iteration", "best_of_n": "candidate", "search": "reward call", "reward_guidance": "denoising step"}


def _plot_trace(result: Any, path: Path, log) -> Path | None:
    """A PNG of the trace (mean over prompts of the total and of the best so far), if matplotlib exists."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping trace.png (pip install matplotlib for the plot; trace.json has the numbers)")
        return None
    total = result.trace["total"]
    x = list(range(total.shape[0]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, torch.nanmean(total, dim=1).tolist(), marker=".", label="total reward (mean over prompts)")
    if result.method != "reward_guidance":
        ax.plot(x, result.best_so_far.mean(dim=1).tolist(), label="best so far (mean over prompts)")
    ax.set_xlabel(_TRACE_AXIS.get(result.method, "index"))
    ax.set_ylabel("sum_i w_i R_i")
    ax.set_title(f"{result.method}: {len(result)} prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _before_after(reward_set: Any, result: Any, adapter: Any) -> dict[str, dict[str, Any]]:
    """Every reward (optimised and report-only) on the first and the best sample of each prompt."""
    kwargs = {k: v for k, v in (("fps", adapter.fps), ("sample_rate", adapter.sample_rate)) if v is not None}
    before = reward_set.score(result.initial_samples, result.prompts, **kwargs)
    after = reward_set.score(result.samples, result.prompts, **kwargs)
    report: dict[str, dict[str, Any]] = {}
    for e in reward_set.entries:
        for key, pick in [(e.label, lambda o: o.scores), (f"{e.label}.strict", lambda o: o.components.get("strict"))]:
            b, a = pick(before[e.label]), pick(after[e.label])
            if b is None or a is None:
                continue
            b, a = b.detach().float().cpu(), a.detach().float().cpu()
            report[key] = {
                "role": "report" if e.held_out else "optimised", "weight": None if e.held_out else e.weight,
                "before_mean": float(torch.nanmean(b)), "after_mean": float(torch.nanmean(a)),
                "before": b.tolist(), "after": a.tolist(),  # NaN (not scored) -> null when written as JSON
            }
    return report


def _report_table(report: dict[str, dict[str, Any]]) -> str:
    head = f"{'reward':28s} {'role':10s} {'before':>10s} {'after':>10s}"
    lines = [head, "-" * len(head)]
    for key, row in report.items():
        lines.append(f"{_short(key, 28):28s} {row['role']:10s} {row['before_mean']:10.4f} {row['after_mean']:10.4f}")
    return "\n".join(lines)


def run_inference_sample(cfg: SampleJobConfig, adapter: Any, prompts: list[str], out: Path, log=print) -> dict[str, Any]:
    """``mmalign sample`` with ``inference.method`` set: run the method over prompt chunks of
    ``batch_size``, write the best samples (``sample_*``), the first ones (``initial_*``), ``grid.png``
    (best), ``before_after.png`` (first row: before, second: after), ``trace.json`` and ``trace.png``."""
    from .media import image_grid, save_image, save_media
    from .samplers.inference import InferenceResult, best_of_n, optimize_noise, reward_guided_sample, search
    from .trainers.common import RewardSet

    inf = cfg.inference
    reward_set = RewardSet.build(inf.rewards, inf.report_rewards, device=cfg.model.device)
    labels = ", ".join(f"{e.label} x {e.weight:g}" for e in reward_set.trained)
    log(f"{inf.method} on {len(prompts)} prompts, optimising {labels}"
        + (f"; reporting {', '.join(e.label for e in reward_set.held_out)}" if reward_set.held_out else ""))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    parts = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        if inf.method == "best_of_n":
            part = best_of_n(adapter, chunk, reward_set, inf.best_of_n.n, cfg.sampler, gen, batch_size=inf.best_of_n.batch_size)
        elif inf.method == "reno":
            part = optimize_noise(adapter, chunk, reward_set, inf.reno, cfg.sampler, gen, log=log)
        elif inf.method == "search":
            part = search(adapter, chunk, reward_set, inf.search, cfg.sampler, gen, log=log)
        else:
            part = reward_guided_sample(adapter, chunk, reward_set, inf.guidance, cfg.sampler, gen)
        parts.append(part)
        log(f"{inf.method}: {start + len(chunk)}/{len(prompts)} prompts")
    seconds = time.perf_counter() - t0
    result = InferenceResult.cat(parts)
    report = _before_after(reward_set, result, adapter)
    table = _report_table(report)
    log("before = first sample of each prompt (plain sampling of its first noise), after = returned best:\n" + table)
    paths = save_media(result.samples, adapter.modality, out, sample_rate=adapter.sample_rate, fps=adapter.fps, upscale=cfg.upscale)
    initial = save_media(result.initial_samples, adapter.modality, out, prefix="initial", sample_rate=adapter.sample_rate,
                         fps=adapter.fps, upscale=cfg.upscale)
    grid_path = pair_path = None
    if adapter.modality == "image":
        grid_path = save_image(image_grid(result.samples), out / "grid.png", cfg.upscale)
        k = min(len(result), 16)
        pair_path = save_image(image_grid(torch.cat([result.initial_samples[:k], result.samples[:k]]), ncols=k),
                               out / "before_after.png", cfg.upscale)
    trace = {**result.to_json(), "seconds": round(seconds, 3), "report": report,
             "files": [{"prompt": p, "best": a.name, "initial": b.name} for p, a, b in zip(result.prompts, paths, initial)]}
    (out / "trace.json").write_text(json.dumps(_jsonable(trace), indent=2))
    plot = _plot_trace(result, out / "trace.png", log) if inf.plot else None
    (out / "report.txt").write_text(table + "\n")
    summary = {"model": cfg.model.name, "family": adapter.family, "modality": adapter.modality, "method": inf.method,
               "seconds": round(seconds, 3), "grid": None if grid_path is None else str(grid_path),
               "before_after": None if pair_path is None else str(pair_path), "trace": str(out / "trace.json"),
               "plot": None if plot is None else str(plot), "report": report,
               "samples": [{"index": i, "prompt": p, "file": f.name, "best_total": _jsonable(float(result.scores[i])),
                            "best_index": int(result.best_index[i])} for i, (p, f) in enumerate(zip(result.prompts, paths))],
               "config": to_dict(cfg)}
    (out / "samples.json").write_text(json.dumps(_jsonable(summary), indent=2))
    log(f"wrote {len(paths)} best samples, {out / 'trace.json'}" + ("" if grid_path is None else f", {grid_path}, {pair_path}")
        + ("" if plot is None else f", {plot}") + f" in {seconds:.1f}s")
    return summary


@dataclass
class ScoreJobConfig:
    """``mmalign score``: score media files with a reward; prints a table, optionally writes JSON."""

    reward: RewardConfig
    """The reward to score with."""
    files: list[str] = field(default_factory=list)
    """Media files (images, GIF videos, WAV audio)."""
    prompts: list[str] = field(default_factory=list)
    """One prompt for every file, or one per file (ignored when prompts_file is set)."""
    prompts_file: str | None = None
    """A text file with one prompt per line (one line for all files, or one per file)."""
    batch_size: int = 16
    """Files per reward call (files of one size are batched together)."""
    fps: float | None = None
    """Frame rate of video files, for rewards that need it."""
    sample_rate: int | None = None
    """Target sample rate for audio files (resampled when they differ)."""
    json_out: str | None = None
    """Also write the scores (and the reward's provenance) to this JSON file."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class EvalRewardJobConfig:
    """``mmalign eval-reward``: pairwise accuracy of a reward on human preference data."""

    reward: RewardConfig
    """The reward to evaluate."""
    data: str
    """Preference set: a JSONL file or a folder (see the README's Rewards section)."""
    tol: float = 0.0
    """Score differences within this tolerance count as predicted ties."""
    batch_size: int = 16
    """Files per reward call."""
    json_out: str | None = None
    """Also write the report (overall, per category, per pair) to this JSON file."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")


def _jsonable(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), tuples -> lists, everything else unknown -> str."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _fmt_score(x: float) -> str:
    return "nan" if x != x else f"{x:.4g}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def score_table(files: list[str], prompts: list[str] | None, rows: list[dict[str, Any]], max_components: int = 3) -> str:
    """Fixed-width table: file, prompt, score, valid/reason and the first few scalar components."""
    comp_names: list[str] = []
    for row in rows:
        for k in row:
            if k not in ("score", "valid", "reason") and k not in comp_names:
                comp_names.append(k)
    comp_names = comp_names[:max_components]
    fw = min(max([len("file")] + [len(Path(f).name) for f in files]), 32)
    pw = min(max([len("prompt")] + [len(p) for p in (prompts or [])]), 32)
    head = f"{'file':{fw}s}  {'prompt':{pw}s}  {'score':>10s}  " + "".join(f"{_short(c, 12):>12s}  " for c in comp_names) + "valid"
    lines = [head, "-" * len(head)]
    for i, (f, row) in enumerate(zip(files, rows)):
        p = prompts[i] if prompts else ""
        comps = "".join(f"{_fmt_score(row[c]) if isinstance(row.get(c), float) else '-':>12s}  " for c in comp_names)
        status = "yes" if row["valid"] else f"no: {row['reason']}"
        lines.append(f"{_short(Path(f).name, fw):{fw}s}  {_short(p, pw):{pw}s}  {_fmt_score(row['score']):>10s}  {comps}{status}")
    return "\n".join(lines)


def run_score(cfg: ScoreJobConfig, log=print) -> dict[str, Any]:
    """Run ``mmalign score``; returns ``{"reward", "provenance", "items"}`` (also written to json_out)."""
    from .rewards.judge import score_files

    if not cfg.files:
        raise ValueError("no files to score: give media files after the options")
    missing = [f for f in cfg.files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"file {missing[0]!r} does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else list(cfg.prompts)
    if prompts:
        if len(prompts) == 1:
            prompts = prompts * len(cfg.files)
        elif len(prompts) != len(cfg.files):
            raise ValueError(f"{len(prompts)} prompts for {len(cfg.files)} files: give one prompt for all files, or one per file")
    reward = build_reward(cfg.reward)
    if "prompt" in reward.needs and not prompts:
        raise ValueError(f"reward {reward.name!r} needs prompts: give --prompt TEXT (or --prompts-file)")
    kwargs = {k: v for k, v in (("fps", cfg.fps), ("sample_rate", cfg.sample_rate)) if v is not None}
    rows = score_files(reward, cfg.files, prompts or None, batch_size=cfg.batch_size, **kwargs)
    log(f"reward: {reward.name} ({'higher' if reward.higher_is_better else 'lower'} is better)")
    log(score_table(cfg.files, prompts or None, rows))
    items = [{"file": f, "prompt": prompts[i] if prompts else None, **row} for i, (f, row) in enumerate(zip(cfg.files, rows))]
    summary = {"reward": reward.name, "provenance": reward.provenance(), "items": items}
    if cfg.json_out:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps(_jsonable(summary), indent=2))
        log(f"wrote {cfg.json_out}")
    return summary


def run_eval_reward(cfg: EvalRewardJobConfig, log=print):
    """Run ``mmalign eval-reward``; returns the :class:`~mmalign.rewards.judge.JudgeReport`."""
    from .rewards.judge import evaluate_reward, load_preferences

    data = load_preferences(cfg.data)
    reward = build_reward(cfg.reward)
    report = evaluate_reward(reward, data, tol=cfg.tol, batch_size=cfg.batch_size)
    log(f"reward: {reward.name} on {cfg.data} ({len(data)} pairs, tie tolerance {cfg.tol:g})")
    log(report.table())
    if cfg.json_out:
        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_out).write_text(json.dumps(_jsonable(report.to_dict()), indent=2))
        log(f"wrote {cfg.json_out}")
    return report


# ----------------------------------------------------------------------------- eval: a model on a prompt suite
def read_prompt_suite(path: str | Path) -> list[tuple[str, str]]:
    """(category, prompt) pairs from a suite file: ``category<TAB>prompt`` lines, or plain prompt lines
    (category ``all``); blank lines and ``#`` comments skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt suite {str(p)!r} does not exist")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        category, sep, prompt = line.partition("\t")  # split before stripping: "cat<TAB>" is an empty prompt
        if not sep:
            category, prompt = "all", line.strip()
        if not prompt.strip():
            raise ValueError(f"{p}:{n}: empty prompt")
        out.append((category.strip(), prompt.strip()))
    if not out:
        raise ValueError(f"prompt suite {str(p)!r} holds no prompts")
    return out


@dataclass
class EvalModelJobConfig:
    """``mmalign eval --model ... --prompts suite.txt --reward ...``: sample a prompt suite and report
    each reward per category (mean score; strict accuracy where a reward reports a ``strict`` component)."""

    prompts: str
    """Prompt suite: ``category<TAB>prompt`` lines (or plain prompts)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to evaluate."""
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig("shapeeval")])
    """Rewards to score samples with."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(num_steps=16))
    """How to sample (an ODE by default: evaluation is deterministic per seed)."""
    samples_per_prompt: int = 2
    """Samples per prompt (different initial noise)."""
    max_prompts: int | None = None
    """Evaluate only the first N prompts of the suite."""
    batch_size: int = 8
    """Samples per sampler call."""
    seed: int = 0
    """Seed of the initial noise."""
    out: str = "runs/eval"
    """Output directory: report.json, grid.png (first samples) and per-sample media."""
    save_samples: bool = True
    """Write every sample's media file."""
    upscale: int = 4
    """Nearest-neighbour upscaling of saved images."""

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "batch_size", "upscale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if not self.rewards:
            raise ValueError("give at least one reward")


def eval_table(per_category: dict[str, dict[str, Any]], reward_names: list[str]) -> str:
    """A fixed-width per-category table of mean scores (and strict accuracy where present)."""
    cols = []
    for r in reward_names:
        cols.append((r, "mean"))
        if any(f"{r}.strict" in row for row in per_category.values()):
            cols.append((r, "strict"))
    head = f"{'category':16s} {'n':>5s} " + " ".join(f"{(r + ' ' + k):>20s}" for r, k in cols)
    lines = [head, "-" * len(head)]
    for cat, row in per_category.items():
        vals = []
        for r, k in cols:
            v = row.get(f"{r}.{k}")
            vals.append(f"{'n/a' if v is None else format(v, '.4f'):>20s}")
        lines.append(f"{cat:16s} {row['n']:>5d} " + " ".join(vals))
    return "\n".join(lines)


def run_eval_model(cfg: EvalModelJobConfig, log=print) -> dict[str, Any]:
    """Sample ``cfg.prompts`` with ``cfg.model`` and score with ``cfg.rewards``; print and write a report."""
    from .loading import load_model
    from .media import image_grid, save_image, save_media
    from .samplers import sample

    suite = read_prompt_suite(cfg.prompts)[: cfg.max_prompts]
    m = cfg.model
    adapter = load_model(m.name, family=m.family, torch_dtype=m.dtype, device=m.device, offline=m.offline,
                         cache_dir=m.cache_dir, adapter_kwargs=m.adapter, seed=cfg.seed)
    rewards = [build_reward(r) for r in cfg.rewards]
    names = [getattr(r, "name", rc.name) for r, rc in zip(rewards, cfg.rewards)]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    log(f"evaluating {m.name} ({adapter.family}) on {len(suite)} prompts x {cfg.samples_per_prompt} samples "
        f"with {', '.join(names)}")
    items = [(cat, p) for cat, p in suite for _ in range(cfg.samples_per_prompt)]
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    grid_samples = []
    t0 = time.perf_counter()
    for start in range(0, len(items), cfg.batch_size):
        chunk = items[start : start + cfg.batch_size]
        prompts = [p for _, p in chunk]
        rollout = sample(adapter, prompts, cfg.sampler, generator=gen)
        media = rollout.samples.detach().cpu()
        extra = {"fps": adapter.fps} if adapter.modality == "video" else {"sample_rate": adapter.sample_rate} if adapter.modality == "audio" else {}
        outputs = [r(media, prompts, **extra) for r in rewards]
        files = save_media(media, adapter.modality, out / "samples", prefix=f"s{start:05d}", sample_rate=adapter.sample_rate,
                           fps=adapter.fps, upscale=cfg.upscale) if cfg.save_samples else [None] * len(chunk)
        if len(grid_samples) < 64 and adapter.modality == "image":
            grid_samples.append(media)
        for i, (cat, prompt) in enumerate(chunk):
            rec: dict[str, Any] = {"category": cat, "prompt": prompt, "file": None if files[i] is None else str(files[i].relative_to(out))}
            for name, o in zip(names, outputs):
                rec[name] = float(o.scores[i]) if bool(o.valid[i]) else None
                if not bool(o.valid[i]):
                    rec[f"{name}.reason"] = o.reasons[i]
                if "strict" in o.components and bool(o.valid[i]):
                    rec[f"{name}.strict"] = float(o.components["strict"][i])
            records.append(rec)
        log(f"  {min(start + cfg.batch_size, len(items))}/{len(items)} samples")
    seconds = time.perf_counter() - t0

    def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
        s: dict[str, Any] = {"n": len(rows)}
        for name in names:
            for key in (name, f"{name}.strict"):
                vals = [r[key] for r in rows if r.get(key) is not None]
                if vals or key == name:
                    s[key if key != name else f"{name}.mean"] = sum(vals) / len(vals) if vals else None
            s[f"{name}.invalid"] = sum(1 for r in rows if r.get(name) is None)
        return s

    per_category = {cat: summarise([r for r in records if r["category"] == cat]) for cat in dict.fromkeys(c for c, _ in items)}
    per_category["overall"] = summarise(records)
    table = eval_table(per_category, names)
    log(table)
    grid = None
    if grid_samples:
        grid = save_image(image_grid(torch.cat(grid_samples)[:64], ncols=8), out / "grid.png", cfg.upscale)
    report = {"model": m.name, "family": adapter.family, "prompts": cfg.prompts, "rewards": names, "seconds": round(seconds, 2),
              "per_category": per_category, "samples": records, "grid": None if grid is None else str(grid), "config": to_dict(cfg)}
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2))
    (out / "table.txt").write_text(table + "\n")
    log(f"wrote {out / 'report.json'} and {out / 'table.txt'}{'' if grid is None else ' and ' + str(grid)} ({seconds:.1f}s)")
    return report

"""compare: the same prompt and seeds from two models (or one model with two samplers / settings),
side by side, with every selected reward's verdict under each sample and the per-side mean.

A side is a model (``tiny:<family>``, a pipeline directory, an HF id), optionally a training checkpoint
or LoRA directory applied to it, a sampler (method, steps, guidance, noise) and an inference-time
method (none, ReNO noise optimisation, best-of-N). Sample i of both sides starts from the initial noise
of seed i. ``build_app()`` returns the ``gr.Blocks`` (with the trajectory viewer as a second tab);
``compare()`` is the callback logic, callable without gradio.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from html import escape
from typing import Any, Sequence

import torch
from torch import Tensor

from .common import (
    APP_CSS,
    EMBEDDED_CLIP,
    REWARD_CHOICES,
    AppSettings,
    Limits,
    ProgressFn,
    Resources,
    Score,
    check_float,
    check_int,
    check_prompt,
    format_number,
    list_prompt_suites,
    mean_scores,
    model_choices,
    media_html,
    noop_progress,
    parse_seeds,
    read_suite,
    score_samples,
    scores_html,
    seeded_noise,
    selected_rewards,
    with_resolution,
)

SAMPLER_CHOICES = ["ode", "flow_grpo", "dance", "cps", "ddim", "ddpm"]
INFERENCE_CHOICES = ["none", "reno", "best_of_n"]
DEFAULT_INFERENCE_REWARD = f"clipscore model_id={EMBEDDED_CLIP}"


@dataclass
class SideSpec:
    """How one side generates: model (+ checkpoint), sampler and inference-time method."""

    label: str
    model: str
    checkpoint: str = ""
    sampler: str = "ode"
    num_steps: int = 8
    guidance_scale: float = 4.0
    noise_level: float = 0.7
    inference: str = "none"
    inference_reward: str = DEFAULT_INFERENCE_REWARD
    iterations: int = 8

    def describe(self) -> str:
        """A one-line description shown above the side's column."""
        parts = [self.model + (f" + {self.checkpoint}" if self.checkpoint else ""),
                 f"{self.sampler} x{self.num_steps}, cfg {self.guidance_scale:g}"]
        if self.sampler != "ode":
            parts.append(f"noise {self.noise_level:g}")
        if self.inference == "reno":
            parts.append(f"ReNO {self.iterations} it. on {self.inference_reward}")
        elif self.inference == "best_of_n":
            parts.append(f"best of {self.iterations} by {self.inference_reward}")
        return ", ".join(parts)


@dataclass
class SideResult:
    """One side's samples (B,... on the CPU, canonical media) and how they were made."""

    spec: SideSpec
    samples: Tensor
    modality: str
    fps: float | None
    sample_rate: int | None
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class CompareResult:
    """Both sides, their rewards per sample (``scores[side][i]``) and per-side means."""

    prompt: str
    seeds: list[int]
    rewards: list[str]
    sides: list[SideResult]
    scores: list[list[list[Score]]]
    means: list[dict[str, float]]


def check_side(spec: SideSpec, limits: Limits) -> SideSpec:
    """Validate a side's settings against the app's bounds (ValueError naming the field)."""
    name = f"side {spec.label}"
    if spec.sampler not in SAMPLER_CHOICES:
        raise ValueError(f"{name}: unknown sampler {spec.sampler!r} (choose one of {', '.join(SAMPLER_CHOICES)})")
    if spec.inference not in INFERENCE_CHOICES:
        raise ValueError(f"{name}: unknown inference method {spec.inference!r} (choose one of {', '.join(INFERENCE_CHOICES)})")
    spec.num_steps = check_int(spec.num_steps, f"{name} steps", 1, limits.max_steps)
    spec.guidance_scale = check_float(spec.guidance_scale, f"{name} guidance scale", 0.0, 50.0)
    spec.noise_level = check_float(spec.noise_level, f"{name} noise level", 0.0, 10.0)
    if spec.inference == "reno":
        spec.iterations = check_int(spec.iterations, f"{name} ReNO iterations", 1, limits.max_iterations)
        if spec.sampler != "ode":
            raise ValueError(f"{name}: ReNO differentiates a deterministic sampler; set its sampler to 'ode'")
    elif spec.inference == "best_of_n":
        spec.iterations = check_int(spec.iterations, f"{name} best-of-N candidates", 1, limits.max_candidates)
    if spec.inference != "none" and not (spec.inference_reward or "").strip():
        raise ValueError(f"{name}: {spec.inference} needs a reward to optimise")
    return spec


def _sampler_config(spec: SideSpec):
    from mmalign.samplers import SamplerConfig

    kwargs: dict[str, Any] = {"method": spec.sampler, "num_steps": spec.num_steps, "guidance_scale": spec.guidance_scale}
    if spec.sampler == "ddim":
        kwargs["eta"] = spec.noise_level
    else:
        kwargs["noise_level"] = spec.noise_level
    return SamplerConfig(**kwargs)


def _sample_plain(adapter: Any, spec: SideSpec, config: Any, prompt: str, seeds: list[int], noise: Tensor,
                  progress: ProgressFn, lo: float, hi: float) -> Tensor:
    """One sampler call per seed: row i from seed i's noise (and, for SDE samplers, seed i's step noise)."""
    from mmalign.samplers import sample

    rows = []
    for i, seed in enumerate(seeds):
        progress(lo + (hi - lo) * i / len(seeds), desc=f"side {spec.label}: sample {i + 1}/{len(seeds)}")
        rollout = sample(adapter, [prompt], config, latents=noise[i : i + 1],
                         generator=torch.Generator(device=adapter.device).manual_seed(int(seed) + 1))
        rows.append(rollout.samples.detach().float().cpu())
    return torch.cat(rows)


def _sample_reno(adapter: Any, spec: SideSpec, config: Any, prompt: str, reward: Any, noise: Tensor,
                 progress: ProgressFn, lo: float, hi: float) -> tuple[Tensor, list[str]]:
    """ReNO on every seed's noise at once (each noise gets its own gradient); progress per iteration."""
    from mmalign.samplers.inference import NoiseOptConfig, optimize_noise

    done = [0]

    def log(message: str) -> None:  # optimize_noise logs once per iteration
        done[0] += 1
        progress(lo + (hi - lo) * done[0] / spec.iterations, desc=f"side {spec.label}: ReNO iteration {done[0]}/{spec.iterations}")

    result = optimize_noise(adapter, [prompt] * noise.shape[0], reward, NoiseOptConfig(iterations=spec.iterations), config,
                            noise=noise, log=log)
    return result.samples.detach().float().cpu(), [f"ReNO: best iteration per sample {result.best_index.tolist()}"]


def _sample_best_of_n(adapter: Any, spec: SideSpec, config: Any, prompt: str, reward: Any, seeds: list[int],
                      progress: ProgressFn, lo: float, hi: float) -> tuple[Tensor, list[str]]:
    """Best-of-N per seed: N candidates drawn from a generator seeded by the seed, the best kept."""
    from mmalign.samplers.inference import best_of_n

    rows, picked = [], []
    for i, seed in enumerate(seeds):
        progress(lo + (hi - lo) * i / len(seeds), desc=f"side {spec.label}: best of {spec.iterations}, seed {seed}")
        result = best_of_n(adapter, [prompt], reward, n=spec.iterations, sampler=config,
                           generator=torch.Generator(device=adapter.device).manual_seed(int(seed)))
        rows.append(result.samples.detach().float().cpu())
        picked.append(int(result.best_index[0]))
    return torch.cat(rows), [f"best-of-{spec.iterations}: candidate kept per sample {picked}"]


def generate_side(resources: Resources, spec: SideSpec, prompt: str, seeds: list[int], height: Any = 0, width: Any = 0,
                  progress: ProgressFn = noop_progress, span: tuple[float, float] = (0.0, 1.0)) -> SideResult:
    """Sample ``prompt`` once per seed on one side (plain, ReNO or best-of-N); progress goes over ``span``."""
    lo, hi = span
    progress(lo, desc=f"side {spec.label}: loading {spec.model}")
    adapter = with_resolution(resources.model(spec.model, spec.checkpoint), height, width, resources.settings.limits)
    config = _sampler_config(spec)
    reward = None
    if spec.inference != "none":
        reward = resources.reward(spec.inference_reward)
        if reward.modality != adapter.modality:
            raise ValueError(f"side {spec.label}: {spec.inference} reward {spec.inference_reward!r} scores {reward.modality} "
                             f"samples, but {spec.model} makes {adapter.modality}")
    start = time.perf_counter()
    notes: list[str] = []
    with resources.lock:
        noise = seeded_noise(adapter, seeds)
        if spec.inference == "none":
            samples = _sample_plain(adapter, spec, config, prompt, seeds, noise, progress, lo, hi)
        elif spec.inference == "reno":
            samples, notes = _sample_reno(adapter, spec, config, prompt, reward, noise, progress, lo, hi)
        else:
            samples, notes = _sample_best_of_n(adapter, spec, config, prompt, reward, seeds, progress, lo, hi)
    return SideResult(spec, samples, adapter.modality, adapter.fps, adapter.sample_rate, time.perf_counter() - start, notes)


def compare(resources: Resources, prompt: str, seeds_text: str, count: Any, rewards: Sequence[str], side_a: SideSpec,
            side_b: SideSpec, height: Any = 0, width: Any = 0, progress: ProgressFn = noop_progress) -> CompareResult:
    """Generate both sides with the same seeds and score every sample with every reward."""
    limits = resources.settings.limits
    prompt = check_prompt(prompt)
    seeds = parse_seeds(seeds_text, count, limits)
    specs = list(rewards)
    sides_in = [check_side(side_a, limits), check_side(side_b, limits)]
    sides = [generate_side(resources, spec, prompt, seeds, height, width, progress, span=(0.45 * i, 0.45 * (i + 1)))
             for i, spec in enumerate(sides_in)]
    if sides[0].modality != sides[1].modality:
        raise ValueError(f"side A makes {sides[0].modality} and side B makes {sides[1].modality}: compare models of the same modality")
    scores, means = [], []
    for i, side in enumerate(sides):
        progress(0.9 + 0.05 * i, desc=f"scoring side {side.spec.label} with {len(specs)} reward(s)")
        extra = {k: v for k, v in (("fps", side.fps), ("sample_rate", side.sample_rate)) if v is not None}
        rows = score_samples(resources, specs, side.samples, [prompt] * len(seeds), side.modality, extra) if specs else [[] for _ in seeds]
        scores.append(rows)
        means.append(mean_scores(rows))
    progress(1.0, desc="done")
    return CompareResult(prompt, seeds, specs, sides, scores, means)


def _better(a: float, b: float, higher_is_better: bool) -> int:
    """0 when a wins, 1 when b wins, -1 for a tie or a missing value."""
    if not (math.isfinite(a) and math.isfinite(b)) or a == b:
        return -1
    return 0 if (a > b) == higher_is_better else 1


def render_compare(result: CompareResult) -> str:
    """The comparison as an HTML table: one row per seed (A | B), then the per-side means with the
    better side of each reward marked, and how often each side won per reward."""
    a, b = result.sides
    head = (f'<tr><th>seed</th><th class="mm-side-a">A: {escape(a.spec.describe())}<br><small>{a.seconds:.1f} s</small></th>'
            f'<th class="mm-side-b">B: {escape(b.spec.describe())}<br><small>{b.seconds:.1f} s</small></th></tr>')
    rows = []
    for i, seed in enumerate(result.seeds):
        cells = []
        for side_index, side in enumerate(result.sides):
            media = media_html(side.samples[i], side.modality, fps=side.fps, sample_rate=side.sample_rate)
            cells.append(f'<td class="mm-cell mm-side-{"ab"[side_index]}">{media}{scores_html(result.scores[side_index][i])}</td>')
        rows.append(f'<tr><td>{seed}</td>{"".join(cells)}</tr>')
    summary = []
    for side_index in range(2):
        lines = []
        for j, spec in enumerate(result.rewards):
            hib = result.scores[0][0][j].higher_is_better if result.scores[0] and result.scores[0][0] else True
            m = [result.means[0].get(spec, float("nan")), result.means[1].get(spec, float("nan"))]
            won = sum(1 for i in range(len(result.seeds))
                      if _better(result.scores[0][i][j].score, result.scores[1][i][j].score, hib) == side_index)
            better = _better(m[0], m[1], hib) == side_index
            cls = "mm-mean mm-better" if better else "mm-mean"
            lines.append(f'<tr class="{cls}"><td class="mm-reward">{escape(spec)}</td><td><b>{format_number(m[side_index])}</b></td>'
                         f'<td class="mm-components">wins {won}/{len(result.seeds)}{" - better mean" if better else ""}</td></tr>')
        summary.append(f'<td class="mm-side-{"ab"[side_index]}"><table class="mm-scores">{"".join(lines)}</table></td>')
    rows.append(f'<tr class="mm-means"><td>mean</td>{"".join(summary)}</tr>')
    notes = "".join(f"<p class='mm-components'>{escape(s.spec.label)}: {escape(n)}</p>" for s in result.sides for n in s.notes)
    return f'<style>{APP_CSS}</style><div class="mm-compare"><p><b>{escape(result.prompt)}</b></p><table class="mm-pairs">{head}{"".join(rows)}</table>{notes}</div>'


def compare_json(result: CompareResult) -> dict[str, Any]:
    """The numbers of a comparison (no media), for the JSON view and downloads."""
    return {
        "prompt": result.prompt, "seeds": result.seeds, "rewards": result.rewards,
        "sides": [{"label": s.spec.label, "setup": s.spec.describe(), "seconds": round(s.seconds, 3),
                   "mean": {k: (v if math.isfinite(v) else None) for k, v in result.means[i].items()},
                   "samples": [{"seed": seed, "scores": {sc.reward: {"score": sc.score if sc.valid else None,
                                                                     "components": sc.components, "reason": sc.reason}
                                                        for sc in result.scores[i][k]}}
                               for k, seed in enumerate(result.seeds)]}
                  for i, s in enumerate(result.sides)],
    }


# ----------------------------------------------------------------------------- the Gradio app
SIDE_FIELDS = ("model", "checkpoint", "sampler", "num_steps", "guidance_scale", "noise_level", "inference",
               "inference_reward", "iterations")


def _side_controls(gr: Any, label: str, settings: AppSettings, inference: str) -> list[Any]:
    limits = settings.limits
    lid = label.lower()
    with gr.Column():
        gr.Markdown(f"### Side {label}")
        model = gr.Dropdown(model_choices(settings.model), value=settings.model, allow_custom_value=True,
                            label="model (pipeline directory, tiny:<family> or HF id)", elem_id=f"model_{lid}")
        checkpoint = gr.Textbox(label="checkpoint or LoRA directory (optional: a run dir, checkpoints/step_N, or a diffusers LoRA dir)",
                                elem_id=f"checkpoint_{lid}")
        with gr.Row():
            sampler = gr.Dropdown(SAMPLER_CHOICES, value="ode", label="sampler", elem_id=f"sampler_{lid}")
            num_steps = gr.Slider(1, limits.max_steps, value=settings.default_steps, step=1, label="steps", elem_id=f"steps_{lid}")
        with gr.Row():
            guidance = gr.Number(value=4.0, label="guidance scale", minimum=0, maximum=50)
            noise = gr.Number(value=0.7, label="SDE noise level / DDIM eta", minimum=0, maximum=10)
        with gr.Row():
            inference_method = gr.Radio(INFERENCE_CHOICES, value=inference, label="inference-time method",
                                        elem_id=f"inference_{lid}")
            iterations = gr.Slider(1, max(limits.max_iterations, limits.max_candidates), value=settings.default_iterations, step=1,
                                   label="ReNO iterations / best-of-N candidates")
        inference_reward = gr.Dropdown(REWARD_CHOICES, value=DEFAULT_INFERENCE_REWARD, allow_custom_value=True,
                                       label="reward to optimise (ReNO: differentiable)")
    return [model, checkpoint, sampler, num_steps, guidance, noise, inference_method, inference_reward, iterations]


USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError)


class CompareCallbacks:
    """The compare tab's event handlers (bound to one :class:`Resources`); tests call them directly."""

    def __init__(self, resources: Resources) -> None:
        self.resources = resources

    def suite_prompts(self, path: str | None):
        """The prompts of the chosen suite, as choices of the suite-prompt dropdown."""
        import gradio as gr

        try:
            items = read_suite(path) if path else []
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return gr.update(choices=items, value=None)

    def generate(self, prompt_text: str, seed_text: str, count: Any, height: Any, width: Any, reward_choices: list[str] | None,
                 custom_rewards: str | None, *side_values: Any, progress: ProgressFn = noop_progress) -> tuple[str, str, dict]:
        """Generate and score both sides: (status line, pairs HTML, numbers as JSON). ``side_values`` are
        side A's then side B's :data:`SIDE_FIELDS`. Bad input raises ``gr.Error`` with the reason."""
        import gradio as gr

        half = len(SIDE_FIELDS)
        if len(side_values) != 2 * half:
            raise gr.Error(f"expected {2 * half} side settings, got {len(side_values)}")
        try:
            a = SideSpec("A", **dict(zip(SIDE_FIELDS, side_values[:half])))
            b = SideSpec("B", **dict(zip(SIDE_FIELDS, side_values[half:])))
            result = compare(self.resources, prompt_text, seed_text, count, selected_rewards(reward_choices, custom_rewards),
                             a, b, height, width, progress=progress)
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from None
        took = " | ".join(f"{s.spec.label}: {s.seconds:.1f} s" for s in result.sides)
        return f"Generated {len(result.seeds)} pair(s) ({took}).", render_compare(result), compare_json(result)


def build_app(settings: AppSettings | None = None, resources: Resources | None = None):
    """The compare app as a ``gr.Blocks`` (not launched): a comparison tab and a trajectory tab."""
    import gradio as gr

    from . import trajectory

    settings = settings or AppSettings()
    resources = resources or Resources(settings)
    suites = list_prompt_suites()
    with gr.Blocks(title="mmalign compare") as demo:
        gr.Markdown("# mmalign compare\nSame prompt, same seeds, two models or settings; every selected reward "
                    "scores every sample. Runs on the device the app was started with "
                    f"(`{settings.device}`, {settings.dtype}).")
        with gr.Tab("compare"):
            with gr.Row():
                prompt = gr.Textbox(label="prompt", value="a red circle", elem_id="prompt", scale=3)
                suite = gr.Dropdown(suites, value=suites[0] if suites else None, label="prompt suite", scale=1)
                suite_prompt = gr.Dropdown([], label="prompt from the suite", allow_custom_value=False, scale=2)
            with gr.Row():
                seeds = gr.Textbox(value="0", label="seeds: first seed, or a comma-separated list", elem_id="seeds")
                count = gr.Slider(1, settings.limits.max_samples, value=settings.default_samples, step=1,
                                  label="samples (with a first seed)")
                height = gr.Number(value=0, label="height (0 = model default)", minimum=0, maximum=settings.limits.max_side)
                width = gr.Number(value=0, label="width (0 = model default)", minimum=0, maximum=settings.limits.max_side)
            with gr.Row():
                rewards = gr.CheckboxGroup(settings.reward_choices, value=settings.rewards, label="rewards shown under every sample")
                custom = gr.Textbox(label="more rewards, one per line: name key=value ...", lines=2)
            with gr.Row():
                side_a = _side_controls(gr, "A", settings, "none")
                side_b = _side_controls(gr, "B", settings, settings.side_b_inference)
            button = gr.Button("Generate both sides", variant="primary", elem_id="generate")
            status = gr.Markdown(elem_id="status")
            pairs = gr.HTML(elem_id="pairs")
            with gr.Accordion("numbers (JSON)", open=False):
                numbers = gr.JSON(label="numbers", elem_id="numbers")

            callbacks = CompareCallbacks(resources)

            ordered = [prompt, seeds, count, height, width, rewards, custom, *side_a, *side_b]

            def on_generate(values: dict, progress=gr.Progress()):  # a set of inputs arrives as {component: value}
                return callbacks.generate(*[values[c] for c in ordered], progress=progress)

            suite.change(callbacks.suite_prompts, suite, suite_prompt)
            demo.load(callbacks.suite_prompts, suite, suite_prompt)
            suite_prompt.change(lambda p, current: p or current, [suite_prompt, prompt], prompt)
            button.click(on_generate, set(ordered), [status, pairs, numbers])
        with gr.Tab("trajectory"):
            trajectory.build_tab(gr, settings, resources)
    return demo

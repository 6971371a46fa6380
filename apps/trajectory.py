"""trajectory: step through one rollout's predicted clean samples, denoising step by denoising step,
with the rewards of every step plotted (dense rewards).

Two views of "the sample at step k": the sampler's own prediction ``x0_hat`` at step k (``x0``), or
the deterministic ODE completion of the latent reached after k steps (``completion``: DenseGRPO's dense
reward, ``R(C(x_k))``; the gain of step k is ``R(C(x_{k+1})) - R(C(x_k))``). Point K is the final sample.
A tab of the compare app and an app of its own (``mmalign app trajectory``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Any, Sequence

import torch
from torch import Tensor

from .common import (
    APP_CSS,
    AppSettings,
    ProgressFn,
    Resources,
    Score,
    check_float,
    check_int,
    check_prompt,
    format_number,
    media_html,
    model_choices,
    noop_progress,
    score_samples,
    scores_html,
    seeded_noise,
    selected_rewards,
    with_resolution,
)

VIEWS = ["x0", "completion"]
SAMPLERS = ["ode", "flow_grpo", "dance", "cps", "ddim", "ddpm"]


@dataclass
class TrajectoryResult:
    """One rollout seen at every step: ``media[k]`` (k = 0..K; K is the final sample) and its scores."""

    prompt: str
    seed: int
    view: str
    modality: str
    fps: float | None
    sample_rate: int | None
    timesteps: list[float]
    media: Tensor
    scores: list[list[Score]]
    rewards: list[str]

    @property
    def num_points(self) -> int:
        return self.media.shape[0]

    def series(self, reward: str) -> list[float]:
        """The reward's score at every point (NaN where not scored)."""
        j = self.rewards.index(reward)
        return [s[j].score if s[j].valid else math.nan for s in self.scores]

    def gains(self, reward: str) -> list[float]:
        """Per-step reward gains ``R(k+1) - R(k)`` (K values)."""
        values = self.series(reward)
        return [b - a for a, b in zip(values[:-1], values[1:])]


def run_trajectory(resources: Resources, model: str, checkpoint: str, prompt: str, seed: Any, sampler: str, num_steps: Any,
                   guidance_scale: Any, noise_level: Any, rewards: Sequence[str], view: str = "x0",
                   completion_steps: Any = 2, height: Any = 0, width: Any = 0,
                   progress: ProgressFn = noop_progress) -> TrajectoryResult:
    """Sample one trajectory (recording every step's prediction) and score the sample of every step."""
    from mmalign.samplers import SamplerConfig, ode_complete, sample

    limits = resources.settings.limits
    prompt = check_prompt(prompt)
    seed = check_int(seed, "seed", 0, 2**63 - 1)
    steps = check_int(num_steps, "steps", 1, limits.max_steps)
    guidance = check_float(guidance_scale, "guidance scale", 0.0, 50.0)
    noise = check_float(noise_level, "noise level", 0.0, 10.0)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose one of {', '.join(SAMPLERS)})")
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r} (choose x0 or completion)")
    specs = list(rewards)
    progress(0.0, desc=f"loading {model}")
    adapter = with_resolution(resources.model(model, checkpoint), height, width, limits)
    noise_key = "eta" if sampler == "ddim" else "noise_level"
    config = SamplerConfig(method=sampler, num_steps=steps, guidance_scale=guidance, record_x0=True, **{noise_key: noise})
    with resources.lock:
        progress(0.05, desc=f"sampling {steps} steps")
        latents = seeded_noise(adapter, [seed])
        rollout = sample(adapter, [prompt], config, latents=latents,
                         generator=torch.Generator(device=adapter.device).manual_seed(seed + 1))
        frames = []
        conditioning = None
        if view == "completion":
            limit = None if completion_steps in (None, "", 0) else check_int(completion_steps, "completion steps", 1, limits.max_steps)
            conditioning = adapter.encode_in_chunks([prompt], None, rollout.meta["guidance_scale"], config.micro_batch)
        for k in range(steps):
            progress(0.1 + 0.6 * k / steps, desc=f"decoding step {k + 1}/{steps}")
            with torch.no_grad():
                if view == "x0":
                    frames.append(adapter.decode(rollout.x0_pred[:, k].to(adapter.device)).detach().float().cpu())
                else:
                    frames.append(ode_complete(adapter, rollout.latents[:, k], k, steps, conditioning, decode=True,
                                               max_steps=limit, micro_batch=config.micro_batch).detach().float().cpu())
        frames.append(rollout.samples.detach().float().cpu())
    media = torch.cat(frames)
    progress(0.75, desc=f"scoring {media.shape[0]} steps with {len(specs)} reward(s)")
    extra = {k: v for k, v in (("fps", adapter.fps), ("sample_rate", adapter.sample_rate)) if v is not None}
    scores = score_samples(resources, specs, media, [prompt] * media.shape[0], adapter.modality, extra) if specs else [[] for _ in range(media.shape[0])]
    progress(1.0, desc="done")
    timesteps = [float(t) for t in rollout.timesteps.tolist()] + [0.0]
    return TrajectoryResult(prompt, seed, view, adapter.modality, adapter.fps, adapter.sample_rate, timesteps, media, scores, specs)


def trajectory_figure(result: TrajectoryResult):
    """A matplotlib figure: each reward against the step (one panel per reward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(result.rewards))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 2.8), squeeze=False)
    xs = list(range(result.num_points))
    for ax, reward in zip(axes.flat, result.rewards or [None]):
        if reward is None:
            ax.text(0.5, 0.5, "no reward selected", ha="center", va="center")
            ax.axis("off")
            continue
        ax.plot(xs, result.series(reward), marker="o", ms=3, lw=1.2)
        ax.set_title(f"{reward} ({'x0_hat' if result.view == 'x0' else 'ODE completion'})", fontsize=8)
        ax.set_xlabel("step (K = final sample)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def step_html(result: TrajectoryResult, k: Any) -> str:
    """The sample at point ``k`` (large) with its scores and the gain from the previous step."""
    k = check_int(k, "step", 0, result.num_points - 1)
    media = media_html(result.media[k], result.modality, fps=result.fps, sample_rate=result.sample_rate, display=256)
    gains = ""
    if k > 0 and result.rewards:
        parts = [f"{escape(r)} {format_number(result.series(r)[k] - result.series(r)[k - 1])}" for r in result.rewards]
        gains = f"<p class='mm-components'>gain of step {k - 1} -> {k}: {', '.join(parts)}</p>"
    label = "final sample" if k == result.num_points - 1 else f"step {k} (t = {result.timesteps[k]:.4g})"
    return (f"<style>{APP_CSS}</style><div class='mm-step'><p><b>{label}</b></p>{media}"
            f"{scores_html(result.scores[k])}{gains}</div>")


def strip_html(result: TrajectoryResult) -> str:
    """Every step's sample in a row, each captioned with its step and scores."""
    figures = []
    for k in range(result.num_points):
        media = media_html(result.media[k], result.modality, fps=result.fps, sample_rate=result.sample_rate, display=96)
        caption = "final" if k == result.num_points - 1 else f"step {k}"
        figures.append(f"<figure class='mm-step-{k}'>{media}<figcaption>{caption}</figcaption>{scores_html(result.scores[k])}</figure>")
    return f"<style>{APP_CSS}</style><div class='mm-strip'>{''.join(figures)}</div>"


# ----------------------------------------------------------------------------- the Gradio parts
class TrajectoryCallbacks:
    """The trajectory view's event handlers (bound to one :class:`Resources`); tests call them directly."""

    def __init__(self, resources: Resources) -> None:
        self.resources = resources

    def run(self, model: str, checkpoint: str, prompt: str, seed: Any, sampler: str, num_steps: Any, guidance: Any,
            noise: Any, view: str, completion_steps: Any, reward_choices: list[str] | None, custom_rewards: str | None,
            progress: ProgressFn = noop_progress):
        """Run a trajectory: (result state, figure, step-slider update, final-step HTML, strip HTML)."""
        import gradio as gr

        try:
            result = run_trajectory(self.resources, model, checkpoint, prompt, seed, sampler, num_steps, guidance, noise,
                                    selected_rewards(reward_choices, custom_rewards), view, completion_steps, progress=progress)
        except (ValueError, OSError, KeyError, RuntimeError) as err:
            raise gr.Error(str(err)) from None
        last = result.num_points - 1
        return (result, trajectory_figure(result), gr.update(maximum=last, value=last), step_html(result, last),
                strip_html(result))

    def step(self, result: TrajectoryResult | None, k: Any) -> str:
        """The HTML of step ``k`` of the last run (empty before any run)."""
        if result is None:
            return ""
        return step_html(result, min(int(k), result.num_points - 1))


def build_tab(gr: Any, settings: AppSettings, resources: Resources) -> None:
    """The trajectory controls and views, rendered into the current Blocks context."""
    limits = settings.limits
    callbacks = TrajectoryCallbacks(resources)
    with gr.Row():
        model = gr.Dropdown(model_choices(settings.model), value=settings.model,
                            allow_custom_value=True, label="model", elem_id="traj_model")
        checkpoint = gr.Textbox(label="checkpoint or LoRA directory (optional)", elem_id="traj_checkpoint")
        prompt = gr.Textbox(label="prompt", value="a red circle", elem_id="traj_prompt")
        seed = gr.Number(value=0, label="seed", precision=0, minimum=0)
    with gr.Row():
        sampler = gr.Dropdown(SAMPLERS, value="ode", label="sampler")
        num_steps = gr.Slider(1, limits.max_steps, value=settings.default_steps, step=1, label="steps")
        guidance = gr.Number(value=4.0, label="guidance scale", minimum=0, maximum=50)
        noise = gr.Number(value=0.7, label="SDE noise level / DDIM eta", minimum=0, maximum=10)
    with gr.Row():
        view = gr.Radio(VIEWS, value="x0", label="sample at step k: predicted x0 or ODE completion (dense reward)")
        completion = gr.Slider(1, limits.max_steps, value=2, step=1, label="ODE completion steps")
        rewards = gr.CheckboxGroup(settings.reward_choices, value=settings.rewards, label="rewards per step")
        custom = gr.Textbox(label="more rewards, one per line", lines=1)
    button = gr.Button("Run trajectory", variant="primary", elem_id="traj_run")
    state = gr.State(None)
    plot = gr.Plot(label="reward per step", elem_id="traj_plot")
    slider = gr.Slider(0, limits.max_steps, value=0, step=1, label="step", elem_id="traj_step")
    current = gr.HTML(elem_id="traj_current")
    strip = gr.HTML(elem_id="traj_strip")

    def on_run(model_name, ckpt, prompt_text, seed_value, method, steps, cfg, level, view_name, completion_steps,
               reward_choices, custom_rewards, progress=gr.Progress()):
        return callbacks.run(model_name, ckpt, prompt_text, seed_value, method, steps, cfg, level, view_name,
                             completion_steps, reward_choices, custom_rewards, progress=progress)

    button.click(on_run, [model, checkpoint, prompt, seed, sampler, num_steps, guidance, noise, view, completion,
                          rewards, custom], [state, plot, slider, current, strip])
    slider.change(callbacks.step, [state, slider], current)


def build_app(settings: AppSettings | None = None, resources: Resources | None = None):
    """The trajectory viewer as its own ``gr.Blocks`` (not launched)."""
    import gradio as gr

    settings = settings or AppSettings()
    resources = resources or Resources(settings)
    with gr.Blocks(title="mmalign trajectory") as demo:
        gr.Markdown("# mmalign trajectory\nOne rollout, step by step: the predicted clean sample of every denoising "
                    "step (or its ODE completion) and every selected reward along the way.")
        build_tab(gr, settings, resources)
    return demo

"""runs: open a training output folder (``mmalign train ... out=DIR``) and watch what training did.

Curves from ``metrics.jsonl``: the trained rewards per step (mean +- std), the held-out rewards scored on
the same samples, every evaluation metric (held-out prompts and seeds), and the KL to the reference.
The first panel overlays the trained reward and the held-out metrics, each standardised by its own
mean and std over the run, so a trained reward that climbs while held-out metrics fall (reward hacking)
shows at a glance. The evaluation grids (``eval/step_XXXXXXXX.png``: same prompts and seeds at every
evaluation) step by step, and ``report.json``'s before -> after table.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .common import AppSettings, ProgressFn, Resources, noop_progress

GRID_NAME = re.compile(r"step_(\d+)\.png$")


@dataclass
class RunView:
    """What a run directory holds: its metrics records, evaluation grids by step, report and config."""

    run_dir: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    grids: list[tuple[int, Path]]
    report: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_keys(self) -> list[str]:
        """Plottable metrics: trained and held-out reward means, KL, and evaluation means (no per-category)."""
        train = sorted({k for r in self.train for k in r if k.endswith("/mean") and k.startswith(("reward/", "held_out/"))})
        evals = sorted({k for r in self.evals for k in r if k.endswith("/mean") and k.startswith("eval/") and "/cat/" not in k})
        kl = [k for k in ("kl", "approx_kl") if any(_finite(r.get(k)) for r in self.train)]
        return train + kl + evals

    @property
    def default_metrics(self) -> list[str]:
        """What the app plots first (at most 9): the metrics that change over the run (a constant one, e.g. a
        prompt's clause count, says nothing), ``kl`` rather than ``approx_kl`` when both are logged."""
        keys = [k for k in self.metric_keys if len(set(self.values(k))) > 1]
        if "kl" in keys and "approx_kl" in keys:
            keys.remove("approx_kl")
        return keys[:9]

    def values(self, key: str) -> list[float]:
        """The logged values of ``key`` over the run (train or eval records)."""
        return _series(self.evals if key.startswith("eval/") else self.train, key)[1]

    def summary(self) -> str:
        """A few lines of Markdown about the run."""
        algo = self.config.get("algorithm", "?")
        model = (self.config.get("model") or {}).get("name", "?")
        last = int(self.train[-1]["step"]) if self.train else 0
        lines = [f"**{self.run_dir}**: `{algo}` on `{model}`, {last} training steps logged, "
                 f"{len(self.evals)} evaluations, {len(self.grids)} evaluation grids."]
        if self.report.get("eval"):
            lines.append("Before -> after (report.json) is in the table below.")
        return "\n\n".join(lines)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def discover_runs(root: str | os.PathLike = "runs", depth: int = 2) -> list[str]:
    """Directories under ``root`` (up to ``depth`` levels) that hold a ``metrics.jsonl``."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = []
    for level in range(1, depth + 1):
        found += [str(p.parent) for p in base.glob("/".join(["*"] * level) + "/metrics.jsonl")]
    if (base / "metrics.jsonl").is_file():
        found.insert(0, str(base))
    return sorted(set(found))


def load_run(run_dir: str | os.PathLike) -> RunView:
    """Read a run directory (``metrics.jsonl`` required; grids, ``report.json``, ``config.yaml`` optional)."""
    import yaml

    from mmalign.trainers.report import read_metrics

    text = str(run_dir or "").strip()
    if not text:
        raise ValueError("enter a run directory (the out= folder of mmalign train)")
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"run directory {text!r} does not exist (working directory: {os.getcwd()})")
    try:
        records = read_metrics(path)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    if not records:
        raise ValueError(f"{path / 'metrics.jsonl'} is empty: the run has not logged a step yet")
    grids = sorted((int(m.group(1)), p) for p in (path / "eval").glob("step_*.png") if (m := GRID_NAME.search(p.name)))
    report = {}
    if (path / "report.json").is_file():
        try:
            report = json.loads((path / "report.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path / 'report.json'} is not JSON ({err})") from None
    config = {}
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    return RunView(path, [r for r in records if r.get("kind") == "train"], [r for r in records if r.get("kind") == "eval"],
                   grids, report, config)


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if _finite(r.get(key)):
            xs.append(int(r["step"]))
            ys.append(float(r[key]))
    return xs, ys


def _running_mean(ys: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out = []
    for i in range(len(ys)):
        part = ys[max(0, i - window + 1) : i + 1]
        out.append(sum(part) / len(part))
    return out


def _standardise(ys: list[float]) -> list[float]:
    if len(ys) < 2:
        return [0.0 for _ in ys]
    mean = sum(ys) / len(ys)
    std = math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys))
    return [(y - mean) / std if std > 0 else 0.0 for y in ys]


def curves_figure(view: RunView, metrics: Sequence[str] | None = None, overlay: bool = True):
    """A matplotlib figure: the standardised overlay (trained vs held-out), then one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(metrics) if metrics else view.default_metrics
    unknown = [m for m in metrics if m not in view.metric_keys]
    if unknown:
        raise ValueError(f"metrics {unknown} are not in this run (it has {view.metric_keys})")
    trained = [m for m in metrics if m.startswith("reward/")]
    held = [m for m in metrics if m.startswith(("held_out/", "eval/"))]
    panels: list[tuple[str, list[str]]] = []
    if overlay and trained and held:
        panels.append(("overlay", trained + held))
    panels += [("single", [m]) for m in metrics]
    if not panels:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "nothing to plot", ha="center", va="center")
        ax.axis("off")
        return fig
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 2.9 * nrow), squeeze=False)
    for ax, (kind, keys) in zip(axes.flat, panels):
        if kind == "overlay":
            for key in keys:
                records = view.evals if key.startswith("eval/") else view.train
                xs, ys = _series(records, key)
                if not key.startswith("eval/"):  # per-step batch means are noisy: a running mean shows the trend
                    ys = _running_mean(ys, max(1, len(ys) // 10))
                ax.plot(xs, _standardise(ys), marker="o" if key.startswith("eval/") else None, ms=3, lw=1.2,
                        ls="-" if key.startswith("reward/") else "--", label=key)
            ax.set_title("trained vs held-out (each standardised; per-step series smoothed)", fontsize=8)
            ax.legend(fontsize=6)
        else:
            key = keys[0]
            records = view.evals if key.startswith("eval/") else view.train
            xs, ys = _series(records, key)
            color = "tab:blue" if key.startswith("reward/") else "tab:red" if "kl" in key else \
                "tab:orange" if key.startswith("held_out/") else "tab:green"
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, ms=3, lw=1.2, color=color)
            if key.startswith("reward/"):
                sx, sd = _series(records, key[: -len("/mean")] + "/std")
                if sx == xs:
                    ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2, color=color)
            ax.set_title(key, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def report_rows(view: RunView) -> list[list[Any]]:
    """``report.json``'s evaluation table: metric, before, after, change, gap closed (rounded)."""
    rows = []
    for key, row in (view.report.get("eval") or {}).items():
        gap = row.get("gap_closed")
        rows.append([key, round(row["before"], 4), round(row["after"], 4), round(row["change"], 4),
                     None if gap is None or not _finite(gap) else round(gap, 4)])
    return rows


def grid_at(view: RunView, index: Any):
    """The evaluation grid number ``index`` (0 = first evaluation) as a PIL image and its caption."""
    from PIL import Image

    if not view.grids:
        raise ValueError(f"{view.run_dir} has no evaluation grids (eval/step_*.png)")
    i = int(index)
    if not 0 <= i < len(view.grids):
        raise ValueError(f"grid index {i} out of range [0, {len(view.grids) - 1}]")
    step, path = view.grids[i]
    with Image.open(path) as im:
        image = im.convert("RGB")
    return image, f"evaluation at step {step} ({i + 1}/{len(view.grids)})"


# ----------------------------------------------------------------------------- the Gradio app
class RunsCallbacks:
    """The runs app's event handlers; tests call them directly."""

    def load(self, path: str, progress: ProgressFn = noop_progress) -> tuple:
        """Open a run: (state, summary, metric choices, figure, report rows, slider, first/last grids, grid)."""
        import gradio as gr

        try:
            progress(0.1, desc="reading metrics.jsonl")
            view = load_run(path)
            figure = curves_figure(view)
            image, caption = grid_at(view, len(view.grids) - 1) if view.grids else (None, "no evaluation grids")
            ends = [grid_at(view, i) for i in sorted({0, len(view.grids) - 1})] if view.grids else []
        except (ValueError, OSError) as err:
            raise gr.Error(str(err)) from None
        slider = gr.update(maximum=max(1, len(view.grids) - 1), value=max(0, len(view.grids) - 1),
                           interactive=len(view.grids) > 1)
        return (view, view.summary(), gr.update(choices=view.metric_keys, value=view.default_metrics), figure,
                report_rows(view), slider, ends, gr.update(value=image, label=caption))

    def metrics(self, view: RunView | None, chosen: list[str] | None, overlay: bool):
        """The curves of the chosen metrics (None before a run is loaded)."""
        import gradio as gr

        if view is None:
            return None
        try:
            return curves_figure(view, chosen or None, overlay)
        except ValueError as err:
            raise gr.Error(str(err)) from None

    def grid(self, view: RunView | None, index: Any):
        """The evaluation grid at slider position ``index``."""
        import gradio as gr

        if view is None or not view.grids:
            return gr.update()
        try:
            image, caption = grid_at(view, min(int(index), len(view.grids) - 1))
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return gr.update(value=image, label=caption)


def build_app(settings: AppSettings | None = None, resources: Resources | None = None, runs_root: str = "runs"):
    """The runs app as a ``gr.Blocks`` (not launched). ``runs_root`` is where runs are discovered."""
    import gradio as gr

    callbacks = RunsCallbacks()
    found = discover_runs(runs_root)
    with gr.Blocks(title="mmalign runs") as demo:
        gr.Markdown("# mmalign runs\nA training run's curves and evaluation grids. A trained reward that climbs "
                    "while the held-out metrics fall is reward hacking.")
        with gr.Row():
            run_dir = gr.Dropdown(found, value=found[0] if found else None, allow_custom_value=True,
                                  label="run directory (out= of mmalign train)", elem_id="run_dir", scale=4)
            refresh = gr.Button("refresh list", scale=1)
            load = gr.Button("Load run", variant="primary", elem_id="load_run", scale=1)
        summary = gr.Markdown(elem_id="run_summary")
        metrics = gr.CheckboxGroup([], label="metrics to plot")
        overlay = gr.Checkbox(value=True, label="overlay trained vs held-out (standardised)")
        plot = gr.Plot(label="curves", elem_id="run_plot")
        report = gr.Dataframe(headers=["metric", "before", "after", "change", "gap closed"], label="report.json: before -> after",
                              elem_id="run_report")
        with gr.Row():
            grid_index = gr.Slider(0, 1, value=0, step=1, label="evaluation", elem_id="grid_index")
            first_last = gr.Gallery(label="first and last evaluation", columns=2, elem_id="first_last")
        grid = gr.Image(label="evaluation grid", type="pil", elem_id="run_grid")
        state = gr.State(None)

        def on_load(path, progress=gr.Progress()):
            return callbacks.load(path, progress)

        load.click(on_load, run_dir, [state, summary, metrics, plot, report, grid_index, first_last, grid])
        refresh.click(lambda: gr.update(choices=discover_runs(runs_root)), None, run_dir)
        metrics.input(callbacks.metrics, [state, metrics, overlay], plot)
        overlay.input(callbacks.metrics, [state, metrics, overlay], plot)
        grid_index.change(callbacks.grid, [state, grid_index], grid)
    return demo

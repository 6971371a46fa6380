"""The end-of-run report of a training run: ``report.json`` (the first and last evaluation side by
side, per reward, component and prompt category, with the gap closed towards declared targets and,
where both evaluations saved per-sample scores, the paired standard error of each overall change),
``curves.png`` (trained / held-out reward curves and evaluation curves from ``metrics.jsonl``) and
``before.png`` / ``after.png`` (the first and last evaluation grids: same prompts, same seeds).

``mmalign report RUN_DIR`` rebuilds them from a run directory; trainers write them at the end of ``fit``.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from .common import atomic_write_text


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` (a corrupt line raises naming its line number)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a training run directory (or logging.jsonl was off)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i} is not JSON ({err})") from None
    return records


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def compare_evals(first: Mapping[str, Any], last: Mapping[str, Any], targets: Mapping[str, float] | None = None) -> dict[str, Any]:
    """``{metric: {"before", "after", "change"[, "target", "gap_closed"]}}`` for every numeric ``eval/...``
    metric present in both evaluations. ``gap_closed`` = (after - before) / (target - before): the
    fraction of the distance to ``target`` covered (1 = reached it; negative = moved away)."""
    targets = dict(targets or {})
    out: dict[str, Any] = {}
    for key, before in first.items():
        if not key.startswith("eval/") or key not in last or not (_numeric(before) and _numeric(last[key])):
            continue
        if key.endswith(("/std", "/min", "/max", "/invalid")):
            continue
        after = float(last[key])
        row: dict[str, Any] = {"before": float(before), "after": after, "change": after - float(before)}
        if key in targets:
            t = float(targets[key])
            row["target"] = t
            row["gap_closed"] = (after - float(before)) / (t - float(before)) if t != float(before) else float("nan")
        out[key] = row
    missing = sorted(set(targets) - set(out))
    if missing:
        raise ValueError(f"eval.report_targets names metrics that the evaluation did not log: {missing} "
                       f"(logged: {sorted(k for k in first if k.startswith('eval/') and k.endswith('/mean'))[:20]})")
    return out


def read_eval_scores(path: str | Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """Per-sample scores of one evaluation (``eval/step_XXXXXXXX.scores.jsonl``) keyed by (prompt, seed,
    index): two evaluations pair up only where the same prompt sat at the same place with the same seed."""
    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = (str(row["prompt"]), int(row["seed"]), int(row.get("index", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: not a per-sample score line ({e})") from e
        if key in rows:
            raise ValueError(f"{path}:{n}: prompt {key[0]!r} with seed {key[1]} at index {key[2]} appears twice")
        rows[key] = row
    return rows


def paired_changes(before: Mapping[tuple, Mapping[str, Any]], after: Mapping[tuple, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Paired change of every per-sample score between two evaluations of the same prompts and seeds:
    ``{"eval/<series>/mean": {"paired_se", "n_pairs"}}`` with paired_se = std(after - before) / sqrt(n)
    (sample std, ddof 1) over the pairs valid in both. The same seeds start both evaluations, so this is
    the standard error of the change itself, usually far below that of either mean."""
    common = sorted(set(before) & set(after))
    series = sorted({k for key in common for k in before[key] if k not in ("index", "prompt", "seed", "category")})
    out: dict[str, dict[str, float]] = {}
    for name in series:
        diffs = [float(after[k][name]) - float(before[k][name]) for k in common
                 if _numeric(before[k].get(name)) and _numeric(after[k].get(name))]
        if len(diffs) < 2:
            continue
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
        out[f"eval/{name}/mean"] = {"paired_se": math.sqrt(var / len(diffs)), "n_pairs": len(diffs)}
    return out


def write_report(run_dir: str | Path, *, targets: Mapping[str, float] | None = None, extra: Mapping[str, Any] | None = None,
                 plot: bool = True) -> dict[str, Any]:
    """Write ``report.json`` (+ ``curves.png``, ``before.png`` / ``after.png``) for the run in
    ``run_dir`` from its ``metrics.jsonl``; returns the report. Needs at least one evaluation."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    evals = [r for r in records if r.get("kind") == "eval"]
    train = [r for r in records if r.get("kind") == "train"]
    if not evals:
        raise ValueError(f"{run_dir}: the run logged no evaluation (set eval.every > 0) - nothing to report")
    first, last = evals[0], evals[-1]
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": int(train[-1]["step"]) if train else 0,
        "first_eval_step": int(first["step"]),
        "last_eval_step": int(last["step"]),
        "train_seconds": round(sum(float(r.get("step_seconds", 0.0)) for r in train), 1),
        "eval_seconds": round(sum(float(r.get("eval_seconds", 0.0)) for r in evals), 1),
        "eval": compare_evals(first, last, targets),
    }
    score_files = [run_dir / "eval" / f"step_{int(r['step']):08d}.scores.jsonl" for r in (first, last)]
    if all(f.is_file() for f in score_files) and score_files[0] != score_files[1]:
        # a change is only worth reading next to its noise: the paired SE over the same prompts and seeds
        for key, extra_row in paired_changes(*(read_eval_scores(f) for f in score_files)).items():
            row = report["eval"].get(key)
            if row is not None:
                row.update(extra_row)
                if "target" in row and row["target"] != row["before"]:
                    row["gap_closed_se"] = extra_row["paired_se"] / abs(row["target"] - row["before"])
    if train:
        keys = sorted(k for k in train[-1] if k.endswith("/mean") and (k.startswith("reward/") or k.startswith("held_out/")))
        report["train_reward_first_last"] = {k: [train[0].get(k), train[-1].get(k)] for k in keys}
    if extra:
        report.update(extra)
    grids = {}
    for name, rec in (("before", first), ("after", last)):
        src = run_dir / "eval" / f"step_{int(rec['step']):08d}.png"
        if src.is_file():
            shutil.copyfile(src, run_dir / f"{name}.png")
            grids[name] = f"{name}.png"
    report["grids"] = grids
    if plot:
        report["curves"] = plot_curves(records, run_dir / "curves.png")
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    return report


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if key in r and _numeric(r[key]):
            xs.append(int(r["step"]))
            ys.append(float(r[key]))
    return xs, ys


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | Path) -> str | None:
    """A PNG of the run's curves: one panel per trained reward, held-out reward and evaluation metric
    (means; trained rewards with a +-1 std band), plus KL when logged. Returns the file name, or None
    (with no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    keys_t = sorted({k for r in train for k in r if k.endswith("/mean") and k.startswith(("reward/", "held_out/"))})
    keys_e = sorted({k for r in evals for k in r if k.endswith("/mean") and k.startswith("eval/") and "/cat/" not in k})
    panels = [("train", k) for k in keys_t] + [("eval", k) for k in keys_e]
    if any("kl" in r for r in train):
        panels.append(("train", "kl"))
    if not panels:
        return None
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 2.8 * nrow), squeeze=False)
    for ax, (kind, key) in zip(axes.flat, panels):
        recs = train if kind == "train" else evals
        xs, ys = _series(recs, key)
        ax.plot(xs, ys, marker="o" if kind == "eval" else None, ms=3, lw=1.2,
                color="tab:blue" if key.startswith("reward/") else "tab:orange" if kind == "train" else "tab:green")
        std_key = key[: -len("/mean")] + "/std" if key.endswith("/mean") else None
        if kind == "train" and std_key and key.startswith("reward/"):
            sx, sd = _series(recs, std_key)
            if len(sd) == len(ys) and sx == xs:
                ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.2, color="tab:blue")
        ax.set_title(f"{key} ({'per step' if kind == 'train' else 'eval'})", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path).name

"""Every training algorithm on the embedded world in the same wall-clock budget: README's table.

    python -m mmalign.embedded.algorithm_table --minutes 5            # all recipes, one after another
    python -m mmalign.embedded.algorithm_table --minutes 5 --only grpo,rwr --out runs/table

Each recipe (``configs/train_<name>_embedded.yaml``; GRPO uses ``configs/quickstart.yaml``) runs as its own
``mmalign train`` process with the same overrides: ``max_minutes`` (the budget; no step starts after it), one
torch thread,
the whole held-out ShapeWorld suite (116 prompts x seeds 0 and 1, 16 Euler steps) evaluated before the first
step and after the last, and ShapeEval strict accuracy as the report target. It then prints one markdown
row per run from its ``report.json``: held-out ShapeEval strict accuracy and clause credit, the tiny CLIP
score, sample diversity, before -> after, steps and samples done. Wall time on a shared machine varies:
the table says what each reached in the budget on the machine that ran it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

RECIPES: dict[str, str] = {
    "grpo": "configs/quickstart.yaml",
    "dense_grpo": "configs/train_dense_grpo_embedded.yaml",
    "dpo": "configs/train_dpo_embedded.yaml",
    "prdp": "configs/train_prdp_embedded.yaml",
    "rwr": "configs/train_rwr_embedded.yaml",
    "reward_backprop": "configs/train_backprop_embedded.yaml",
}
STRICT = "eval/shapeeval:strict/mean"
COMMON = [
    "threads=1",  # every run on one torch thread (recipes differ; the budget must mean the same compute)
    "max_steps=100000",
    "eval.every=100000",
    "eval.prompts_file=assets/prompts/shapeworld_heldout.txt",
    "eval.max_prompts=null",
    "eval.seeds=[0, 1]",
    "eval.num_steps=16",
    "eval.method=ode",
    "checkpoint.every=0",
    "checkpoint.save_final=false",
    f"eval.report_targets={{{STRICT}: 1.0}}",
]


def command(name: str, minutes: float, out: Path, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "mmalign", "train", "--config", RECIPES[name], f"max_minutes={minutes:g}",
            f"out={out / name}", *COMMON, *extra]


def _cell(ev: dict, key: str, fmt: str = "{:.3f}") -> str:
    row = ev.get(key)
    if row is None:
        return "n/a"
    return f"{fmt.format(row['before'])} -> {fmt.format(row['after'])}"


def table_row(name: str, run: Path) -> str:
    rep = json.loads((run / "report.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [m for m in metrics if m.get("kind") == "train"]
    samples = sum(int(m.get("samples", 0)) for m in train)
    ev = rep["eval"]
    gap = ev.get(STRICT, {}).get("gap_closed", float("nan"))
    return (f"| {name} | {rep['steps']} | {samples} | {_cell(ev, STRICT)} | {100 * gap:.1f}% | "
            f"{_cell(ev, 'eval/shapeeval/mean')} | {_cell(ev, 'eval/clipscore/mean', '{:.2f}')} | "
            f"{_cell(ev, 'eval/diversity/pixel_rms')} | {rep['train_seconds'] / 60:.1f} |")


HEADER = ("| algorithm | steps | samples | held-out strict | gap closed | held-out credit | tiny-CLIP (held out) | "
          "diversity (pixel RMS) | train min |\n|---|---:|---:|---|---:|---|---|---|---:|")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget per algorithm")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(RECIPES)}")
    p.add_argument("--out", default="runs/table", help="parent output directory")
    p.add_argument("--report-only", action="store_true", help="print the table from existing runs")
    args = p.parse_args(argv)
    names = list(RECIPES) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown algorithm(s) {unknown}; choose from {list(RECIPES)}")
    if args.minutes <= 0:
        p.error("--minutes must be > 0")
    out = Path(args.out)
    for name in names if not args.report_only else []:
        cmd = command(name, args.minutes, out)
        print("$ " + " ".join(shlex.quote(c) for c in cmd[1:]).replace("-m mmalign", "mmalign", 1), flush=True)
        t0 = time.time()
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "stdout.txt").write_text(res.stdout)
        print(f"  {name}: exit {res.returncode} in {time.time() - t0:.0f} s", flush=True)
        if res.returncode != 0:
            print("\n".join(res.stdout.splitlines()[-15:]), flush=True)
    print(HEADER)
    for name in names:
        run = out / name
        if (run / "report.json").is_file():
            print(table_row(name, run))
        else:
            print(f"| {name} | (no report: see {run / 'stdout.txt'}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

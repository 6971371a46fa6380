"""Every training algorithm on an embedded world in the same wall-clock budget: README's tables.

    python -m mmalign.embedded.algorithm_table --minutes 5            # all image recipes, one after another
    python -m mmalign.embedded.algorithm_table --minutes 5 --only grpo,rwr --out runs/table
    python -m mmalign.embedded.algorithm_table --minutes 5 --only grpo --set optim.lr=1e-3 --tag _lr1e-3   # a variant
    python -m mmalign.embedded.algorithm_table --world video --minutes 5   # MovingShapes (Wan): grpo, dpo, rwr, reward_backprop
    python -m mmalign.embedded.algorithm_table --world audio --minutes 5   # ToneWorld (AudioLDM): the same four

World ``image`` is ShapeWorld (below); ``video`` and ``audio`` run the ``configs/train_<name>_movingshapes.yaml``
/ ``_toneworld.yaml`` recipes the same way, with their held-out suites (seeds 0 and 1, the recipe's eval
steps), MotionEval / ToneEval strict accuracy as the target, and the held-out learned reward (tiny CLIP over
frames / tiny CLAP) in its column.

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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class World:
    """One embedded world's table: its recipes, held-out suite, verifier and held-out learned reward."""

    recipes: dict[str, str]
    heldout: str
    verifier: str
    learned: str
    learned_label: str
    eval_steps: int
    eval_seeds: tuple[int, ...] = (0, 1)
    """Seeds per held-out prompt: enough samples that a change of a few points stands out of the noise."""

    @property
    def strict(self) -> str:
        return f"eval/{self.verifier}:strict/mean"


def _media_recipes(world: str) -> dict[str, str]:
    return {name: f"configs/train_{file}_{world}.yaml"
            for name, file in [("grpo", "grpo"), ("dpo", "dpo"), ("rwr", "rwr"), ("reward_backprop", "backprop")]}


WORLDS: dict[str, World] = {
    "image": World(RECIPES, "assets/prompts/shapeworld_heldout.txt", "shapeeval", "eval/clipscore/mean", "tiny-CLIP", 16),
    "video": World(_media_recipes("movingshapes"), "assets/prompts/movingshapes_heldout.txt", "motioneval",
                   "eval/video_frames/mean", "tiny-CLIP over frames", 16),
    # 40 held-out prompts: five seeds each give 200 paired samples
    "audio": World(_media_recipes("toneworld"), "assets/prompts/toneworld_heldout.txt", "toneeval",
                   "eval/clap/mean", "tiny-CLAP", 25, (0, 1, 2, 3, 4)),
}


def common_overrides(world: World) -> list[str]:
    """The overrides every run of a world's table gets (the same budget must mean the same compute)."""
    return [
        "threads=1",  # every run on one torch thread (recipes differ)
        "max_steps=100000",
        "eval.every=100000",
        f"eval.prompts_file={world.heldout}",
        "eval.max_prompts=null",
        f"eval.seeds=[{', '.join(map(str, world.eval_seeds))}]",
        f"eval.num_steps={world.eval_steps}",
        "eval.method=ode",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
        f"eval.report_targets={{{world.strict}: 1.0}}",
    ]


COMMON = common_overrides(WORLDS["image"])


def command(name: str, minutes: float, out: Path, extra: Sequence[str] = (), world: str = "image", tag: str = "") -> list[str]:
    """The ``mmalign train`` command of one table run (``extra`` overrides last, so they win)."""
    w = WORLDS[world]
    return [sys.executable, "-m", "mmalign", "train", "--config", w.recipes[name], f"max_minutes={minutes:g}",
            f"out={out / (name + tag)}", *common_overrides(w), *extra]


def _cell(ev: dict, key: str, fmt: str = "{:.3f}") -> str:
    row = ev.get(key)
    if row is None:
        return "n/a"
    cell = f"{fmt.format(row['before'])} -> {fmt.format(row['after'])}"
    # the paired standard error of the change (same prompts and seeds before and after), when measured
    return cell + (f" (±{fmt.format(row['paired_se'])})" if "paired_se" in row else "")


def table_row(name: str, run: Path, world: str = "image") -> str:
    w = WORLDS[world]
    rep = json.loads((run / "report.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [m for m in metrics if m.get("kind") == "train"]
    samples = sum(int(m.get("samples", 0)) for m in train)
    ev = rep["eval"]
    gap = ev.get(w.strict, {}).get("gap_closed", float("nan"))
    gap_se = ev.get(w.strict, {}).get("gap_closed_se")
    learned_fmt = "{:.2f}" if world == "image" else "{:.3f}"
    return (f"| {name} | {rep['steps']} | {samples} | {_cell(ev, w.strict)} | {100 * gap:+.1f}%"
            f"{'' if gap_se is None else f' ± {100 * gap_se:.1f}'} | "
            f"{_cell(ev, f'eval/{w.verifier}/mean')} | {_cell(ev, w.learned, learned_fmt)} | "
            f"{_cell(ev, 'eval/diversity/pixel_rms')} | {rep['train_seconds'] / 60:.1f} |")


def header(world: str = "image") -> str:
    return (f"| algorithm | steps | samples | held-out strict | gap closed | held-out credit | {WORLDS[world].learned_label} "
            "(held out) | diversity (pixel RMS) | train min |\n|---|---:|---:|---|---:|---|---|---|---:|")


HEADER = header("image")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=list(WORLDS), default="image", help="which embedded world's recipes to run")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget per algorithm")
    p.add_argument("--only", default=None, help="comma-separated subset of the world's algorithms")
    p.add_argument("--out", default=None, help="parent output directory (default runs/table, runs/table_video, runs/table_audio)")
    p.add_argument("--report-only", action="store_true", help="print the table from existing runs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (repeatable), e.g. --set optim.lr=1e-3")
    p.add_argument("--tag", default="", help="suffix of each run's directory and row name (for variants made with --set)")
    args = p.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"--set takes KEY=VALUE, got {bad}")
    recipes = WORLDS[args.world].recipes
    names = list(recipes) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in recipes]
    if unknown:
        p.error(f"unknown algorithm(s) {unknown} for world {args.world}; choose from {list(recipes)}")
    if args.minutes <= 0:
        p.error("--minutes must be > 0")
    out = Path(args.out or ("runs/table" if args.world == "image" else f"runs/table_{args.world}"))
    for name in names if not args.report_only else []:
        cmd = command(name, args.minutes, out, args.overrides, world=args.world, tag=args.tag)
        print("$ " + " ".join(shlex.quote(c) for c in cmd[1:]).replace("-m mmalign", "mmalign", 1), flush=True)
        t0 = time.time()
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run = out / (name + args.tag)
        run.mkdir(parents=True, exist_ok=True)
        (run / "stdout.txt").write_text(res.stdout)
        print(f"  {name}: exit {res.returncode} in {time.time() - t0:.0f} s", flush=True)
        if res.returncode != 0:
            print("\n".join(res.stdout.splitlines()[-15:]), flush=True)
    print(header(args.world))
    for name in names:
        run = out / (name + args.tag)
        if (run / "report.json").is_file():
            print(table_row(name + args.tag + "".join(f" {o}" for o in args.overrides), run, args.world))
        else:
            print(f"| {name} | (no report: see {run / 'stdout.txt'}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

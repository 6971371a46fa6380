"""The ``mmalign`` command line: ``mmalign sample|score|eval-reward|eval|train|report|app|bench|list``.

Configs come from ``--config file.yaml`` plus ``key.sub=value`` overrides; bad input prints
``mmalign: error: ...`` and exits with status 2 (never a traceback, unless ``MMALIGN_DEBUG=1``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__

EXIT_USAGE = 2


def config_kinds() -> dict[str, type]:
    """Config file name prefix -> config class: shipped configs are named ``<kind>_*.yaml``."""
    from .bench import BenchConfig
    from .jobs import EvalModelJobConfig, EvalRewardJobConfig, SampleJobConfig, ScoreJobConfig
    from .trainers.common import train_config_class

    # bench_*.yaml files name their benchmark (``name: rollout|rewards``) and hold its section;
    # train_*.yaml files (and quickstart.yaml, the main job) name their algorithm (``algorithm: grpo``) and
    # hold its sections; evalmodel_*.yaml are ``mmalign eval --model`` jobs
    return {"sample": SampleJobConfig, "bench": BenchConfig, "score": ScoreJobConfig, "eval": EvalRewardJobConfig,
            "evalmodel": EvalModelJobConfig, "train": train_config_class(), "quickstart": train_config_class()}


class CLIError(Exception):
    """An error to report to the user as ``mmalign: error: <message>``."""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. sampler.num_steps=4")
    p.add_argument("--show-config", action="store_true", help="print the resolved config and its fields, then exit")


def _load(cls, args):
    from .config import load_config

    return load_config(cls, args.config, args.overrides)


def _show(cfg) -> None:
    import yaml

    from .config import describe_config, to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    print("\n# fields:")
    for key, tp, default, doc in describe_config(type(cfg)):
        print(f"#   {key} ({tp}, default {default!r}): {doc}")


def cmd_sample(args) -> int:
    from .config import apply_overrides, from_dict, load_yaml
    from .jobs import SampleJobConfig, run_sample

    data = load_yaml(args.config) if args.config else {}
    if args.model:  # --model M is sugar for model.name=M
        data.setdefault("model", {})["name"] = args.model
    inference = data.get("inference") if isinstance(data.get("inference"), dict) else None
    if (args.optimize_noise or args.reward or args.report_reward) and inference is None:  # sugar for the inference section
        if "inference" in data:
            raise CLIError(f"config key 'inference' must be a mapping, got {data['inference']!r}")
        inference = data["inference"] = {}
    if args.optimize_noise:
        inference["method"] = "reno"
    if args.reward:
        inference["rewards"] = [{"name": args.reward, "options": apply_overrides({}, args.reward_option)}]
    elif args.reward_option:
        raise CLIError("--reward-option/-o applies to --reward NAME; give --reward too")
    if args.report_reward:
        inference["report_rewards"] = [{"name": r} for r in args.report_reward]
    cfg = from_dict(SampleJobConfig, apply_overrides(data, args.overrides))
    if args.show_config:
        _show(cfg)
        return 0
    run_sample(cfg)
    return 0


def cmd_bench(args) -> int:
    from .bench import BENCHMARKS, load_bench_config

    name = args.name
    if name is not None and "=" in name:  # `mmalign bench --config f.yaml key=value`: no name given
        args.overrides = [name, *args.overrides]
        name = None
    if name is None and not args.config:
        raise CLIError(f"name a benchmark ({', '.join(sorted(BENCHMARKS))}) or give --config bench_*.yaml")
    if name is not None and name not in BENCHMARKS:
        raise CLIError(f"unknown benchmark {name!r} (known: {', '.join(sorted(BENCHMARKS))})")
    name, cfg = load_bench_config(name, args.config, args.overrides)
    runner = BENCHMARKS[name][1]
    if args.show_config:
        _show(cfg)
        return 0
    runner(cfg)
    return 0


def _reward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward", "-r", metavar="NAME",
                   help="registered reward, tiny:NAME (tiny random weights, offline) or package.module:factory")
    p.add_argument("--reward-option", "-o", action="append", default=[], metavar="key=value",
                   help="reward factory option (value parsed as YAML; repeatable), e.g. weights=[1,0.5]")
    p.add_argument("--device", help="torch device of the reward model (default cpu)")
    p.add_argument("--batch-size", type=int, help="files per reward call")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--config", "-c", help="YAML config file (flags override its values)")
    p.add_argument("--show-config", action="store_true", help="print the resolved config and its fields, then exit")


def _reward_job_data(args) -> dict:
    from .config import apply_overrides, load_yaml

    data = load_yaml(args.config) if args.config else {}
    reward = data.setdefault("reward", {})
    if not isinstance(reward, dict):
        raise CLIError(f"config key 'reward' must be a mapping with name and options, got {reward!r}")
    if args.reward:
        if reward.get("name") not in (None, args.reward):
            reward["options"] = {}  # options of the config's reward do not apply to another one
        reward["name"] = args.reward
    if args.reward_option:
        reward["options"] = apply_overrides(dict(reward.get("options") or {}), args.reward_option)
    if args.device:
        reward["device"] = args.device
    if "name" not in reward:
        raise CLIError("no reward given: use --reward NAME (see 'mmalign list rewards'; tiny:NAME builds a tiny offline one)")
    for key in ("batch_size", "json_out"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    return data


def cmd_score(args) -> int:
    from .config import from_dict
    from .jobs import ScoreJobConfig, run_score

    data = _reward_job_data(args)
    if args.files:
        data["files"] = list(args.files)
    if args.prompt:
        data["prompts"] = list(args.prompt)
    if args.prompts_file:
        data["prompts_file"] = args.prompts_file
    cfg = from_dict(ScoreJobConfig, data)
    if args.show_config:
        _show(cfg)
        return 0
    run_score(cfg)
    return 0


def cmd_eval_reward(args) -> int:
    from .config import from_dict
    from .jobs import EvalRewardJobConfig, run_eval_reward

    if args.command == "eval" and (getattr(args, "model", None) or getattr(args, "prompts", None) or _config_is_model_eval(args)):
        return cmd_eval_model(args)
    if args.command == "eval" and not (args.reward or args.data or args.config):
        raise CLIError("mmalign eval needs either --model M --prompts SUITE [--reward R ...] (a generative model on a "
                       "prompt suite) or --reward NAME --data prefs.jsonl (a reward model on preference data)")
    data = _reward_job_data(args)
    if args.data:
        data["data"] = args.data
    if args.tol is not None:
        data["tol"] = args.tol
    if "data" not in data:
        raise CLIError("no preference data given: use --data prefs.jsonl (or a folder of pairs)")
    cfg = from_dict(EvalRewardJobConfig, data)
    if args.show_config:
        _show(cfg)
        return 0
    run_eval_reward(cfg)
    return 0


def _config_is_model_eval(args) -> bool:
    from .config import load_yaml

    return bool(args.config) and "prompts" in load_yaml(args.config)


def cmd_eval_model(args) -> int:
    from .config import apply_overrides, from_dict, load_yaml
    from .jobs import EvalModelJobConfig, run_eval_model

    data = load_yaml(args.config) if args.config else {}
    if args.model:
        data.setdefault("model", {})["name"] = args.model
    if args.prompts:
        data["prompts"] = args.prompts
    if args.reward:
        # one reward from the flags; several through the config or a rewards=[...] override
        data["rewards"] = [{"name": args.reward, "options": apply_overrides({}, args.reward_option)}]
    if args.device:
        data.setdefault("model", {})["device"] = args.device
        for r in data.get("rewards", []):
            r["device"] = args.device
    if args.json_out:
        raise CLIError("--json is for reward evaluation; model evaluation writes report.json into out=DIR")
    data = apply_overrides(data, args.overrides)
    if "prompts" not in data:
        raise CLIError("no prompt suite given: use --prompts assets/prompts/....txt")
    cfg = from_dict(EvalModelJobConfig, data)
    if args.show_config:
        _show(cfg)
        return 0
    run_eval_model(cfg)
    return 0


def cmd_report(args) -> int:
    from .trainers.report import write_report

    targets = {}
    for t in args.target:
        key, sep, value = t.rpartition("=")
        try:
            targets[key] = float(value)
        except ValueError:
            raise CLIError(f"--target {t!r}: expected METRIC=NUMBER") from None
        if not sep or not key:
            raise CLIError(f"--target {t!r}: expected METRIC=NUMBER")
    run = Path(args.run_dir)
    if not run.is_dir():
        raise CLIError(f"{run} is not a directory")
    if not targets:  # the run's own config, when it declared targets
        cfg_file = run / "config.yaml"
        if cfg_file.is_file():
            import yaml

            targets = (yaml.safe_load(cfg_file.read_text()) or {}).get("eval", {}).get("report_targets", {}) or {}
    rep = write_report(run, targets=targets)
    for key, row in rep["eval"].items():
        if key.endswith("/mean") and "/cat/" not in key or "gap_closed" in row:
            extra = f"  ({100 * row['gap_closed']:.1f}% of the gap to {row['target']:g} closed)" if "gap_closed" in row else ""
            se = f"  (change {row['change']:+.4g} +- {row['paired_se']:.2g} paired SE)" if "paired_se" in row else ""
            print(f"{key:45s} {row['before']:10.4g} -> {row['after']:10.4g}{se}{extra}")
    print(f"wrote {run / 'report.json'}" + (f" and {run / rep['curves']}" if rep.get("curves") else ""))
    return 0


def cmd_train(args) -> int:
    from .trainers import build_trainer, load_train_config

    if not args.config:
        raise CLIError("mmalign train needs --config configs/train_*.yaml (training from defaults alone is not available: "
                       "a run needs a model, prompts and rewards); e.g. mmalign train --config configs/train_grpo_tiny.yaml")
    cfg = load_train_config(args.config, args.overrides)
    if args.show_config:
        _show(cfg)
        return 0
    trainer = build_trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    if trainer.is_main:
        print(f"trained {cfg.algorithm} for {trainer.step} steps; metrics in {trainer.out / 'metrics.jsonl'}, "
              f"checkpoints in {trainer.ckpt_dir}")
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Leave a multi-process run in step and tear its process group down before the interpreter exits: left
    to interpreter shutdown, gloo's threads can abort a rank ("terminate called without an active exception")
    after the run itself has finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def cmd_list(args) -> int:
    import mmalign

    tables = {"models": mmalign.list_models, "samplers": mmalign.list_samplers,
              "rewards": mmalign.list_rewards, "trainers": mmalign.list_trainers}
    for kind in [args.kind] if args.kind else list(tables):
        described = tables[kind](describe=True)
        print(f"{kind}:" + ("" if described else " (none yet)"))
        width = max([12, *(len(n) for n in described)])
        for name, doc in described.items():
            print(f"  {name:{width}s} {doc}")
    return 0


def apps_package(repo_apps: str | os.PathLike | None = None):
    """The apps package, found the same way from an installed wheel and from a clone.

    An installation maps the repository's top-level ``apps/`` folder to ``mmalign.apps``; when that is not
    importable (a clone used through ``PYTHONPATH`` or an editable install made before the mapping), the
    ``apps/`` folder next to the ``mmalign`` package (or ``repo_apps``) is loaded under that same name.
    """
    import importlib
    import importlib.util

    if repo_apps is None and "mmalign.apps" in sys.modules:
        return sys.modules["mmalign.apps"]
    if repo_apps is None:
        try:
            if importlib.util.find_spec("mmalign.apps") is not None:
                return importlib.import_module("mmalign.apps")
        except ImportError:
            pass
    folder = Path(repo_apps) if repo_apps is not None else Path(__file__).resolve().parent.parent / "apps"
    init = folder / "__init__.py"
    if not init.is_file():
        raise CLIError(f"the mmalign apps are not installed: no mmalign.apps package and no {folder}/__init__.py "
                       "(reinstall mmalign, or run from a clone of the repository)")
    spec = importlib.util.spec_from_file_location("mmalign.apps", init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["mmalign.apps"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["mmalign.apps"]
        raise
    return module


def cmd_app(args) -> int:
    apps = apps_package()
    if args.list:
        width = max(len(n) for n in apps.APPS)
        for name, (_, what) in apps.APPS.items():
            print(f"  {name:{width}s}  {what}")
        print(f"(apps package: {Path(apps.__file__).parent})")
        return 0
    if not args.name:
        raise CLIError(f"name an app: {', '.join(apps.APPS)} (mmalign app --list describes them)")
    if args.name not in apps.APPS:
        raise CLIError(f"unknown app {args.name!r} (apps: {', '.join(apps.APPS)})")
    if args.port is not None and not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    options = {"model": args.model, "rewards": args.reward or None}
    settings = apps.AppSettings(device=args.device or apps.AppSettings.auto_device(), dtype=args.dtype or "float32",
                                **{k: v for k, v in options.items() if v})
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mmalign: warning: listening on {args.host}: anyone who can reach this machine can use the app "
              "(and its models and files)", file=sys.stderr)
    demo = apps.build_app(args.name, settings=settings)
    apps.launch(demo, host=args.host, port=args.port, share=args.share, block=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description="Align image, video and audio generative models with reward models.")
    parser.add_argument("--version", action="version", version=f"mmalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("sample", help="sample prompts with a recorded trajectory (or best-of-N / ReNO / search / reward "
                                      "guidance against rewards); writes media and a grid")
    p.add_argument("--model", "-m", help="model: tiny:<family>, a pipeline directory (e.g. assets/shapeworld-sd3) or an HF id")
    p.add_argument("--optimize-noise", action="store_true",
                   help="ReNO: optimise each prompt's initial noise against the rewards (= inference.method=reno)")
    p.add_argument("--reward", "-r", metavar="NAME",
                   help="reward to optimise (= inference.rewards=[{name: NAME}]); a registered name, tiny:NAME or module:factory")
    p.add_argument("--reward-option", "-o", action="append", default=[], metavar="key=value",
                   help="option of --reward (value parsed as YAML; repeatable), e.g. model_id=assets/shapeworld-clip")
    p.add_argument("--report-reward", action="append", default=[], metavar="NAME",
                   help="reward only reported before vs after (repeatable), e.g. shapeeval")
    _config_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="benchmarks that print numbers ('rollout', 'rewards')")
    p.add_argument("name", nargs="?", help="benchmark name: rollout or rewards (or taken from a bench_*.yaml --config)")
    _config_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("list", help="list registered models, samplers, rewards and trainers")
    p.add_argument("kind", nargs="?", choices=["models", "samplers", "rewards", "trainers"])
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("score", help="score media files with a reward model; prints a table")
    p.add_argument("files", nargs="*", help="media files: images, GIF videos, WAV audio")
    p.add_argument("--prompt", "-p", action="append", help="prompt for every file, or repeat once per file")
    p.add_argument("--prompts-file", help="text file with one prompt per line (one for all files, or one per file)")
    _reward_args(p)
    p.set_defaults(func=cmd_score)

    for name, what in [("eval-reward", "pairwise accuracy of a reward model on human preference data"),
                       ("eval", "evaluate a model on a prompt suite (--model, --prompts, --reward) or a reward on preference data (--reward, --data)")]:
        p = sub.add_parser(name, help=what)
        p.add_argument("--data", "-d", help="preference set: JSONL file or folder of pairs")
        p.add_argument("--tol", type=float, help="score differences within tol are predicted ties (default 0)")
        if name == "eval":
            p.add_argument("--model", "-m", help="evaluate a generative model (tiny:<family>, a directory or an HF id) ...")
            p.add_argument("--prompts", help="... on this prompt suite (category<TAB>prompt lines)")
            p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="model-eval config overrides, e.g. samples_per_prompt=4")
        _reward_args(p)
        p.set_defaults(func=cmd_eval_reward)

    p = sub.add_parser("train", help="align a model to rewards (config: algorithm + sections, e.g. configs/train_grpo_tiny.yaml)")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="(re)write a training run's report.json, curves.png, before/after.png from its metrics.jsonl")
    p.add_argument("run_dir", help="a training run's out directory")
    p.add_argument("--target", action="append", default=[], metavar="METRIC=VALUE",
                   help="measure the gap closed towards VALUE, e.g. eval/shapeeval:strict/mean=1 (repeatable)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("app", help="start a Gradio app (compare, trajectory, rewards, runs) on 127.0.0.1; --list lists them")
    p.add_argument("name", nargs="?", help="the app: compare | trajectory | rewards | runs")
    p.add_argument("--list", action="store_true", help="list the apps and where they were found, then exit")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 exposes the app to the network)")
    p.add_argument("--port", type=int, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (only when asked)")
    p.add_argument("--device", help="torch device of models and rewards (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model weights dtype (default float32)")
    p.add_argument("--model", help="default model of the app's model fields (default assets/shapeworld-sd3)")
    p.add_argument("--reward", action="append", default=[], metavar="SPEC",
                   help="reward ticked at start, 'name key=value ...' (repeatable; default shapeeval and the tiny CLIP)")
    p.set_defaults(func=cmd_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse reports usage errors itself with exit status 2
    from .config import ConfigError
    from .registry import RegistryError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError, RegistryError, ValueError, TypeError, OSError, ImportError) as err:
        if os.environ.get("MMALIGN_DEBUG") == "1":
            raise
        print(f"mmalign: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mmalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``mmalign`` command line: ``mmalign sample|score|train|eval|app|bench|list``.

Configs come from ``--config file.yaml`` plus ``key.sub=value`` overrides; bad input prints
``mmalign: error: ...`` and exits with status 2 (never a traceback, unless ``MMALIGN_DEBUG=1``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from . import __version__

EXIT_USAGE = 2


def config_kinds() -> dict[str, type]:
    """Config file name prefix -> config class: shipped configs are named ``<kind>_*.yaml``."""
    from .bench import RolloutBenchConfig
    from .jobs import SampleJobConfig

    return {"sample": SampleJobConfig, "bench": RolloutBenchConfig}


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
    from .jobs import SampleJobConfig, run_sample

    cfg = _load(SampleJobConfig, args)
    if args.show_config:
        _show(cfg)
        return 0
    run_sample(cfg)
    return 0


def cmd_bench(args) -> int:
    from .bench import BENCHMARKS

    if args.name not in BENCHMARKS:
        raise CLIError(f"unknown benchmark {args.name!r} (known: {', '.join(sorted(BENCHMARKS))})")
    cfg_cls, runner = BENCHMARKS[args.name]
    cfg = _load(cfg_cls, args)
    if args.show_config:
        _show(cfg)
        return 0
    runner(cfg)
    return 0


def cmd_list(args) -> int:
    import mmalign

    tables = {"models": mmalign.list_models, "samplers": mmalign.list_samplers,
              "rewards": mmalign.list_rewards, "trainers": mmalign.list_trainers}
    for kind in [args.kind] if args.kind else list(tables):
        described = tables[kind](describe=True)
        print(f"{kind}:" + ("" if described else " (none yet)"))
        for name, doc in described.items():
            print(f"  {name:12s} {doc}")
    return 0


def _not_yet(name: str, what: str) -> Callable[[argparse.Namespace], int]:
    def run(args) -> int:
        raise CLIError(f"'mmalign {name}' ({what}) is not available in mmalign {__version__} yet")

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description="Align image, video and audio generative models with reward models.")
    parser.add_argument("--version", action="version", version=f"mmalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("sample", help="sample prompts with a recorded trajectory; writes media and a grid")
    _config_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="benchmarks that print numbers (e.g. 'rollout')")
    p.add_argument("name", help="benchmark name: rollout")
    _config_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("list", help="list registered models, samplers, rewards and trainers")
    p.add_argument("kind", nargs="?", choices=["models", "samplers", "rewards", "trainers"])
    p.set_defaults(func=cmd_list)

    for name, what in [("score", "score media with reward models"), ("train", "align a model to rewards"),
                       ("eval", "evaluate a model on a prompt suite"), ("app", "Gradio inspection apps")]:
        p = sub.add_parser(name, help=f"{what} (coming in a later release)")
        _config_args(p)
        p.set_defaults(func=_not_yet(name, what))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse reports usage errors itself with exit status 2
    from .config import ConfigError
    from .registry import RegistryError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError, RegistryError, ValueError, TypeError, OSError) as err:
        if os.environ.get("MMALIGN_DEBUG") == "1":
            raise
        print(f"mmalign: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mmalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""mmalign's Gradio apps for looking at models, rewards and training runs.

This folder is the top-level ``apps/`` of the repository; installed, it is the subpackage
``mmalign.apps`` (pyproject maps it), and ``mmalign app NAME`` finds it either way
(:func:`mmalign.cli.apps_package`). Every app module has ``build_app(settings, resources) -> gr.Blocks``
(not launched); :func:`launch` starts one on 127.0.0.1 unless told otherwise.

=============  ==========================================================================================
``compare``    two models / settings, same prompt and seeds, side by side with rewards (+ trajectory tab)
``trajectory`` one rollout's predicted clean samples per denoising step, with per-step rewards plotted
``rewards``    score uploaded or picked media with several rewards; rankings; preference pairs
``runs``       a training run's reward / KL / held-out curves and its evaluation grids per step
=============  ==========================================================================================
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .common import AppSettings, Limits, Resources

#: app name -> (module in this package, one-line description)
APPS: dict[str, tuple[str, str]] = {
    "compare": ("compare", "two models or settings side by side: same prompt and seeds, rewards under each sample"),
    "trajectory": ("trajectory", "step through a rollout's predicted clean samples with per-step (dense) rewards"),
    "rewards": ("rewards", "score media with several rewards at once: scores, components, rankings, preference pairs"),
    "runs": ("runs", "a training run's reward / KL / held-out curves and evaluation grids per step"),
}

LOOPBACK = "127.0.0.1"


def app_names() -> list[str]:
    """The apps, in a stable order."""
    return list(APPS)


def app_module(name: str) -> ModuleType:
    """The module of app ``name`` (ValueError listing the apps for an unknown name)."""
    if name not in APPS:
        raise ValueError(f"unknown app {name!r} (apps: {', '.join(APPS)})")
    return importlib.import_module(f"{__name__}.{APPS[name][0]}")


def build_app(name: str, settings: AppSettings | None = None, resources: Resources | None = None):
    """``gr.Blocks`` of app ``name``, built but not launched."""
    return app_module(name).build_app(settings=settings, resources=resources)


def launch(demo: Any, *, host: str = LOOPBACK, port: int | None = None, share: bool = False, block: bool = True,
           quiet: bool = False) -> Any:
    """Start a built app on ``host:port`` (loopback unless asked; ``share`` only when asked). With
    ``block=False`` it returns once the server is up (``demo.local_url``); ``demo.close()`` stops it."""
    demo.queue(default_concurrency_limit=1)
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
                       show_error=True, footer_links=[])


__all__ = ["APPS", "AppSettings", "LOOPBACK", "Limits", "Resources", "app_module", "app_names", "build_app", "launch"]

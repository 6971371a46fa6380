"""Take the README's screenshot of the compare app: the shipped ShapeWorld SD3 plain (A) vs the same
model with ReNO noise optimisation against the shipped tiny CLIP (B), scored by ShapeEval and the tiny
CLIP, driven in headless Chromium on a loopback port.

    python -m apps.screenshot --out assets/compare_app.png          # from a clone's root
    python -m mmalign.apps.screenshot --out compare_app.png          # installed (models from ./assets)

The app's defaults name ``assets/...`` relative to the working directory: run it from the repository root.
Needs Debian's ``chromium`` and the ``playwright`` package.
"""
from __future__ import annotations

import argparse
import socket
from pathlib import Path

from . import AppSettings, Resources, launch
from .compare import build_app

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def take(out: str | Path, prompt: str, samples: int, steps: int, iterations: int, chromium: str = CHROMIUM,
         width: int = 1280) -> Path:
    """Generate one comparison in the compare app and save a full-page PNG to ``out``."""
    from playwright.sync_api import sync_playwright

    settings = AppSettings(device="cpu", default_steps=steps, default_samples=samples, default_iterations=iterations)
    demo = build_app(settings, Resources(settings))
    launch(demo, port=free_port(), block=False, quiet=True)
    out = Path(out)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.set_default_timeout(600_000)
            page.goto(demo.local_url)
            page.locator("#prompt textarea").fill(prompt)
            page.locator("#generate").click()
            page.locator("#status").get_by_text("Generated").wait_for()
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        demo.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="assets/compare_app.png")
    parser.add_argument("--prompt", default="a red circle and a blue square")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10, help="ReNO iterations of side B")
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args()
    print(f"wrote {take(args.out, args.prompt, args.samples, args.steps, args.iterations, args.chromium)}")


if __name__ == "__main__":
    main()

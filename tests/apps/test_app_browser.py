"""End to end: each app on a free loopback port, driven in headless Chromium (Debian's ``chromium``
through Playwright, no browser download): fill the inputs, click, check what rendered, screenshot."""
from __future__ import annotations

import math
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 180_000  # first clicks load models on a busy 2-core machine

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium); "
                                                           "apt-get install -y chromium (.ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


@contextmanager
def served(apps, demo) -> Iterator[str]:
    """The app running on 127.0.0.1 at a free port; closed afterwards."""
    apps.launch(demo, port=free_port(), block=False, quiet=True)
    try:
        assert demo.local_url.startswith("http://127.0.0.1:")
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def test_compare_renders_both_sides_with_scores(apps, resources, repo_cwd, page, tmp_path):
    from mmalign.apps.compare import build_app

    settings = apps.AppSettings(device="cpu", default_steps=4, default_samples=2, default_iterations=2)
    with served(apps, build_app(settings, resources)) as url:
        page.goto(url)
        page.locator("#prompt textarea").fill("a blue square")
        page.locator("#generate").click()
        page.locator("#status").get_by_text("Generated 2 pair(s)").wait_for()
        for side in ("a", "b"):
            cells = page.locator(f"#pairs td.mm-cell.mm-side-{side}")
            assert cells.count() == 2
            for i in range(2):
                image = cells.nth(i).locator("img")
                assert image.evaluate("img => img.complete && img.naturalWidth > 0")
                scores = cells.nth(i).locator(".mm-score").all_inner_texts()
                assert len(scores) == 2 and all(float(s) >= 0 for s in scores)
        assert "a blue square" in page.locator("#pairs").inner_text()
        assert page.locator("#pairs tr.mm-means .mm-score, #pairs tr.mm-means b").count() >= 4
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        page.locator("#prompt textarea").fill("")
        page.locator("#generate").click()
        page.get_by_text("enter a prompt").first.wait_for()
    assert (tmp_path / "compare.png").stat().st_size > 10_000


PLAYABLE_JS = """m => new Promise(done => {
  if (m.tagName === 'IMG') { done(m.complete && m.naturalWidth > 0 ? 1 : 0); return; }
  if (m.readyState >= 1) { done(m.duration); return; }
  m.onloadedmetadata = () => done(m.duration);
  m.onerror = () => done(-1);
})"""


@pytest.mark.parametrize("model, reward, selector", [("tiny:wan", "tiny:temporal_consistency", ".mm-video"),
                                                     ("tiny:audioldm", "tiny:clap", "audio")])
def test_compare_plays_video_and_audio(apps, resources, page, model, reward, selector):
    from mmalign.apps.compare import build_app

    settings = apps.AppSettings(device="cpu", model=model, rewards=[reward], side_b_inference="none", default_steps=2,
                                default_samples=1)
    with served(apps, build_app(settings, resources)) as url:
        page.goto(url)
        page.locator("#prompt textarea").fill("a dog barking")
        page.locator("#generate").click()
        page.locator("#status").get_by_text("Generated 1 pair(s)").wait_for()
        for side in ("a", "b"):
            cell = page.locator(f"#pairs td.mm-cell.mm-side-{side}")
            assert cell.locator(selector).evaluate(PLAYABLE_JS) > 0  # the browser decoded the media
            assert math.isfinite(float(cell.locator(".mm-score").inner_text()))  # the reward scored it


def test_trajectory_steps_and_plot(apps, resources, repo_cwd, page, tmp_path):
    from mmalign.apps.trajectory import build_app

    settings = apps.AppSettings(device="cpu", default_steps=4)
    with served(apps, build_app(settings, resources)) as url:
        page.goto(url)
        page.locator("#traj_prompt textarea").fill("a red circle")
        page.locator("#traj_run").click()
        page.locator("#traj_strip figure").nth(4).wait_for()
        assert page.locator("#traj_strip figure").count() == 5
        assert page.locator("#traj_current").get_by_text("final sample").count() == 1
        assert page.locator("#traj_current .mm-score").count() == 2
        page.locator("#traj_plot img, #traj_plot svg").first.wait_for()
        page.screenshot(path=str(tmp_path / "trajectory.png"), full_page=True)


def test_rewards_scores_uploaded_files(apps, resources, page, shapeworld_pngs, tmp_path):
    from mmalign.apps.rewards import build_app

    paths, captions = shapeworld_pngs
    with served(apps, build_app(resources.settings, resources)) as url:
        page.goto(url)
        page.locator("#files input[type=file]").set_input_files([str(p) for p in paths])
        page.locator("#files").get_by_text(paths[-1].stem).first.wait_for()  # shown as name + suffix
        page.locator("#prompt textarea").fill("\n".join(captions))
        page.locator("#score").click()
        page.locator("#table tr.mm-file").nth(2).wait_for()
        rows = page.locator("#table tr.mm-file")
        assert rows.count() == 3
        assert all(rows.nth(i).locator("img").evaluate("img => img.naturalWidth > 0") for i in range(3))
        text = page.locator("#table").inner_text()
        assert "rank 1/3" in text and "strict" in text
        page.screenshot(path=str(tmp_path / "rewards.png"), full_page=True)


def test_runs_shows_curves_and_grids(apps, page, run_dir, tmp_path):
    from mmalign.apps.runs import build_app

    with served(apps, build_app(runs_root=str(run_dir.parent))) as url:
        page.goto(url)
        page.locator("#load_run").click()
        page.locator("#run_summary").get_by_text("3 evaluation grids").wait_for()
        page.locator("#run_grid img").first.wait_for()
        page.locator("#run_plot img, #run_plot svg").first.wait_for()
        assert "eval/shapeeval/mean" in page.locator("#run_report").inner_text()
        page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)

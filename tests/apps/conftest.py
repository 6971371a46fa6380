"""Fixtures of the apps' tests: the apps package (found as ``mmalign app`` finds it), shared caches of
tiny models and rewards, a tiny LoRA checkpoint in the trainers' format, and a training run folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
EMBEDDED_MODEL = str(REPO / "assets" / "shapeworld-sd3")
CLIP_SPEC = f"clipscore model_id={REPO / 'assets' / 'shapeworld-clip'}"


@pytest.fixture(scope="session")
def apps():
    """The ``mmalign.apps`` package."""
    from mmalign.cli import apps_package

    return apps_package()


@pytest.fixture(scope="session")
def resources(apps):
    """One model / reward cache for every test (each model loads once per session), on the CPU."""
    return apps.Resources(apps.AppSettings(device="cpu"))


@pytest.fixture(scope="session")
def repo_cwd():
    """Run from the repository root, where the apps' relative defaults (assets/...) live."""
    old = os.getcwd()
    os.chdir(REPO)
    yield REPO
    os.chdir(old)


@pytest.fixture(scope="session")
def lora_checkpoint(tmp_path_factory) -> Path:
    """A LoRA checkpoint of tiny:sd3 written as the trainers write one (trainer_state.json +
    trained.safetensors), with random non-zero LoRA weights so it changes the samples."""
    from safetensors.torch import save_file

    from mmalign.testing import tiny_adapter

    adapter = tiny_adapter("sd3")
    adapter.add_lora(4)
    gen = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(p.shape, generator=gen) * 0.5 for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    out = tmp_path_factory.mktemp("run") / "checkpoints" / "step_00000003"
    out.mkdir(parents=True)
    save_file(weights, str(out / "trained.safetensors"))
    state = {"format": 1, "step": 3, "updates": 3, "algorithm": "grpo", "world_size": 1, "lora": True,
             "trained_tensors": len(weights),
             "config": {"algorithm": "grpo", "model": {"name": "tiny:sd3"}, "lora": {"enabled": True, "rank": 4, "alpha": None,
                                                                                     "target_modules": None}}}
    (out / "trainer_state.json").write_text(json.dumps(state))
    (out.parent / "latest").write_text("step_00000003\n")
    return out


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A training run folder in the trainers' format: metrics.jsonl (train + eval records), eval grids,
    config.yaml, and report.json written by mmalign's own report writer."""
    import yaml

    from mmalign.media import save_image
    from mmalign.trainers.report import write_report

    run = tmp_path_factory.mktemp("runs") / "grpo_tiny"
    (run / "eval").mkdir(parents=True)
    records = []
    for step in range(0, 7):
        if step % 3 == 0:
            records.append({"kind": "eval", "step": step, "eval/shapeeval/mean": 0.2 - 0.02 * step,
                            "eval/shapeeval/cat/counting": 0.1, "eval/clipscore/mean": 60.0 - step,
                            "eval/shapeeval:strict/mean": 0.05, "eval_seconds": 1.0})
            save_image(torch.full((3, 8, 16), step / 6.0), run / "eval" / f"step_{step:08d}.png")
        if step > 0:
            records.append({"kind": "train", "step": step, "reward/shapeeval/mean": 0.2 + 0.1 * step,
                            "reward/shapeeval/std": 0.05, "held_out/clipscore/mean": 62.0 - step, "kl": 0.01 * step,
                            "loss": 0.1, "step_seconds": 2.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": "grpo", "model": {"name": "tiny:sd3"}}))
    write_report(run, targets={"eval/shapeeval:strict/mean": 1.0}, plot=False)
    return run


@pytest.fixture(scope="session")
def shapeworld_pngs(tmp_path_factory) -> tuple[list[Path], list[str]]:
    """Three ShapeWorld ground-truth renders as PNGs, and their captions."""
    from mmalign.embedded.shapeworld import generate
    from mmalign.media import save_image

    out = tmp_path_factory.mktemp("media")
    images, captions, _ = generate(3, seed=0)
    paths = [save_image(img, out / f"shape_{i}.png") for i, img in enumerate(images)]
    return paths, captions

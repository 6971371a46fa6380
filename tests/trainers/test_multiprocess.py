"""Every trainer makes the same update on 2 CPU processes (gloo, launched by torchrun) as on one
process with the same global batch: sharded rollouts, rewards gathered for group statistics, and
gradients averaged over processes. (GRPO and FSDP have their own tests in test_common.py.)"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmalign.trainers import TRAINERS, load_train_config

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares", "three green triangles", "a yellow star"]
COLOR = [{"name": "tiny:verifiable", "metadata": {"target_color": [1.0, 0.0, 0.0]}}]
COMMON = {
    "model": {"name": "tiny:sd3", "device": "cpu"},
    "lora": {"rank": 2},
    "optim": {"lr": 0.01},
    "prompts": {"prompts": PROMPTS},
    "max_steps": 1,
    "threads": 1,
    "logging": {"stdout": False},
    "eval": {"every": 0},
}
SDE = {"method": "flow_grpo", "num_steps": 2, "guidance_scale": 1.0, "record_x0": False, "micro_batch": 1}
CASES = {
    "dense_grpo": {"sampler": SDE, "rewards": COLOR,
                   "grpo": {"prompts_per_step": 2, "group_size": 2, "clip_range": 0.2, "beta": 0.05, "num_minibatches": 1}},
    "dpo": {"sampler": SDE, "rewards": COLOR, "dpo": {"mode": "online", "prompts_per_step": 2, "group_size": 2}},
    "prdp": {"sampler": SDE, "rewards": COLOR,
             "prdp": {"prompts_per_step": 2, "group_size": 2, "num_inner_epochs": 1, "reward_norm": "group", "beta": 1.0}},
    "rwr": {"sampler": {"method": "ode", "num_steps": 2, "guidance_scale": 1.0, "record_x0": False, "micro_batch": 2},
            "rewards": COLOR, "rwr": {"prompts_per_step": 2, "group_size": 2, "temperature": 0.5}},
    "reward_backprop": {"sampler": {"method": "ode", "num_steps": 2, "guidance_scale": 1.0, "micro_batch": None},
                        "rewards": [{"name": "tiny:clipscore"}], "backprop": {"prompts_per_step": 2, "k": 1}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_trainer_but_grpo_has_a_case():
    assert set(CASES) | {"grpo"} == set(TRAINERS.names())


@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_two_processes_make_the_same_update_as_one(tmp_path, algorithm):
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump({"algorithm": algorithm, **COMMON, **CASES[algorithm]}))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mmalign", "train", "--config", str(f), f"out={two}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((two / "checkpoints/step_00000001/trainer_state.json").read_text())["world_size"] == 2

    cfg = load_train_config(f, [f"out={tmp_path / 'one'}"])
    single = TRAINERS.get(algorithm)(cfg, log=lambda s: None)
    single.fit()
    assert single.world_size == 1
    w2 = load_file(str(two / "checkpoints/step_00000001/trained.safetensors"))
    assert set(w2) == {n for n, _ in single.named_trainable}
    moved = 0.0
    for n, p in single.named_trainable:
        assert torch.allclose(p.detach(), w2[n], atol=1e-6, rtol=0), n
        if "lora_B" in n:
            moved = max(moved, float(w2[n].abs().max()))
    assert moved > 1e-5  # lora_B starts at 0: the step really updated the weights

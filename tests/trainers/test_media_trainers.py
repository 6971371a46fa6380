"""DPO (online D3PO), RWR and reward backprop on the tiny video (Wan) and audio (AudioLDM) pipelines: one
step each runs on the family's media, with finite losses and moved LoRA weights (the T2V/T2A recipes'
code paths; GRPO on both is covered by the recipes' own tests and test_grpo's partial chains)."""
import json
import math

import pytest
import torch
import yaml

from mmalign.trainers import load_train_config
from mmalign.trainers.common import trainer_class

PROMPTS = ["a red circle moving left", "two high beeps", "a blue square appearing", "a low tone then a high tone"]
MEDIA = {  # family -> (stochastic sampler for DPO, reward on tiny random weights, differentiable)
    "wan": ({"method": "flow_grpo", "noise_level": 0.7}, {"name": "tiny:video_frames"}),
    "audioldm": ({"method": "ddim", "eta": 1.0}, {"name": "tiny:clap"}),
}
ALGORITHMS = {
    "dpo": {"dpo": {"mode": "online", "prompts_per_step": 2, "group_size": 2, "beta": 0.1}, "sde": True},
    "rwr": {"rwr": {"prompts_per_step": 2, "group_size": 2, "temperature": 0.5, "timesteps_per_sample": 1}},
    "reward_backprop": {"backprop": {"prompts_per_step": 2, "k": 1}},
}


@pytest.mark.parametrize("family", list(MEDIA))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_one_step_on_video_and_audio(tmp_path, family, algorithm):
    sde, reward = MEDIA[family]
    spec = dict(ALGORITHMS[algorithm])
    uses_sde = spec.pop("sde", False)
    sampler = {"num_steps": 2, "guidance_scale": 1.0, "record_x0": False, "micro_batch": None,
               **(sde if uses_sde else {"method": "ode"})}
    if uses_sde:
        sampler["micro_batch"] = 1
    cfg = {"algorithm": algorithm, "model": {"name": f"tiny:{family}", "device": "cpu"}, "lora": {"rank": 4},
           "optim": {"lr": 0.05}, "sampler": sampler, "prompts": {"prompts": PROMPTS}, "rewards": [reward],
           "max_steps": 1, "threads": 1, "checkpoint": {"save_final": False}, "logging": {"stdout": False},
           "eval": {"every": 0}, **spec}
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    config = load_train_config(f, [f"out={tmp_path / 'run'}"])
    t = trainer_class(algorithm)(config, log=lambda s: None)
    assert t.adapter.modality == {"wan": "video", "audioldm": "audio"}[family]
    before = {n: p.detach().clone() for n, p in t.named_trainable}
    m = t.fit()[0]
    losses = [v for k, v in m.items() if k.endswith("loss") and isinstance(v, float)]
    assert losses and all(math.isfinite(v) for v in losses), json.dumps(m, default=str)
    assert any(not torch.equal(before[n], p.detach()) for n, p in t.named_trainable), m

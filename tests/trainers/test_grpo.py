"""GRPO on the tiny pipelines: exact first ratio and zero KL, it raises a reward on held-out seeds,
SDE windows and timestep subsets, invalid rewards, and `mmalign train` end to end."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmalign.testing.training import sign_flipped_reward_shift
from mmalign.cli import main
from mmalign.rewards import CallableReward
from mmalign.trainers import load_train_config
from mmalign.trainers.grpo import GRPOTrainer

ROOT = Path(__file__).resolve().parents[2]
RED = [{"name": "tiny:verifiable", "metadata": {"target_color": [1.0, 0.0, 0.0]}}]
TINY = {
    "algorithm": "grpo",
    "model": {"name": "tiny:sd3", "device": "cpu"},
    "lora": {"rank": 4},
    "optim": {"lr": 0.01},
    "sampler": {"method": "flow_grpo", "num_steps": 3, "guidance_scale": 1.0, "record_x0": False, "micro_batch": 1},
    "prompts": {"prompts": ["a red circle", "two blue squares", "three green triangles", "a yellow star"]},
    "rewards": RED,
    "grpo": {"prompts_per_step": 2, "group_size": 2, "clip_range": 0.2, "beta": 0.05},
    "max_steps": 1,
    "threads": 1,
    "checkpoint": {"save_final": False},
    "logging": {"stdout": False},
    "eval": {"every": 0},
}


def trainer(tmp_path, *overrides, **kwargs):
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(TINY))
    return GRPOTrainer(load_train_config(f, [f"out={tmp_path / 'run'}", *overrides]), log=lambda s: None, **kwargs)


@pytest.mark.parametrize("overrides", [
    [],  # flow (tiny SD3, flow_grpo SDE), no CFG
    ["sampler.guidance_scale=4.5", "grpo.group_size=4", "grpo.num_minibatches=2", "grpo.num_inner_epochs=2"],  # CFG at training
    ["model.name=tiny:sd", "sampler.method=ddim", "sampler.eta=1.0"],  # diffusion (tiny SD1.5, DDIM eta 1)
    ["sampler.method=dance", "sampler.noise_level=0.3", "sampler.same_noise_in_group=true", "grpo.beta=0",
     "grpo.normalize_ratio=true"],  # DanceGRPO, GRPO-Guard
])
def test_first_inner_step_ratio_is_exactly_one_and_kl_zero(tmp_path, overrides):
    t = trainer(tmp_path, *overrides)
    before = {n: p.detach().clone() for n, p in t.named_trainable}
    m = t.fit()[0]
    assert m["first_ratio_max_dev"] == 0.0  # recomputed log-probs equal the recorded ones bit for bit
    if t.cfg.grpo.beta > 0:
        assert "kl" in m
        if t.cfg.grpo.num_minibatches == 1:
            assert m["kl"] == 0.0  # LoRA starts at zero: the policy is the reference
    assert m["updates"] == t.updates_per_step() and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    changed = [n for n, p in t.named_trainable if not torch.equal(before[n], p.detach())]
    assert changed and all("lora" in n for n in changed)
    if t.cfg.grpo.num_inner_epochs > 1:  # later minibatches see updated weights
        assert m["ratio_max"] > 1.0


def test_grpo_raises_the_reward_on_held_out_seeds(tmp_path):
    """Six GRPO steps push the mean colour towards blue on held-out seeds (deterministic ODE eval), by
    more than the baseline's spread; the same run with the reward's sign flipped ends up clearly lower
    (so a sign error, or no learning, fails the test)."""
    common = ["model.name=tiny:sd3", "optim.lr=0.1", "max_steps=6", "grpo.group_size=16", "sampler.micro_batch=null",
              "grpo.clip_range=0.2", "grpo.beta=0.01", "eval.seeds=[100, 101, 102, 103]", "eval.max_prompts=2"]

    def make(sign, rewards):
        (tmp_path / str(sign)).mkdir()
        return trainer(tmp_path / str(sign), *common, rewards)

    moved = sign_flipped_reward_shift(make, 6)
    # in units of the baseline's spread over the eval samples
    assert moved[1.0] > 1.5, moved
    assert moved[1.0] - moved[-1.0] > 2.0, moved


def test_sde_window_and_timestep_subsets(tmp_path):
    t = trainer(tmp_path, "sampler.num_steps=4", "grpo.sde_window_size=2", "max_steps=2")
    hist = t.fit()
    assert all(h["timesteps"] == 2 for h in hist) and {h["sde_window_start"] for h in hist} <= {0, 1, 2}
    assert t.step_sampler(0).sde_window == t.step_sampler(0).sde_window  # a function of the step: same on every process
    (tmp_path / "f").mkdir()
    t = trainer(tmp_path / "f", "sampler.num_steps=4", "grpo.timestep_fraction=0.5")
    assert t.fit()[0]["timesteps"] == 2


def test_several_rewards_and_held_out_rewards_are_logged(tmp_path):
    bright = CallableReward(lambda x, prompts: x.mean(dim=(1, 2, 3)), name="brightness")
    t = trainer(tmp_path, "grpo.reward_aggregation=normalize_then_sum",
                rewards=[(bright, 0.5), CallableReward(lambda x, p: x[:, 0].mean(dim=(1, 2)), name="red")],
                held_out_rewards=[CallableReward(lambda x, p: -x.std(dim=(1, 2, 3)), name="flatness")])
    m = t.fit()[0]
    for key in ("reward/brightness/mean", "reward/red/max", "held_out/flatness/std", "advantage/abs_mean"):
        assert key in m and math.isfinite(m[key]), key


def test_invalid_rewards_stop_training_or_get_zero_advantage(tmp_path):
    def half_broken(x, prompts):
        scores = x.mean(dim=(1, 2, 3)).clone()
        scores[0] = float("nan")
        return scores

    broken = CallableReward(half_broken, name="broken")
    with pytest.raises(ValueError, match=r"1 of 4 samples were not scored.*broken produced a non-finite score"):
        trainer(tmp_path, rewards=[broken]).fit()
    (tmp_path / "z").mkdir()
    m = trainer(tmp_path / "z", "grpo.on_invalid_reward=zero_advantage", rewards=[broken]).fit()[0]
    assert m["reward/broken/invalid"] == 1 and math.isfinite(m["loss"])
    with pytest.raises(ValueError, match="GRPO needs at least one trained reward"):
        trainer(tmp_path, "rewards=[]")


def test_mmalign_train_runs_the_tiny_recipe(tmp_path, capsys):
    out = tmp_path / "tiny"
    code = main(["train", "--config", str(ROOT / "configs/train_grpo_tiny.yaml"), "max_steps=1", f"out={out}",
                 "grpo.group_size=4", "grpo.num_minibatches=1", "eval.seeds=[0]", "eval.max_prompts=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[train] step 1" in printed and "reward/mean_color_match/mean" in printed
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["kind"] == "train"]
    evals = [l for l in lines if l["kind"] == "eval"]
    assert len(train) == 1 and [e["step"] for e in evals] == [0, 1]
    for key in ("reward/mean_color_match/mean", "reward/mean_color_match/std", "reward/mean_color_match/min",
                "reward/mean_color_match/max", "held_out/clipscore/mean", "kl", "clip_frac", "grad_norm", "lr", "samples_per_s"):
        assert key in train[0], key
    assert "eval/mean_color_match/mean" in evals[0] and "eval/clipscore/mean" in evals[1]
    assert (out / "eval/step_00000000.png").is_file() and (out / "eval/step_00000001.png").is_file()
    ckpt = out / "checkpoints" / (out / "checkpoints/latest").read_text().strip()
    assert ckpt.name == "step_00000001" and all("lora" in k for k in load_file(str(ckpt / "trained.safetensors")))


def _media_dataset(tmp_path, modality, n=3, frames=9, size=16):
    """A JSONL dataset of ``n`` prompt/media records (PNG images or GIF clips) written to ``tmp_path``."""
    from mmalign.media import save_image, save_video_gif

    lines = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        if modality == "image":
            save_image(torch.rand(3, size, size, generator=g), tmp_path / f"m{i}.png")
            lines.append({"prompt": TINY["prompts"]["prompts"][i], "image": f"m{i}.png", "category": "c"})
        else:
            save_video_gif(torch.rand(frames, 3, size, size, generator=g), tmp_path / f"m{i}.gif")
            lines.append({"prompt": TINY["prompts"]["prompts"][i], "video": f"m{i}.gif"})
    path = tmp_path / "media.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize("model, modality", [("tiny:sd3", "image"), ("tiny:wan", "video")])
def test_partial_chain_grpo_trains_on_the_remaining_steps(tmp_path, model, modality):
    """InstructVideo partial chains: rollouts start from dataset media noised to start_step, only the
    remaining steps are sampled and trained, the first ratio is exactly 1 and the weights move."""
    data = _media_dataset(tmp_path, modality, size=32 if modality == "image" else 16)
    video = [{"name": "video_frames", "options": {"image_reward": "jpeg_size", "k": 3}}]
    t = trainer(tmp_path, f"model.name={model}", "sampler.num_steps=4", "sampler.start_step=2",
                f"grpo.partial_chain_dataset={data}", "max_steps=2", *([f"rewards={json.dumps(video)}"] if modality == "video" else []))
    assert len(t.chain_records) == 3
    before = {n: p.detach().clone() for n, p in t.named_trainable}
    hist = t.fit()
    assert all(h["timesteps"] == 2 for h in hist) and hist[0]["first_ratio_max_dev"] == 0.0
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert any(not torch.equal(before[n], p.detach()) for n, p in t.named_trainable)
    rollout = t.sample_partial_chains(0, t.step_sampler(0))
    assert rollout.num_steps == 2 and rollout.meta["start_step"] == 2
    # random SDE windows (Flow-GRPO-Fast) fall among the sampled steps
    (tmp_path / "w").mkdir()
    t = trainer(tmp_path / "w", f"model.name={model}", "sampler.num_steps=4", "sampler.start_step=2",
                f"grpo.partial_chain_dataset={data}", "grpo.sde_window_size=1", *([f"rewards={json.dumps(video)}"] if modality == "video" else []))
    assert {t.step_sampler(s).sde_window for s in range(20)} == {(2, 3), (3, 4)}


def test_partial_chain_config_and_data_errors(tmp_path):
    data = _media_dataset(tmp_path, "image", size=32)
    with pytest.raises(ValueError, match="set grpo.partial_chain_dataset"):
        trainer(tmp_path, "sampler.start_step=1")
    with pytest.raises(ValueError, match="set sampler.start_step > 0"):
        trainer(tmp_path, f"grpo.partial_chain_dataset={data}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer(tmp_path, "sampler.start_step=1", f"grpo.partial_chain_dataset={tmp_path / 'none.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a cat", "video": "m0.png"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key\(s\) image"):
        trainer(tmp_path, "sampler.start_step=1", f"grpo.partial_chain_dataset={bad}")
    (tmp_path / "v").mkdir()
    short = _media_dataset(tmp_path / "v", "video", frames=5)
    t = trainer(tmp_path, "model.name=tiny:wan", "sampler.start_step=1", f"grpo.partial_chain_dataset={short}")
    with pytest.raises(ValueError, match="has 5 frames, the model makes 9"):
        t.fit()
    from mmalign.samplers import SamplerConfig
    from mmalign.trainers.dense_grpo import DenseGRPOTrainConfig

    with pytest.raises(ValueError, match="partial chains are supported by algorithm grpo only"):
        DenseGRPOTrainConfig(out=str(tmp_path), sampler=SamplerConfig(method="flow_grpo", num_steps=3, start_step=1))

"""Rollouts decode only the video frames their rewards read (issue: "decode only the frames a reward
needs where the family allows it"): Wan's causal VAE decodes a latent prefix to exactly the first frames;
frame-sampled rewards declare their frames and score a prefix the same as the whole video; rewards that
read every frame refuse a prefix."""
from pathlib import Path

import pytest
import torch
import yaml

import mmalign
from mmalign.rewards.combine import load_weighted_sum
from mmalign.testing import tiny_reward
from mmalign.trainers import load_train_config
from mmalign.trainers.common import trainer_class

WAN = str(Path(__file__).resolve().parents[2] / "assets" / "movingshapes-wan")


@pytest.fixture(scope="module")
def wan():
    return mmalign.load_model(WAN)


def test_wan_decodes_a_latent_prefix_to_exactly_the_first_frames(wan):
    lat = torch.randn(wan.latent_shape(2), generator=torch.Generator().manual_seed(0))
    full = wan.decode(lat)
    assert wan.causal_frame_decoding and full.shape[1] == 9
    for n in range(1, full.shape[1] + 1):
        assert torch.equal(wan.decode_prefix(lat, n), full[:, :n]), n
    with pytest.raises(ValueError, match=r"num_frames must be in \[1, 9\]"):
        wan.decode_prefix(lat, 10)


def test_non_causal_families_cut_a_full_decode_and_images_refuse():
    sd3 = mmalign.load_model("tiny:sd3")
    assert not sd3.causal_frame_decoding
    with pytest.raises(ValueError, match="decode_prefix is for video models"):
        sd3.decode_prefix(torch.zeros(sd3.latent_shape(1)), 1)


def _first_two(num_frames, k, seed=None):
    return [0, 1]


def test_frame_sampled_rewards_score_a_prefix_like_the_whole_video():
    video = torch.rand(3, 9, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "a blue square", "a green triangle"]
    r = tiny_reward("video_frames", sampler=_first_two, k=2)
    assert r.frames_needed(9) == [0, 1]
    whole = r(video, prompts).scores
    torch.testing.assert_close(r(video[:, :2], prompts, num_frames=9).scores, whole)
    with pytest.raises(ValueError, match="reads frame 1 of a 9-frame video, got only the first 1"):
        r(video[:, :1], prompts, num_frames=9)
    seg = tiny_reward("video_frames", sampler="segmental", k=2)  # frames 2 and 6 of 9
    combo = load_weighted_sum([r, seg], [1.0, 1.0])
    assert seg.frames_needed(9) == [2, 6] and combo.frames_needed(9) == [0, 1, 2, 6]
    torch.testing.assert_close(combo(video[:, :7], prompts, num_frames=9).scores, combo(video, prompts).scores)
    every = tiny_reward("temporal_consistency")
    assert every.frames_needed(9) is None
    with pytest.raises(ValueError, match="reads every frame of a 9-frame video"):
        every(video[:, :7], prompts, num_frames=9)
    with pytest.raises(ValueError, match="reads every frame"):
        load_weighted_sum([r, every], [1.0, 1.0])(video[:, :7], prompts, num_frames=9)


def _grpo(tmp_path, reward):
    cfg = {"algorithm": "grpo", "model": {"name": WAN, "device": "cpu"}, "lora": {"rank": 4},
           "optim": {"lr": 0.01}, "sampler": {"method": "flow_grpo", "num_steps": 2, "noise_level": 0.7, "guidance_scale": 1.0,
                                             "record_x0": False, "micro_batch": 1},
           "prompts": {"prompts": ["a red circle moving left", "a blue square appearing"]}, "rewards": [reward],
           "grpo": {"prompts_per_step": 2, "group_size": 2}, "max_steps": 1, "threads": 1,
           "checkpoint": {"save_final": False}, "logging": {"stdout": False}, "eval": {"every": 0}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return trainer_class("grpo")(load_train_config(f, [f"out={tmp_path / 'run'}"]), log=lambda s: None)


def test_grpo_rollouts_decode_only_the_frames_the_rewards_read(tmp_path):
    t = _grpo(tmp_path, {"name": "tiny:video_frames", "options": {"sampler": "segmental", "k": 2}})
    assert t.reward_frame_prefix() == (7, 9)  # segmental frames 2 and 6: latent frames 0-3 of 5
    items = [(0, "all", "a red circle moving left")]
    rollout = t.sample_groups(0, items, t.cfg.sampler)
    assert rollout.samples.shape[1] == 7 and rollout.meta["num_frames"] == 9
    full = t.adapter.decode(rollout.final_latents)
    assert torch.equal(rollout.samples, full[:, :7])
    label = t.rewards.trained[0].label
    prefix_scores = t.rewards.score(rollout.samples, rollout.prompts, num_frames=9)[label].scores
    torch.testing.assert_close(prefix_scores, t.rewards.score(full, rollout.prompts)[label].scores)
    assert torch.isfinite(torch.tensor(t.fit()[0]["loss"]))
    every = _grpo(tmp_path / "b", {"name": "tiny:temporal_consistency"})
    assert every.reward_frame_prefix() is None
    assert every.sample_groups(0, items, every.cfg.sampler).samples.shape[1] == 9


def test_rollout_bench_times_a_prefix_decode():
    from mmalign.bench import RolloutBenchConfig, run_rollout_bench

    lines = []
    out = run_rollout_bench(RolloutBenchConfig(model=WAN, num_steps=2, batch_size=1, repeats=1, decode_frames=1), log=lines.append)
    assert out["prefix_decode_time_fraction"] > 0 and "decoding 1 frames (causal VAE: a latent prefix)" in lines[-1]  # a number, not a test
    with pytest.raises(ValueError, match="decode_frames must be >= 1"):
        RolloutBenchConfig(model=WAN, decode_frames=0)
    with pytest.raises(ValueError, match="decode_frames is for video models"):
        run_rollout_bench(RolloutBenchConfig(family="sd3", num_steps=1, batch_size=1, repeats=1, decode_frames=1), log=lines.append)

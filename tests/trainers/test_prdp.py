"""PRDP on the tiny pipelines: first-step log-ratio exactly 0, the step-by-step gradient equals the
full-graph gradient of prdp_loss, it raises a reward on held-out seeds, pairs and reward normalisation
by hand, clear errors, exact resume."""
import dataclasses
import math

import pytest
import torch
import yaml

from mmalign.testing.training import sign_flipped_reward_shift
from mmalign.config import ConfigError
from mmalign.rewards import CallableReward
from mmalign.samplers import log_prob
from mmalign.trainers import load_train_config
from mmalign.trainers.losses import prdp_loss
from mmalign.trainers.prdp import PRDPTrainer

TINY = {
    "algorithm": "prdp",
    "model": {"name": "tiny:sd3", "device": "cpu"},
    "lora": {"rank": 4},
    "optim": {"lr": 0.01},
    "sampler": {"method": "flow_grpo", "num_steps": 3, "guidance_scale": 1.0, "record_x0": False, "micro_batch": 2},
    "prompts": {"prompts": ["a red circle", "two blue squares", "three green triangles", "a yellow star"]},
    "rewards": [{"name": "tiny:verifiable", "metadata": {"target_color": [0.0, 0.0, 1.0]}}],
    "prdp": {"prompts_per_step": 2, "group_size": 4, "num_inner_epochs": 2, "reward_norm": "group", "beta": 1.0},
    "max_steps": 1,
    "threads": 1,
    "checkpoint": {"save_final": False},
    "logging": {"stdout": False},
    "eval": {"every": 0},
}


def config(tmp_path, *overrides):
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(TINY))
    return load_train_config(f, [f"out={tmp_path / 'run'}", *overrides])


def trainer(tmp_path, *overrides, **kwargs):
    return PRDPTrainer(config(tmp_path, *overrides), log=lambda s: None, **kwargs)


@pytest.mark.parametrize("overrides", [
    [],  # flow (tiny SD3, flow_grpo SDE), reference = the pretrained model (LoRA disabled)
    ["sampler.guidance_scale=4.5", "prdp.pairs=random", "prdp.num_pairs=3", "prdp.num_minibatches=2",
     "prdp.reference=sampling", "sampler.log_prob_reduction=mean"],  # CFG at training, random pairs, minibatches
    ["model.name=tiny:sd", "sampler.method=ddim", "sampler.eta=1.0"],  # diffusion (tiny SD1.5, DDIM eta 1)
])
def test_first_log_ratio_is_exactly_zero_and_lora_moves(tmp_path, overrides):
    t = trainer(tmp_path, *overrides)
    before = {n: p.detach().clone() for n, p in t.named_trainable}
    m = t.fit()[0]
    assert m["first_log_ratio_max_dev"] == 0.0  # recomputed log-probs equal the recorded ones bit for bit
    if t.cfg.prdp.reference == "pretrained":
        assert m["kl_ref"] == 0.0  # LoRA starts at zero: the sampling policy is the reference
    assert m["updates"] == t.updates_per_step() == 2 * t.cfg.prdp.num_minibatches
    assert m["pairs"] == (2 * 3 if t.cfg.prdp.pairs == "random" else 2 * 6)
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["log_ratio_abs_max"] > 0  # the 2nd epoch moved
    changed = [n for n, p in t.named_trainable if not torch.equal(before[n], p.detach())]
    assert changed and all("lora" in n for n in changed)
    assert all(torch.isfinite(p).all() for p in t.trainable_params)


def test_step_by_step_gradient_equals_the_full_graph_gradient(tmp_path):
    """minibatch_gradient (one step's graph at a time) == autograd of prdp_loss over every step at once,
    with the policy moved away from both pi_old and pi_ref so that clipping is active."""
    t = trainer(tmp_path, "sampler.num_steps=2")
    sampler = dataclasses.replace(t.cfg.sampler, group_size=4)
    rollout = t.sample_groups(0, [(0, "all", "a red circle")], sampler)
    steps = [0, 1]
    cond = t.adapter.encode_in_chunks(rollout.prompts, None, rollout.meta["guidance_scale"], sampler.micro_batch)
    with torch.no_grad():
        ref = log_prob(t.adapter, rollout, steps, conditioning=cond, config=sampler).log_probs
        for n, p in t.named_trainable:  # move the policy: log-ratios no longer 0, some beyond the clip
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        moved = (log_prob(t.adapter, rollout, steps, conditioning=cond, config=sampler).log_probs - rollout.log_probs[:, steps]).abs()
    t.cfg.prdp.clip_range = eps = float(moved.median())  # about half the steps beyond the proximal clip
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.1]) * float(moved.max())
    pairs = torch.tensor([(i, j) for i in range(4) for j in range(i + 1, 4)])
    t.optimizer.zero_grad(set_to_none=True)
    stats = t.minibatch_gradient(rollout, cond, ref, rewards, pairs, steps, sampler)
    stepwise = [p.grad.clone() for p in t.trainable_params]
    assert 0 < stats["clip_frac"] < 1 and 0 < stats["clipped_loss_frac"] < 1, stats  # both loss branches in play
    t.optimizer.zero_grad(set_to_none=True)
    lp = log_prob(t.adapter, rollout, steps, conditioning=cond, config=sampler).log_probs  # every step's graph
    r, old = lp - ref, rollout.log_probs[:, steps] - ref
    loss, _ = prdp_loss(r[pairs[:, 0]], r[pairs[:, 1]], rewards[pairs[:, 0]], rewards[pairs[:, 1]], 1.0, eps,
                        old_log_ratio_a=old[pairs[:, 0]], old_log_ratio_b=old[pairs[:, 1]])
    loss.backward()
    assert loss.item() == pytest.approx(stats["loss"], rel=1e-5)
    for a, p in zip(stepwise, t.trainable_params):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_prdp_raises_the_reward_on_held_out_seeds(tmp_path):
    """Four PRDP steps move the mean colour towards blue on held-out seeds (ODE eval) by more than the
    baseline's spread; with the reward's sign flipped it ends clearly lower (no learning, or a sign
    error, fails)."""
    common = ["optim.lr=0.1", "max_steps=4", "prdp.group_size=8", "sampler.micro_batch=8",
              "eval.seeds=[100, 101, 102, 103]", "eval.max_prompts=2"]

    def make(sign, rewards):
        (tmp_path / str(sign)).mkdir()
        return trainer(tmp_path / str(sign), *common, rewards)

    def left_the_reference(t, hist, before):
        assert hist[-1]["kl_ref"] > 0  # the policy left the reference

    moved = sign_flipped_reward_shift(make, 4, left_the_reference)
    assert moved[1.0] > 1.5, moved  # in units of the baseline's spread over the eval samples
    assert moved[1.0] - moved[-1.0] > 2.0, moved


def test_pairs_and_reward_normalisation_by_hand(tmp_path):
    t = trainer(tmp_path)
    assert t.group_pairs(0, [5])[0] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    t.cfg.prdp.pairs, t.cfg.prdp.num_pairs = "random", 3
    a = t.group_pairs(7, [0, 1])
    assert all(len(p) == 3 == len(set(p)) and all(i < j for i, j in p) for p in a)
    assert a == t.group_pairs(7, [0, 1])  # a function of (seed, step, group): the same on every process
    assert any(t.group_pairs(s, [0]) != t.group_pairs(7, [0]) for s in range(8))
    scores, gids = {"mean_color_match": torch.tensor([1.0, 2.0, 3.0, 5.0])}, torch.tensor([0, 0, 1, 1])
    t.cfg.prdp.reward_norm = "none"  # centred per group: differences are the raw ones
    assert t.pair_rewards(scores, gids).tolist() == pytest.approx([-0.5, 0.5, -1.0, 1.0])
    t.cfg.prdp.reward_norm = "group"  # divided by the group std (0.5 and 1) + eps
    assert t.pair_rewards(scores, gids).tolist() == pytest.approx([-0.5 / 0.5001, 0.5 / 0.5001, -1 / 1.0001, 1 / 1.0001])
    t.cfg.prdp.reward_norm = "global"  # the batch's population std: sqrt(8.75 / 4)
    s = math.sqrt(8.75 / 4) + 1e-4
    assert t.pair_rewards(scores, gids).tolist() == pytest.approx([-0.5 / s, 0.5 / s, -1 / s, 1 / s])


def test_a_nan_reward_stops_training_naming_the_sample(tmp_path):
    def broken(x, prompts):
        s = x.mean(dim=(1, 2, 3)).clone()
        s[2] = float("nan")
        return s

    with pytest.raises(ValueError, match=r"1 of 8 samples have no valid trained reward \(sample 2 \(prompt '[a-z ]+', group 0\): broken"):
        trainer(tmp_path, rewards=[CallableReward(broken, name="broken")]).fit()
    with pytest.raises(ValueError, match="PRDP needs at least one trained reward"):
        trainer(tmp_path, "rewards=[]")
    with pytest.raises(ValueError, match="2 groups per process do not split into prdp.num_minibatches=3"):
        trainer(tmp_path, "prdp.num_minibatches=3")


@pytest.mark.parametrize("override, message", [
    ("prdp.group_size=1", "group_size must be >= 2"),
    ("prdp.beta=0", "beta must be > 0"),
    ("prdp.clip_range=-1", "clip_range must be > 0 or null"),
    ("prdp.pairs=some", r"prdp.pairs: expected one of \['all', 'random'\]"),
    ("prdp.reference=sft", r"prdp.reference: expected one of \['pretrained', 'sampling'\]"),
    ("prdp.num_pairs=7", "num_pairs 7 exceeds the 6 distinct pairs of a group of 4"),
    ("sampler.method=ode", "PRDP needs a stochastic sampler"),
    ("prdp.group_size=3", "prdp.group_size 3 must be a multiple of sampler.micro_batch 2"),
    ("sampler.group_size=4", "set the group size in prdp.group_size"),
])
def test_bad_config_fails_naming_the_problem(tmp_path, override, message):
    extra = ["prdp.pairs=random"] if "num_pairs" in override else []
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *extra, override)


def test_resume_is_exact(tmp_path):
    """2 steps straight == 1 step, checkpoint, resume, 1 step: same loss and weights, bit for bit."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    overrides = ["max_steps=2", "checkpoint.every=1", "checkpoint.keep_last=0", "prdp.pairs=random", "prdp.num_pairs=2",
                 "prdp.num_minibatches=2"]
    run_a = trainer(a_dir, *overrides)
    hist_a = run_a.fit()
    run_b = trainer(b_dir, *overrides, f"resume={a_dir / 'run/checkpoints/step_00000001'}")
    assert run_b.step == 1
    hist_b = run_b.fit()
    assert len(hist_b) == 1
    for key in ("loss", "grad_norm", "kl_ref", "pred_mean", "reward/mean_color_match/mean", "log_ratio_abs_max"):
        assert hist_b[0][key] == hist_a[1][key], key
    for (n, p), (_, q) in zip(run_a.named_trainable, run_b.named_trainable):
        assert torch.equal(p, q), n

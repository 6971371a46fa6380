"""DenseGRPO on the tiny pipelines: per-step noise levels in the sampler (log-prob = Normal), few-step
ODE completions, gains that telescope, per-step advantages and the calibration rule against hand
values, exact first ratio, a reward that rises on held-out seeds, exact resume with the calibration
state, shipped recipes and clear errors."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from mmalign.testing.training import sign_flipped_reward_shift
from mmalign.cli import config_kinds
from mmalign.config import ConfigError, load_config
from mmalign.rewards import CallableReward
from mmalign.samplers import SamplerConfig, log_prob, ode_complete, sample
from mmalign.samplers.steps import flow_grpo_std
from mmalign.testing import tiny_adapter
from mmalign.trainers import load_train_config
from mmalign.trainers.dense_grpo import DenseGRPOConfig, DenseGRPOTrainer, NoiseCalibrator, step_gains

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "algorithm": "dense_grpo",
    "model": {"name": "tiny:sd3", "device": "cpu"},
    "lora": {"rank": 4},
    "optim": {"lr": 0.01},
    "sampler": {"method": "flow_grpo", "num_steps": 3, "guidance_scale": 1.0, "record_x0": False, "micro_batch": 1},
    "prompts": {"prompts": ["a red circle", "two blue squares", "three green triangles", "a yellow star"]},
    "rewards": [{"name": "tiny:verifiable", "metadata": {"target_color": [1.0, 0.0, 0.0]}}],
    "grpo": {"prompts_per_step": 2, "group_size": 2, "clip_range": 0.2, "beta": 0.05},
    "max_steps": 1,
    "threads": 1,
    "checkpoint": {"save_final": False},
    "logging": {"stdout": False},
    "eval": {"every": 0},
}


def brightness(x, prompts):
    return x.mean(dim=(1, 2, 3))


def config(tmp_path, *overrides):
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(TINY))
    return load_train_config(f, [f"out={tmp_path / 'run'}", *overrides])


def trainer(tmp_path, *overrides, **kwargs):
    return DenseGRPOTrainer(config(tmp_path, *overrides), log=lambda s: None, **kwargs)


@pytest.fixture(scope="module")
def sd3():
    torch.set_num_threads(1)
    return tiny_adapter("sd3", seed=0)


# ----------------------------------------------------------------------------- sampler pieces
def test_per_step_noise_levels_in_the_sampler(sd3):
    levels = [0.9, 0.3, 0.6]
    cfg = SamplerConfig(method="flow_grpo", num_steps=3, noise_levels=levels, guidance_scale=1.0)
    r = sample(sd3, ["a red circle", "a blue square"], cfg, generator=torch.Generator().manual_seed(0))
    lp = log_prob(sd3, r)
    assert torch.equal(lp.log_probs, r.log_probs)  # recomputed under the same per-step levels
    sig = r.sigmas
    below_one = sig[sig < 1][0]
    for k, a in enumerate(levels):
        std = flow_grpo_std(sig[k], a, below_one) * torch.sqrt(sig[k] - sig[k + 1])  # Flow-GRPO std with a_k
        torch.testing.assert_close(lp.stds[k], std)
        ref = torch.distributions.Normal(lp.means[:, k].double(), std.double()).log_prob(r.latents[:, k + 1].double())
        torch.testing.assert_close(r.log_probs[:, k].double(), ref.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    # constant levels reproduce the constant noise_level bit for bit
    same = SamplerConfig(method="flow_grpo", num_steps=3, noise_levels=[0.7] * 3, guidance_scale=1.0)
    a = sample(sd3, ["a red circle"], same, generator=torch.Generator().manual_seed(1))
    b = sample(sd3, ["a red circle"], SamplerConfig(method="flow_grpo", num_steps=3, noise_level=0.7, guidance_scale=1.0),
               generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    for bad, message in [({"noise_levels": [0.7, 0.7]}, "2 values for num_steps=3"),
                         ({"noise_levels": [0.7, -1.0, 0.7]}, r"finite and >= 0; steps \[1\]"),
                         ({"noise_levels": [0.7] * 3, "method": "ode"}, "method 'ode' has no noise level"),
                         ({"noise_levels": [0.7] * 3, "method": "ddpm"}, "method 'ddpm' has no noise level")]:
        with pytest.raises(ValueError, match=message):
            SamplerConfig(**{"method": "flow_grpo", "num_steps": 3, **bad})


def test_few_step_ode_completion(sd3):
    r = sample(sd3, ["a red circle", "a blue square"], SamplerConfig(method="flow_grpo", num_steps=4, guidance_scale=1.0),
               generator=torch.Generator().manual_seed(0))
    cond = sd3.encode_prompts(r.prompts, None, 1.0)
    x1, sig = r.latents[:, 1], r.sigmas
    # one Euler step from sigma_1 straight to the last sigma, with the velocity at step 1
    v = sd3.denoise(x1, r.timesteps[1], cond)
    torch.testing.assert_close(ode_complete(sd3, x1, 1, 4, cond, max_steps=1), x1 + (sig[4] - sig[1]) * v)
    # max_steps >= the remaining steps, or None: every remaining step (micro-batching changes nothing)
    full = ode_complete(sd3, x1, 1, 4, cond)
    torch.testing.assert_close(ode_complete(sd3, x1, 1, 4, cond, max_steps=5, micro_batch=1), full, rtol=1e-5, atol=1e-6)
    # two steps over 3 remaining: points 1, 2, 4
    v2 = sd3.denoise(x1, r.timesteps[1], cond)
    x2 = x1 + (sig[2] - sig[1]) * v2
    x4 = x2 + (sig[4] - sig[2]) * sd3.denoise(x2, r.timesteps[2], cond)
    torch.testing.assert_close(ode_complete(sd3, x1, 1, 4, cond, max_steps=2), x4)
    assert torch.equal(ode_complete(sd3, r.latents[:, 4], 4, 4, cond, max_steps=2), r.latents[:, 4].float())
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        ode_complete(sd3, x1, 1, 4, cond, max_steps=0)


# ----------------------------------------------------------------------------- dense rewards and advantages
def test_gains_telescope_to_final_minus_start_completion(tmp_path):
    """Every step trained: the per-step gains sum to R(final) - R(ODE completion from the noise)."""
    bright = CallableReward(brightness, name="brightness")
    t = trainer(tmp_path, "dense.completion_steps=2", "grpo.group_size=3", rewards=[bright])
    sampler = t.step_sampler(0)
    rollout = t.sample_groups(0, [(0, "all", "a red circle"), (1, "all", "a blue square")], sampler)
    K, steps = rollout.num_steps, [0, 1, 2]
    cond = t.adapter.encode_in_chunks(rollout.prompts, None, rollout.meta["guidance_scale"], 1)
    cols, ok, _ = t.completion_scores(rollout, [0, 1, 2], cond, sampler)
    assert bool(ok.all())
    final = brightness(rollout.samples, None)
    gains = step_gains({K: final, **{j: cols["brightness"][:, j] for j in range(K)}}, steps)
    start = brightness(ode_complete(t.adapter, rollout.latents[:, 0], 0, K, cond, max_steps=2, decode=True), None)
    torch.testing.assert_close(gains.sum(1), final - start, rtol=0, atol=1e-6)
    assert gains.abs().min() > 0  # every step moves the reward
    adv, m = t.step_advantages(0, rollout, sampler, steps, cond)
    assert adv.shape == (6, K) and m["completions"] == 3 * 6
    assert m["gain/sum_mean"] == pytest.approx(float((final - start).mean()), abs=1e-6)
    for k in steps:
        assert m[f"gain/step_{k}"] == pytest.approx(float(gains[:, k].mean()), abs=1e-7)
    # only the trained steps' latents are completed; the other columns are NaN gains, zero advantages
    cols, _, _ = t.completion_scores(rollout, [1, 2], cond, sampler)
    assert step_gains({K: final, 1: cols["brightness"][:, 0], 2: cols["brightness"][:, 1]}, [1, 2])[:, 0].isnan().all()
    with pytest.raises(ValueError, match=r"no completion rewards of latent indices \[0\]"):
        step_gains({K: final, 1: final, 2: final}, [0, 1])


def _fixed_step_advantages(tmp_path, *overrides):
    """step_advantages on fixed completion rewards: R(x_0), R(x_1) and the final R (K = 2), two groups."""
    t = trainer(tmp_path, "sampler.num_steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2", *overrides,
                rewards=[CallableReward(brightness, name="r")])
    r0, r1, r2 = [1.0, 2.0, 0.0, 0.0], [2.0, 2.0, 1.0, 3.0], [2.5, 3.0, 1.0, 2.0]
    group_ids = torch.tensor([0, 0, 1, 1])
    t.score_samples = lambda rollout: ({"r": torch.tensor(r2)}, torch.ones(4, dtype=torch.bool), group_ids, [], {})
    t.completion_scores = lambda rollout, idx, cond, sampler: (
        {"r": torch.tensor([r0, r1]).T[:, idx]}, torch.ones(4, len(idx), dtype=torch.bool), [])

    class FakeRollout:
        num_steps, batch_size, stochastic = 2, 4, torch.tensor([True, True])

    return t.step_advantages(0, FakeRollout(), t.step_sampler(0), [0, 1], None)


def test_per_step_advantages_against_hand_values(tmp_path):
    # gains: step 0 = r1 - r0 = [1, 0, 1, 3]; step 1 = r2 - r1 = [0.5, 1, 0, -1]
    adv, m = _fixed_step_advantages(tmp_path, "grpo.adv_eps=0")
    # per group and step: (g - mean) / std  ->  group 0: [1, 0] -> [1, -1]; group 1: [1, 3] -> [-1, 1] ...
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0], [-1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]))
    assert m["gain/step_0"] == pytest.approx(1.25) and m["gain/step_1"] == pytest.approx(0.125)
    assert m["gain/sum_mean"] == pytest.approx(1.375)  # = mean(final - R(x_0)) = mean([1.5, 1, 1, 2])
    (tmp_path / "b").mkdir()
    adv, _ = _fixed_step_advantages(tmp_path / "b", "grpo.adv_std=none", "grpo.adv_clip=0.4")
    # centred gains, clipped to 0.4: step 0 [-.5 +.5 | -1 +1] -> clip; step 1 [-.25 +.25 | +.5 -.5] -> clip
    torch.testing.assert_close(adv, torch.tensor([[0.4, -0.25], [-0.4, 0.25], [-0.4, 0.4], [0.4, -0.4]]))
    (tmp_path / "c").mkdir()
    adv, _ = _fixed_step_advantages(tmp_path / "c", "grpo.adv_std=global", "grpo.adv_eps=0", "grpo.adv_clip=null")
    s0, s1 = torch.tensor([1.0, 0, 1, 3]).std(unbiased=False), torch.tensor([0.5, 1, 0, -1]).std(unbiased=False)
    torch.testing.assert_close(adv, torch.stack([torch.tensor([0.5, -0.5, -1, 1]) / s0, torch.tensor([-0.25, 0.25, 0.5, -0.5]) / s1], 1))


# ----------------------------------------------------------------------------- calibration rule
def test_calibration_rule_against_hand_values():
    cfg = DenseGRPOConfig(calibration_rate=0.1, stats_decay=0.0, low_spread=0.5, high_spread=2.0, drop_tolerance=1.0)
    cal = NoiseCalibrator(4, cfg)
    group_ids = torch.tensor([0, 0, 1, 1])
    gains = torch.tensor([
        # step 0: group stds 0.1, 0.3 -> spread 0.2, mean 0             -> within [0.5 T, 2 T]: kept
        # step 1: group stds 0, 0.01 -> spread 0.005, mean 0            -> below 0.5 T: raised
        # step 2: group stds 0.1, 0.1 -> spread 0.1, mean -1.05 < -0.1  -> reward drops: lowered
        # step 3: not trained (never read)
        [0.1, 0.0, -1.0, 9.0], [-0.1, 0.0, -1.2, 9.0], [0.3, 0.01, -0.9, 9.0], [-0.3, -0.01, -1.1, 9.0]])
    valid = torch.ones(4, 4, dtype=torch.bool)
    changes = cal.update(gains, valid, group_ids, [0, 1, 2])
    assert changes == {0: 0, 1: 1, 2: -1}  # target T = mean(0.2, 0.005, 0.1) = 0.10167
    torch.testing.assert_close(cal.spread, torch.tensor([0.2, 0.005, 0.1, 0.0], dtype=torch.float64))
    torch.testing.assert_close(cal.mean_gain, torch.tensor([0.0, 0.0, -1.05, 0.0], dtype=torch.float64))
    torch.testing.assert_close(cal.multipliers, torch.tensor([1.0, 1.1, 1 / 1.1, 1.0], dtype=torch.float64))
    assert cal.levels([0.7, 0.7, 0.7, 0.5]) == pytest.approx([0.7, 0.77, 0.7 / 1.1, 0.5])

    # EMA (decay 0.5) of the statistics; a step seen for the first time takes its value as is
    cal.cfg = DenseGRPOConfig(calibration_rate=0.1, stats_decay=0.5, max_multiplier=1.15)
    gains2 = gains.clone()
    gains2[:, 0] = torch.tensor([0.5, -0.5, 0.5, -0.5])  # spread 0.5 -> EMA 0.35 > 2 T (T = (0.35 + 0.005 + 0.1) / 3)
    changes = cal.update(gains2, valid, group_ids, [0, 1, 2])
    torch.testing.assert_close(cal.spread[:3], torch.tensor([0.35, 0.005, 0.1], dtype=torch.float64))
    assert changes == {0: -1, 1: 1, 2: -1}
    torch.testing.assert_close(cal.multipliers, torch.tensor([1 / 1.1, 1.15, 1 / 1.21, 1.0], dtype=torch.float64))  # capped at 1.15

    # an absolute target; invalid rows and groups with fewer than two valid gains are left out
    cal = NoiseCalibrator(2, DenseGRPOConfig(target_spread=1.0, stats_decay=0.0, calibration_rate=0.5, min_multiplier=0.5))
    g = torch.tensor([[0.0, 1.0], [3.0, -1.0], [5.0, 100.0], [0.0, 0.0]])
    ok = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    changes = cal.update(g, ok, torch.tensor([0, 0, 1, 1]), [0, 1])
    # step 0: stds 1.5, 2.5 -> spread 2 (in [0.5, 2]): kept; step 1: only group 0 -> spread 1, mean (1 - 1 + 0) / 3 = 0
    assert changes == {0: 0, 1: 0} and cal.spread.tolist() == [2.0, 1.0]
    g2 = g * torch.tensor([3.0, 0.1])  # step 0: spread 6 > 2 T -> lowered; step 1: spread 0.1 < 0.5 T -> raised
    changes = cal.update(g2, ok, torch.tensor([0, 0, 1, 1]), [0, 1])
    assert changes == {0: -1, 1: 1} and cal.multipliers.tolist() == pytest.approx([1 / 1.5, 1.5])
    # the lower bound holds
    for _ in range(5):
        cal.update(g * 3, ok, torch.tensor([0, 0, 1, 1]), [0])
    assert cal.multipliers[0] == 0.5
    # a step whose gains never differ (T = 0) is kept; a single group of one sample says nothing
    cal = NoiseCalibrator(1, DenseGRPOConfig(stats_decay=0.0))
    assert cal.update(torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool), torch.tensor([0, 0]), [0]) == {0: 0}
    assert cal.update(torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.tensor([0]), [0]) == {}


def test_calibration_errors():
    cal = NoiseCalibrator(3, DenseGRPOConfig())
    with pytest.raises(ValueError, match=r"gains must have shape \(B, 3\)"):
        cal.update(torch.zeros(4, 2), torch.ones(4, 2, dtype=torch.bool), torch.zeros(4, dtype=torch.long), [0])
    with pytest.raises(ValueError, match="step 5 out of range"):
        cal.update(torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, dtype=torch.long), [5])
    with pytest.raises(ValueError, match="non-finite gain statistics at step 0"):
        cal.update(torch.full((2, 3), float("nan")), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, dtype=torch.long), [0])
    with pytest.raises(ValueError, match="has 2 steps, this run samples 3"):
        cal.load_state_dict(NoiseCalibrator(2, DenseGRPOConfig()).state_dict())
    with pytest.raises(ValueError, match="3 base noise levels for 2"):
        NoiseCalibrator(2, DenseGRPOConfig()).levels([0.7] * 3)


# ----------------------------------------------------------------------------- training
def test_first_inner_step_ratio_is_exactly_one_with_calibrated_levels(tmp_path):
    t = trainer(tmp_path, "grpo.group_size=4", "grpo.num_minibatches=2", "sampler.micro_batch=2", "sampler.guidance_scale=3.0")
    t.calibrator.multipliers = torch.tensor([1.3, 0.6, 1.0], dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in t.named_trainable}
    m = t.fit()[0]
    assert m["first_ratio_max_dev"] == 0.0 and m["kl"] >= 0
    assert [m[f"noise/step_{k}"] for k in range(3)] == pytest.approx([0.91, 0.42, 0.7])
    assert m["timesteps"] == 3 and m["completions"] == 3 * 8 and m["updates"] == 2
    assert all(math.isfinite(v) for k, v in m.items() if isinstance(v, float) and not k.startswith("gain"))
    assert m["calibration/raised"] + m["calibration/lowered"] <= 3
    changed = [n for n, p in t.named_trainable if not torch.equal(before[n], p.detach())]
    assert changed and all("lora" in n for n in changed)


def test_dense_grpo_raises_the_reward_on_held_out_seeds(tmp_path):
    """Five DenseGRPO steps push the mean colour towards blue on held-out seeds (ODE eval) by more than
    the baseline's spread; the same run with the reward's sign flipped ends up clearly lower."""
    common = ["optim.lr=0.1", "max_steps=5", "grpo.group_size=8", "sampler.micro_batch=null", "grpo.clip_range=0.2",
              "grpo.beta=0.01", "dense.completion_steps=1", "eval.seeds=[100, 101, 102, 103]", "eval.max_prompts=2"]

    def make(sign, rewards):
        (tmp_path / str(sign)).mkdir()
        return trainer(tmp_path / str(sign), *common, rewards)

    moved = sign_flipped_reward_shift(make, 5)
    assert moved[1.0] > 1.5, moved
    assert moved[1.0] - moved[-1.0] > 3.0, moved


def test_resume_is_exact_with_the_calibration_state(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    overrides = ["max_steps=3", "checkpoint.every=2", "checkpoint.keep_last=0", "dense.calibration_rate=0.3",
                 "dense.stats_decay=0.5", "grpo.timestep_fraction=0.67", "dense.low_spread=0.99", "dense.high_spread=1.01"]
    run_a = trainer(a_dir, *overrides)
    hist_a = run_a.fit()
    ckpt = a_dir / "run/checkpoints/step_00000002"
    saved = torch.load(ckpt / "extra_state.pt", weights_only=True)["noise_calibration"]
    assert saved["multipliers"].tolist() != [1.0, 1.0, 1.0]  # the calibration moved and was saved
    run_b = trainer(b_dir, *overrides, f"resume={ckpt}")
    assert run_b.step == 2
    for key, value in saved.items():
        assert torch.equal(getattr(run_b.calibrator, key), value), key
    hist_b = run_b.fit()
    for key in ("loss", "policy_loss", "kl", "grad_norm", "advantage/abs_mean", "gain/sum_mean",
                "noise/step_0", "noise/step_1", "noise/step_2", "reward/mean_color_match/mean"):
        assert hist_b[0][key] == hist_a[2][key], key  # bit-exact
    assert all(torch.equal(x, y) for x, y in zip(run_a.calibrator.state_dict().values(), run_b.calibrator.state_dict().values()))
    for (n, p), (_, q) in zip(run_a.named_trainable, run_b.named_trainable):
        assert torch.equal(p, q), n
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="holds a noise calibration but dense.calibrate is false"):
        trainer(tmp_path / "c", *overrides, "dense.calibrate=false", f"resume={ckpt}")


# ----------------------------------------------------------------------------- configs and errors
def test_shipped_recipes_validate():
    union = config_kinds()["train"]
    for name in ("train_dense_grpo_embedded.yaml", "train_dense_grpo_sd35.yaml"):
        cfg = load_train_config(ROOT / "configs" / name)
        assert cfg.algorithm == "dense_grpo" and cfg.rewards and cfg.dense.calibrate, name
        load_config(union, ROOT / "configs" / name)
    emb = load_train_config(ROOT / "configs/train_dense_grpo_embedded.yaml")
    assert emb.model.name == "assets/shapeworld-sd3" and emb.rewards[0].name == "shapeeval" and emb.model.device == "auto"
    sd35 = load_train_config(ROOT / "configs/train_dense_grpo_sd35.yaml")
    assert sd35.model.name == "stabilityai/stable-diffusion-3.5-medium" and sd35.sampler.method == "flow_grpo"


@pytest.mark.parametrize("override, message", [
    ("dense.completion_steps=0", "completion_steps must be >= 1 or null"),
    ("dense.calibration_rate=0", "calibration_rate must be > 0"),
    ("dense.stats_decay=1", r"stats_decay must be in \[0, 1\)"),
    ("dense.low_spread=3", "need 0 < low_spread < high_spread"),
    ("dense.max_multiplier=0.5", "need 0 < min_multiplier <= 1 <= max_multiplier"),
    ("dense.target_spread=0", "target_spread must be > 0 or null"),
    ("dense.drop_tolerance=-1", "drop_tolerance must be >= 0"),
    (("algorithm=grpo", "dense.completion_steps=1"), r"unknown config key\(s\) dense"),
    ("sampler.method=ode", "GRPO needs a stochastic sampler"),
    ("sampler.noise_levels=[0.7, 0.7]", "noise_levels has 2 values for num_steps=3"),
])
def test_config_errors_name_the_problem(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, *([override] if isinstance(override, str) else override))


def test_evaluation_sampler_and_per_step_levels(tmp_path):
    t = trainer(tmp_path, "sampler.noise_levels=[0.5, 0.6, 0.7]", "eval.num_steps=5")
    ev = t.eval_sampler()  # ODE evaluation: no per-step levels, any number of steps
    assert ev.method == "ode" and ev.noise_levels is None and ev.num_steps == 5
    assert t.base_noise == [0.5, 0.6, 0.7]
    t.calibrator.multipliers = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    assert t.step_sampler(0).noise_levels == pytest.approx([1.0, 0.6, 0.35])
    (tmp_path / "t").mkdir()
    t = trainer(tmp_path / "t", "sampler.noise_levels=[0.5, 0.6, 0.7]", "eval.method=train")
    t.calibrator.multipliers = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    assert t.eval_sampler().noise_levels == pytest.approx([1.0, 0.6, 0.35])  # the exploration being trained
    with pytest.raises(ConfigError, match="eval.num_steps 5 differs from sampler.num_steps 3"):
        config(tmp_path, "sampler.noise_levels=[0.5, 0.6, 0.7]", "eval.method=train", "eval.num_steps=5")
    with pytest.raises(ConfigError, match="eval.method train samples with the calibrated noise levels"):
        config(tmp_path, "eval.method=train", "eval.num_steps=5")


def test_other_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="ddpm sampler has no noise level to calibrate"):
        config(tmp_path, "model.name=tiny:sd", "sampler.method=ddpm")
    with pytest.raises(ConfigError, match="cps noise levels must stay <= 1"):
        config(tmp_path, "sampler.method=cps", "sampler.noise_level=0.7")
    config(tmp_path, "sampler.method=cps", "sampler.noise_level=0.4")  # 0.4 x 2 <= 1
    config(tmp_path, "model.name=tiny:sd", "sampler.method=ddpm", "dense.calibrate=false")

    def half_broken(x, prompts):  # NaN on dark images: some completions cannot be scored
        s = x.mean(dim=(1, 2, 3)).clone()
        s[0] = float("nan")
        return s

    broken = CallableReward(half_broken, name="broken")
    with pytest.raises(ValueError, match="not scored by a trained reward.*broken produced a non-finite score"):
        trainer(tmp_path, rewards=[broken]).fit()
    (tmp_path / "z").mkdir()
    m = trainer(tmp_path / "z", "grpo.on_invalid_reward=zero_advantage", rewards=[broken]).fit()[0]
    assert math.isfinite(m["loss"]) and m["reward/broken/invalid"] == 1

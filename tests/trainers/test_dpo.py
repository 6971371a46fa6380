"""DPO trainers on the tiny pipelines: the assembled Diffusion-DPO / Flow-DPO loss against a hand
computation, offline training (flow and diffusion, LoRA and full finetuning) with loss = log 2 at the
first step, online D3PO / Diffusion-DPO, clear errors on bad preference data, exact resume, the reward
rising on held-out seeds (offline on the shipped ShapeWorld model, online on the tiny SD3), and the
pair-set builder with its CLI."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mmalign.config import ConfigError
from mmalign.media import save_image
from mmalign.rewards import CallableReward
from mmalign.rewards.judge import PreferenceDataError, load_preferences
from mmalign.samplers import log_prob
from mmalign.trainers import load_train_config
from mmalign.trainers.dpo import DPOTrainer, build_pairs, main, resize_center_crop

ROOT = Path(__file__).resolve().parents[2]
LOG2 = math.log(2.0)
PROMPTS = ["a red circle", "two blue squares", "three green triangles", "a yellow star"]
OFFLINE = {
    "algorithm": "dpo",
    "model": {"name": "tiny:sd3", "device": "cpu"},
    "lora": {"rank": 4},
    "optim": {"lr": 0.01},
    "sampler": {"method": "flow_grpo", "num_steps": 3, "guidance_scale": 1.0, "record_x0": False, "micro_batch": 1},
    "dpo": {"mode": "offline", "pairs_per_step": 2, "beta": 200.0},
    "max_steps": 1,
    "threads": 1,
    "checkpoint": {"save_final": False},
    "logging": {"stdout": False},
    "eval": {"every": 0},
}
ONLINE = {
    **OFFLINE,
    "prompts": {"prompts": PROMPTS},
    "rewards": [{"name": "tiny:verifiable", "metadata": {"target_color": [1.0, 0.0, 0.0]}}],
    "dpo": {"mode": "online", "prompts_per_step": 2, "group_size": 2},
}


def redness(x, prompts):
    return x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2))


def write_pairs(root: Path, n: int = 4, size: int = 32, swap: bool = False, extra: list | None = None) -> Path:
    """``n`` pairs of textured images, chosen = red and rejected = blue (``swap``: the other way round)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        tex = 0.15 * torch.rand(3, size, size, generator=g)
        red, blue = tex.clone(), tex.clone()
        red[0] += 0.8
        blue[2] += 0.8
        save_image(red.clamp(0, 1), root / f"img/{i}_red.png")
        save_image(blue.clamp(0, 1), root / f"img/{i}_blue.png")
        chosen, rejected = (f"img/{i}_blue.png", f"img/{i}_red.png") if swap else (f"img/{i}_red.png", f"img/{i}_blue.png")
        lines.append({"prompt": PROMPTS[i % len(PROMPTS)], "chosen": chosen, "rejected": rejected})
    lines += extra or []
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def config(tmp_path, base, *overrides):
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(base))
    return load_train_config(f, [f"out={tmp_path / 'run'}", *overrides])


def trainer(tmp_path, base, *overrides, **kwargs):
    return DPOTrainer(config(tmp_path, base, *overrides), log=lambda s: None, **kwargs)


def offline(tmp_path, *overrides, **kwargs):
    data = write_pairs(tmp_path / "data")
    return trainer(tmp_path, OFFLINE, f"dpo.data={data}", *overrides, **kwargs)


# ----------------------------------------------------------------------------- the assembled loss
@pytest.mark.parametrize("model", ["tiny:sd3", "tiny:sd"])
def test_assembled_loss_matches_a_hand_computation(tmp_path, model):
    """Noised latents / targets on hand numbers; then, after one update (policy != reference), the
    trainer's Diffusion-DPO loss of two pairs equals -log sigmoid(-beta/2 [(e_w - e_ref_w) - (e_l -
    e_ref_l)]) computed here from scratch: x_t and the target by the formulas, the denoiser called per
    image, the reference with LoRA disabled."""
    t = offline(tmp_path, f"model.name={model}", "optim.lr=0.05")
    ad, flow = t.adapter, model == "tiny:sd3"
    # x_t and targets: x0 = 1, noise = 2
    x0, noise = torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)
    xt, target, ts = t.noisy_latents(x0, noise, torch.tensor([7]))
    if flow:
        s = float(ad.schedule(1000).sigmas[7])
        assert torch.allclose(xt, torch.full_like(x0, (1 - s) * 1 + s * 2)) and torch.equal(target, torch.ones_like(x0))  # v = noise - x0
        assert float(ts[0]) == float(ad.schedule(1000).timesteps[7])
    else:
        a = float(ad.pipeline.scheduler.alphas_cumprod[7])
        assert torch.allclose(xt, torch.full_like(x0, math.sqrt(a) + 2 * math.sqrt(1 - a))) and torch.equal(target, noise)
        assert int(ts[0]) == 7

    t.fit()
    positions = [2, 3]
    indices = [t.data.index_at(p) for p in positions]
    x0_w, x0_l = t.pair_latents(indices, positions)
    prompts = [t.data.pairs[i].prompt for i in indices]
    keys = [("offline", p) for p in positions]
    loss, stats = t.diffusion_dpo_chunk(x0_w, x0_l, prompts, keys)

    beta, insides = t.beta, []
    with torch.no_grad():
        for j, key in enumerate(keys):
            z, idx = t.draw_noise_and_timestep(x0_w.shape[1:], key)
            cond = ad.encode_prompts([prompts[j]], guidance_scale=1.0)
            errs = {}
            for name, x in (("w", x0_w[j:j + 1]), ("l", x0_l[j:j + 1])):
                if flow:
                    s = ad.schedule(1000).sigmas[idx]
                    x_t, tgt, tt = (1 - s) * x + s * z, z - x, ad.schedule(1000).timesteps[idx]
                else:
                    a = ad.pipeline.scheduler.alphas_cumprod[idx]
                    x_t, tgt, tt = a.sqrt() * x + (1 - a).sqrt() * z, z, torch.tensor(idx)
                errs[name] = float(((ad.denoise(x_t, tt, cond) - tgt) ** 2).mean())
                with ad.disable_lora():
                    errs["ref_" + name] = float(((ad.denoise(x_t, tt, cond) - tgt) ** 2).mean())
            insides.append(-beta / 2 * ((errs["w"] - errs["ref_w"]) - (errs["l"] - errs["ref_l"])))
    hand = sum(math.log1p(math.exp(-v)) for v in insides) / len(insides)  # -log sigmoid(v) = log(1 + e^-v)
    # float32 errors (~1) differ in the 7th digit between batchings; beta/2 magnifies that to ~1e-5
    assert float(loss.detach()) == pytest.approx(hand, abs=1e-4)
    assert stats["implicit_reward_margin"] == pytest.approx(sum(insides) / 2, abs=1e-4)
    assert stats["implicit_acc"] == sum((v > 0) + 0.5 * (v == 0) for v in insides) / 2
    assert any(abs(v) > 1e-3 for v in insides)  # the update moved the policy off the reference


# ----------------------------------------------------------------------------- offline training
@pytest.mark.parametrize("overrides", [
    [],  # Flow-DPO: tiny SD3, velocity target
    ["model.name=tiny:sd", "sampler.method=ddim", "dpo.timestep_sampling=logit_normal", "dpo.random_flip=true",
     "gradient_accumulation_steps=2"],  # Diffusion-DPO: tiny SD1.5, epsilon target
    ["lora.enabled=false", "optim.lr=0.001"],  # full finetuning: the reference is a frozen copy
])
def test_offline_training_starts_at_log2_and_moves_only_trained_weights(tmp_path, overrides):
    t = offline(tmp_path, "max_steps=2", *overrides)
    before = {n: p.detach().clone() for n, p in t.named_trainable}
    hist = t.fit()
    first = hist[0]
    assert first["loss"] == pytest.approx(LOG2, abs=1e-7)  # LoRA B = 0 / copied weights: the policy is the reference
    assert first["model_err_chosen"] == first["ref_err_chosen"] and first["model_err_rejected"] == first["ref_err_rejected"]
    assert first["implicit_acc"] == 0.5 and first["implicit_reward_margin"] == 0.0
    assert first["pairs"] == 2 and first["grad_norm"] > 0 and first["beta"] == 200.0
    for h in hist:
        assert all(math.isfinite(h[k]) for k in ("loss", "implicit_acc", "implicit_reward_margin", "grad_norm", "lr"))
    assert hist[1]["ref_err_chosen"] != hist[1]["model_err_chosen"]  # the policy moved away from the reference
    changed = [n for n, p in t.named_trainable if not torch.equal(before[n], p.detach())]
    assert changed and all(torch.isfinite(p).all() for p in t.trainable_params)
    if t.cfg.lora.enabled:
        assert all("lora" in n for n in changed)
        assert any("lora" in n for n, _ in t.adapter.denoiser.named_parameters())
    else:  # the reference stays the initial weights
        with t.reference():
            assert all(torch.equal(p, before[n]) for n, p in t.named_trainable)


def test_default_beta_follows_the_model_kind(tmp_path):
    assert offline(tmp_path, "dpo.beta=null").beta == 100.0  # flow: velocity-MSE scale
    (tmp_path / "sd").mkdir()
    assert offline(tmp_path / "sd", "dpo.beta=null", "model.name=tiny:sd", "sampler.method=ddim").beta == 5000.0
    assert trainer(tmp_path / "sd", ONLINE).beta == 0.1  # D3PO


def test_images_are_resized_and_centre_cropped():
    img = torch.zeros(1, 3, 20, 40)
    img[..., 10:30] = 1.0  # a bright centre band, half the width
    out = resize_center_crop(img, (16, 16))
    assert out.shape == (1, 3, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(out[..., 4:12].mean()) > 0.9  # the crop keeps the centre


# ----------------------------------------------------------------------------- online
@pytest.mark.parametrize("overrides", [
    [],  # D3PO, reference = the sampling-time policy
    ["dpo.d3po_reference=base", "dpo.d3po_clip_range=0.2", "model.name=tiny:sd", "sampler.method=ddim", "dpo.group_size=3"],
    ["dpo.online_objective=diffusion_dpo", "dpo.beta=50", "sampler.micro_batch=null"],
])
def test_online_pairs_from_own_samples(tmp_path, overrides):
    t = trainer(tmp_path, ONLINE, *overrides)
    before = {n: p.detach().clone() for n, p in t.named_trainable}
    m = t.fit()[0]
    assert m["pairs"] == 2 and m["skipped_groups"] == 0 and m["pair_reward_gap"] > 0
    assert m["loss"] == pytest.approx(LOG2, abs=1e-7) and m["implicit_acc"] == 0.5
    for key in ("reward/mean_color_match/mean", "reward/mean_color_match/std", "grad_norm", "lr", "implicit_reward_margin"):
        assert math.isfinite(m[key]), key
    if t.objective == "d3po":
        assert m["log_ratio_abs_max"] == 0.0  # recomputed step log-probs equal the recorded ones
    else:
        assert m["model_err_chosen"] == m["ref_err_chosen"]
    changed = [n for n, p in t.named_trainable if not torch.equal(before[n], p.detach())]
    assert changed and all("lora" in n for n in changed) and m["grad_norm"] > 0


def test_d3po_update_raises_the_chosen_steps_log_probs(tmp_path):
    """After one small D3PO update, the chosen transitions' log-probs rose relative to the rejected ones
    (on the same recorded trajectories), on average over pairs and steps and for most of them: the update
    descends the D3PO loss, whose gradient at pi = pi_ref is -beta/2 times that of the summed margins."""
    t = trainer(tmp_path, ONLINE, "optim.lr=0.001", "dpo.prompts_per_step=4")
    seen = {}
    real = t.d3po_chunk

    def spy(rollout, w_rows, l_rows, sampler, step, scale):
        seen.update(rollout=rollout, w=w_rows, l=l_rows, sampler=sampler)
        return real(rollout, w_rows, l_rows, sampler, step, scale)

    t.d3po_chunk = spy
    t.fit()
    sub = seen["rollout"].select(seen["w"] + seen["l"])
    n = len(seen["w"])
    with torch.no_grad():
        moved = log_prob(t.adapter, sub, None, config=seen["sampler"]).log_probs - sub.log_probs
    margin = moved[:n] - moved[n:]
    assert n == 4 and float(margin.mean()) > 0 and float((margin > 0).float().mean()) > 0.5, margin


def test_groups_without_a_reward_gap_are_skipped(tmp_path):
    flat = CallableReward(lambda x, p: torch.full((x.shape[0],), 0.5), name="flat")
    t = trainer(tmp_path, ONLINE, rewards=[flat])
    before = {n: p.detach().clone() for n, p in t.named_trainable}
    m = t.fit()[0]
    assert m["pairs"] == 0 and m["skipped_groups"] == 2 and "loss" not in m and m["grad_norm"] == 0.0
    assert all(torch.equal(before[n], p) for n, p in t.named_trainable)


def test_invalid_rewards_stop_online_training_or_are_left_out(tmp_path):
    def half_broken(x, prompts):
        s = redness(x, prompts).clone()
        s[0] = float("nan")
        return s

    broken = CallableReward(half_broken, name="broken")
    with pytest.raises(ValueError, match=r"1 of 4 samples were not scored.*broken"):
        trainer(tmp_path, ONLINE, rewards=[broken]).fit()
    (tmp_path / "skip").mkdir()
    m = trainer(tmp_path / "skip", ONLINE, "dpo.on_invalid_reward=skip", rewards=[broken]).fit()[0]
    assert m["reward/broken/invalid"] == 1 and m["pairs"] == 1 and m["skipped_groups"] == 1  # a group of one scored sample


# ----------------------------------------------------------------------------- errors
def test_bad_preference_data_gets_clear_errors(tmp_path):
    def make(name, lines=None, raw=None):
        d = tmp_path / name
        data = write_pairs(d, n=2)
        if raw is not None:
            data.write_text(raw)
        if lines is not None:
            data.write_text("".join(json.dumps(l) + "\n" for l in lines))
        return data

    with pytest.raises(FileNotFoundError, match="does not exist"):
        offline(tmp_path, f"dpo.data={tmp_path / 'nowhere.jsonl'}")
    ok = {"prompt": "a red circle", "chosen": "img/0_red.png", "rejected": "img/0_blue.png"}
    cases = [
        (make("missing", [ok, {**ok, "rejected": "img/gone.png"}]), r"pairs.jsonl:2: rejected file .*gone.png.* does not exist"),
        (make("empty", raw=""), "holds no preference pairs"),
        (make("blank_prompt", [ok, {**ok, "prompt": "  "}]), r"pairs.jsonl:2: empty prompt"),
        (make("ties", [{**ok, "tie": True}]), "all 1 pairs are labelled tie"),
        (make("not_json", raw=json.dumps(ok) + "\n{oops\n"), r"pairs.jsonl:2: not valid JSON"),
    ]
    corrupt = make("corrupt")
    (corrupt.parent / "img/1_blue.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    cases.append((corrupt, r"pairs.jsonl:2 \(rejected\): cannot read image .*1_blue.png"))
    for path, message in cases:
        with pytest.raises(PreferenceDataError, match=message):
            offline(tmp_path, f"dpo.data={path}")


@pytest.mark.parametrize("base, overrides, message", [
    (OFFLINE, [], "dpo.data: offline DPO needs a preference set"),
    (OFFLINE, ["dpo.data=x.jsonl", "dpo.pairs_per_step=3", "gradient_accumulation_steps=2"], "multiple of gradient_accumulation_steps"),
    (ONLINE, ["sampler.method=ode"], "D3PO trains on the log-probs of stochastic steps"),
    (ONLINE, ["sampler.group_size=2"], "set the group size in dpo.group_size"),
    (ONLINE, ["dpo.group_size=1"], "group_size must be >= 2"),
    (ONLINE, ["dpo.beta=0"], "beta must be > 0"),
    (ONLINE, ["dpo.mode=both"], "dpo.mode"),
])
def test_config_errors(tmp_path, base, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, base, *overrides)


def test_online_needs_a_trained_reward(tmp_path):
    with pytest.raises(ValueError, match="online DPO ranks samples by a trained reward"):
        trainer(tmp_path, ONLINE, "rewards=[]")


def test_ode_sampler_is_fine_for_online_diffusion_dpo(tmp_path):
    cfg = config(tmp_path, ONLINE, "sampler.method=ode", "dpo.online_objective=diffusion_dpo")
    assert cfg.dpo.online_objective == "diffusion_dpo"


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("base, overrides", [
    (OFFLINE, ["dpo.random_flip=true", "dpo.timestep_sampling=logit_normal", "ema.enabled=true"]),
    (ONLINE, ["dpo.timestep_fraction=0.5", "sampler.num_steps=4"]),
])
def test_resume_is_exact(tmp_path, base, overrides):
    """Two steps in one run == one step, checkpoint, resume, one step: same loss, bit for bit."""
    if base is OFFLINE:
        overrides = [f"dpo.data={write_pairs(tmp_path / 'data', n=3)}", *overrides]  # 2 per step over 3 pairs: epochs turn over
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = trainer(tmp_path / "a", base, "max_steps=2", *overrides)
    hist = straight.fit()
    first = trainer(tmp_path / "b", base, "max_steps=1", "checkpoint.save_final=true", *overrides)
    first.fit()
    resumed = trainer(tmp_path / "b", base, "max_steps=2", "resume=latest", *overrides)
    assert resumed.step == 1
    again = resumed.fit()
    assert len(again) == 1
    for key in ("loss", "grad_norm", "implicit_reward_margin"):
        assert again[0][key] == hist[1][key], key
    for (n, p), (_, q) in zip(straight.named_trainable, resumed.named_trainable):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- the reward rises
@pytest.mark.slow
def test_offline_dpo_on_red_vs_blue_pairs_makes_new_samples_redder(tmp_path):
    """Two Flow-DPO steps on the shipped ShapeWorld SD3 (its VAE keeps colours) with red images chosen
    over blue ones make held-out samples (deterministic ODE, unseen seeds) redder, by more than the
    baseline's spread; with blue chosen instead they end up bluer."""
    common = ["model.name=assets/shapeworld-sd3", "max_steps=2", "optim.lr=0.01", "dpo.beta=100", "sampler.num_steps=4",
              "eval.seeds=[100, 101, 102]", "eval.prompts=[a circle, a square]"]
    moved = {}
    for swap in (False, True):
        d = tmp_path / str(swap)
        data = write_pairs(d / "data", swap=swap)
        t = trainer(d, OFFLINE, f"dpo.data={data}", *common, held_out_rewards=[CallableReward(redness, name="redness")])
        base = t.evaluate(0)
        hist = t.fit()
        after = t.evaluate(2)
        assert all(math.isfinite(h["loss"]) for h in hist) and hist[-1]["implicit_acc"] > 0.5
        moved[swap] = (after["eval/redness/mean"] - base["eval/redness/mean"]) / base["eval/redness/std"]
    assert moved[False] > 2.0, moved  # red chosen: redder
    assert moved[True] < -1.0, moved  # blue chosen: bluer


@pytest.mark.slow
def test_online_d3po_raises_the_reward_on_held_out_seeds(tmp_path):
    """Four D3PO steps with redness as the reward make held-out samples redder than four steps with its
    negation (in units of the baseline's spread): a sign error, or no learning, fails."""
    common = ["max_steps=4", "optim.lr=0.1", "dpo.group_size=8", "sampler.num_steps=4", "sampler.micro_batch=null",
              "eval.seeds=[100, 101, 102]", "eval.prompts=[a circle, a square]"]
    after, spread = {}, None
    for sign in (1.0, -1.0):
        d = tmp_path / str(sign)
        d.mkdir()
        reward = CallableReward(lambda x, p, s=sign: s * redness(x, p), name="signed_redness")
        t = trainer(d, ONLINE, *common, rewards=[reward], held_out_rewards=[CallableReward(redness, name="redness")])
        base = t.evaluate(0)
        spread = base["eval/redness/std"]
        hist = t.fit()
        assert all(math.isfinite(h["loss"]) and h["pairs"] > 0 for h in hist)
        after[sign] = t.evaluate(4)["eval/redness/mean"]
        if sign > 0:
            assert after[sign] > base["eval/redness/mean"] + 2 * spread
    assert (after[1.0] - after[-1.0]) / spread > 3.0, after


# ----------------------------------------------------------------------------- building pairs
def test_build_pairs_writes_a_set_the_trainer_reads(tmp_path):
    from mmalign.loading import load_model
    from mmalign.samplers import SamplerConfig

    adapter = load_model("tiny:sd3")
    bright = CallableReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="brightness")
    dark = CallableReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="darkness", higher_is_better=False)
    sampler = SamplerConfig(method="ode", num_steps=2, guidance_scale=1.0)
    report = build_pairs(adapter, bright, [("color", "a red circle"), "a square", "a star"], tmp_path / "pairs",
                         samples_per_prompt=3, sampler=sampler, log=lambda s: None)
    assert report["pairs"] == 3 and report["mean_gap"] > 0
    data = load_preferences(report["path"])
    assert [p.prompt for p in data] == ["a red circle", "a square", "a star"] and data.pairs[0].category == "color"
    assert all(p.meta["chosen_score"] > p.meta["rejected_score"] for p in data)
    low = build_pairs(adapter, dark, ["a red circle"], tmp_path / "low", samples_per_prompt=3, sampler=sampler, log=lambda s: None)
    line = json.loads(Path(low["path"]).read_text())
    assert line["chosen_score"] < line["rejected_score"]  # lower is better: the darker sample is chosen
    tie = build_pairs(adapter, CallableReward(lambda x, p: torch.zeros(x.shape[0]), name="flat"), ["a"], tmp_path / "tie",
                      samples_per_prompt=2, sampler=sampler, log=lambda s: None)
    assert tie["pairs"] == 0 and tie["skipped_ties"] == 1
    m = trainer(tmp_path, OFFLINE, f"dpo.data={report['path']}").fit()[0]
    assert m["loss"] == pytest.approx(LOG2, abs=1e-7)


def test_make_pairs_cli(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("shapes\ta circle\nshapes\ta square\n")
    code = main(["make-pairs", "--model", "tiny:sd3", "--reward", "tiny:jpeg_size", "--prompts", str(prompts), "--out",
                 str(tmp_path / "out"), "--samples", "2", "--num-steps", "2", "--guidance-scale", "1", "--threads", "1"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 2 and report["pairs"] + report["skipped_ties"] == 2
    assert len(load_preferences(tmp_path / "out/pairs.jsonl")) == report["pairs"] or report["pairs"] == 0
    assert main(["make-pairs", "--model", "tiny:sd3", "--reward", "tiny:jpeg_size", "--prompts", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shipped recipes
def test_shipped_dpo_recipes_load_and_validate():
    from mmalign.cli import config_kinds
    from mmalign.config import load_config

    emb = load_train_config(ROOT / "configs/train_dpo_embedded.yaml")
    assert (emb.algorithm, emb.dpo.mode, emb.dpo.online_objective, emb.model.name) == ("dpo", "online", "d3po", "assets/shapeworld-sd3")
    assert emb.rewards[0].name == "shapeeval" and emb.prompts.file == "assets/prompts/shapeworld_train.txt"
    sd35 = load_train_config(ROOT / "configs/train_dpo_sd35.yaml")
    assert (sd35.dpo.mode, sd35.model.name, sd35.mixed_precision) == ("offline", "stabilityai/stable-diffusion-3.5-medium", "bf16")
    assert sd35.dpo.data and sd35.lora.enabled
    for f in ("train_dpo_embedded.yaml", "train_dpo_sd35.yaml"):
        load_config(config_kinds()["train"], ROOT / "configs" / f)

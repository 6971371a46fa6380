"""The shared training machinery: configs, optimizer pieces, checkpoints (atomic, exact resume),
reference policies, gradient checkpointing and data-parallel runs."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmalign.cli import config_kinds, main
from mmalign.registry import TRAINERS
from mmalign.config import ConfigError, load_config
from mmalign.trainers import common, load_train_config
from mmalign.trainers.common import EMA, OptimConfig, ParamGroupConfig, build_optimizer, lr_factor
from mmalign.trainers.grpo import GRPOTrainer

ROOT = Path(__file__).resolve().parents[2]

# a small GRPO run on the tiny SD3: 2 prompts x 2 samples, 2 flow_grpo steps, KL on, no eval
TINY = {
    "algorithm": "grpo",
    "model": {"name": "tiny:sd3", "device": "cpu"},
    "lora": {"rank": 2},
    "optim": {"lr": 0.01},
    "sampler": {"method": "flow_grpo", "num_steps": 2, "guidance_scale": 1.0, "record_x0": False, "micro_batch": 1},
    "prompts": {"prompts": ["a red circle", "two blue squares", "three green triangles"]},
    "rewards": [{"name": "tiny:verifiable", "metadata": {"target_color": [1.0, 0.0, 0.0]}}],
    "grpo": {"prompts_per_step": 2, "group_size": 2, "clip_range": 0.2, "beta": 0.05},
    "max_steps": 1,
    "threads": 1,
    "logging": {"stdout": False},
    "eval": {"every": 0},
}


def tiny_config(tmp_path, *overrides, base=None):
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(base or TINY))
    return load_train_config(f, [f"out={tmp_path / 'run'}", *overrides])


def quiet(cfg, **kwargs):
    return GRPOTrainer(cfg, log=lambda s: None, **kwargs)


# ----------------------------------------------------------------------------- configs
def test_every_shipped_train_config_loads_and_validates():
    files = sorted((ROOT / "configs").glob("train_*.yaml")) + [ROOT / "configs" / "quickstart.yaml"]
    names = {f.name for f in files}
    assert {"train_grpo_tiny.yaml", "train_grpo_sd35.yaml", "train_grpo_flux.yaml", "train_grpo_wan.yaml",
            "train_grpo_audioldm.yaml", "train_grpo_embedded.yaml"} <= names
    union = config_kinds()["train"]
    for f in files:
        cfg = load_train_config(f)
        assert cfg.algorithm in TRAINERS.names(), f.name  # (offline DPO trains on pairs: no reward needed)
        load_config(union, f)  # the class test_core uses for every train_*.yaml
    sd35 = load_train_config(ROOT / "configs/train_grpo_sd35.yaml")
    assert (sd35.model.name, sd35.sampler.noise_level, sd35.sampler.num_steps, sd35.grpo.clip_range, sd35.grpo.beta) == \
        ("stabilityai/stable-diffusion-3.5-medium", 0.7, 10, 1e-4, 0.04)
    assert sd35.mixed_precision == "bf16" and sd35.lora.enabled and [r.name for r in sd35.held_out_rewards] == ["clipscore"]
    flux = load_train_config(ROOT / "configs/train_grpo_flux.yaml")
    assert (flux.sampler.method, flux.sampler.noise_level, flux.grpo.beta, flux.sampler.same_noise_in_group) == ("dance", 0.3, 0.0, True)
    assert flux.parallel == "fsdp" and load_train_config(ROOT / "configs/train_grpo_wan.yaml").parallel == "fsdp"
    emb = load_train_config(ROOT / "configs/train_grpo_embedded.yaml")
    assert emb.model.name == "assets/shapeworld-sd3" and emb.rewards[0].name == "shapeeval" and emb.held_out_rewards
    assert emb.prompts.file == "assets/prompts/shapeworld_train.txt"
    quick = load_train_config(ROOT / "configs/quickstart.yaml")  # the main job: GRPO on the embedded world
    assert quick.algorithm == "grpo" and quick.rewards[0].name == "shapeeval" and quick.lora.enabled
    assert quick.eval.prompts_file == "assets/prompts/shapeworld_heldout.txt" and quick.eval.max_prompts is None
    assert quick.eval.report_targets == {"eval/shapeeval:strict/mean": 1.0} and len(quick.eval.seeds) >= 2
    assert quick.max_minutes is not None and quick.max_minutes <= 15


@pytest.mark.parametrize("override, message", [
    ("grpo.clip_rang=0.1", r"unknown config key\(s\) grpo.clip_rang \(did you mean grpo.clip_range\?\)"),
    ("optim.lrr=1", r"optim.lrr \(did you mean optim.lr\?\)"),
    ("bogus=1", r"unknown config key\(s\) bogus"),
    ("algorithm=nope", "algorithm: unknown trainer 'nope'"),
    ("sampler.method=ode", "sampler.method: GRPO needs a stochastic sampler"),
    ("sampler.group_size=4", "set the group size in grpo.group_size"),
    ("grpo.group_size=3", "grpo.group_size 3 must be a multiple of sampler.micro_batch 2"),
    ("optim.param_groups=[{match: '('}]", "not a regular expression"),
    ("mixed_precision=fp8", r"mixed_precision: expected one of \['no', 'bf16', 'fp16'\]"),
    ("grpo.timestep_fraction=0", "timestep_fraction must be in"),
])
def test_bad_train_config_fails_naming_the_key(tmp_path, override, message):
    extra = ["sampler.micro_batch=2"] if "group_size=3" in override else []
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *extra, override)


def test_train_config_needs_an_algorithm(tmp_path):
    base = {k: v for k, v in TINY.items() if k != "algorithm"}
    with pytest.raises(ConfigError, match="missing required config key.*algorithm.*grpo"):
        tiny_config(tmp_path, base=base)


def test_train_cli_errors_are_messages(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(TINY))
    for argv, needle in [(["train"], "needs --config"),
                         (["train", "--config", str(f), "grpo.groupsize=2"], "grpo.groupsize (did you mean grpo.group_size?)"),
                         (["train", "--config", str(tmp_path / "none.yaml")], "does not exist")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    assert main(["train", "--config", str(f), "--show-config"]) == 0
    assert "grpo.clip_range" in capsys.readouterr().out


# ----------------------------------------------------------------------------- optimizer pieces
def test_lr_warmup_and_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=4)
    assert [lr_factor(u, cfg, 10) for u in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = OptimConfig(warmup_steps=2, schedule="linear", min_lr_ratio=0.1)
    assert lr_factor(2, lin, 12) == 1.0 and lr_factor(11, lin, 12) == pytest.approx(0.1)
    cos = OptimConfig(schedule="cosine")
    assert lr_factor(0, cos, 11) == 1.0 and lr_factor(5, cos, 11) == pytest.approx(0.5) and lr_factor(10, cos, 11) == pytest.approx(0.0)


def test_param_groups_get_their_own_lr_and_unmatched_patterns_fail():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    named = list(net.named_parameters())
    opt = build_optimizer(named, OptimConfig(lr=1e-3, param_groups=[ParamGroupConfig(match=r"^1\.", lr=1e-5, weight_decay=0.0)]))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups[r"^1\."]["lr"] == 1e-5 and groups[r"^1\."]["weight_decay"] == 0.0 and len(groups[r"^1\."]["params"]) == 2
    assert groups["default"]["lr"] == 1e-3 and len(groups["default"]["params"]) == 2
    with pytest.raises(ValueError, match=r"param_groups\[0\].match 'lora_X' matches no trainable parameter"):
        build_optimizer(named, OptimConfig(param_groups=[ParamGroupConfig(match="lora_X")]))


def test_ema_tracks_and_swaps_in_and_out():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.5)
    with torch.no_grad():
        p.fill_(4.0)
    ema.update([("w", p)])
    assert torch.equal(ema.shadow["w"], torch.full((3,), 2.0))
    with ema.swapped_in([("w", p)]):
        assert torch.equal(p.detach(), torch.full((3,), 2.0))
    assert torch.equal(p.detach(), torch.full((3,), 4.0))


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_write_is_atomic_a_crash_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = quiet(tiny_config(tmp_path, "max_steps=2", "checkpoint.save_final=false"))
    trainer.fit(1)
    first = trainer.save_checkpoint()
    ckpts = trainer.ckpt_dir
    assert (ckpts / "latest").read_text().strip() == first.name == "step_00000001"
    lora = load_file(str(first / "trained.safetensors"))
    assert lora and all("lora" in k for k in lora)  # LoRA weights only
    assert {"optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json"} <= {p.name for p in first.iterdir()}

    trainer.fit(2)
    calls = {"n": 0}
    real = common._fsync_file

    def crash_midway(path):  # the process dies after some files of the new checkpoint were written
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")
        real(path)

    monkeypatch.setattr(common, "_fsync_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.setattr(common, "_fsync_file", real)
    assert (ckpts / "latest").read_text().strip() == "step_00000001"
    assert not (ckpts / "step_00000002").exists() and (ckpts / ".tmp-step_00000002").exists()  # half-written, never "latest"

    fresh = quiet(tiny_config(tmp_path, "max_steps=2", f"resume={tmp_path / 'run'}"))
    assert fresh.step == 1
    for n, p in fresh.named_trainable:  # the step-1 weights, not the crashed step's
        assert torch.equal(p.detach(), lora[n])
    second = trainer.save_checkpoint()  # a successful save replaces the leftover temp dir
    assert (ckpts / "latest").read_text().strip() == second.name and not (ckpts / ".tmp-step_00000002").exists()


def test_resume_continues_exactly(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    overrides = ["max_steps=3", "checkpoint.every=2", "checkpoint.keep_last=0", "ema.enabled=true", "optim.warmup_steps=2",
                 "grpo.num_minibatches=2", "grpo.timestep_fraction=0.5"]
    run_a = quiet(tiny_config(a_dir, *overrides))
    hist_a = run_a.fit()
    assert (a_dir / "run/checkpoints/step_00000002/trainer_state.json").is_file()
    run_b = quiet(tiny_config(b_dir, *overrides, f"resume={a_dir / 'run/checkpoints/step_00000002'}"))
    assert run_b.step == 2 and run_b.updates == 4
    hist_b = run_b.fit()
    assert len(hist_b) == 1
    for key in ("loss", "policy_loss", "kl", "grad_norm", "lr", "reward/mean_color_match/mean", "ratio_mean"):
        assert hist_b[0][key] == hist_a[2][key], key  # bit-exact, not approximately
    for (n, p), (_, q) in zip(run_a.named_trainable, run_b.named_trainable):
        assert torch.equal(p, q), n
    assert all(torch.equal(run_a.ema.shadow[n], run_b.ema.shadow[n]) for n in run_a.ema.shadow)


def test_resume_latest_starts_fresh_when_there_is_no_checkpoint(tmp_path):
    t = quiet(tiny_config(tmp_path, "resume=latest"))
    assert t.step == 0
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        quiet(tiny_config(tmp_path, f"resume={tmp_path / 'nowhere'}"))


def test_a_fresh_run_in_a_used_directory_sets_the_old_metrics_aside(tmp_path):
    """A run from step 0 into a directory with an earlier run's metrics.jsonl keeps that file (renamed) and
    writes only its own rows, so its report's "before" is its own first evaluation; a resumed run appends."""
    import json

    def rows(path):
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    quiet(tiny_config(tmp_path, "max_steps=1", "checkpoint.every=1")).fit()
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = rows(metrics)
    quiet(tiny_config(tmp_path, "max_steps=1")).fit()
    assert (tmp_path / "run" / "metrics.previous-1.jsonl").is_file() and rows(tmp_path / "run" / "metrics.previous-1.jsonl") == first
    assert len([r for r in rows(metrics) if r.get("kind") == "train"]) == 1
    quiet(tiny_config(tmp_path, "max_steps=2", "resume=latest")).fit()  # resumes the checkpoint of step 1: appends
    assert not (tmp_path / "run" / "metrics.previous-2.jsonl").exists()
    assert [r["step"] for r in rows(metrics) if r.get("kind") == "train"] == [1, 2]


# ----------------------------------------------------------------------------- model setups
def test_full_finetuning_keeps_a_frozen_reference(tmp_path):
    cfg = tiny_config(tmp_path, "model.name=tiny:sd", "sampler.method=ddim", "sampler.eta=1.0", "lora.enabled=false",
                      "optim.lr=0.001")
    t = quiet(cfg)
    assert len(t.named_trainable) == len(list(t.adapter.denoiser.parameters()))  # every weight trains
    before = [p.detach().clone() for p in t.trainable_params]
    m = t.fit()[0]
    assert m["kl"] == 0.0 and m["first_ratio_max_dev"] == 0.0
    assert any(not torch.equal(b, p) for b, p in zip(before, t.trainable_params))
    with t.reference():
        assert all(torch.equal(b, p) for b, p in zip(before, t.trainable_params))
    assert any(not torch.equal(b, p) for b, p in zip(before, t.trainable_params))


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    (tmp_path / "plain").mkdir(), (tmp_path / "ckpt").mkdir()
    plain = quiet(tiny_config(tmp_path / "plain")).fit()[0]
    ckpt = quiet(tiny_config(tmp_path / "ckpt", "gradient_checkpointing=true"))
    assert ckpt.adapter.denoiser.gradient_checkpointing
    m = ckpt.fit()[0]
    assert m["loss"] == plain["loss"] and m["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)


# ----------------------------------------------------------------------------- data parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_the_same_update_as_one(tmp_path):
    base = dict(TINY, sampler=dict(TINY["sampler"], num_steps=2), grpo=dict(TINY["grpo"], num_minibatches=1))
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(base))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mmalign", "train", "--config", str(f), f"out={two}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((two / "checkpoints/step_00000001/trainer_state.json").read_text())
    assert state["world_size"] == 2  # really two processes (accelerate launch --cpu would silently run one)
    lines = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["world_size"] == 2 and lines[-1]["samples"] == 4
    assert {p.name for p in (two / "checkpoints/step_00000001").glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}

    one = load_train_config(f, [f"out={tmp_path / 'one'}"])
    single = quiet(one)
    m = single.fit()[0]
    assert single.world_size == 1
    w2 = load_file(str(two / "checkpoints/step_00000001/trained.safetensors"))
    assert set(w2) == {n for n, _ in single.named_trainable}
    for n, p in single.named_trainable:
        assert torch.allclose(p.detach(), w2[n], atol=1e-6, rtol=0), n
    assert max(float(w2[n].abs().max()) for n in w2 if "lora_B" in n) > 1e-4  # B starts at 0: the step moved it
    assert m["reward/mean_color_match/mean"] == pytest.approx(lines[-1]["reward/mean_color_match/mean"], abs=1e-7)
    assert m["grad_norm"] > 0 and math.isfinite(m["grad_norm"])


def _launch_two(cfg_file, *overrides, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mmalign", "train", "--config", str(cfg_file), *overrides]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_fsdp_on_two_processes_makes_the_same_updates_and_resumes_exactly(tmp_path):
    """parallel: fsdp shards the denoiser over 2 processes (gloo on CPU): the step equals one process's,
    the full-tensor checkpoint resumes on 2 processes to the same second step as an uninterrupted run,
    and the evaluation (which every process runs under FSDP) does not hang."""
    base = dict(TINY, sampler=dict(TINY["sampler"], num_steps=2), grpo=dict(TINY["grpo"], num_minibatches=1),
                parallel="fsdp", max_steps=2, checkpoint={"every": 1, "keep_last": 0},
                eval={"every": 2, "prompts": ["a red circle"], "seeds": [0], "num_steps": 2, "at_start": False})
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(base))
    run = tmp_path / "fsdp"
    proc = _launch_two(f, f"out={run}")
    assert "FSDP: denoiser sharded over 2 processes" in proc.stdout + proc.stderr
    state = json.loads((run / "checkpoints/step_00000001/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["parallel"] == "fsdp"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if "loss" in l]
    assert [l["world_size"] for l in train] == [2, 2]
    assert any("eval/mean_color_match/mean" in l for l in lines)  # the eval ran (all processes sampled)
    assert (run / "eval/step_00000002.png").is_file()

    # step 1 equals one process's step 1 (same rollouts, full-group advantages, averaged gradients)
    single = quiet(load_train_config(f, [f"out={tmp_path / 'one'}", "parallel=ddp", "max_steps=1", "eval.every=0"]))
    single.fit()
    w1 = load_file(str(run / "checkpoints/step_00000001/trained.safetensors"))
    assert set(w1) == {n for n, _ in single.named_trainable}  # full tensors under the plain names
    for n, p in single.named_trainable:
        assert torch.allclose(p.detach(), w1[n], atol=1e-6, rtol=0), n
    assert max(float(w1[n].abs().max()) for n in w1 if "lora_B" in n) > 1e-4

    # resume from step 1 on 2 processes: step 2 is the uninterrupted run's step 2
    resumed = tmp_path / "resumed"
    _launch_two(f, f"out={resumed}", f"resume={run / 'checkpoints/step_00000001'}", "eval.every=0")
    again = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(again) == 1 and again[0]["step"] == 2
    assert again[0]["loss"] == pytest.approx(train[1]["loss"], rel=1e-6, abs=1e-9)
    w2, w2r = (load_file(str(d / "checkpoints/step_00000002/trained.safetensors")) for d in (run, resumed))
    for n in w2:
        assert torch.allclose(w2[n], w2r[n], atol=1e-7, rtol=0), n

    # a DDP run cannot silently load the FSDP optimizer state
    with pytest.raises(ValueError, match="FSDP optimizer state"):
        quiet(load_train_config(f, [f"out={tmp_path / 'ddp'}", "parallel=ddp", f"resume={run / 'checkpoints/step_00000001'}"]))


def test_fsdp_full_finetuning_with_a_reference_matches_one_process(tmp_path):
    """Full finetuning under FSDP: the frozen reference (KL term) is this process's shards, swapped in
    place; the sharded step equals one process's step."""
    base = dict(TINY, sampler=dict(TINY["sampler"], num_steps=2), grpo=dict(TINY["grpo"], num_minibatches=1),
                lora={"enabled": False}, optim={"lr": 0.001}, parallel="fsdp")
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(base))
    _launch_two(f, f"out={tmp_path / 'fsdp'}")
    line = [json.loads(l) for l in (tmp_path / "fsdp/metrics.jsonl").read_text().splitlines() if '"loss"' in l][-1]
    single = quiet(load_train_config(f, [f"out={tmp_path / 'one'}", "parallel=ddp"]))
    m = single.fit()[0]
    assert line["kl"] == m["kl"] == 0.0 and line["world_size"] == 2
    w = load_file(str(tmp_path / "fsdp/checkpoints/step_00000001/trained.safetensors"))
    assert len(w) == len(list(single.adapter.denoiser.parameters()))
    for n, p in single.named_trainable:
        assert torch.allclose(p.detach(), w[n], atol=1e-6, rtol=0), n
    with single.reference():  # and the reference is still the initial weights after the swap-back
        assert any(not torch.allclose(p.detach(), w[n]) for n, p in single.named_trainable)

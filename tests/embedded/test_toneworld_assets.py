"""The shipped, really trained ToneWorld audio models (``assets/toneworld-audioldm``, ``assets/toneworld-clap``)
and their training script (``python -m mmalign.embedded.pretrain_audio``). Offline, CPU.

Asset tests skip (with the reason) only when an asset directory is missing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mmalign
from mmalign.embedded import toneworld as tw
from mmalign.embedded.toneeval import evaluate

REPO = Path(__file__).resolve().parents[2]
ALDM_DIR = REPO / "assets" / "toneworld-audioldm"
CLAP_DIR = REPO / "assets" / "toneworld-clap"

needs_aldm = pytest.mark.skipif(not (ALDM_DIR / "model_index.json").is_file(),
                                reason=f"{ALDM_DIR} is missing: run `python -m mmalign.embedded.pretrain_audio audioldm --out {ALDM_DIR.relative_to(REPO)}`")
needs_clap = pytest.mark.skipif(not (CLAP_DIR / "config.json").is_file(),
                                reason=f"{CLAP_DIR} is missing: run `python -m mmalign.embedded.pretrain_audio clap --out {CLAP_DIR.relative_to(REPO)}`")


def _files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------- script pieces
def test_mel_and_tokenizer_of_the_training_script():
    from mmalign.embedded.pretrain_audio import FRAMES, N_MELS, ToneMel, toneworld_tokenizer

    audio, _, _ = tw.generate(2, seed=0)
    mel = ToneMel()(audio[:, 0])
    assert mel.shape == (2, FRAMES, N_MELS) and torch.isfinite(mel).all()
    silent = ToneMel()(torch.zeros(1, 8000))
    assert torch.allclose(silent, torch.full_like(silent, float(np.log(1e-5))))
    tok = toneworld_tokenizer()
    assert tok.tokenize("a medium beep then two high buzzes")[:6] == ["a", "\u0120medium", "\u0120beep", "\u0120then", "\u0120two", "\u0120high"]
    for _, p in tw.build_prompt_suites()["heldout"]:
        assert len(tok.tokenize(p)) <= 2 * len(p.split())
    assert tok.decode(tok("a cat, 42!")["input_ids"], skip_special_tokens=True) == "a cat, 42!"  # byte fallback
    if (CLAP_DIR / "tokenizer_config.json").is_file():  # the shipped tokenizer is the one the script builds
        from transformers import AutoTokenizer

        shipped = AutoTokenizer.from_pretrained(str(CLAP_DIR), local_files_only=True)
        for _, p in tw.build_prompt_suites()["train"]:
            assert shipped(p)["input_ids"] == tok(p)["input_ids"]


# ---------------------------------------------------------------------------------------------- AudioLDM
@pytest.fixture(scope="module")
def pipe():
    from mmalign.embedded.pretrain_audio import load_audioldm_dir

    return load_audioldm_dir(ALDM_DIR)


@needs_aldm
def test_audioldm_asset_is_small_complete_and_measured():
    files = _files(ALDM_DIR)
    for needed in ("model_index.json", "MODEL_CARD.md", "metrics.json", "mmalign_adapter.json", "unet/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors", "vocoder/model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json"):
        assert needed in files, needed
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    assert sum((ALDM_DIR / f).stat().st_size for f in files) < 12 * 2**20
    assert json.loads((ALDM_DIR / "model_index.json").read_text())["_class_name"] == "AudioLDMPipeline"
    metrics = json.loads((ALDM_DIR / "metrics.json").read_text())
    held = metrics["eval"]["heldout"]
    assert set(tw.CATEGORIES) <= set(held) and held["overall"]["n"] == 2 * len(tw.build_prompt_suites()["heldout"])
    assert metrics["vocoded_ground_truth"]["overall"]["strict"] >= 0.95
    assert any(f.startswith("samples_heldout/") and f.endswith(".wav") for f in files)


@needs_aldm
def test_audioldm_asset_samples_deterministically(pipe):
    def run(seed):
        return pipe("a high beep", num_inference_steps=4, guidance_scale=2.5, audio_length_in_s=1.0,
                    generator=torch.Generator().manual_seed(seed)).audios
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 8000) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.isfinite(a).all() and np.abs(a).max() <= 1.0


@needs_aldm
def test_vocoder_reconstructs_ground_truth_for_the_verifier(pipe):
    from mmalign.embedded.pretrain_audio import ToneMel

    audio, caps, _ = tw.generate(10, seed=99)
    with torch.no_grad():
        wave = pipe.vocoder(ToneMel()(audio[:, 0]))[:, :8000]
    strict = [evaluate(w, c).strict for w, c in zip(wave, caps)]
    assert sum(strict) >= 9, strict


@needs_aldm
def test_audioldm_asset_loads_as_an_adapter_and_scores_with_toneeval():
    from mmalign.samplers import SamplerConfig, sample

    adapter = mmalign.load_model(str(ALDM_DIR))  # audio_length_in_s from mmalign_adapter.json
    assert adapter.family == "audioldm" and adapter.sample_rate == tw.SAMPLE_RATE and adapter.num_samples == 8000
    assert adapter.latent_shape(2)[0] == 2
    rollout = sample(adapter, ["a low beep", "two high tones"], SamplerConfig(method="ddim", eta=1.0, num_steps=3, guidance_scale=2.5),
                     generator=torch.Generator().manual_seed(0))
    assert rollout.samples.shape == (2, 1, 8000)
    out = mmalign.load_reward("toneeval")(rollout.samples, ["a low beep", "two high tones"], sample_rate=adapter.sample_rate)
    assert out.valid.all() and ((out.scores >= 0) & (out.scores <= 1)).all()


# ---------------------------------------------------------------------------------------------- CLAP
@pytest.fixture(scope="module")
def clap():
    return mmalign.load_reward("clap", model_id=str(CLAP_DIR), offline=True)


@needs_clap
def test_clap_asset_is_small_and_measured():
    files = _files(CLAP_DIR)
    for needed in ("config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json", "MODEL_CARD.md", "metrics.json"):
        assert needed in files, needed
    assert sum((CLAP_DIR / f).stat().st_size for f in files) < 4 * 2**20
    held = json.loads((CLAP_DIR / "metrics.json").read_text())["eval"]["heldout"]
    assert held["top1"] > 5 / held["prompts"]  # far above chance


@needs_clap
def test_clap_reward_prefers_the_true_caption_batches_and_has_gradients(clap):
    assert clap.sampling_rate == tw.SAMPLE_RATE and clap.window_samples == 8000
    rng = np.random.default_rng(0)
    audio, caps, _ = tw.generate(20, seed=7)
    specs = [tw.example_at(i, 7).spec for i in range(20)]
    negs = []
    for s in specs:
        for kind in ("pitch", "count", "timbre", "duration", "order"):
            e = tw.edit_caption(s, kind, rng)
            if e is not None:
                negs.append(e.prompt())
                break
    own = clap(audio, caps, sample_rate=8000)
    neg = clap(audio, negs, sample_rate=8000)
    assert own.valid.all() and float((own.scores > neg.scores).float().mean()) >= 0.6
    singles = torch.cat([clap(audio[i : i + 1], caps[i : i + 1], sample_rate=8000).scores for i in range(4)])
    torch.testing.assert_close(singles, own.scores[:4], rtol=1e-4, atol=1e-5)  # batch == one by one
    x = audio[:2].clone().requires_grad_(True)
    clap(x, caps[:2], sample_rate=8000).scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@needs_clap
def test_clap_windows_long_clips_deterministically_and_resamples(clap):
    from mmalign.rewards.audio import split_windows

    audio, caps, _ = tw.generate(3, seed=8)
    long = audio.reshape(1, 1, -1)[:, :, :20000]  # 2.5 s: windows [0,1), [1,2), [2,2.5)+zeros
    a = clap(long, caps[:1], sample_rate=8000).scores
    b = clap(long, caps[:1], sample_rate=8000).scores
    assert torch.equal(a, b)
    windows = split_windows(long[:, 0], 8000, 8000)
    assert windows.shape == (1, 3, 8000) and torch.equal(windows[0, 2, 4000:], torch.zeros(4000))
    with torch.no_grad():
        per = torch.nn.functional.normalize(torch.cat([clap.audio_embeddings(w[None]) for w in windows[0]]).mean(0), dim=-1)
        text = clap.text_embeddings(caps[:1])[0]
    torch.testing.assert_close(a[0], (per * text).sum(), rtol=1e-4, atol=1e-5)  # mean of window embeddings
    hi = torch.from_numpy(tw.render(tw.example_at(0, 8).scene, 16000))[None, None]
    s16 = clap(hi, caps[:1], sample_rate=16000).scores
    s8 = clap(audio[:1], caps[:1], sample_rate=8000).scores
    assert abs(float(s16 - s8)) < 0.05  # resampled in torch to the model's 8 kHz


# ---------------------------------------------------------------------------------------------- GRPO recipe
def test_toneworld_grpo_recipe_validates():
    from mmalign.cli import config_kinds
    from mmalign.config import load_config
    from mmalign.trainers import load_train_config

    path = REPO / "configs" / "train_grpo_toneworld.yaml"
    load_config(config_kinds()["train"], path)
    cfg = load_train_config(path)
    assert cfg.algorithm == "grpo" and cfg.model.name == "assets/toneworld-audioldm" and cfg.lora.enabled
    assert cfg.sampler.method == "ddim" and cfg.sampler.eta > 0
    assert [r.name for r in cfg.rewards] == ["toneeval"]
    assert [(r.name, r.options) for r in cfg.held_out_rewards] == [("clap", {"model_id": "assets/toneworld-clap"})]
    assert cfg.prompts.file == "assets/prompts/toneworld_train.txt" and cfg.eval.prompts_file == "assets/prompts/toneworld_heldout.txt"
    assert cfg.max_minutes is not None and cfg.max_minutes <= 15


@needs_aldm
@needs_clap
def test_mmalign_train_runs_the_toneworld_recipe(tmp_path, capsys):
    from mmalign.cli import main

    out = tmp_path / "tone"
    code = main(["train", "--config", str(REPO / "configs/train_grpo_toneworld.yaml"), "max_steps=1", f"out={out}",
                 "grpo.prompts_per_step=1", "grpo.group_size=2", "sampler.micro_batch=2", "grpo.num_minibatches=1", "sampler.num_steps=3",
                 "eval.every=0", "checkpoint.save_final=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[train] step 1" in printed and "reward/toneeval/mean" in printed and "held_out/clap/mean" in printed


def test_audio_training_stages_replay_a_time_capped_run_step_for_step():
    """``--*-stop-at-step`` replays a stage cut by its time cap: the same steps under the full schedule,
    bit-identical; the replay command names every cut stage."""
    from mmalign.embedded.pretrain_audio import (ToneMel, _tokenizer, build_audioldm, replay_command, text_encoder_from_clap,
                                                 toneworld_data, train_vae)

    tok = _tokenizer()
    audio, _, _ = toneworld_data(16, 0, lambda *a: None)
    mels = ToneMel()(audio)

    def vae_after(steps, stop):
        pipe = build_audioldm(0, text_encoder_from_clap(None, 0, tok), tok, unet_channels=[8, 16], vae_channels=[8, 8],
                              vocoder_channels=8, latent_channels=4)
        out = train_vae(pipe.vae, mels, steps=steps, batch_size=4, lr=1e-3, kl_weight=1e-3, seed=1, log=lambda *a: None,
                        max_seconds=1e6, stop_at_step=stop)
        return out["steps_done"], torch.cat([p.detach().flatten() for p in pipe.vae.parameters()])

    n1, w1 = vae_after(6, 3)
    n2, w2 = vae_after(6, 3)
    n6, w6 = vae_after(6, None)
    assert n1 == n2 == 3 and n6 == 6 and torch.equal(w1, w2) and not torch.equal(w1, w6)
    import mmalign.embedded.pretrain_audio as pa

    meta = {"vocoder": {"steps_done": 10}, "vae": {"steps_done": 7}, "unet": {"steps_done": 4}}
    full = pa.build_parser().parse_args(["audioldm", "--out", "x", "--vocoder-steps", "10", "--vae-steps", "10", "--steps", "10"])
    cmd = replay_command(full, meta)
    assert "--vae-stop-at-step 7" in cmd and "--stop-at-step 4" in cmd and "--vocoder-stop-at-step" not in cmd
    flags = cmd[cmd.index("--vae-stop-at-step"):].split()
    assert pa.build_parser().parse_args(["audioldm", "--out", "x", *flags]).vae_stop_at_step == 7

"""The tiny MovingShapes text-to-video model: its training script (``python -m mmalign.embedded.pretrain_video``)
and the shipped asset ``assets/movingshapes-wan`` (asset tests skip, with the reason, only when it is missing)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmalign
from mmalign.embedded import pretrain_video as pv

REPO = Path(__file__).resolve().parents[2]
WAN_DIR = REPO / "assets" / "movingshapes-wan"
needs_wan = pytest.mark.skipif(not (WAN_DIR / "model_index.json").is_file(),
                               reason=f"{WAN_DIR} is missing: run `python -m mmalign.embedded.pretrain_video wan --out assets/movingshapes-wan`")
SMALL = dict(layers=1, heads=2, head_dim=12, ffn_dim=32, z_dim=4, text_dim=16)


@pytest.fixture(scope="module")
def small_pipe(tmp_path_factory):
    torch.manual_seed(0)
    tok = pv.build_tokenizer(tmp_path_factory.mktemp("tok"))
    return pv.build_wan_pipeline(0, pv.WanArch(**SMALL), tok)


def test_tokenizer_is_word_level(small_pipe):
    tok = small_pipe.tokenizer
    ids = tok("a red circle moving left and a blue square bouncing").input_ids
    assert len(ids) == 11 and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok("a red blob").input_ids[2] == tok.unk_token_id


def test_encode_text_equals_the_pipelines_prompt_encoding(small_pipe):
    prompts = ["a red circle moving left", "", "a blue square turning white and a red triangle moving up"]
    with torch.no_grad():
        mine = pv.encode_text(small_pipe, prompts, 16)
        theirs, _ = small_pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16, device="cpu")
    assert torch.equal(mine, theirs)


def test_unclamped_decode_is_the_vaes_decode_before_its_clamp(small_pipe):
    z = torch.randn(2, 4, 5, 8, 8) * 3
    with torch.no_grad():
        raw = pv.decode_unclamped(small_pipe.vae, z)
        ref = small_pipe.vae.decode(z).sample
    assert raw.shape == (2, 3, 9, 32, 32)
    assert torch.allclose(raw.clamp(-1, 1), ref, atol=1e-6)


def test_training_script_runs_end_to_end_and_loads_with_mmalign(tmp_path):
    out = tmp_path / "wan"
    args = ["wan", "--out", str(out), "--num-train", "8", "--vae-steps", "2", "--vae-batch-size", "2", "--steps", "2", "--batch-size", "2",
            "--eval-samples", "0", "--quiet", "--layers", "1", "--heads", "2", "--head-dim", "12", "--ffn-dim", "32", "--z-dim", "4", "--text-dim", "16"]
    assert pv.main(args) == 0
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["training"]["steps_done"] == 2 and meta["training"]["vae_steps"] == 2 and meta["replay_command"] is None
    assert "python -m mmalign.embedded.pretrain_video wan" in (out / "MODEL_CARD.md").read_text()
    adapter = mmalign.load_model(str(out), offline=True)
    assert (adapter.height, adapter.width, adapter.num_frames, adapter.max_sequence_length, adapter.fps) == (32, 32, 9, 16, 8)
    assert adapter.latent_shape(2) == (2, 4, 5, 8, 8)
    video = adapter.decode(torch.zeros(1, 4, 5, 8, 8))
    assert video.shape == (1, 9, 3, 32, 32)
    with pytest.raises(SystemExit):
        pv.main(["wan", "--out", str(out), "--vae-window", "6"])


# ---------------------------------------------------------------------------------------------- the asset
@needs_wan
def test_asset_is_small_complete_and_documented():
    files = {p.relative_to(WAN_DIR).as_posix() for p in WAN_DIR.rglob("*") if p.is_file()}
    for needed in ("model_index.json", "MODEL_CARD.md", "metrics.json", "mmalign_adapter.json", "transformer/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        assert needed in files, needed
    assert any(f.endswith(".mp4") for f in files) and any(f.endswith(".gif") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    assert sum(p.stat().st_size for p in WAN_DIR.rglob("*") if p.is_file()) < 10 * 2**20
    assert json.loads((WAN_DIR / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    meta = json.loads((WAN_DIR / "metrics.json").read_text())
    table = meta["eval"]["heldout"]["table"]
    from mmalign.embedded.movingshapes import CATEGORIES

    assert set(CATEGORIES) <= set(table) and table["overall"]["n"] >= 90
    assert meta["total_seconds"] <= 30 * 60  # trained in well under half an hour on one CPU thread
    card = (WAN_DIR / "MODEL_CARD.md").read_text()
    assert "MotionEval on the held-out prompt suite" in card and f"{table['overall']['strict']:.3f}" in card


@needs_wan
def test_shipped_wan_was_trained_with_the_pretrain_defaults():
    """``pretrain_video wan --out assets/movingshapes-wan`` (no other flags) replays the shipped run: every
    recorded hyperparameter equals the parser's default, and no time limit cut it."""
    meta = json.loads((WAN_DIR / "metrics.json").read_text())
    defaults = vars(pv.build_parser().parse_args(["wan", "--out", "assets/movingshapes-wan"]))
    recorded = meta["args"]
    differing = {k: (recorded[k], defaults[k]) for k in recorded if k in defaults and k != "quiet" and recorded[k] != defaults[k]}
    assert not differing, differing
    assert meta["replay_command"] is None and meta["training"]["steps_done"] == recorded["steps"]
    assert meta["training"]["vae_steps"] == recorded["vae_steps"]


@needs_wan
def test_asset_loads_with_mmalign_and_samples_deterministically():
    from mmalign.samplers import SamplerConfig, sample

    adapter = mmalign.load_model(str(WAN_DIR), offline=True)
    assert (adapter.height, adapter.num_frames, adapter.max_sequence_length) == (32, 9, 16)
    cfg = SamplerConfig(method="ode", num_steps=4, guidance_scale=4.0)
    prompts = ["a red circle moving left", "a blue square appearing"]
    a = sample(adapter, prompts, cfg, generator=torch.Generator().manual_seed(0))
    b = sample(adapter, prompts, cfg, generator=torch.Generator().manual_seed(0))
    assert a.samples.shape == (2, 9, 3, 32, 32) and torch.equal(a.samples, b.samples)
    out = mmalign.load_reward("motioneval")(a.samples, prompts)
    assert out.all_valid and ((0 <= out.scores) & (out.scores <= 1)).all()


def test_grpo_recipe_loads_and_points_at_the_shipped_pieces():
    from mmalign.trainers.common import load_train_config

    cfg = load_train_config(REPO / "configs" / "train_grpo_movingshapes.yaml")
    assert (cfg.algorithm, cfg.model.name, [r.name for r in cfg.rewards]) == ("grpo", "assets/movingshapes-wan", ["motioneval"])
    assert cfg.lora.enabled and cfg.sampler.method == "flow_grpo" and cfg.max_minutes is not None
    assert (REPO / cfg.prompts.file).is_file() and (REPO / cfg.eval.prompts_file).is_file()
    assert cfg.prompts.file.endswith("movingshapes_train.txt") and cfg.eval.prompts_file.endswith("movingshapes_heldout.txt")
    assert cfg.eval.report_targets == {"eval/motioneval:strict/mean": 1.0}


def test_encode_media_inverts_decode_on_real_clips_and_partial_chain_bench_runs():
    """``WanAdapter.encode_media`` is the inverse of ``decode`` through the shipped (trained) VAE: rendered
    MovingShapes clips survive encode -> decode; the rollout bench times a partial chain with it."""
    from mmalign.bench import RolloutBenchConfig, run_rollout_bench
    from mmalign.embedded.movingshapes import generate

    adapter = mmalign.load_model(str(WAN_DIR), offline=True)
    videos, _, _ = generate(32, seed=3)  # B,T,3,H,W in [0, 1]
    z = adapter.encode_media(videos)
    assert z.shape == adapter.latent_shape(32)
    # the pipeline's latents_mean/std were measured on such clips: encoded, they are ~N(0, 1) per channel
    # (the VAE's raw latents are not), the distribution the transformer was trained on
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.1 and ((per_channel.std(1) - 1).abs() < 0.15).all()
    with torch.no_grad():
        back = adapter.decode(z)
    psnr = -10 * torch.log10(((back - videos) ** 2).mean())
    assert psnr > 20, psnr  # the card's held-out reconstruction PSNR is 25.1 dB; decoding noise gives ~14
    with pytest.raises(ValueError, match="B,T,3,H,W"):
        adapter.encode_media(videos[0])
    lines = []
    out = run_rollout_bench(RolloutBenchConfig(model=str(WAN_DIR), num_steps=4, batch_size=1, repeats=1, partial_chain_start=2),
                            log=lines.append)
    assert out["partial_chain_time_fraction"] > 0 and "partial chain (2 of 4 steps" in lines[-1]  # timing: a number, not a test


def test_partial_chain_recipe_runs_on_a_written_clip_dataset(tmp_path):
    """``python -m mmalign.embedded.movingshapes dataset`` writes GIFs + JSONL that partial-chain GRPO reads;
    one step of the shipped recipe (shrunk) trains on the last 6 of 10 steps."""
    import json

    from mmalign.cli import main as cli
    from mmalign.embedded.movingshapes import main as ms_main

    assert ms_main(["dataset", "--out", str(tmp_path / "clips"), "--n", "3", "--seed", "1"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "clips" / "dataset.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all((tmp_path / "clips" / x["video"]).is_file() for x in lines)
    out = tmp_path / "run"
    rc = cli(["train", "--config", str(REPO / "configs" / "train_grpo_movingshapes_partial.yaml"), f"out={out}",
              f"grpo.partial_chain_dataset={tmp_path / 'clips' / 'dataset.jsonl'}", "max_steps=1", "grpo.prompts_per_step=1",
              "grpo.group_size=2", "grpo.num_minibatches=1", "sampler.micro_batch=2", "eval.every=0", "held_out_rewards=[]",
              "max_minutes=null", "checkpoint.save_final=false", "logging.stdout=false"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    assert train and train[0]["timesteps"] == 3 and train[0]["sde_window_start"] >= 4 and train[0]["first_ratio_max_dev"] == 0.0

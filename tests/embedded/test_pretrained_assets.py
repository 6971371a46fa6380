"""The shipped, really trained embedded-world models (``assets/shapeworld-sd3``, ``assets/shapeworld-clip``)
and the script that trains them (``python -m mmalign.embedded.pretrain``).

Asset tests skip (with the reason) only when an asset directory is missing; everything runs offline on CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SD3_DIR = REPO / "assets" / "shapeworld-sd3"
CLIP_DIR = REPO / "assets" / "shapeworld-clip"

needs_sd3 = pytest.mark.skipif(not (SD3_DIR / "model_index.json").is_file(), reason=f"{SD3_DIR} is missing: run `python -m mmalign.embedded.pretrain sd3 --out {SD3_DIR.relative_to(REPO)}`")
needs_clip = pytest.mark.skipif(not (CLIP_DIR / "open_clip_config.json").is_file(), reason=f"{CLIP_DIR} is missing: run `python -m mmalign.embedded.pretrain clip --out {CLIP_DIR.relative_to(REPO)}`")


def _shapeeval_available() -> bool:
    try:
        from mmalign.embedded import shapeeval  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- SD3 asset
@pytest.fixture(scope="module")
def sd3_pipe():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(SD3_DIR), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t5_tokens() -> int:
    """The zero "T5" tokens the shipped model was trained with (its pipeline calls must pass them)."""
    return int(json.loads((SD3_DIR / "metrics.json").read_text()).get("t5_tokens", 256))


def _sample(pipe, prompt: str, seed: int, steps: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=4.0, generator=gen, output_type="pt",
                max_sequence_length=_t5_tokens()).images


@needs_sd3
def test_sd3_asset_is_small_and_complete():
    files = {p.relative_to(SD3_DIR).as_posix() for p in SD3_DIR.rglob("*") if p.is_file()}
    for needed in ("model_index.json", "MODEL_CARD.md", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                   "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer_config.json"):
        assert needed in files, needed
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files), "weights must be safetensors"
    size = sum(p.stat().st_size for p in SD3_DIR.rglob("*") if p.is_file())
    assert size < 12 * 2**20, f"{size / 2**20:.1f} MB"
    index = json.loads((SD3_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index.get("text_encoder_3", [None])[0] is None  # no T5


@needs_sd3
def test_sd3_asset_loads_offline_and_samples_deterministically(sd3_pipe):
    from diffusers import StableDiffusion3Pipeline

    assert isinstance(sd3_pipe, StableDiffusion3Pipeline)
    assert sd3_pipe.text_encoder_3 is None
    assert sd3_pipe.vae.config.shift_factor is not None
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert next(getattr(sd3_pipe, name).parameters()).dtype == torch.float32, name
    a = _sample(sd3_pipe, "a red circle left of a blue square", seed=0)
    b = _sample(sd3_pipe, "a red circle left of a blue square", seed=0)
    c = _sample(sd3_pipe, "a red circle left of a blue square", seed=1)
    assert a.shape == (1, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


@needs_sd3
def test_sd3_asset_draws_the_prompted_colour(sd3_pipe):
    """Trained, not random: a single-colour prompt yields that colour's hue among the bright pixels."""
    gen = [torch.Generator().manual_seed(s) for s in range(4)]
    imgs = sd3_pipe(prompt=["a red square"] * 2 + ["a blue square"] * 2, num_inference_steps=8, guidance_scale=4.0,
                    generator=gen, output_type="pt", max_sequence_length=_t5_tokens()).images

    def mean_bright(img):
        mask = img.max(0).values > 0.4
        return img[:, mask].mean(1) if mask.any() else img.reshape(3, -1).mean(1)

    red = torch.stack([mean_bright(i) for i in imgs[:2]]).mean(0)
    blue = torch.stack([mean_bright(i) for i in imgs[2:]]).mean(0)
    assert red[0] > red[2] and blue[2] > blue[0], (red, blue)


@needs_sd3
def test_sd3_asset_through_the_mmalign_adapter():
    from mmalign.models.sd3 import StableDiffusion3Adapter

    adapter = StableDiffusion3Adapter.from_pretrained(str(SD3_DIR), offline=True, text_encoder_3=None, tokenizer_3=None)
    assert adapter.image_size() == (32, 32)
    cond = adapter.encode_prompts(["a green triangle"], guidance_scale=4.0)
    assert cond.cond["encoder_hidden_states"].shape[1] == 32 + adapter.max_sequence_length


@needs_sd3
def test_sd3_asset_through_load_model():
    import mmalign

    adapter = mmalign.load_model(str(SD3_DIR), offline=True)
    assert adapter.family == "sd3" and adapter.pipeline.text_encoder_3 is None
    assert adapter.image_size() == (32, 32)
    assert adapter.max_sequence_length == _t5_tokens()  # read from mmalign_adapter.json
    other = mmalign.load_model(str(SD3_DIR), offline=True, adapter_kwargs={"max_sequence_length": 7})
    assert other.max_sequence_length == 7  # explicit kwargs win


def test_saved_adapter_kwargs_file(tmp_path):
    from mmalign.models.base import saved_adapter_kwargs

    assert saved_adapter_kwargs(tmp_path) == {} and saved_adapter_kwargs("org/hub-id") == {}
    (tmp_path / "mmalign_adapter.json").write_text('{"adapter_kwargs": {"max_sequence_length": 1}}')
    assert saved_adapter_kwargs(tmp_path) == {"max_sequence_length": 1}
    (tmp_path / "mmalign_adapter.json").write_text('{"adapter_kwargs": [1]')
    with pytest.raises(OSError, match="mmalign_adapter.json is corrupt"):
        saved_adapter_kwargs(tmp_path)


# ---------------------------------------------------------------------------------------------- CLIP asset
@pytest.fixture(scope="module")
def clip_model():
    from mmalign.embedded.tiny_clip import load_shapeworld_clip

    return load_shapeworld_clip(CLIP_DIR)


@needs_clip
def test_clip_asset_files():
    names = {p.name for p in CLIP_DIR.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "MODEL_CARD.md", "tokenizer_config.json"} <= names
    size = sum(p.stat().st_size for p in CLIP_DIR.rglob("*") if p.is_file())
    assert size < 8 * 2**20, f"{size / 2**20:.1f} MB"


@needs_clip
def test_clip_asset_ranks_matching_captions_first(clip_model):
    from mmalign.embedded import shapeworld as sw
    from mmalign.embedded.tiny_clip import preprocess

    model, tokenizer, info = clip_model
    images, captions, _ = sw.generate(12, seed=2024, size=32)
    with torch.no_grad():
        img = model.encode_image(preprocess(images, info), normalize=True)
        txt = model.encode_text(tokenizer(captions), normalize=True)
    assert img.shape == txt.shape and img.shape[0] == 12
    sims = img @ txt.T
    wins = total = 0
    for i in range(12):
        for j in range(12):
            if captions[j] != captions[i]:
                total += 1
                wins += int(sims[i, i] > sims[i, j])
    assert wins / total > 0.85, f"matching caption ranked first in {wins}/{total} pairs"
    # simple single-attribute edits of a rendered image
    one, caps, _ = sw.generate(6, seed=7, size=32, categories=["colors"])
    wrong = [c.replace("red", "blue") if "red" in c else " ".join(["a", "red", c.split()[-1]]) for c in caps]
    with torch.no_grad():
        fi = model.encode_image(preprocess(one, info), normalize=True)
        good = (fi * model.encode_text(tokenizer(caps), normalize=True)).sum(-1)
        bad = (fi * model.encode_text(tokenizer(wrong), normalize=True)).sum(-1)
    assert int((good > bad).sum()) >= 5, (caps, wrong, good, bad)


@needs_clip
def test_clip_asset_loads_natively_with_open_clip(clip_model):
    import open_clip

    model, tokenizer, info = clip_model
    native = open_clip.create_model(f"local-dir:{CLIP_DIR}", precision="fp32").eval()
    native_tok = open_clip.get_tokenizer(f"local-dir:{CLIP_DIR}")
    texts = ["a red circle left of a blue square", "three triangles"]
    assert torch.equal(native_tok(texts), tokenizer(texts))
    with torch.no_grad():
        torch.testing.assert_close(native.encode_text(native_tok(texts)), model.encode_text(tokenizer(texts)))


@needs_clip
def test_clip_asset_as_the_clipscore_reward(clip_model):
    """The rewards' open_clip-directory path (clipscore) sees the same text embeddings as the shipped loader."""
    from mmalign.rewards.clip import load_clipscore

    model, tokenizer, info = clip_model
    backbone = load_clipscore(str(CLIP_DIR)).backbone
    texts = ["a red circle left of a blue square", "three triangles"]
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_tokens(backbone.tokenize(texts)).float(), model.encode_text(tokenizer(texts)))


@needs_clip
def test_clip_similarity_is_differentiable(clip_model):
    from mmalign.embedded.tiny_clip import clip_similarity

    model, tokenizer, info = clip_model
    images = torch.rand(2, 3, 64, 64, requires_grad=True)  # resized to 32x32 inside
    sim = clip_similarity(model, tokenizer, info, images, ["a red circle", "two squares"])
    sim.sum().backward()
    assert sim.shape == (2,) and images.grad is not None and images.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- the script
def test_zero_token_multiplicity_matches_the_pipelines_256_zero_tokens():
    """Training feeds one zero "T5" token with multiplicity 256: exactly the pipeline's 256 zero tokens."""
    from mmalign.embedded.pretrain import SD3Arch, build_sd3_pipeline, encode_clip_ids, set_zero_token_processors, tokenize, transformer_forward

    pipe = build_sd3_pipeline(0, SD3Arch(layers=2, heads=2, num_merges=1000))
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        prompts = ["a red circle left of a blue square", ""]
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=256)
        hidden, pooled2 = encode_clip_ids(pipe, tokenize(pipe, prompts))
        torch.testing.assert_close(embeds[:, : hidden.shape[1]], hidden)
        torch.testing.assert_close(pooled, pooled2)
        x, t = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8])
        ref = pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        old = set_zero_token_processors(pipe.transformer, 256)
        out = transformer_forward(pipe, x, t, hidden, pooled)
        pipe.transformer.set_attn_processor(old)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_training_data_never_contains_heldout_prompts():
    from mmalign.embedded.pretrain import _norm_prompt, clip_training_data, prompt_suite, training_data

    heldout = {_norm_prompt(p) for _, p in prompt_suite("heldout")}
    _, caps, _ = training_data(300, seed=3, log=lambda m: None)
    _, caps2, negs, _ = clip_training_data(300, seed=3, log=lambda m: None)
    assert not heldout & {_norm_prompt(c) for c in caps + caps2 + negs}
    assert sum(n != c for n, c in zip(negs, caps2)) > 250  # almost every image gets a real hard negative


def test_pretrain_script_runs_end_to_end(tmp_path, capsys):
    from mmalign.embedded import pretrain
    from mmalign.embedded.tiny_clip import load_shapeworld_clip

    sd3_out, clip_out = tmp_path / "sd3", tmp_path / "clip"
    ev = ["--eval-prompts", "2", "--eval-samples", "1", "--eval-steps", "2"] if _shapeeval_available() else ["--eval-prompts", "0"]
    rc = pretrain.main(["sd3", "--out", str(sd3_out), "--num-train", "64", "--vae-steps", "3", "--vae-stop-at-step", "2",
                        "--vae-batch-size", "4", "--steps", "3", "--batch-size", "4", "--layers", "1", "--heads", "2", "--threads", "1", *ev])
    assert rc == 0
    assert (sd3_out / "model_index.json").is_file() and (sd3_out / "MODEL_CARD.md").is_file()
    meta = json.loads((sd3_out / "metrics.json").read_text())
    assert meta["training"]["steps_done"] == 3 and meta["seed"] == 0
    assert meta["training"]["vae_steps"] == 2 and meta["replay_command"] is None  # asked-for stops need no replay
    assert "--steps 3" in (sd3_out / "MODEL_CARD.md").read_text()
    pipe = pretrain.load_sd3_dir(sd3_out)
    assert pipe(prompt="a circle", num_inference_steps=2, output_type="pt").images.shape == (1, 3, 32, 32)

    rc = pretrain.main(["clip", "--out", str(clip_out), "--num-train", "64", "--steps", "2", "--batch-size", "8", "--width", "32",
                        "--layers", "1", "--heads", "2", "--embed-dim", "16", "--num-merges", "1000", "--threads", "1", "--eval-n", "12"])
    assert rc == 0
    model, tokenizer, info = load_shapeworld_clip(clip_out)
    assert model.encode_text(tokenizer(["a red circle"])).shape == (1, 16)
    assert "steps_done" in json.loads((clip_out / "metrics.json").read_text())["training"]
    out = capsys.readouterr().out
    assert "sd3 step" in out and "clip step" in out


def test_replay_command_names_every_part_a_time_limit_cut():
    """A run cut by --vae-max-minutes (or --max-minutes) records the command that replays it exactly."""
    from argparse import Namespace

    from mmalign.embedded import pretrain

    args = Namespace(command="sd3", argv=["sd3", "--out", "m", "--max-minutes", "50"], steps=5500, stop_at_step=None,
                     vae_steps=1500, vae_stop_at_step=None, init_from=None)
    assert pretrain._replay_command(args, {"steps_done": 5500, "vae_steps": 1500}) is None
    cmd = pretrain._replay_command(args, {"steps_done": 5500, "vae_steps": 1203})
    assert "--vae-stop-at-step 1203" in cmd and "--stop-at-step" not in cmd.replace("--vae-stop-at-step", "")
    assert "--vae-max-minutes 100000" in cmd
    cmd = pretrain._replay_command(args, {"steps_done": 4000, "vae_steps": 1203})
    assert "--stop-at-step 4000" in cmd and "--vae-stop-at-step 1203" in cmd
    args.init_from = "old"  # a continued run keeps its source's VAE: nothing to replay there
    assert pretrain._replay_command(args, {"steps_done": 5500, "vae_steps": 1203}) is None


def test_pretrain_cli_errors(tmp_path, capsys):
    from mmalign.embedded import pretrain

    with pytest.raises(SystemExit):
        pretrain.main([])
    with pytest.raises(SystemExit):
        pretrain.main(["sd3", "--out", str(tmp_path), "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["eval-sd3", "--model", str(tmp_path / "nope")])


@needs_sd3
def test_rollout_bench_on_the_shipped_model_uses_its_token_count():
    from mmalign.bench import RolloutBenchConfig, run_rollout_bench

    lines = []
    out = run_rollout_bench(RolloutBenchConfig(model=str(SD3_DIR), num_steps=1, batch_size=1, repeats=1), log=lines.append)
    assert f"{_t5_tokens()} T5 tokens" in lines[0] and out["denoiser_params"] > 1e6
    lines.clear()
    run_rollout_bench(RolloutBenchConfig(model=str(SD3_DIR), max_sequence_length=3, num_steps=1, batch_size=1, repeats=1), log=lines.append)
    assert "3 T5 tokens" in lines[0]


def test_shipped_sd3_was_trained_with_the_pretrain_defaults():
    """README's one command (``pretrain sd3 --out assets/shapeworld-sd3``, no other flags) is the shipped run:
    every recorded hyperparameter equals the parser's default, and the run was not cut by a time limit."""
    from mmalign.embedded import pretrain

    meta = json.loads((SD3_DIR / "metrics.json").read_text())
    defaults = vars(pretrain.build_parser().parse_args(["sd3", "--out", "assets/shapeworld-sd3"]))
    recorded = meta["args"]
    differing = {k: (recorded[k], defaults[k]) for k in recorded if k in defaults and k not in ("quiet",) and recorded[k] != defaults[k]}
    assert not differing, differing
    assert meta["replay_command"] is None and meta["training"]["steps_done"] == recorded["steps"]

"""CogVideoX adapter against the real (tiny, offline) ``CogVideoXPipeline``."""
import logging
import time

import pytest
import torch

from mmalign.models import MODELS
from mmalign.models.cogvideox import CogVideoXAdapter
from mmalign.samplers import SamplerConfig, log_prob, sample
from mmalign.testing import tiny_adapter
from mmalign.testing.cogvideox import TINY_COGVIDEOX_TEXT_LEN, tiny_cogvideox_pipeline

PROMPTS = ["a red circle", "three blue triangles"]
TEXT = TINY_COGVIDEOX_TEXT_LEN  # the tiny transformer's max_text_seq_length (226 for the real models)



@pytest.fixture(scope="module")
def adapter() -> CogVideoXAdapter:
    return CogVideoXAdapter(tiny_cogvideox_pipeline(seed=0))


def noise(adapter: CogVideoXAdapter, batch: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return adapter.init_noise(batch, torch.Generator().manual_seed(seed))


def run_pipeline(pipe, prompts, steps, guidance, latents, negative=None, **kwargs):
    """The pipeline's own call; returns (latents after each step: B,K,*L, decoded video B,T,3,H,W)."""
    traj = []

    def keep(_pipe, _i, _t, cb_kwargs):
        traj.append(cb_kwargs["latents"].clone())
        return {}

    out = pipe(
        prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
        latents=latents.clone(), output_type="pt", callback_on_step_end=keep, max_sequence_length=TEXT, **kwargs,
    )
    return torch.stack(traj, 1), out.frames


# ---------------------------------------------------------------- building
def test_tiny_pipeline_builds_fast_and_seeded():
    tiny_cogvideox_pipeline()  # the first call may build the tokenizer
    start = time.perf_counter()
    pipe = tiny_cogvideox_pipeline(seed=1)
    assert time.perf_counter() - start < 1.0
    assert type(pipe).__name__ == "CogVideoXPipeline"
    assert type(pipe.scheduler).__name__ == "CogVideoXDDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.transformer.config.use_rotary_positional_embeddings
    a, b, c = tiny_cogvideox_pipeline(seed=3), tiny_cogvideox_pipeline(seed=3), tiny_cogvideox_pipeline(seed=4)
    for pa, pb in zip(a.transformer.parameters(), b.transformer.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.transformer.parameters(), c.transformer.parameters()))


def test_registry_and_properties(adapter):
    assert MODELS.get("cogvideox") is CogVideoXAdapter
    assert isinstance(tiny_adapter("cogvideox"), CogVideoXAdapter)
    assert adapter.family == "cogvideox" and adapter.modality == "video"
    assert adapter.pipeline_class == "CogVideoXPipeline"
    assert adapter.default_model_id == "THUDM/CogVideoX-2b"
    assert adapter.default_guidance_scale == 6.0
    assert adapter.fps == 8 and CogVideoXAdapter(adapter.pipeline, fps=16).fps == 16
    assert adapter.denoiser is adapter.pipeline.transformer
    # defaults from the transformer config, as the pipeline computes them
    assert (adapter.height, adapter.width, adapter.num_frames) == (32, 32, 9)
    assert adapter.max_sequence_length == TEXT


def test_latent_shape_is_the_pipelines():
    pipe = tiny_cogvideox_pipeline()
    for kw in ({}, {"height": 48, "width": 64, "num_frames": 13}, {"num_frames": 1}):
        ad = CogVideoXAdapter(pipe, **kw)
        ref = pipe.prepare_latents(
            3, pipe.transformer.config.in_channels, ad.num_frames, ad.height, ad.width,
            torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0),
        )
        assert ad.latent_shape(3) == tuple(ref.shape)  # B, F', C, h, w
    assert CogVideoXAdapter(pipe).latent_shape(1) == (1, 3, 4, 4, 4)


# ---------------------------------------------------------------- prompts
def test_encode_shapes_and_cfg(adapter):
    dim = adapter.pipeline.text_encoder.config.d_model
    off = adapter.encode_prompts(PROMPTS, guidance_scale=1.0)
    assert off.uncond is None and not off.do_cfg and off.negative_prompts is None
    assert off.cond["encoder_hidden_states"].shape == (2, TEXT, dim)
    assert not off.cond["encoder_hidden_states"].requires_grad

    on = adapter.encode_prompts(PROMPTS)  # default guidance 6 -> CFG with "" negatives
    assert on.guidance_scale == 6.0 and on.do_cfg and on.negative_prompts == ["", ""]
    assert on.uncond["encoder_hidden_states"].shape == (2, TEXT, dim)
    torch.testing.assert_close(on.cond["encoder_hidden_states"], off.cond["encoder_hidden_states"])
    torch.testing.assert_close(on.uncond["encoder_hidden_states"][0], on.uncond["encoder_hidden_states"][1])


def test_negative_prompts_are_used(adapter):
    default = adapter.encode_prompts(PROMPTS, guidance_scale=3.0)
    neg = ["blurry", "low quality"]
    custom = adapter.encode_prompts(PROMPTS, negative_prompts=neg, guidance_scale=3.0)
    assert custom.negative_prompts == neg
    assert not torch.allclose(custom.uncond["encoder_hidden_states"], default.uncond["encoder_hidden_states"])
    with torch.no_grad():
        ref_pos, ref_neg = adapter.pipeline.encode_prompt(PROMPTS, neg, True, max_sequence_length=TEXT)
    torch.testing.assert_close(custom.uncond["encoder_hidden_states"], ref_neg)
    torch.testing.assert_close(custom.cond["encoder_hidden_states"], ref_pos)
    x = noise(adapter)
    with torch.no_grad():
        assert not torch.allclose(adapter.denoise(x, 500, custom), adapter.denoise(x, 500, default))


def test_bad_inputs_raise_clear_errors(adapter):
    with pytest.raises(ValueError, match="empty"):
        adapter.encode_prompts([])
    with pytest.raises(TypeError, match="not strings"):
        adapter.encode_prompts([None])
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        adapter.encode_prompts(PROMPTS, negative_prompts=["a", "b", "c"], guidance_scale=6.0)
    for frames in (8, 0, 12):
        with pytest.raises(ValueError, match=r"num_frames must be 4k\+1"):
            CogVideoXAdapter(adapter.pipeline, num_frames=frames)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        CogVideoXAdapter(adapter.pipeline, height=40)
    with pytest.raises(ValueError, match="width must be a positive multiple of 16"):
        CogVideoXAdapter(adapter.pipeline, width=-16)
    cond = adapter.encode_prompts(PROMPTS, guidance_scale=1.0)
    with pytest.raises(ValueError, match="does not match conditioning batch"):
        adapter.denoise(noise(adapter, batch=1), 500, cond)
    with pytest.raises(ValueError, match="num_steps"):
        adapter.schedule(-1)


# ---------------------------------------------------------------- schedule
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_schedule_equals_the_pipelines(spacing):
    pipe = tiny_cogvideox_pipeline(scheduler={"timestep_spacing": spacing})
    ad = CogVideoXAdapter(pipe)
    ac = pipe.scheduler.alphas_cumprod
    for steps in (1, 2, 4, 5):
        pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=1.0, output_type="latent", max_sequence_length=TEXT)
        held = pipe.scheduler.timesteps.clone()
        sched = ad.schedule(steps)
        assert sched.kind == "diffusion" and sched.prediction_type == "v_prediction" and sched.num_steps == steps
        assert torch.equal(sched.timesteps, held)
        # what CogVideoXDDIMScheduler.step uses: alpha_bar[t] and alpha_bar[t - T // K] (final 1.0 below 0)
        stride = 1000 // steps
        lands = [int(t) - stride for t in held]
        want = [float(ac[int(t)]) for t in held] + [float(ac[lands[-1]]) if lands[-1] >= 0 else 1.0]
        torch.testing.assert_close(sched.alphas_cumprod, torch.tensor(want, dtype=torch.float32))
        if spacing != "linspace":
            assert lands[:-1] == held[1:].tolist()  # a consistent chain: each step lands on the next timestep
        # the pipeline's own scheduler is never touched
        ad.schedule(steps + 3)
        assert torch.equal(pipe.scheduler.timesteps, held)


def test_schedule_when_steps_do_not_divide_training_timesteps(adapter, caplog):
    """trailing spacing, K=3: timesteps 999, 666, 332 but the scheduler's steps land on 666, 333: mmalign
    keeps one consistent chain (alpha_bar at the next step's timestep) and says so once."""
    ac = adapter.pipeline.scheduler.alphas_cumprod
    with caplog.at_level(logging.WARNING, logger="mmalign.models.cogvideox"):
        sched = adapter.schedule(3)
        adapter.schedule(3)
    assert sched.timesteps.tolist() == [999, 666, 332]
    torch.testing.assert_close(sched.alphas_cumprod, torch.tensor([ac[999], ac[666], ac[332], 1.0]).float())
    assert sum("land on" in r.message for r in caplog.records) == 1


def test_schedule_from_dpm_scheduler_uses_its_alphas():
    from diffusers import CogVideoXDPMScheduler

    pipe = tiny_cogvideox_pipeline()
    ddim = CogVideoXAdapter(pipe).schedule(4)
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    dpm = CogVideoXAdapter(pipe).schedule(4)
    assert torch.equal(dpm.timesteps, ddim.timesteps) and torch.equal(dpm.alphas_cumprod, ddim.alphas_cumprod)


# ---------------------------------------------------------------- sampling parity
@pytest.mark.parametrize(
    "guidance, negative, steps", [(1.0, None, 2), (6.0, None, 4), (4.0, ["blurry", "ugly"], 2)]
)
def test_ddim_sampler_reproduces_the_pipeline(adapter, guidance, negative, steps):
    x = noise(adapter)
    rollout = sample(
        adapter, PROMPTS, SamplerConfig(method="ddim", eta=0.0, num_steps=steps, guidance_scale=guidance),
        latents=x, negative_prompts=negative,
    )
    traj, video = run_pipeline(adapter.pipeline, PROMPTS, steps, guidance, x, negative)
    assert rollout.latents.shape == (2, steps + 1, 3, 4, 4, 4)
    assert not rollout.stochastic.any()
    torch.testing.assert_close(rollout.latents[:, 0], x)
    torch.testing.assert_close(rollout.latents[:, 1:], traj, rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.final_latents, traj[:, -1], rtol=0, atol=1e-4)
    assert rollout.samples.shape == video.shape == (2, 9, 3, 32, 32)
    torch.testing.assert_close(rollout.samples, video, rtol=0, atol=1e-4)
    assert rollout.meta["fps"] == 8 and rollout.meta["prediction_type"] == "v_prediction"


def test_stochastic_ddim_rollout_log_probs_recompute(adapter):
    cfg = SamplerConfig(method="ddim", eta=1.0, num_steps=4, guidance_scale=6.0)
    rollout = sample(adapter, PROMPTS, cfg, generator=torch.Generator().manual_seed(0))
    # (the last step lands on alpha_bar = 1, final_alpha_cumprod: it has no variance)
    steps = [k for k in range(4) if rollout.stochastic[k]]
    assert steps[:3] == [0, 1, 2]
    assert torch.isfinite(rollout.latents).all() and torch.isfinite(rollout.log_probs[:, steps]).all()
    again = log_prob(adapter, rollout)
    torch.testing.assert_close(again.log_probs, rollout.log_probs[:, steps], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_rotary_positional_embeddings": False},  # CogVideoX-2b: sincos positions, no rotary
        {"patch_size_t": 2, "patch_size": 1},  # CogVideoX 1.5: temporal patches, padded latent frames
    ],
)
def test_ode_parity_other_transformer_variants(overrides):
    pipe = tiny_cogvideox_pipeline(**overrides)
    ad = CogVideoXAdapter(pipe)
    x = noise(ad)
    rollout = sample(ad, PROMPTS, SamplerConfig(method="ode", num_steps=2, guidance_scale=6.0), latents=x)
    traj, video = run_pipeline(pipe, PROMPTS, 2, 6.0, x)
    torch.testing.assert_close(rollout.final_latents, traj[:, -1], rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.samples, video, rtol=0, atol=1e-4)
    if "patch_size_t" in overrides:
        assert ad.padding_frames == 1 and x.shape[1] == 4 and video.shape[1] == 9


# ---------------------------------------------------------------- decode
def test_decode_shape_range_and_gradient(adapter):
    z = noise(adapter).requires_grad_(True)
    video = adapter.decode(z)
    assert video.shape == (2, 9, 3, 32, 32) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1
    video.mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ---------------------------------------------------------------- LoRA
def test_lora_trains_only_lora_and_can_be_disabled():
    ad = CogVideoXAdapter(tiny_cogvideox_pipeline(seed=0))
    x = noise(ad)
    cond = ad.encode_prompts(PROMPTS, guidance_scale=6.0)
    with torch.no_grad():
        base = ad.denoise(x, 600, cond)
    ad.add_lora(rank=4)
    trainable = [n for n, p in ad.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.rsplit(".lora_", 1)[0].split(".", 3)[-1] for n in trainable}
    assert targets == {"to_q", "to_k", "to_v", "to_out.0"}
    with torch.no_grad():
        for n, p in ad.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        tuned = ad.denoise(x, 600, cond)
        assert not torch.allclose(tuned, base, atol=1e-4)
        with ad.disable_lora():
            torch.testing.assert_close(ad.denoise(x, 600, cond), base, rtol=0, atol=0)
        torch.testing.assert_close(ad.denoise(x, 600, cond), tuned, rtol=0, atol=0)
    ad.denoise(x, 600, cond).square().mean().backward()
    assert all(p.grad is not None for p in ad.denoiser.parameters() if p.requires_grad)


# ---------------------------------------------------------------- loading
def test_from_pretrained_roundtrip_and_offline_failure(adapter, tmp_path):
    adapter.pipeline.save_pretrained(tmp_path)
    loaded = CogVideoXAdapter.from_pretrained(tmp_path, offline=True)
    assert isinstance(loaded, CogVideoXAdapter) and loaded.latent_shape(1) == adapter.latent_shape(1)
    x = noise(adapter)
    with torch.no_grad():
        a = adapter.denoise(x, 400, adapter.encode_prompts(PROMPTS, ["blurry", ""]))
        b = loaded.denoise(x, 400, loaded.encode_prompts(PROMPTS, ["blurry", ""]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    start = time.perf_counter()
    with pytest.raises(OSError, match="offline"):
        CogVideoXAdapter.from_pretrained("mmalign-test/does-not-exist-cogvideox", offline=True)
    assert time.perf_counter() - start < 10

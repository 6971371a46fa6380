"""AudioLDM adapter against the real diffusers ``AudioLDMPipeline`` (tiny random weights, CPU, offline)."""
from __future__ import annotations

import math
import time

import pytest
import torch

from mmalign.models import MODELS
from mmalign.models.audioldm import AudioLDMAdapter
from mmalign.testing.audioldm import tiny_audioldm_pipeline

PROMPTS = ["a hammer hitting a wooden surface", "rain on a tin roof"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_audioldm_pipeline(seed=0)


@pytest.fixture(scope="module")
def adapter(pipe) -> AudioLDMAdapter:
    return AudioLDMAdapter(pipe)


def run_pipeline(pipe, prompts, latents, num_steps, guidance_scale, **kwargs):
    """The pipeline's own call; returns (per-step latents K x (B,*L), waveform B,N)."""
    steps: dict[int, torch.Tensor] = {}
    out = pipe(
        prompts,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        latents=latents.clone(),
        output_type="pt",
        callback=lambda i, t, x: steps.__setitem__(i, x.clone()),
        callback_steps=1,
        **kwargs,
    )
    return [steps[i] for i in range(num_steps)], out.audios


# ---------------------------------------------------------------------------- building
def test_registry_and_tiny_builder():
    from mmalign.testing import tiny_adapter

    assert MODELS.get("audioldm") is AudioLDMAdapter
    a = tiny_adapter("audioldm", adapter_kwargs={"audio_length_in_s": 0.016})
    assert isinstance(a, AudioLDMAdapter) and a.modality == "audio" and a.num_samples == 256
    assert AudioLDMAdapter.default_guidance_scale == 2.5
    assert AudioLDMAdapter.default_model_id == "cvssp/audioldm-s-full-v2"


def test_build_time_and_seeding(pipe):
    start = time.perf_counter()
    again = tiny_audioldm_pipeline(seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"tiny AudioLDM took {elapsed:.2f}s to build"
    assert again.dtype == torch.float32 and again.device.type == "cpu"
    for name in ("unet", "vae", "text_encoder", "vocoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = tiny_audioldm_pipeline(seed=1)
    w = next(iter(pipe.unet.state_dict()))
    assert not torch.equal(pipe.unet.state_dict()[w], other.unet.state_dict()[w])


def test_tiny_builder_overrides():
    from diffusers import PNDMScheduler

    p = tiny_audioldm_pipeline(unet={"sample_size": 8}, scheduler=PNDMScheduler(skip_prk_steps=True))
    assert p.unet.config.sample_size == 8 and isinstance(p.scheduler, PNDMScheduler)
    with pytest.raises(TypeError, match="unknown overrides"):
        tiny_audioldm_pipeline(transformer={})


# ---------------------------------------------------------------------------- prompts
def test_encode_shapes_and_cfg(adapter, pipe):
    dim = pipe.text_encoder.config.projection_dim
    on = adapter.encode_prompts(PROMPTS, guidance_scale=2.5)
    assert on.do_cfg and on.guidance_scale == 2.5 and len(on) == 2
    assert set(on.cond) == {"class_labels"} and on.cond["class_labels"].shape == (2, dim)
    assert on.uncond["class_labels"].shape == (2, dim)
    assert on.negative_prompts == ["", ""]
    # CLAP embeddings are L2-normalised by the pipeline
    torch.testing.assert_close(on.cond["class_labels"].norm(dim=-1), torch.ones(2))

    off = adapter.encode_prompts(PROMPTS, guidance_scale=1.0)
    assert off.uncond is None and not off.do_cfg and off.negative_prompts is None
    torch.testing.assert_close(off.cond["class_labels"], on.cond["class_labels"])

    default = adapter.encode_prompts(PROMPTS)
    assert default.guidance_scale == 2.5 and default.do_cfg

    # "" is the negative default: its uncond equals encoding "" as a prompt
    empty = adapter.encode_prompts(["", ""], guidance_scale=1.0)
    torch.testing.assert_close(on.uncond["class_labels"], empty.cond["class_labels"])
    single = adapter.encode_prompts(PROMPTS[0], guidance_scale=1.0)
    assert single.prompts == [PROMPTS[0]] and single.cond["class_labels"].shape == (1, dim)


def test_negative_prompts_are_used(adapter):
    negatives = ["low quality", "noise and hiss"]
    cond = adapter.encode_prompts(PROMPTS, negatives, guidance_scale=3.0)
    assert cond.negative_prompts == negatives
    as_prompts = adapter.encode_prompts(negatives, guidance_scale=1.0)
    torch.testing.assert_close(cond.uncond["class_labels"], as_prompts.cond["class_labels"])
    default = adapter.encode_prompts(PROMPTS, guidance_scale=3.0)
    assert not torch.allclose(cond.uncond["class_labels"], default.uncond["class_labels"])
    # one string applies to every prompt
    shared = adapter.encode_prompts(PROMPTS, "low quality", guidance_scale=3.0)
    torch.testing.assert_close(shared.uncond["class_labels"][1], cond.uncond["class_labels"][0])
    # without guidance the negatives are not used
    assert adapter.encode_prompts(PROMPTS, negatives, guidance_scale=1.0).uncond is None


def test_bad_inputs_raise(adapter, pipe):
    with pytest.raises(ValueError, match="empty"):
        adapter.encode_prompts([])
    with pytest.raises(TypeError, match="not strings"):
        adapter.encode_prompts(["ok", 3])
    with pytest.raises(ValueError, match="negative_prompts: 1 negative prompts for 2 prompts"):
        adapter.encode_prompts(PROMPTS, ["only one"], guidance_scale=2.0)
    with pytest.raises(ValueError, match="empty"):
        adapter.encode_prompts(PROMPTS, [], guidance_scale=2.0)
    for bad in (0, -1.0, 1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="audio_length_in_s must be"):
            AudioLDMAdapter(pipe, audio_length_in_s=bad)
    with pytest.raises(TypeError, match="audio_length_in_s must be a number"):
        AudioLDMAdapter(pipe, audio_length_in_s="5")
    with pytest.raises(ValueError, match="batch_size"):
        adapter.latent_shape(0)
    with pytest.raises(ValueError, match="num_steps"):
        adapter.schedule(0)


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("seconds", [None, 0.016, 0.0123])
def test_latent_shape_and_length_match_pipeline(pipe, seconds):
    adapter = AudioLDMAdapter(pipe, audio_length_in_s=seconds)
    shape = adapter.latent_shape(2)
    x = torch.randn(shape)
    steps, audio = run_pipeline(pipe, PROMPTS, x, 1, 1.0, audio_length_in_s=seconds)
    assert tuple(steps[0].shape) == shape  # the pipeline accepted and kept this layout
    assert shape[1] == pipe.unet.config.in_channels
    assert shape[3] == pipe.vocoder.config.model_in_dim // pipe.vae_scale_factor
    assert adapter.decode(steps[0]).shape == (2, 1, audio.shape[-1]) == (2, 1, adapter.num_samples)
    if seconds is None:  # the pipeline's default duration: sample_size latent frames
        assert shape[2] == pipe.unet.config.sample_size
    else:
        assert adapter.num_samples == int(seconds * adapter.sample_rate)


# ---------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("num_steps", [1, 3, 4])
def test_schedule_matches_pipeline_scheduler(pipe, adapter, num_steps):
    pipe.scheduler.set_timesteps(7)
    before = pipe.scheduler.timesteps.clone()
    sched = adapter.schedule(num_steps)
    # the pipeline's own scheduler is not touched
    assert torch.equal(pipe.scheduler.timesteps, before)

    run_pipeline(pipe, PROMPTS[:1], torch.randn(adapter.latent_shape(1)), num_steps, 1.0)
    s = pipe.scheduler
    assert sched.kind == "diffusion" and sched.prediction_type == s.config.prediction_type == "epsilon"
    assert torch.equal(sched.timesteps, s.timesteps.long())
    assert sched.alphas_cumprod.dtype == torch.float32 and sched.alphas_cumprod.shape == (num_steps + 1,)
    torch.testing.assert_close(sched.alphas_cumprod[:-1], s.alphas_cumprod[s.timesteps].float(), rtol=0, atol=0)
    # alpha_bar of each step's target, exactly as DDIMScheduler.step computes it
    for k, t in enumerate(s.timesteps.tolist()):
        prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
        expected = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        assert sched.alphas_cumprod[k + 1].item() == pytest.approx(float(expected), abs=0)


def test_schedule_default_config_is_silent_and_other_spacings_warn(adapter):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the published "leading" spacing steps onto the next timestep
        adapter.schedule(5)
    trailing = AudioLDMAdapter(tiny_audioldm_pipeline(scheduler={"timestep_spacing": "trailing"}))
    with pytest.warns(UserWarning, match="timestep_spacing='trailing'"):
        trailing.schedule(3)


def test_schedule_from_non_ddim_scheduler():
    from diffusers import DDIMScheduler, PNDMScheduler

    base = tiny_audioldm_pipeline()
    pndm = tiny_audioldm_pipeline(scheduler=PNDMScheduler.from_config(base.scheduler.config, skip_prk_steps=True))
    sched = AudioLDMAdapter(pndm).schedule(4)
    ddim = DDIMScheduler.from_config(pndm.scheduler.config)
    ddim.set_timesteps(4)
    assert torch.equal(sched.timesteps, ddim.timesteps.long())
    assert isinstance(pndm.scheduler, PNDMScheduler)


# ---------------------------------------------------------------------------- ODE parity
@pytest.mark.parametrize(
    "guidance_scale, negatives", [(1.0, None), (2.5, None), (4.0, ["low quality", "noise"])]
)
def test_ode_parity_with_pipeline(pipe, adapter, guidance_scale, negatives):
    from mmalign.samplers import SamplerConfig, sample

    num_steps = 3
    x_t = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(1))
    config = SamplerConfig(method="ddim", eta=0.0, num_steps=num_steps, guidance_scale=guidance_scale)
    rollout = sample(adapter, PROMPTS, config, latents=x_t, negative_prompts=negatives)
    steps, audio = run_pipeline(pipe, PROMPTS, x_t, num_steps, guidance_scale, negative_prompt=negatives)

    assert rollout.latents.shape == (2, num_steps + 1, *adapter.latent_shape(2)[1:])
    assert torch.equal(rollout.latents[:, 0], x_t)
    for k in range(num_steps):
        torch.testing.assert_close(rollout.latents[:, k + 1], steps[k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rollout.final_latents, steps[-1], atol=1e-4, rtol=1e-4)
    assert rollout.samples.shape == (2, 1, audio.shape[-1])
    torch.testing.assert_close(rollout.samples[:, 0], audio.clamp(-1, 1), atol=1e-4, rtol=1e-4)
    assert rollout.meta["sample_rate"] == adapter.sample_rate
    # and guidance really changes the trajectory
    if guidance_scale > 1:
        plain, _ = run_pipeline(pipe, PROMPTS, x_t, num_steps, 1.0)
        assert not torch.allclose(plain[-1], steps[-1], atol=1e-4)


def test_ode_parity_in_micro_batches(pipe, adapter):
    from mmalign.samplers import SamplerConfig, sample

    x_t = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(2))
    config = SamplerConfig(method="ddim", eta=0.0, num_steps=2, guidance_scale=2.5, micro_batch=1)
    rollout = sample(adapter, PROMPTS, config, latents=x_t)
    steps, _ = run_pipeline(pipe, PROMPTS, x_t, 2, 2.5)
    torch.testing.assert_close(rollout.final_latents, steps[-1], atol=1e-4, rtol=1e-4)


def test_denoise_matches_pipeline_guidance(pipe, adapter):
    """One guided UNet evaluation equals the pipeline's own [uncond; cond] batch with its formula."""
    cond = adapter.encode_prompts(PROMPTS, guidance_scale=3.0)
    x = torch.randn(adapter.latent_shape(2))
    t = adapter.schedule(2).timesteps[0]
    embeds = pipe._encode_prompt(PROMPTS, "cpu", 1, True)
    with torch.no_grad():
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=None, class_labels=embeds).sample
        got = adapter.denoise(x, t, cond)
    u, c = out.chunk(2)
    torch.testing.assert_close(got, u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)
    # per-sample timesteps work with the CFG-doubled batch too
    with torch.no_grad():
        per_row = adapter.denoise(x, t.repeat(2), cond)
    torch.testing.assert_close(per_row, got, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- decode
def test_decode_shape_range_and_gradient(adapter):
    assert adapter.sample_rate == 16000 and isinstance(adapter.sample_rate, int)
    z = (3 * torch.randn(adapter.latent_shape(2))).requires_grad_(True)
    audio = adapter.decode(z)
    assert audio.shape == (2, 1, adapter.num_samples) and audio.dtype == torch.float32
    assert audio.min() >= -1 and audio.max() <= 1
    audio.pow(2).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # the default duration: sample_size latent frames * vae scale * vocoder upsampling
    assert adapter.num_samples == 16 * 2 * 4
    assert math.isclose(adapter.audio_length_in_s, adapter.num_samples / adapter.sample_rate)


# ---------------------------------------------------------------------------- LoRA
def test_lora_trainable_and_disable():
    adapter = AudioLDMAdapter(tiny_audioldm_pipeline(seed=3))
    cond = adapter.encode_prompts(PROMPTS, guidance_scale=2.0)
    x = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(0))
    t = adapter.schedule(2).timesteps[0]
    with torch.no_grad():
        base = adapter.denoise(x, t, cond)

    unet = adapter.add_lora(rank=4)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("attn1.to_q" in n for n in trainable) and any("attn2.to_k" in n for n in trainable)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    for name in ("text_encoder", "vae", "vocoder"):
        assert not any(p.requires_grad for p in getattr(adapter.pipeline, name).parameters()), name

    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
        changed = adapter.denoise(x, t, cond)
        with adapter.disable_lora():
            restored = adapter.denoise(x, t, cond)
    assert not torch.allclose(changed, base, atol=1e-4)
    assert torch.equal(restored, base)

    # gradients reach the LoRA weights through denoise
    adapter.denoise(x, t, cond).pow(2).mean().backward()
    grads = [p.grad for n, p in unet.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------- loading
def test_from_pretrained_roundtrip(tmp_path):
    pipe = tiny_audioldm_pipeline(seed=5)
    pipe.save_pretrained(tmp_path)
    original = AudioLDMAdapter(pipe, audio_length_in_s=0.016)
    loaded = AudioLDMAdapter.from_pretrained(tmp_path, offline=True, adapter_kwargs={"audio_length_in_s": 0.016})
    assert isinstance(loaded, AudioLDMAdapter) and loaded.latent_shape(2) == original.latent_shape(2)
    x = torch.randn(original.latent_shape(2))
    t = original.schedule(3).timesteps[1]
    with torch.no_grad():
        a = original.denoise(x, t, original.encode_prompts(PROMPTS, ["quiet", "loud"], guidance_scale=2.5))
        b = loaded.denoise(x, t, loaded.encode_prompts(PROMPTS, ["quiet", "loud"], guidance_scale=2.5))
        torch.testing.assert_close(b, a, atol=0, rtol=0)
        torch.testing.assert_close(loaded.decode(x), original.decode(x), atol=0, rtol=0)
    assert loaded.sample_rate == original.sample_rate
    torch.testing.assert_close(loaded.schedule(3).alphas_cumprod, original.schedule(3).alphas_cumprod)


def test_from_pretrained_missing_offline_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(OSError, match="could not load audioldm"):
        AudioLDMAdapter.from_pretrained("mmalign-test/no-such-audioldm-model", offline=True)
    with pytest.raises(OSError):
        AudioLDMAdapter.from_pretrained(tmp_path / "missing", offline=True)
    assert time.perf_counter() - start < 10

"""Stable Diffusion (1.x/2.x) and SDXL adapters on tiny random pipelines (offline, CPU).

The reference everywhere is the diffusers pipeline itself: prompt encoding, timesteps, and a whole
DDIM trajectory run by ``pipeline(...)`` from the same initial latents.
"""
from __future__ import annotations

import time

import pytest
import torch

from mmalign.models.sd import StableDiffusionAdapter, StableDiffusionXLAdapter
from mmalign.models import MODELS
from mmalign.samplers import SamplerConfig, log_prob, sample
from mmalign.testing import tiny_adapter, tiny_pipeline
from mmalign.testing.sd import TINY_CLIP_MERGES
from mmalign.testing.tokenizers import clip_tokenizer

FAMILIES = ["sd", "sdxl"]
ADAPTERS = {"sd": StableDiffusionAdapter, "sdxl": StableDiffusionXLAdapter}
PROMPTS = ["a photo of a cat", "a red square on a blue background"]



@pytest.fixture(scope="module")
def adapters() -> dict:
    """One unmodified adapter per family, shared by the read-only tests."""
    return {family: tiny_adapter(family) for family in FAMILIES}


def _unet_out(adapter, x: torch.Tensor, cond, t: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return adapter.denoise(x, torch.tensor(t), cond)


# ----------------------------------------------------------------------------- building
def test_registry_and_class_attributes() -> None:
    assert MODELS.get("sd") is StableDiffusionAdapter
    assert MODELS.get("sdxl") is StableDiffusionXLAdapter
    assert issubclass(StableDiffusionXLAdapter, StableDiffusionAdapter)
    assert StableDiffusionAdapter.default_guidance_scale == 7.5
    assert StableDiffusionXLAdapter.default_guidance_scale == 5.0
    assert StableDiffusionAdapter.pipeline_class == "StableDiffusionPipeline"
    assert StableDiffusionXLAdapter.pipeline_class == "StableDiffusionXLPipeline"
    assert StableDiffusionAdapter.lora_target_modules == ("to_q", "to_k", "to_v", "to_out.0")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_build_is_fast_seeded_and_private(family: str, adapters: dict) -> None:
    clip_tokenizer(TINY_CLIP_MERGES)  # the one slow part, cached per process
    state = torch.random.get_rng_state()
    elapsed = []
    for _ in range(3):  # best of three: a busy shared CPU can stall any single build
        start = time.perf_counter()
        pipe = tiny_pipeline(family, seed=0)
        elapsed.append(time.perf_counter() - start)
        if elapsed[-1] < 0.5:
            break
    assert min(elapsed) < 1.0, f"tiny {family} pipeline took {min(elapsed):.2f}s to build"
    # Building seeds its components without disturbing the caller's random stream.
    assert torch.equal(torch.random.get_rng_state(), state)
    ref = adapters[family].pipeline
    for name in ("unet", "vae", "text_encoder"):
        a, b = next(getattr(pipe, name).parameters()), next(getattr(ref, name).parameters())
        assert torch.equal(a, b), f"seed 0 gave different {name} weights"
    other = tiny_pipeline(family, seed=1)
    assert not torch.equal(next(other.unet.parameters()), next(pipe.unet.parameters()))
    # The text encoders' special ids are the tokenizer's (the pooled output reads the eos position).
    tok = pipe.tokenizer
    cfg = pipe.text_encoder.config
    assert (cfg.vocab_size, cfg.eos_token_id, cfg.bos_token_id) == (len(tok), len(tok) - 1, tok.bos_token_id)
    assert cfg.pad_token_id == tok.pad_token_id
    assert pipe.scheduler.init_noise_sigma == 1.0
    assert next(pipe.unet.parameters()).dtype == torch.float32


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_shapes_and_cfg(family: str, adapters: dict) -> None:
    adapter = adapters[family]
    pipe = adapter.pipeline
    on = adapter.encode_prompts(PROMPTS, guidance_scale=4.0)
    off = adapter.encode_prompts(PROMPTS, guidance_scale=1.0)
    default = adapter.encode_prompts(PROMPTS)
    assert off.uncond is None and not off.do_cfg
    assert on.uncond is not None and on.do_cfg and default.do_cfg
    assert default.guidance_scale == adapter.default_guidance_scale
    hidden = on.cond["encoder_hidden_states"]
    assert hidden.shape == (2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
    expected_keys = {"encoder_hidden_states"} | ({"text_embeds", "time_ids"} if family == "sdxl" else set())
    assert set(on.cond) == set(on.uncond) == set(off.cond) == expected_keys
    for key, value in on.cond.items():
        assert on.uncond[key].shape == value.shape
        torch.testing.assert_close(off.cond[key], value, rtol=0, atol=0)
    if family == "sdxl":
        assert on.cond["text_embeds"].shape == (2, pipe.text_encoder_2.config.projection_dim)
        h, w = adapter.height, adapter.width
        assert on.cond["time_ids"].tolist() == [[h, w, 0, 0, h, w]] * 2
        # force_zeros_for_empty_prompt: without negatives the unconditional branch is zeros, as in the pipeline.
        assert pipe.config.force_zeros_for_empty_prompt
        assert not on.uncond["encoder_hidden_states"].any()
    else:
        empty = adapter.encode_prompts(["", ""], guidance_scale=1.0).cond["encoder_hidden_states"]
        torch.testing.assert_close(on.uncond["encoder_hidden_states"], empty, rtol=0, atol=0)
    # The conditioning matches the pipeline's own encode_prompt.
    ref = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, ref[0], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompts_are_used(family: str, adapters: dict) -> None:
    adapter = adapters[family]
    negative = ["blurry, low quality", "ugly"]
    c = adapter.encode_prompts(PROMPTS, negative, guidance_scale=3.0)
    assert c.negative_prompts == negative
    as_prompts = adapter.encode_prompts(negative, guidance_scale=1.0).cond
    default = adapter.encode_prompts(PROMPTS, guidance_scale=3.0).uncond
    for key in c.uncond:
        torch.testing.assert_close(c.uncond[key], as_prompts[key], rtol=0, atol=0)
    assert not torch.equal(c.uncond["encoder_hidden_states"], default["encoder_hidden_states"])
    # A single string is one negative prompt for the whole batch.
    one = adapter.encode_prompts(PROMPTS, "ugly", guidance_scale=3.0)
    torch.testing.assert_close(one.uncond["encoder_hidden_states"][1], c.uncond["encoder_hidden_states"][1])
    # Selecting rows keeps conditioning aligned with prompts.
    sub = c.select([1])
    assert sub.prompts == PROMPTS[1:] and sub.negative_prompts == ["ugly"]
    torch.testing.assert_close(sub.uncond["encoder_hidden_states"][0], c.uncond["encoder_hidden_states"][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_raise_clear_errors(family: str, adapters: dict) -> None:
    adapter = adapters[family]
    with pytest.raises(ValueError, match="empty"):
        adapter.encode_prompts([])
    with pytest.raises(ValueError, match="negative"):
        adapter.encode_prompts(PROMPTS, ["only one"], guidance_scale=3.0)
    with pytest.raises(TypeError, match="not strings"):
        adapter.encode_prompts(["ok", 3])
    pipe = adapter.pipeline
    for bad in (12, 0, -16, 16.0, "16"):
        with pytest.raises(ValueError, match="height"):
            ADAPTERS[family](pipe, height=bad)
    with pytest.raises(ValueError, match="width"):
        ADAPTERS[family](pipe, width=20)
    with pytest.raises(ValueError, match="num_steps"):
        adapter.schedule(0)
    x = adapter.init_noise(2)
    with pytest.raises(ValueError, match="batch"):
        adapter.denoise(x[:1], 10, adapter.encode_prompts(PROMPTS, guidance_scale=1.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_shape_and_sizes(family: str, adapters: dict) -> None:
    adapter = adapters[family]
    pipe = adapter.pipeline
    s = pipe.vae_scale_factor
    assert (adapter.height, adapter.width) == (pipe.unet.config.sample_size * s,) * 2
    assert adapter.latent_shape(3) == (3, 4, adapter.height // s, adapter.width // s)
    tall = ADAPTERS[family](pipe, height=32, width=16)
    assert tall.latent_shape(1) == (1, 4, 16, 8)
    noise = tall.init_noise(4, torch.Generator().manual_seed(0), group_size=2)
    assert noise.shape == (4, 4, 16, 8) and noise.dtype == torch.float32
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[1], noise[2])
    if family == "sdxl":
        ids = tall.encode_prompts(["x"], guidance_scale=1.0).cond["time_ids"]
        assert ids.tolist() == [[32, 16, 0, 0, 32, 16]]


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_matches_pipeline_scheduler(family: str, adapters: dict) -> None:
    from diffusers import DDIMScheduler

    adapter = adapters[family]
    pipe_sched = adapter.pipeline.scheduler
    before = pipe_sched.num_inference_steps
    for k in (1, 3, 4, 7, 50):
        sched = adapter.schedule(k)
        assert sched.kind == "diffusion" and sched.prediction_type == "epsilon" and sched.num_steps == k
        ref = DDIMScheduler.from_config(pipe_sched.config)
        ref.set_timesteps(k)
        assert torch.equal(sched.timesteps, ref.timesteps)
        a = sched.alphas_cumprod
        assert a.dtype == torch.float32 and a.shape == (k + 1,)
        stride = ref.config.num_train_timesteps // k
        for i, t in enumerate(ref.timesteps.tolist()):
            assert a[i] == ref.alphas_cumprod[t]
            prev = t - stride  # DDIMScheduler.step's alpha_prod_t_prev
            assert a[i + 1] == (ref.alphas_cumprod[prev] if prev >= 0 else ref.final_alpha_cumprod)
        assert a[-1] == ref.alphas_cumprod[0]  # set_alpha_to_one=False (SD 1.5)
        assert bool((a[1:] > a[:-1]).all())
    assert pipe_sched.num_inference_steps == before  # the pipeline's scheduler was not touched


def test_schedule_other_schedulers_and_spacings() -> None:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    v = tiny_adapter("sd", scheduler={"prediction_type": "v_prediction"})
    assert v.schedule(3).prediction_type == "v_prediction"
    # PNDM (SD 1.5's) and Euler (SDXL's) schedulers: the schedule is DDIM's for the same config.
    for sched in (PNDMScheduler(**base, skip_prk_steps=True, set_alpha_to_one=False), EulerDiscreteScheduler(**base)):
        adapter = tiny_adapter("sd", scheduler=sched)
        ref = DDIMScheduler.from_config(sched.config)
        ref.set_timesteps(4)
        got = adapter.schedule(4)
        assert torch.equal(got.timesteps, ref.timesteps)
        assert got.alphas_cumprod[-1] == ref.final_alpha_cumprod
        assert type(adapter.pipeline.scheduler) is type(sched)
    trailing = tiny_adapter("sd", scheduler={"timestep_spacing": "trailing"})
    assert trailing.schedule(4).timesteps.tolist() == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
        trailing.schedule(3)  # 999 -> 666 but the next step starts at 665
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_adapter("sd", scheduler={"prediction_type": "sample"}).schedule(2)


# ----------------------------------------------------------------------------- pipeline parity
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "guidance, negative",
    [(1.0, None), (4.0, None), (4.0, ["blurry", "dark"])],
    ids=["no-cfg", "cfg", "cfg-negative"],
)
def test_ode_rollout_matches_pipeline(family: str, guidance: float, negative, adapters: dict) -> None:
    adapter = adapters[family]
    pipe = adapter.pipeline
    k = 3
    x_t = torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(7))
    rollout = sample(
        adapter, PROMPTS, SamplerConfig(method="ddim", eta=0.0, num_steps=k, guidance_scale=guidance),
        latents=x_t, negative_prompts=negative, generator=None,
    )
    assert rollout.latents.shape == (2, k + 1, *x_t.shape[1:])
    assert torch.equal(rollout.latents[:, 0], x_t)
    kwargs = dict(num_inference_steps=k, guidance_scale=guidance, negative_prompt=negative)
    ref = pipe(PROMPTS, latents=x_t.clone(), output_type="latent", **kwargs).images
    torch.testing.assert_close(rollout.final_latents, ref, rtol=0, atol=1e-4)
    images = pipe(PROMPTS, latents=x_t.clone(), output_type="pt", **kwargs).images
    assert rollout.samples.shape == images.shape == (2, 3, adapter.height, adapter.width)
    torch.testing.assert_close(rollout.samples, images, rtol=0, atol=1e-5)
    assert torch.equal(rollout.timesteps, adapter.schedule(k).timesteps)


def test_ode_rollout_matches_pipeline_v_prediction_nonsquare() -> None:
    adapter = tiny_adapter("sdxl", scheduler={"prediction_type": "v_prediction"}, adapter_kwargs={"height": 24, "width": 16})
    x_t = torch.randn(adapter.latent_shape(1), generator=torch.Generator().manual_seed(3))
    rollout = sample(adapter, PROMPTS[:1], SamplerConfig(method="ode", num_steps=2, guidance_scale=2.0), latents=x_t)
    ref = adapter.pipeline(
        PROMPTS[:1], height=24, width=16, num_inference_steps=2, guidance_scale=2.0, latents=x_t.clone(), output_type="latent"
    ).images
    torch.testing.assert_close(rollout.final_latents, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_distilled_unet_matches_pipeline(family: str) -> None:
    # LCM-style UNets (time_cond_proj_dim) embed the guidance scale and run no unconditional branch.
    adapter = tiny_adapter(family, unet={"time_cond_proj_dim": 8})
    cond = adapter.encode_prompts(PROMPTS[:1], guidance_scale=4.0)
    assert cond.uncond is None and cond.cond["timestep_cond"].shape == (1, 8)
    x_t = torch.randn(adapter.latent_shape(1), generator=torch.Generator().manual_seed(4))
    rollout = sample(adapter, PROMPTS[:1], SamplerConfig(method="ode", num_steps=2, guidance_scale=4.0, decode=False), latents=x_t)
    ref = adapter.pipeline(PROMPTS[:1], num_inference_steps=2, guidance_scale=4.0, latents=x_t.clone(), output_type="latent").images
    torch.testing.assert_close(rollout.final_latents, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_stochastic_rollout_log_probs_recompute(family: str, adapters: dict) -> None:
    adapter = adapters[family]
    config = SamplerConfig(method="ddim", eta=1.0, num_steps=2, guidance_scale=3.0, decode=False)
    rollout = sample(adapter, PROMPTS, config, negative_prompts=["dark", ""], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(rollout.log_probs).all() and rollout.stochastic.all()
    again = log_prob(adapter, rollout, [0, 1])
    torch.testing.assert_close(again.log_probs, rollout.log_probs, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- decode
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_range_shape_and_gradient(family: str, adapters: dict) -> None:
    adapter = adapters[family]
    z = (3 * torch.randn(adapter.latent_shape(2), generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    images = adapter.decode(z)
    assert images.shape == (2, 3, adapter.height, adapter.width) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.pipeline.vae.parameters())  # the VAE is frozen


def test_sdxl_float16_vae_with_force_upcast_decodes_in_float32() -> None:
    adapter = tiny_adapter("sdxl")
    z = torch.randn(adapter.latent_shape(1), generator=torch.Generator().manual_seed(2))
    reference = adapter.decode(z)
    vae = adapter.pipeline.vae
    vae.register_to_config(force_upcast=True)
    vae.to(torch.float16)
    got = adapter.decode(z.clone().requires_grad_(True))
    assert vae.dtype == torch.float16  # the pipeline's VAE is left as it was
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-2)  # float32 copy of float16-rounded weights
    got.sum().backward()


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trainable_and_disable(family: str) -> None:
    adapter = tiny_adapter(family)
    cond = adapter.encode_prompts(PROMPTS, guidance_scale=3.0)
    x = adapter.init_noise(2, torch.Generator().manual_seed(0))
    base = _unet_out(adapter, x, cond)
    unet = adapter.add_lora(rank=4)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {m for n in trainable for m in adapter.lora_target_modules if f".{m}.lora_" in n} == set(adapter.lora_target_modules)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    changed = _unet_out(adapter, x, cond)
    assert (changed - base).abs().max() > 1e-4
    with adapter.disable_lora():
        torch.testing.assert_close(_unet_out(adapter, x, cond), base, rtol=0, atol=0)
    torch.testing.assert_close(_unet_out(adapter, x, cond), changed, rtol=0, atol=0)


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_roundtrip_offline(family: str, adapters: dict, tmp_path) -> None:
    adapter = adapters[family]
    adapter.pipeline.save_pretrained(tmp_path)
    loaded = ADAPTERS[family].from_pretrained(tmp_path, offline=True)
    assert type(loaded) is ADAPTERS[family] and type(loaded.pipeline) is type(adapter.pipeline)
    cond_a = adapter.encode_prompts(PROMPTS, guidance_scale=3.0)
    cond_b = loaded.encode_prompts(PROMPTS, guidance_scale=3.0)
    x = adapter.init_noise(2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(_unet_out(loaded, x, cond_b), _unet_out(adapter, x, cond_a), rtol=0, atol=0)
    assert torch.equal(loaded.schedule(3).alphas_cumprod, adapter.schedule(3).alphas_cumprod)


def test_from_pretrained_missing_offline_fails_fast() -> None:
    for model_id in ("mmalign-test/no-such-sd-model", "/nonexistent/mmalign/sd-model"):
        start = time.perf_counter()
        with pytest.raises(OSError, match="offline") as err:
            StableDiffusionAdapter.from_pretrained(model_id, offline=True)
        assert model_id in str(err.value)
        assert time.perf_counter() - start < 10

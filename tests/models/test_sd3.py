"""SD3 adapter against the real (tiny, offline) ``StableDiffusion3Pipeline``."""
import time

import pytest
import torch

from mmalign.models.sd3 import StableDiffusion3Adapter
from mmalign.samplers import SamplerConfig, sample
from mmalign.testing.sd3 import tiny_sd3_pipeline

SIZE = 32
PROMPTS = ["a red circle", "three blue triangles"]



def make_adapter(**overrides) -> StableDiffusion3Adapter:
    return StableDiffusion3Adapter(tiny_sd3_pipeline(seed=0, **overrides), height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def adapter() -> StableDiffusion3Adapter:
    return make_adapter()


def noise(adapter, batch=len(PROMPTS), seed=0):
    return adapter.init_noise(batch, torch.Generator().manual_seed(seed))


def test_tiny_pipeline_builds_fast():
    tiny_sd3_pipeline()  # the first call may build the tokenizer
    start = time.perf_counter()
    pipe = tiny_sd3_pipeline(seed=1)
    assert time.perf_counter() - start < 1.0
    assert pipe.vae.config.shift_factor is not None
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id == len(pipe.tokenizer) - 1
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    # seeded: same seed, same weights
    a, b = tiny_sd3_pipeline(seed=3), tiny_sd3_pipeline(seed=3)
    for pa, pb in zip(a.transformer.parameters(), b.transformer.parameters()):
        assert torch.equal(pa, pb)


def test_encode_shapes_and_cfg(adapter):
    tf = adapter.pipeline.transformer.config
    seq = adapter.pipeline.tokenizer_max_length + adapter.max_sequence_length  # CLIP tokens + (zero) T5 tokens
    off = adapter.encode_prompts(PROMPTS, guidance_scale=1.0)
    assert off.uncond is None and not off.do_cfg and off.negative_prompts is None
    assert off.cond["encoder_hidden_states"].shape == (2, seq, tf.joint_attention_dim)
    assert off.cond["pooled_projections"].shape == (2, tf.pooled_projection_dim)
    assert off.cond["encoder_hidden_states"].dtype == torch.float32

    on = adapter.encode_prompts(PROMPTS)  # default guidance 4.5 -> CFG with "" negatives
    assert on.guidance_scale == StableDiffusion3Adapter.default_guidance_scale == 4.5
    assert on.do_cfg and on.negative_prompts == ["", ""]
    for key, value in on.cond.items():
        assert on.uncond[key].shape == value.shape
        torch.testing.assert_close(value, off.cond[key])
    # the two "" negatives encode identically; they differ from the prompts
    torch.testing.assert_close(on.uncond["pooled_projections"][0], on.uncond["pooled_projections"][1])
    assert not torch.allclose(on.uncond["pooled_projections"], on.cond["pooled_projections"])


def test_negative_prompts_are_used(adapter):
    default = adapter.encode_prompts(PROMPTS, guidance_scale=3.0)
    neg = ["blurry", "low quality"]
    custom = adapter.encode_prompts(PROMPTS, negative_prompts=neg, guidance_scale=3.0)
    assert custom.negative_prompts == neg
    assert not torch.allclose(custom.uncond["pooled_projections"], default.uncond["pooled_projections"])
    # exactly the pipeline's own negative embeddings
    with torch.no_grad():  # (as in the pipeline's __call__)
        _, ref_neg, _, ref_neg_pooled = adapter.pipeline.encode_prompt(
            PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt=neg
        )
    torch.testing.assert_close(custom.uncond["encoder_hidden_states"], ref_neg)
    torch.testing.assert_close(custom.uncond["pooled_projections"], ref_neg_pooled)
    x, t = noise(adapter), adapter.schedule(2).timesteps[0]
    assert not torch.allclose(adapter.denoise(x, t, custom), adapter.denoise(x, t, default))


def test_bad_inputs_raise(adapter):
    with pytest.raises(ValueError, match="empty"):
        adapter.encode_prompts([])
    with pytest.raises(ValueError, match="negative prompts for 2 prompts"):
        adapter.encode_prompts(PROMPTS, negative_prompts=["only one"], guidance_scale=4.0)
    with pytest.raises(TypeError, match="not strings"):
        adapter.encode_prompts(["ok", 3])
    with pytest.raises(ValueError, match="multiple of 4"):
        StableDiffusion3Adapter(adapter.pipeline, height=30, width=SIZE)
    with pytest.raises(ValueError, match="width"):
        StableDiffusion3Adapter(adapter.pipeline, height=SIZE, width=0)
    with pytest.raises(ValueError, match="num_steps"):
        adapter.schedule(0)
    cond = adapter.encode_prompts(PROMPTS, guidance_scale=1.0)
    with pytest.raises(ValueError, match="batch"):
        adapter.denoise(noise(adapter, batch=3), 500.0, cond)
    with pytest.raises(ValueError, match="shape"):
        adapter.decode(torch.zeros(1, 4, 8, 8))


def test_latent_shape_and_default_size():
    pipe = tiny_sd3_pipeline()
    default = StableDiffusion3Adapter(pipe)
    # the pipeline's default: transformer.sample_size * vae_scale_factor pixels
    assert default.image_size() == (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    assert default.latent_shape(3) == (3, pipe.transformer.config.in_channels, pipe.default_sample_size, pipe.default_sample_size)
    wide = StableDiffusion3Adapter(pipe, height=16, width=48)
    assert wide.latent_shape(1) == (1, 4, 8, 24)


@pytest.mark.parametrize("scheduler", [{}, {"use_dynamic_shifting": True}], ids=["static_shift", "dynamic_shift"])
def test_schedule_matches_pipeline(scheduler):
    adapter = make_adapter(scheduler=scheduler)
    pipe = adapter.pipeline
    for k in (1, 3, 4):
        pipe(PROMPTS[0], num_inference_steps=k, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="latent")
        ref_t, ref_s = pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone()
        adapter.schedule(k + 2)  # another step count: the pipeline's scheduler must stay as it is
        sched = adapter.schedule(k)
        assert sched.kind == "flow" and sched.prediction_type == "flow" and sched.num_steps == k
        assert sched.sigmas.dtype == torch.float32 and len(sched.sigmas) == k + 1 and sched.sigmas[-1] == 0
        torch.testing.assert_close(pipe.scheduler.timesteps, ref_t, rtol=0, atol=0)
        torch.testing.assert_close(sched.timesteps, ref_t, rtol=0, atol=0)
        torch.testing.assert_close(sched.sigmas, ref_s, rtol=0, atol=0)


@pytest.mark.parametrize(
    "guidance, negative", [(1.0, None), (4.5, None), (3.0, ["blurry", "ugly"])], ids=["no_cfg", "cfg", "cfg_negative"]
)
def test_ode_matches_pipeline(adapter, guidance, negative):
    k = 3
    x_t = noise(adapter)
    rollout = sample(
        adapter, PROMPTS, SamplerConfig(method="ode", num_steps=k, guidance_scale=guidance), latents=x_t,
        negative_prompts=negative,
    )
    kwargs = dict(num_inference_steps=k, guidance_scale=guidance, negative_prompt=negative, height=SIZE, width=SIZE)
    ref = adapter.pipeline(PROMPTS, latents=x_t.clone(), output_type="latent", **kwargs).images
    ref_img = adapter.pipeline(PROMPTS, latents=x_t.clone(), output_type="pt", **kwargs).images
    assert rollout.latents.shape == (2, k + 1, *adapter.latent_shape(1)[1:])
    torch.testing.assert_close(rollout.latents[:, 0], x_t)
    torch.testing.assert_close(rollout.final_latents, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.samples, ref_img, rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.sigmas, adapter.pipeline.scheduler.sigmas.cpu())


@pytest.mark.parametrize("start_step", [1, 3])
def test_partial_chain_matches_the_img2img_pipeline(adapter, start_step):
    """An ODE partial chain from clean latents (InstructVideo) is diffusers' img2img with strength
    (K - start) / K: the same noised start (``scheduler.scale_noise``), the same remaining timesteps."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    k = 4
    clean = noise(adapter, seed=5) * 0.5
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))  # the pipeline's randn_tensor draw
    cfg = SamplerConfig(method="ode", num_steps=k, guidance_scale=3.0, start_step=start_step)
    rollout = sample(adapter, PROMPTS, cfg, latents=eps, clean_latents=clean)
    img2img = StableDiffusion3Img2ImgPipeline.from_pipe(adapter.pipeline)
    ref = img2img(PROMPTS, image=clean.clone(), strength=(k - start_step) / k, num_inference_steps=k, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert rollout.num_steps == k - start_step and rollout.meta["start_step"] == start_step
    sigma = adapter.schedule(k).sigmas[start_step]
    torch.testing.assert_close(rollout.latents[:, 0], (1 - sigma) * clean + sigma * eps)
    torch.testing.assert_close(rollout.final_latents, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.timesteps, adapter.schedule(k).timesteps[start_step:])


def test_decode_range_and_gradient(adapter):
    z = noise(adapter).requires_grad_(True)
    images = adapter.decode(z)
    assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_lora_train_and_disable():
    adapter = make_adapter()
    cond = adapter.encode_prompts(PROMPTS, guidance_scale=2.0)
    x, t = noise(adapter), adapter.schedule(2).timesteps[0]
    base = adapter.denoise(x, t, cond)

    adapter.add_lora(rank=4)
    trainable = {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0] for n in trainable}
    # joint attention (both streams) and SD3.5's second self-attention are covered
    for module in ("attn.to_q", "attn.add_q_proj", "attn.to_add_out", "attn.to_out.0", "attn2.to_q"):
        assert any(name.endswith(module) for name in targets), module

    with torch.no_grad():
        for n, p in adapter.denoiser.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(adapter.denoise(x, t, cond), base)
    with adapter.disable_lora():
        torch.testing.assert_close(adapter.denoise(x, t, cond), base, rtol=0, atol=0)
    assert not torch.allclose(adapter.denoise(x, t, cond), base)
    # gradients reach the LoRA weights through the velocity
    adapter.denoise(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for n, p in adapter.denoiser.named_parameters() if p.requires_grad)


def test_from_pretrained_roundtrip(tmp_path, adapter):
    adapter.pipeline.save_pretrained(tmp_path)
    # the tiny pipeline has no T5: say so, as for any SD3 checkpoint loaded without its T5 encoder
    loaded = StableDiffusion3Adapter.from_pretrained(
        tmp_path, offline=True, adapter_kwargs={"height": SIZE, "width": SIZE}, text_encoder_3=None, tokenizer_3=None
    )
    assert isinstance(loaded, StableDiffusion3Adapter)
    x, t = noise(adapter), adapter.schedule(2).timesteps[0]
    want, got = (a.denoise(x, t, a.encode_prompts(PROMPTS)) for a in (adapter, loaded))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loaded.schedule(3).sigmas, adapter.schedule(3).sigmas)


def test_from_pretrained_missing_offline_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(OSError, match="offline"):
        StableDiffusion3Adapter.from_pretrained("mmalign-test/definitely-not-a-model", offline=True, cache_dir=tmp_path)
    assert time.perf_counter() - start < 10

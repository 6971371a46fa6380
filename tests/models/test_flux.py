"""FLUX adapter against the real (tiny, offline) ``FluxPipeline``: dev-like (embedded guidance) and
schnell-like (no guidance input) transformers, packed latents, true CFG."""
import time

import pytest
import torch

from mmalign.models.flux import FluxAdapter
from mmalign.samplers import SamplerConfig, sample
from mmalign.testing.flux import tiny_flux_pipeline

SIZE = 32
PROMPTS = ["a red circle", "three blue triangles"]



def make_adapter(true_cfg_scale: float = 1.0, **overrides) -> FluxAdapter:
    return FluxAdapter(tiny_flux_pipeline(seed=0, **overrides), height=SIZE, width=SIZE, true_cfg_scale=true_cfg_scale)


@pytest.fixture(scope="module")
def adapter() -> FluxAdapter:
    return make_adapter()


def noise(adapter, batch=len(PROMPTS), seed=0):
    return adapter.init_noise(batch, torch.Generator().manual_seed(seed))


def test_tiny_pipeline_builds_fast():
    tiny_flux_pipeline()  # the first call may build the tokenizers
    start = time.perf_counter()
    pipe = tiny_flux_pipeline(seed=1)
    assert time.perf_counter() - start < 1.0
    assert pipe.transformer.config.guidance_embeds  # dev-like by default
    assert not tiny_flux_pipeline(guidance_embeds=False).transformer.config.guidance_embeds  # schnell-like
    assert pipe.vae.config.shift_factor is not None
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id == len(pipe.tokenizer) - 1
    assert pipe.text_encoder_2.config.vocab_size >= len(pipe.tokenizer_2)
    a, b = tiny_flux_pipeline(seed=3), tiny_flux_pipeline(seed=3)
    for pa, pb in zip(a.transformer.parameters(), b.transformer.parameters()):
        assert torch.equal(pa, pb)


def test_encode_shapes_and_embedded_guidance(adapter):
    tf = adapter.pipeline.transformer.config
    cond = adapter.encode_prompts(PROMPTS)
    assert cond.uncond is None and not cond.do_cfg  # guidance-distilled: one call per step
    assert cond.guidance_scale == FluxAdapter.default_guidance_scale == 3.5
    assert cond.cond["encoder_hidden_states"].shape == (2, adapter.max_sequence_length, tf.joint_attention_dim)
    assert cond.cond["pooled_projections"].shape == (2, tf.pooled_projection_dim)
    torch.testing.assert_close(cond.cond["guidance"], torch.full((2,), 3.5))
    assert cond.shared["txt_ids"].shape == (adapter.max_sequence_length, 3)
    assert cond.shared["img_ids"].shape == (adapter.num_tokens(), 3) == ((SIZE // 4) ** 2, 3)
    # rows can be picked / repeated (the guidance travels with its row)
    picked = cond.repeat_interleave(2).select([1, 2])
    assert picked.prompts == [PROMPTS[0], PROMPTS[1]] and picked.cond["guidance"].shape == (2,)
    # the schnell-like transformer has no guidance input
    schnell = make_adapter(guidance_embeds=False)
    assert "guidance" not in schnell.encode_prompts(PROMPTS).cond


def test_embedded_guidance_reaches_the_model(adapter):
    seen = []
    hook = adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["guidance"].clone()), with_kwargs=True
    )
    try:
        x, t = noise(adapter), adapter.schedule(2).timesteps[0]
        low = adapter.denoise(x, t, adapter.encode_prompts(PROMPTS, guidance_scale=1.0))
        high = adapter.denoise(x, t, adapter.encode_prompts(PROMPTS, guidance_scale=5.0))
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0], torch.ones(2))
    torch.testing.assert_close(seen[1], torch.full((2,), 5.0))
    assert not torch.allclose(low, high)


def test_true_cfg_uses_negative_prompts():
    adapter = make_adapter(true_cfg_scale=2.0)
    with pytest.warns(UserWarning, match="no effect without negative prompts"):
        plain = adapter.encode_prompts(PROMPTS)
    assert plain.uncond is None
    neg = ["blurry", "low quality"]
    cfg = adapter.encode_prompts(PROMPTS, negative_prompts=neg)
    assert cfg.do_cfg and cfg.guidance_scale == 2.0 and cfg.negative_prompts == neg
    torch.testing.assert_close(cfg.uncond["guidance"], torch.full((2,), 3.5))  # embedded guidance kept
    with torch.no_grad():  # (the pipeline runs under no_grad; with grad, attention may take another kernel)
        ref_neg, ref_neg_pooled, _ = adapter.pipeline.encode_prompt(neg, None, max_sequence_length=adapter.max_sequence_length)
    torch.testing.assert_close(cfg.uncond["encoder_hidden_states"], ref_neg)
    torch.testing.assert_close(cfg.uncond["pooled_projections"], ref_neg_pooled)
    x, t = noise(adapter), adapter.schedule(2).timesteps[0]
    assert not torch.allclose(adapter.denoise(x, t, cfg), adapter.denoise(x, t, plain))
    # an explicit true_cfg_scale=1 turns it off even with negatives
    assert adapter.encode_prompts(PROMPTS, negative_prompts=neg, true_cfg_scale=1.0).uncond is None


def test_bad_inputs_raise(adapter):
    with pytest.raises(ValueError, match="empty"):
        adapter.encode_prompts([])
    with pytest.raises(ValueError, match="negative prompts for 2 prompts"):
        adapter.encode_prompts(PROMPTS, negative_prompts=["a", "b", "c"], true_cfg_scale=2.0)
    with pytest.raises(TypeError, match="not strings"):
        adapter.encode_prompts([None])
    with pytest.raises(ValueError, match="multiple of 4"):
        FluxAdapter(adapter.pipeline, height=SIZE, width=34)
    cond = adapter.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="image tokens"):
        adapter.denoise(torch.zeros(2, 16, 16), 500.0, cond)
    with pytest.raises(ValueError, match="shape"):
        adapter.decode(torch.zeros(2, 16, 16))


def test_latent_shape_is_the_pipelines_packing(adapter):
    pipe = adapter.pipeline
    c = pipe.vae.config.latent_channels
    h = w = SIZE // pipe.vae_scale_factor
    packed = pipe._pack_latents(torch.randn(3, c, h, w), 3, c, h, w)
    assert adapter.latent_shape(3) == tuple(packed.shape) == (3, (h // 2) * (w // 2), 4 * c)
    wide = FluxAdapter(pipe, height=16, width=48)
    assert wide.latent_shape(1) == (1, 4 * 12, 16) and wide.image_ids().shape == (48, 3)  # latent 8x24
    # the pipeline's default size: default_sample_size * vae_scale_factor
    assert FluxAdapter(pipe).image_size() == (pipe.default_sample_size * pipe.vae_scale_factor,) * 2


@pytest.mark.parametrize("scheduler", [{}, {"use_dynamic_shifting": False, "shift": 1.0}], ids=["dev", "schnell"])
def test_schedule_matches_pipeline(scheduler):
    adapter = make_adapter(scheduler=scheduler)
    pipe = adapter.pipeline
    for k in (1, 2, 4):
        pipe(PROMPTS[0], num_inference_steps=k, height=SIZE, width=SIZE, output_type="latent")
        ref_t, ref_s = pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone()
        adapter.schedule(k + 2)  # another step count: the pipeline's scheduler must stay as it is
        sched = adapter.schedule(k)
        assert sched.kind == "flow" and sched.prediction_type == "flow" and sched.num_steps == k
        assert sched.sigmas.dtype == torch.float32 and len(sched.sigmas) == k + 1 and sched.sigmas[-1] == 0
        torch.testing.assert_close(pipe.scheduler.timesteps, ref_t, rtol=0, atol=0)
        torch.testing.assert_close(sched.timesteps, ref_t, rtol=0, atol=0)
        torch.testing.assert_close(sched.sigmas, ref_s, rtol=0, atol=0)


@pytest.mark.parametrize(
    "variant, guidance, true_cfg",
    [("dev", 3.5, 1.0), ("dev", 1.0, 1.0), ("schnell", 0.0, 1.0), ("dev", 3.5, 2.5)],
    ids=["dev_guidance", "dev_no_guidance", "schnell", "dev_true_cfg"],
)
def test_ode_matches_pipeline(variant, guidance, true_cfg):
    adapter = make_adapter(true_cfg_scale=true_cfg, guidance_embeds=variant == "dev")
    k = 3
    negative = ["blurry", "ugly"] if true_cfg > 1 else None
    x_t = noise(adapter)
    rollout = sample(
        adapter, PROMPTS, SamplerConfig(method="ode", num_steps=k, guidance_scale=guidance), latents=x_t,
        negative_prompts=negative,
    )
    kwargs = dict(
        num_inference_steps=k, guidance_scale=guidance, negative_prompt=negative, true_cfg_scale=true_cfg,
        height=SIZE, width=SIZE,
    )
    ref = adapter.pipeline(PROMPTS, latents=x_t.clone(), output_type="latent", **kwargs).images
    ref_img = adapter.pipeline(PROMPTS, latents=x_t.clone(), output_type="pt", **kwargs).images
    assert rollout.latents.shape == (2, k + 1, *adapter.latent_shape(1)[1:])
    torch.testing.assert_close(rollout.final_latents, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.samples, ref_img, rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.sigmas, adapter.pipeline.scheduler.sigmas.cpu())


def test_decode_range_and_gradient(adapter):
    z = noise(adapter).requires_grad_(True)
    images = adapter.decode(z)
    assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_lora_train_and_disable():
    adapter = make_adapter()
    cond = adapter.encode_prompts(PROMPTS)
    x, t = noise(adapter), adapter.schedule(2).timesteps[0]
    base = adapter.denoise(x, t, cond)

    adapter.add_lora(rank=4)
    trainable = {n for n, p in adapter.denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.split(".lora_")[0] for n in trainable}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                   "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.0.attn.to_v"):
        assert any(name.endswith(module) for name in targets), module

    with torch.no_grad():
        for n, p in adapter.denoiser.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(adapter.denoise(x, t, cond), base)
    with adapter.disable_lora():
        torch.testing.assert_close(adapter.denoise(x, t, cond), base, rtol=0, atol=0)
    assert not torch.allclose(adapter.denoise(x, t, cond), base)
    adapter.denoise(x, t, cond).square().mean().backward()
    assert all(p.grad is not None for n, p in adapter.denoiser.named_parameters() if p.requires_grad)


def test_from_pretrained_roundtrip(tmp_path, adapter):
    adapter.pipeline.save_pretrained(tmp_path)
    loaded = FluxAdapter.from_pretrained(tmp_path, offline=True, adapter_kwargs={"height": SIZE, "width": SIZE})
    assert isinstance(loaded, FluxAdapter) and loaded.guidance_embeds
    x, t = noise(adapter), adapter.schedule(2).timesteps[0]
    want, got = (a.denoise(x, t, a.encode_prompts(PROMPTS)) for a in (adapter, loaded))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loaded.schedule(3).sigmas, adapter.schedule(3).sigmas)


def test_from_pretrained_missing_offline_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(OSError, match="offline"):
        FluxAdapter.from_pretrained("mmalign-test/definitely-not-a-model", offline=True, cache_dir=tmp_path)
    assert time.perf_counter() - start < 10

"""Wan adapter against the real (tiny, offline) ``WanPipeline``."""
import time

import pytest
import torch

from mmalign.models import MODELS
from mmalign.models.wan import WanAdapter
from mmalign.samplers import SamplerConfig, log_prob, sample
from mmalign.testing import tiny_adapter
from mmalign.testing.wan import TINY_WAN_SIZE, tiny_wan_pipeline

PROMPTS = ["a red circle", "three blue triangles"]
SIZE = dict(TINY_WAN_SIZE)  # height 16, width 16, num_frames 9 -> latents B,16,3,2,2



@pytest.fixture(scope="module")
def adapter() -> WanAdapter:
    return WanAdapter(tiny_wan_pipeline(seed=0))


def noise(adapter: WanAdapter, batch: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return adapter.init_noise(batch, torch.Generator().manual_seed(seed))


def run_pipeline(pipe, prompts, steps, guidance, latents, negative=None, **size):
    """The pipeline's own call; returns (latents after each step: B,K,*L, decoded video B,T,3,H,W)."""
    traj = []

    def keep(_pipe, _i, _t, kwargs):
        traj.append(kwargs["latents"].clone())
        return {}

    out = pipe(
        prompts, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
        latents=latents.clone(), output_type="pt", callback_on_step_end=keep, **(size or SIZE),
    )
    return torch.stack(traj, 1), out.frames


# ---------------------------------------------------------------- building
def test_tiny_pipeline_builds_fast_and_seeded():
    tiny_wan_pipeline()  # the first call may build the tokenizer
    start = time.perf_counter()
    pipe = tiny_wan_pipeline(seed=1)
    assert time.perf_counter() - start < 1.0
    assert type(pipe).__name__ == "WanPipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    a, b, c = tiny_wan_pipeline(seed=3), tiny_wan_pipeline(seed=3), tiny_wan_pipeline(seed=4)
    for pa, pb in zip(a.transformer.parameters(), b.transformer.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.transformer.parameters(), c.transformer.parameters()))


def test_registry_and_properties(adapter):
    assert MODELS.get("wan") is WanAdapter
    assert isinstance(tiny_adapter("wan"), WanAdapter)
    assert adapter.family == "wan" and adapter.modality == "video"
    assert adapter.pipeline_class == "WanPipeline"
    assert adapter.default_model_id == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert adapter.default_guidance_scale == 5.0
    assert adapter.fps == 16 and WanAdapter(adapter.pipeline, fps=24).fps == 24
    assert adapter.denoiser is adapter.pipeline.transformer
    assert (adapter.height, adapter.width, adapter.num_frames) == (16, 16, 9)
    assert adapter.max_sequence_length == 512  # WanPipeline.__call__'s default
    assert adapter.dtype == torch.float32 and adapter.device.type == "cpu"


def test_latent_shape_is_the_pipelines():
    pipe = tiny_wan_pipeline()
    for kw in ({}, {"height": 32, "width": 48, "num_frames": 13}, {"num_frames": 1}):
        ad = WanAdapter(pipe, **kw)
        size = {**SIZE, **kw}
        ref = pipe.prepare_latents(
            3, pipe.transformer.config.in_channels, size["height"], size["width"], size["num_frames"],
            torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0),
        )
        assert ad.latent_shape(3) == tuple(ref.shape)
    assert WanAdapter.default_size == {"height": 480, "width": 832, "num_frames": 81}


# ---------------------------------------------------------------- prompts
def test_encode_shapes_and_cfg(adapter):
    dim = adapter.pipeline.text_encoder.config.d_model
    off = adapter.encode_prompts(PROMPTS, guidance_scale=1.0)
    assert off.uncond is None and not off.do_cfg and off.negative_prompts is None
    assert off.cond["encoder_hidden_states"].shape == (2, 512, dim)
    assert off.cond["encoder_hidden_states"].dtype == torch.float32
    assert not off.cond["encoder_hidden_states"].requires_grad

    on = adapter.encode_prompts(PROMPTS)  # default guidance 5 -> CFG with "" negatives
    assert on.guidance_scale == 5.0 and on.do_cfg and on.negative_prompts == ["", ""]
    assert on.uncond["encoder_hidden_states"].shape == (2, 512, dim)
    torch.testing.assert_close(on.cond["encoder_hidden_states"], off.cond["encoder_hidden_states"])
    torch.testing.assert_close(on.uncond["encoder_hidden_states"][0], on.uncond["encoder_hidden_states"][1])
    # the pipeline zero-pads past each prompt's tokens
    assert on.cond["encoder_hidden_states"][:, 64:].abs().max() == 0

    short = WanAdapter(adapter.pipeline, max_sequence_length=32).encode_prompts(PROMPTS, guidance_scale=1.0)
    assert short.cond["encoder_hidden_states"].shape == (2, 32, dim)


def test_negative_prompts_are_used(adapter):
    default = adapter.encode_prompts(PROMPTS, guidance_scale=3.0)
    neg = ["blurry", "low quality"]
    custom = adapter.encode_prompts(PROMPTS, negative_prompts=neg, guidance_scale=3.0)
    assert custom.negative_prompts == neg
    assert not torch.allclose(custom.uncond["encoder_hidden_states"], default.uncond["encoder_hidden_states"])
    ref_pos, ref_neg = adapter.pipeline.encode_prompt(PROMPTS, neg, True, max_sequence_length=512)
    torch.testing.assert_close(custom.uncond["encoder_hidden_states"], ref_neg)
    torch.testing.assert_close(custom.cond["encoder_hidden_states"], ref_pos)
    x = noise(adapter)
    with torch.no_grad():
        assert not torch.allclose(adapter.denoise(x, 500.0, custom), adapter.denoise(x, 500.0, default))


def test_bad_inputs_raise_clear_errors(adapter):
    with pytest.raises(ValueError, match="empty"):
        adapter.encode_prompts([])
    with pytest.raises(TypeError, match="not strings"):
        adapter.encode_prompts(["ok", 3])
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        adapter.encode_prompts(PROMPTS, negative_prompts=["x"], guidance_scale=5.0)
    with pytest.raises(ValueError, match="empty"):
        adapter.encode_prompts(PROMPTS, negative_prompts=[], guidance_scale=5.0)
    for frames in (8, 0, 10):
        with pytest.raises(ValueError, match=r"num_frames must be 4k\+1"):
            WanAdapter(adapter.pipeline, num_frames=frames)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        WanAdapter(adapter.pipeline, height=24)
    with pytest.raises(ValueError, match="width must be a positive multiple of 16"):
        WanAdapter(adapter.pipeline, width=0)
    cond = adapter.encode_prompts(PROMPTS, guidance_scale=1.0)
    with pytest.raises(ValueError, match="does not match conditioning batch"):
        adapter.denoise(noise(adapter, batch=3), 500.0, cond)
    with pytest.raises(ValueError, match="num_steps"):
        adapter.schedule(0)


# ---------------------------------------------------------------- schedule
def test_schedule_equals_the_pipelines(adapter):
    pipe = adapter.pipeline
    for steps in (3, 7):
        pipe(PROMPTS[0], num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
             max_sequence_length=16, **SIZE)
        held_t, held_s = pipe.scheduler.timesteps.clone(), pipe.scheduler.sigmas.clone()
        sched = adapter.schedule(steps)
        assert sched.kind == "flow" and sched.prediction_type == "flow" and sched.num_steps == steps
        torch.testing.assert_close(sched.timesteps, held_t, rtol=0, atol=0)
        torch.testing.assert_close(sched.sigmas, held_s, rtol=0, atol=0)
        assert sched.sigmas[0] == 1.0 and sched.sigmas[-1] == 0.0
        # the pipeline's own scheduler is never touched
        adapter.schedule(steps + 5)
        assert torch.equal(pipe.scheduler.timesteps, held_t)


def test_schedule_from_unipc_uses_euler_sigmas_with_flow_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_wan_pipeline(unipc=True, scheduler={"flow_shift": 5.0})
    ad = WanAdapter(pipe)
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ref.set_timesteps(4)
    sched = ad.schedule(4)
    torch.testing.assert_close(sched.sigmas, ref.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(sched.timesteps, ref.timesteps, rtol=0, atol=0)
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler" and pipe.scheduler.num_inference_steps is None


# ---------------------------------------------------------------- sampling parity
@pytest.mark.parametrize("guidance, negative", [(1.0, None), (5.0, None), (4.0, ["blurry", "ugly"])])
def test_ode_sampler_reproduces_the_pipeline(adapter, guidance, negative):
    x = noise(adapter)
    steps = 3
    rollout = sample(
        adapter, PROMPTS, SamplerConfig(method="ode", num_steps=steps, guidance_scale=guidance),
        latents=x, negative_prompts=negative,
    )
    traj, video = run_pipeline(adapter.pipeline, PROMPTS, steps, guidance, x, negative)
    assert rollout.latents.shape == (2, steps + 1, *adapter.latent_shape(2)[1:])
    torch.testing.assert_close(rollout.latents[:, 0], x)
    torch.testing.assert_close(rollout.latents[:, 1:], traj, rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.final_latents, traj[:, -1], rtol=0, atol=1e-4)
    assert rollout.samples.shape == video.shape == (2, 9, 3, 16, 16)
    torch.testing.assert_close(rollout.samples, video, rtol=0, atol=1e-4)
    assert rollout.meta["fps"] == 16 and rollout.meta["family"] == "wan"


def test_sde_rollout_log_probs_recompute(adapter):
    """The adapter is deterministic between sampling and training: recomputed log-probs match exactly."""
    cfg = SamplerConfig(method="flow_grpo", num_steps=3, guidance_scale=5.0)
    rollout = sample(adapter, PROMPTS, cfg, generator=torch.Generator().manual_seed(0))
    assert rollout.stochastic.all() and torch.isfinite(rollout.log_probs).all()
    again = log_prob(adapter, rollout)
    torch.testing.assert_close(again.log_probs, rollout.log_probs, rtol=0, atol=1e-5)


def test_batched_cfg_agrees_with_the_pipelines_two_calls(adapter):
    x = noise(adapter)
    cond = adapter.encode_prompts(PROMPTS, ["blurry", ""], guidance_scale=5.0)
    batched = WanAdapter(adapter.pipeline, batch_cfg=True)
    with torch.no_grad():
        torch.testing.assert_close(batched.denoise(x, 700.0, cond), adapter.denoise(x, 700.0, cond), rtol=0, atol=1e-5)


def test_expand_timesteps_pipeline_parity():
    """Wan 2.2 TI2V-style per-token timesteps (``expand_timesteps=True``)."""
    pipe = tiny_wan_pipeline(expand_timesteps=True)
    ad = WanAdapter(pipe, max_sequence_length=16)
    x = noise(ad)
    rollout = sample(ad, PROMPTS, SamplerConfig(method="ode", num_steps=2, guidance_scale=1.0), latents=x)
    traj, video = run_pipeline(pipe, PROMPTS, 2, 1.0, x, max_sequence_length=16, **SIZE)
    torch.testing.assert_close(rollout.final_latents, traj[:, -1], rtol=0, atol=1e-4)
    torch.testing.assert_close(rollout.samples, video, rtol=0, atol=1e-4)


def test_two_expert_pipelines_are_refused():
    pipe = tiny_wan_pipeline()
    pipe.register_to_config(boundary_ratio=0.9)
    with pytest.raises(NotImplementedError, match="two-expert"):
        WanAdapter(pipe)


# ---------------------------------------------------------------- decode
def test_decode_shape_range_and_gradient(adapter):
    z = noise(adapter).requires_grad_(True)
    video = adapter.decode(z)
    assert video.shape == (2, 9, 3, 16, 16) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1
    video.mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ---------------------------------------------------------------- LoRA
def test_lora_trains_only_lora_and_can_be_disabled():
    ad = WanAdapter(tiny_wan_pipeline(seed=0), max_sequence_length=16)
    x = noise(ad)
    cond = ad.encode_prompts(PROMPTS, guidance_scale=5.0)
    with torch.no_grad():
        base = ad.denoise(x, 600.0, cond)
    ad.add_lora(rank=4)
    trainable = [n for n, p in ad.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = {n.rsplit(".lora_", 1)[0].split(".", 3)[-1] for n in trainable}
    assert targets == {"to_q", "to_k", "to_v", "to_out.0"}
    with torch.no_grad():
        for n, p in ad.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        tuned = ad.denoise(x, 600.0, cond)
        assert not torch.allclose(tuned, base, atol=1e-4)
        with ad.disable_lora():
            torch.testing.assert_close(ad.denoise(x, 600.0, cond), base, rtol=0, atol=0)
        torch.testing.assert_close(ad.denoise(x, 600.0, cond), tuned, rtol=0, atol=0)
    # gradients reach the LoRA weights through denoise
    ad.denoise(x, 600.0, cond).square().mean().backward()
    assert all(p.grad is not None for p in ad.denoiser.parameters() if p.requires_grad)


# ---------------------------------------------------------------- loading
def test_from_pretrained_roundtrip_and_offline_failure(adapter, tmp_path):
    adapter.pipeline.save_pretrained(tmp_path)
    loaded = WanAdapter.from_pretrained(tmp_path, offline=True, adapter_kwargs=dict(SIZE))
    assert isinstance(loaded, WanAdapter) and loaded.latent_shape(1) == adapter.latent_shape(1)
    x = noise(adapter)
    with torch.no_grad():
        a = adapter.denoise(x, 400.0, adapter.encode_prompts(PROMPTS, ["blurry", ""]))
        b = loaded.denoise(x, 400.0, loaded.encode_prompts(PROMPTS, ["blurry", ""]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    start = time.perf_counter()
    with pytest.raises(OSError, match="offline"):
        WanAdapter.from_pretrained("mmalign-test/does-not-exist-wan", offline=True)
    assert time.perf_counter() - start < 10

"""Shared app logic: bounds with clear messages, seeds and reward specs from text, caches, checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


def test_bounds_name_the_field_and_the_limit(apps):
    from mmalign.apps.common import check_float, check_int

    assert check_int("8", "steps", 1, 100) == 8
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100\], got 1000"):
        check_int(1000, "steps", 1, 100)
    with pytest.raises(ValueError, match="whole number"):
        check_int(2.5, "samples", 1, 16)
    with pytest.raises(ValueError, match="guidance"):
        check_float(float("nan"), "guidance", 0, 50)


def test_seeds_from_a_first_seed_or_a_list(apps):
    from mmalign.apps.common import Limits, parse_seeds

    limits = Limits(max_samples=4)
    assert parse_seeds("7", 3, limits) == [7, 8, 9]
    assert parse_seeds("", 2, limits) == [0, 1]
    assert parse_seeds("3, 9,12", 1, limits) == [3, 9, 12]
    with pytest.raises(ValueError, match=r"samples must be in \[1, 4\]"):
        parse_seeds("0", 5, limits)
    with pytest.raises(ValueError, match="at most 4 samples"):
        parse_seeds("1,2,3,4,5", 1, limits)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_seeds("seven", 1, limits)
    with pytest.raises(ValueError, match="repeat"):
        parse_seeds("1,1", 1, limits)


def test_reward_specs(apps):
    from mmalign.apps.common import parse_reward_spec, selected_rewards

    assert parse_reward_spec("clipscore model_id=assets/x batch_size=8") == ("clipscore", {"model_id": "assets/x", "batch_size": 8})
    with pytest.raises(ValueError, match="not key=value"):
        parse_reward_spec("clipscore model_id")
    assert selected_rewards(["shapeeval"], "tiny:clipscore\n\nshapeeval\n") == ["shapeeval", "tiny:clipscore"]


def test_models_and_rewards_load_once(apps, resources):
    first = resources.model("tiny:sd3")
    builds = resources.models.builds
    assert resources.model(" tiny:sd3 ") is first
    assert resources.models.builds == builds
    reward = resources.reward("tiny:jpeg_size")
    assert resources.reward("tiny:jpeg_size") is reward
    with pytest.raises(ValueError, match="does not exist"):
        resources.model("assets/no-such-model")
    with pytest.raises(ValueError, match="choose a model"):
        resources.model("  ")


def test_lru_cache_is_bounded(apps):
    from mmalign.apps.common import LRUCache

    cache = LRUCache(2)
    for key in "abc":
        cache.get(key, lambda key=key: key.upper())
    assert len(cache) == 2 and cache.builds == 3
    assert cache.get("c", lambda: "new") == "C"


def test_lora_checkpoint_changes_the_model_and_loads_exactly(apps, resources, lora_checkpoint):
    from safetensors.torch import load_file

    from mmalign.apps.common import apply_checkpoint, resolve_checkpoint_dir
    from mmalign.testing import tiny_adapter

    run = lora_checkpoint.parent.parent
    assert resolve_checkpoint_dir(run) == lora_checkpoint  # a run dir resolves to its latest checkpoint
    adapter = tiny_adapter("sd3")
    info = apply_checkpoint(adapter, lora_checkpoint)
    assert info["kind"] == "lora" and info["step"] == 3
    params = dict(adapter.denoiser.named_parameters())
    for name, tensor in load_file(str(lora_checkpoint / "trained.safetensors")).items():
        assert torch.equal(params[name].detach(), tensor)
    base = resources.model("tiny:sd3")
    tuned = resources.model("tiny:sd3", str(run))
    assert tuned is not base
    x = torch.randn(base.latent_shape(1), generator=torch.Generator().manual_seed(0))
    cond = base.encode_prompts(["a red circle"], guidance_scale=1.0)
    with torch.no_grad():
        assert not torch.allclose(base.denoise(x, base.schedule(2).timesteps[0], cond),
                                  tuned.denoise(x, tuned.schedule(2).timesteps[0], cond))


def test_bad_checkpoints_say_why(apps, tmp_path, lora_checkpoint):
    from mmalign.apps.common import apply_checkpoint, resolve_checkpoint_dir
    from mmalign.testing import tiny_adapter

    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a training checkpoint"):
        resolve_checkpoint_dir(tmp_path)
    with pytest.raises(ValueError, match="does not fit this model"):
        apply_checkpoint(tiny_adapter("sd"), lora_checkpoint)


def test_resolution_is_checked_and_bounded(apps, resources):
    from mmalign.apps.common import Limits, with_resolution

    adapter = resources.model("tiny:sd3")
    assert with_resolution(adapter, 0, 0, Limits()) is adapter
    resized = with_resolution(adapter, 64, 48, Limits())
    assert resized.image_size() == (64, 48) and adapter.height is None
    with pytest.raises(ValueError, match=r"height must be in \[0, 128\]"):
        with_resolution(adapter, 256, 0, Limits(max_side=128))
    with pytest.raises(ValueError, match="resolution"):
        with_resolution(adapter, 33, 0, Limits())


def test_media_html_for_every_modality(apps, monkeypatch):
    from mmalign import media
    from mmalign.apps.common import media_html, mp4_data_uri

    assert media_html(torch.rand(3, 8, 8), "image").startswith('<img class="mm-media" src="data:image/png;base64,')
    video = torch.rand(4, 3, 8, 8)
    if mp4_data_uri(video, 8) is not None:  # PyAV present: a real player
        assert '<video class="mm-media mm-video" controls' in media_html(video, "video", fps=8)
    monkeypatch.delattr(media, "save_video_mp4", raising=False)  # without MP4 writing: an animated GIF
    assert "data:image/gif;base64," in media_html(video, "video", fps=8)
    assert "<audio" in media_html(torch.rand(1, 800) * 2 - 1, "audio", sample_rate=16000)
    with pytest.raises(ValueError, match="sample rate"):
        media_html(torch.zeros(1, 10), "audio")


def test_shipped_assets_resolve_from_any_directory(apps, tmp_path, monkeypatch):
    from mmalign.apps.common import resolve_asset

    monkeypatch.chdir(tmp_path)
    resolved = resolve_asset("assets/shapeworld-sd3")
    assert Path(resolved).is_absolute() and resolved.endswith("assets/shapeworld-sd3")
    assert (Path(resolved) / "model_index.json").is_file()
    assert resolve_asset("assets/not-shipped") == "assets/not-shipped"
    assert resolve_asset("tiny:sd3") == "tiny:sd3"


def test_diffusers_lora_directory_loads_exactly(apps, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from mmalign.apps.common import apply_checkpoint
    from mmalign.testing import tiny_adapter

    trained = tiny_adapter("sd3")
    trained.add_lora(4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trained.denoiser.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    type(trained.pipeline).save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(trained.denoiser))
    loaded = tiny_adapter("sd3")
    assert apply_checkpoint(loaded, tmp_path)["kind"] == "diffusers_lora"
    x = torch.randn(trained.latent_shape(1), generator=torch.Generator().manual_seed(1))
    cond = trained.encode_prompts(["a red circle"], guidance_scale=1.0)
    t = trained.schedule(2).timesteps[0]
    with torch.no_grad():
        assert torch.allclose(trained.denoise(x, t, cond), loaded.denoise(x, t, cond), atol=1e-6)
        assert not torch.allclose(tiny_adapter("sd3").denoise(x, t, cond), loaded.denoise(x, t, cond))

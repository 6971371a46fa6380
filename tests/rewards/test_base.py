"""The reward base: input loading, validity, batching, callables; pure-torch preprocessing."""
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mmalign
from mmalign.media import load_media, save_wav
from mmalign.rewards import CallableReward, InvalidSampleError, Reward, ScoreBatch, as_reward, load_reward
from mmalign.rewards.preprocess import (
    ImagePreprocess,
    pixel_budget_size,
    resample_audio,
    resize_longest_side_pad,
    resize_shortest_edge_crop,
    warn_if_truncated,
)


def brightness(samples, prompts):
    return samples.mean(dim=(1, 2, 3))


class Brightness(Reward):
    name = "brightness"
    needs = frozenset({"prompt"})
    differentiable = True

    def score(self, samples, prompts, references, metadata, **media_info):
        return ScoreBatch(samples.mean(dim=(1, 2, 3)), {"red": samples[:, 0].mean(dim=(1, 2))})


def test_plain_callable_is_wrapped_and_scored():
    r = as_reward(brightness)
    imgs = torch.rand(3, 3, 8, 8)
    out = r(imgs, ["a", "b", "c"])
    torch.testing.assert_close(out.scores, imgs.mean(dim=(1, 2, 3)))
    assert out.scores.dtype == torch.float32 and out.valid.all() and out.reasons == [None] * 3
    assert out.provenance["reward"] == "brightness"
    assert load_reward(brightness).name == "brightness"
    assert mmalign.load_reward(r) is r
    with pytest.raises(TypeError, match="callable"):
        as_reward(3)


def test_invalid_items_get_nan_and_a_reason_never_zero(tmp_path):
    imgs = torch.rand(4, 3, 8, 8)
    imgs[1, 0, 0, 0] = float("nan")
    out = Brightness()(imgs, ["a", "b", "", "d"])
    assert out.valid.tolist() == [True, False, False, True]
    assert "non-finite" in out.reasons[1] and out.reasons[2] == "empty prompt"
    assert math.isnan(out.scores[1]) and math.isnan(out.scores[2]) and math.isnan(out.components["red"][1])
    torch.testing.assert_close(out.scores[[0, 3]], imgs[[0, 3]].mean(dim=(1, 2, 3)))
    with pytest.raises(InvalidSampleError, match="2 of 4 items not scored.*item 1: non-finite"):
        out.raise_if_invalid()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    good = tmp_path / "good.png"
    Image.fromarray((np.random.rand(8, 8, 3) * 255).astype(np.uint8)).save(good)
    out = Brightness()([str(good), str(bad), str(tmp_path / "missing.png")], ["a", "b", "c"])
    assert out.valid.tolist() == [True, False, False]
    assert "unreadable image" in out.reasons[1] and "does not exist" in out.reasons[2]
    out = Brightness()(torch.rand(1, 3, 4, 4) * 2, ["a"])
    assert not out.valid[0] and "outside [0, 1]" in out.reasons[0]


def test_batch_level_mistakes_raise():
    r = Brightness()
    with pytest.raises(ValueError, match="B,3,H,W"):
        r(torch.rand(2, 8, 8, 3), ["a", "b"])
    with pytest.raises(ValueError, match="1 prompts for 2 samples"):
        r(torch.rand(2, 3, 8, 8), ["a"])
    with pytest.raises(ValueError, match="needs prompts"):
        r(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no samples"):
        r([], [])
    with pytest.raises(ValueError, match="batch_size"):
        Brightness(batch_size=0)


def test_batching_does_not_change_scores_and_keeps_gradients():
    imgs = torch.rand(7, 3, 8, 8, requires_grad=True)
    prompts = [str(i) for i in range(7)]
    a = Brightness(batch_size=2)(imgs, prompts)
    b = Brightness(batch_size=16)(imgs, prompts)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)
    a.scores.sum().backward()
    torch.testing.assert_close(imgs.grad, torch.full_like(imgs, 1 / (3 * 64)))


def test_pil_numpy_uint8_and_paths_match_tensors(tmp_path):
    arr = (np.random.rand(8, 8, 3) * 255).astype(np.uint8)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    p = tmp_path / "x.png"
    Image.fromarray(arr).save(p)
    inputs = [Image.fromarray(arr), arr, torch.from_numpy(arr).permute(2, 0, 1), str(p), t]
    out = Brightness()(inputs, ["a"] * 5)
    torch.testing.assert_close(out.scores, t.mean().expand(5))


def test_load_media_audio_and_video(tmp_path):
    wav = torch.sin(torch.linspace(0, 100, 1600))[None] * 0.5
    save_wav(wav, tmp_path / "a.wav", 16000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....")
    items, reasons = load_media([str(tmp_path / "a.wav"), str(tmp_path / "bad.wav")], "audio", sample_rate=8000)
    assert items[0].shape == (1, 800) and reasons[0] is None and "unreadable audio" in reasons[1]
    items, reasons = load_media(torch.rand(2, 4, 3, 8, 8), "video")
    assert len(items) == 2 and items[0].shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="B,T,3,H,W"):
        load_media(torch.rand(2, 3, 8, 8), "video")
    items, reasons = load_media(torch.full((1, 1, 10), 2.0), "audio")
    assert "outside [-1, 1]" in reasons[0]


def test_resize_policies():
    img = torch.rand(1, 3, 20, 40)
    out = resize_shortest_edge_crop(img, 10)
    assert out.shape == (1, 3, 10, 10)
    torch.testing.assert_close(out, torch.nn.functional.interpolate(img, size=(10, 20), mode="bicubic", antialias=True, align_corners=False)[..., 5:15])
    pad = resize_longest_side_pad(img, 10)
    assert pad.shape == (1, 3, 10, 10)
    assert (pad[..., :2, :] == 0).all() and (pad[..., 7:, :] == 0).all()  # 5 rows of image, centred
    torch.testing.assert_close(pad[..., 2:7, :], torch.nn.functional.interpolate(img, size=(5, 10), mode="bicubic", antialias=True, align_corners=False))
    h, w = pixel_budget_size(1000, 500, max_pixels=28 * 28 * 16, multiple=28)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 16 and h > w
    x = torch.rand(2, 3, 30, 30, requires_grad=True)
    ImagePreprocess(size=16)(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="unknown resize policy"):
        ImagePreprocess(policy="stretch")(x)


def test_resample_audio_reproduces_a_sine():
    sr_in, sr_out, f = 16000, 48000, 440.0
    t_in = torch.arange(sr_in) / sr_in
    y = resample_audio(torch.sin(2 * math.pi * f * t_in)[None], sr_in, sr_out)
    t_out = torch.arange(y.shape[-1]) / sr_out
    assert y.shape == (1, 48000)
    assert (y[0, 300:-300] - torch.sin(2 * math.pi * f * t_out)[300:-300]).abs().max() < 1e-3
    assert resample_audio(y, 48000, 48000) is y
    with pytest.raises(ValueError, match="positive"):
        resample_audio(y, 0, 16000)


def test_truncation_warns():
    from mmalign.testing.tokenizers import clip_tokenizer

    tok = clip_tokenizer(1000)
    with pytest.warns(UserWarning, match="exceed the model's 77-token limit"):
        warn_if_truncated(tok, ["word " * 100], 77)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_truncated(tok, ["short"], 77)


def test_callable_returning_wrong_count_raises():
    r = CallableReward(lambda s, p: [1.0], name="bad")
    with pytest.raises(ValueError, match="returned 1 scores for 2 samples"):
        r(torch.rand(2, 3, 4, 4), ["a", "b"])

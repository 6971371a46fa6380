"""Video rewards: frame samplers and weights, an image reward over frames, temporal consistency."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import mmalign
from mmalign.media import save_video_gif
from mmalign.rewards import CallableReward, Reward, ScoreBatch, load_reward
from mmalign.rewards.video import (
    FRAME_SAMPLERS,
    TemporalConsistencyReward,
    VideoFramesReward,
    first_middle_last_frames,
    frame_weights,
    load_video_frames,
    random_frames,
    segmental_frames,
    uniform_frames,
)
from mmalign.testing import tiny_reward

PROMPTS = ["a red circle", "two blue squares", "a green star", "a cat on a mat"]


class Brightness(Reward):
    """Image reward: mean pixel value; component ``red``: mean of the red channel."""

    name = "brightness"
    needs = frozenset({"prompt"})
    differentiable = True

    def score(self, samples, prompts, references, metadata, **media_info):
        return ScoreBatch(samples.mean(dim=(1, 2, 3)), {"red": samples[:, 0].mean(dim=(1, 2))})


def videos(b=4, t=16, size=8, seed=0):
    return torch.rand(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- samplers and weights


def test_frame_sampler_indices():
    assert set(FRAME_SAMPLERS) == {"uniform", "segmental", "first_middle_last", "random"}
    assert uniform_frames(16, 4) == [0, 5, 10, 15]  # 0, 5, 10, 15 = round(i * 15 / 3)
    assert uniform_frames(10, 4) == [0, 3, 6, 9]
    assert uniform_frames(9, 1) == [4]
    assert segmental_frames(16, 4) == [2, 6, 10, 14]  # middles of [0,4), [4,8), [8,12), [12,16)
    assert segmental_frames(10, 3) == [1, 5, 8]  # floor(5/3), floor(15/3), floor(25/3)
    assert segmental_frames(2, 4) == [0, 0, 1, 1]  # fewer frames than k: repeats
    assert first_middle_last_frames(16, 4) == [0, 7, 15]
    assert first_middle_last_frames(1, 3) == [0, 0, 0]
    picks = random_frames(16, 4, seed=3)
    assert picks == sorted(random.Random(3).sample(range(16), 4)) == random_frames(16, 4, seed=3)
    assert len(set(picks)) == 4
    assert random_frames(16, 4, seed=4) != picks or random_frames(16, 4, seed=5) != picks
    many = random_frames(3, 5, seed=0)
    assert len(many) == 5 and many == sorted(many) and set(many) <= {0, 1, 2}
    with pytest.raises(ValueError):
        segmental_frames(16, 0)
    with pytest.raises(ValueError):
        uniform_frames(0, 2)


def test_frame_weights_by_hand():
    torch.testing.assert_close(frame_weights([2, 6, 10, 14], 16), torch.full((4,), 0.25))
    raw = [math.exp(-0.3 * abs(t - 7.5)) for t in (2, 6, 10, 14)]
    expected = torch.tensor([r / sum(raw) for r in raw])
    got = frame_weights([2, 6, 10, 14], 16, "attenuated", rate=0.3)
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32 and abs(float(got.sum()) - 1) < 1e-6
    assert got[1] > got[0] and got[2] > got[3]  # the centre counts more
    torch.testing.assert_close(frame_weights([0, 1], 4, "attenuated", rate=0.0), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(frame_weights([0, 1, 2], 3, [1, 2, 1]), torch.tensor([0.25, 0.5, 0.25]))
    with pytest.raises(ValueError):
        frame_weights([0, 1], 2, "nope")
    with pytest.raises(ValueError):
        frame_weights([0, 1], 2, [1.0])
    with pytest.raises(ValueError):
        frame_weights([0, 1], 2, [1.0, -1.0])


# ----------------------------------------------------------------------------- an image reward over frames


@pytest.mark.parametrize("sampler,weighting", [("segmental", "uniform"), ("uniform", "attenuated"), ("random", "attenuated")])
def test_video_frames_is_the_weighted_image_reward_of_the_frames(sampler, weighting):
    image = Brightness()
    reward = load_video_frames(image, sampler=sampler, k=4, weighting=weighting, rate=0.2, seed=7)
    v = videos()
    out = reward(v, PROMPTS)
    idx = {"segmental": segmental_frames, "uniform": uniform_frames, "random": random_frames}[sampler](16, 4, seed=7)
    w = frame_weights(idx, 16, weighting, rate=0.2)
    direct = image(v[:, idx].reshape(-1, 3, 8, 8), [p for p in PROMPTS for _ in idx])
    per_frame = direct.scores.view(4, 4)
    torch.testing.assert_close(out.scores, (per_frame * w).sum(1))
    torch.testing.assert_close(out.components["frame_scores"], per_frame)
    torch.testing.assert_close(out.components["red"], (direct.components["red"].view(4, 4) * w).sum(1))
    assert out.all_valid and reward.needs == image.needs and reward.differentiable
    assert out.provenance["preprocessing"]["frames"]["sampler"] == sampler


def test_video_frames_with_tiny_clipscore():
    reward = tiny_reward("video_frames", k=3, sampler="first_middle_last")
    clip = reward.image_reward
    assert clip.name == "clipscore" and isinstance(reward, VideoFramesReward)
    v = videos(b=2, t=8, size=32, seed=1)
    prompts = PROMPTS[:2]
    out = reward(v, prompts)
    direct = clip(v[:, [0, 3, 7]].reshape(-1, 3, 32, 32), [p for p in prompts for _ in range(3)]).scores.view(2, 3)
    torch.testing.assert_close(out.scores, direct.mean(1), rtol=1e-5, atol=1e-5)
    assert out.components["frame_scores"].shape == (2, 3)
    assert reward.differentiable == clip.differentiable and reward.weights_id == clip.weights_id


def test_video_frames_gradients_reach_only_the_sampled_frames():
    reward = load_video_frames(Brightness(), sampler="segmental", k=4, weighting="attenuated")
    v = videos(b=2).requires_grad_(True)
    reward(v, PROMPTS[:2]).scores.sum().backward()
    touched = (v.grad.abs().sum(dim=(0, 2, 3, 4)) > 0).nonzero().flatten().tolist()
    assert touched == [2, 6, 10, 14]
    frozen = load_video_frames(CallableReward(lambda x, p: x.mean(dim=(1, 2, 3)), differentiable=False))
    assert not frozen.differentiable


def test_video_frames_batch_invariance():
    reward = load_video_frames(Brightness(), sampler="random", k=5, seed=1, batch_size=3)
    v = videos()
    full = reward(v, PROMPTS).scores
    singles = torch.cat([reward(v[i : i + 1], PROMPTS[i : i + 1]).scores for i in range(4)])
    torch.testing.assert_close(full, singles)


def test_video_frames_invalid_items_have_reasons(tmp_path):
    def picky(samples, prompts):  # NaN for frames whose first pixel is exactly 0
        s = samples.mean(dim=(1, 2, 3))
        return torch.where(samples[:, 0, 0, 0] == 0, torch.full_like(s, math.nan), s)

    reward = load_video_frames(CallableReward(picky, name="picky"), sampler="segmental", k=4)
    v = videos(b=3)
    v[1, 6, 0, 0, 0] = 0.0  # a sampled frame the image reward cannot score
    v[2, 5, 0, 0, 0] = 0.0  # an unsampled frame: fine
    out = reward(v, PROMPTS[:3])
    assert out.valid.tolist() == [True, False, True]
    assert out.reasons[1].startswith("frame 6:") and "picky" in out.reasons[1]
    assert math.isnan(out.scores[1]) and torch.isfinite(out.scores[[0, 2]]).all()

    v = videos(b=2)
    v[0, 3, 1, 2, 2] = float("nan")
    out = reward(v, PROMPTS[:2])
    assert out.valid.tolist() == [False, True] and "non-finite" in out.reasons[0]
    out = reward(v[1:], [""])
    assert out.reasons == ["empty prompt"]

    good = save_video_gif(videos(b=1, t=6)[0], tmp_path / "ok.gif")
    bad = tmp_path / "bad.gif"
    bad.write_bytes(b"GIF89a not really a gif")
    out = reward([str(good), str(bad), str(tmp_path / "missing.gif")], PROMPTS[:3])
    assert out.valid.tolist() == [True, False, False]
    assert out.reasons[1].startswith("unreadable video") and out.reasons[2].startswith("unreadable video")


def test_video_frames_by_name_and_errors():
    reward = load_reward("video_frames", image_reward=Brightness(), k=2, sampler="uniform")
    assert isinstance(reward, VideoFramesReward) and reward.frame_indices(5) == [0, 4]
    assert mmalign.load_reward("video_frames", image_reward=Brightness()).k == 4
    with pytest.raises(ValueError):
        load_video_frames(Brightness(), sampler="nope")
    with pytest.raises(ValueError):
        load_video_frames(Brightness(), weighting="nope")
    with pytest.raises(ValueError):
        VideoFramesReward(CallableReward(lambda x, p: x.mean(), modality="video"))


# ----------------------------------------------------------------------------- temporal consistency


def test_temporal_consistency_equals_cosines_by_hand():
    reward = tiny_reward("temporal_consistency")
    assert isinstance(reward, TemporalConsistencyReward) and reward.needs == frozenset() and reward.differentiable
    v = videos(b=2, t=5, size=40, seed=2)
    out = reward(v)  # no prompts needed
    frames = v.reshape(-1, 3, 40, 40)
    size = reward.model.config.image_size
    x = F.interpolate(frames, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    with torch.no_grad():
        emb = reward.model(pixel_values=(x - mean) / std).image_embeds
    emb = F.normalize(emb, dim=-1).view(2, 5, -1)
    pairs = torch.stack([F.cosine_similarity(emb[:, i], emb[:, i + 1], dim=-1) for i in range(4)], dim=1)
    torch.testing.assert_close(out.components["pair_similarity"], pairs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.scores, pairs.mean(1), rtol=1e-5, atol=1e-5)
    same = reward(v[:, :1].expand(-1, 4, -1, -1, -1).contiguous())
    torch.testing.assert_close(same.scores, torch.ones(2), rtol=1e-5, atol=1e-5)  # a still video is fully consistent


def test_temporal_consistency_gradients_batches_and_invalid_items():
    reward = tiny_reward("temporal_consistency", batch_size=3)
    v = videos(b=4, t=4, size=32, seed=3).requires_grad_(True)
    out = reward(v)
    out.scores.sum().backward()
    assert torch.isfinite(v.grad).all() and (v.grad.abs().sum(dim=(0, 2, 3, 4)) > 0).all()
    singles = torch.cat([reward(v[i : i + 1].detach()).scores for i in range(4)])
    torch.testing.assert_close(out.scores.detach(), singles, rtol=1e-5, atol=1e-5)
    one = reward(videos(b=2, t=1, size=32))
    assert not one.valid.any() and "at least 2 frames" in one.reasons[0]
    bad = videos(b=2, t=4, size=32).clone()
    bad[0, 2, 0, 0, 0] = float("nan")
    out = reward(bad)
    assert out.valid.tolist() == [False, True] and out.reasons[0]
    sub = tiny_reward("temporal_consistency", sampler="segmental", k=3)
    assert sub(videos(b=1, t=12, size=32)).components["pair_similarity"].shape == (1, 2)


def test_gif_roundtrip_keeps_every_frame_of_still_and_paused_clips(tmp_path):
    """GIF writers merge identical consecutive frames (a still clip becomes one frame); files written by
    save_video_gif record the frame duration, and read_video restores the frame count and content."""
    from mmalign.media import read_video

    still = torch.zeros(9, 3, 8, 8)
    still[:, 0] = 1.0
    paused = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    paused[2:5] = paused[2]  # frames 2-4 identical: merged in the file
    back = read_video(save_video_gif(still, tmp_path / "still.gif", fps=10))
    assert back.shape == still.shape and (back - still).abs().max() <= 1 / 255 + 1e-6
    back = read_video(save_video_gif(paused, tmp_path / "paused.gif", fps=10))  # random colours: palette-quantised
    assert back.shape == paused.shape and torch.equal(back[2], back[3]) and torch.equal(back[3], back[4])

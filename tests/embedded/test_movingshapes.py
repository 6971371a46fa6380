"""MovingShapes (the video world), MotionEval (its verifier) and the ``motioneval`` reward."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmalign
from mmalign.embedded import movingshapes as ms
from mmalign.embedded.motioneval import as_video_array, evaluate, parse_prompt, track
from mmalign.embedded.verify_motioneval import NEGATIVES, accuracy, negative_video


# ---------------------------------------------------------------------------------------------- generator
def test_clips_are_deterministic_and_in_the_rewards_layout():
    a, b = ms.clip_at(5, seed=3), ms.clip_at(5, seed=3)
    assert np.array_equal(a.video, b.video) and a.caption == b.caption
    assert not np.array_equal(a.video, ms.clip_at(6, seed=3).video)
    videos, caps, cats = ms.generate(14, seed=0)
    assert videos.shape == (14, ms.FRAMES, 3, ms.SIZE, ms.SIZE) and videos.dtype == torch.float32
    assert 0.0 <= float(videos.min()) and float(videos.max()) <= 1.0
    assert cats == [ms.CATEGORIES[i % len(ms.CATEGORIES)] for i in range(14)]
    for cap, cat in zip(caps, cats):
        assert parse_prompt(cap).category == cat


def test_clips_act_out_their_captions():
    moving = ms.sample_clip(np.random.default_rng(0), "motion")
    (tr,) = moving.tracks
    d = ms.DIRECTIONS[moving.script.actors[0].direction]
    along = np.diff(np.array(tr.xs if d[0] else tr.ys)) * (d[0] + d[1])
    assert (along >= 1).all()  # at least 1 px per frame, always forward
    appear = ms.sample_clip(np.random.default_rng(1), "appear")
    assert not appear.tracks[0].visible[0] and appear.tracks[0].visible[-1]
    assert appear.video[0].max() == 0  # nothing drawn before it appears
    turn = ms.sample_clip(np.random.default_rng(2), "color_change")
    actor = turn.script.actors[0]
    assert turn.tracks[0].colors[0] == actor.color and turn.tracks[0].colors[-1] == actor.to_color
    bounce = ms.sample_clip(np.random.default_rng(3), "bounce")
    path = np.array(bounce.tracks[0].xs if np.ptp(bounce.tracks[0].xs) else bounce.tracks[0].ys)
    steps = np.sign(np.diff(path))
    assert (np.diff(steps[steps != 0]) != 0).sum() == 1  # exactly one reversal


def test_bad_generator_arguments_raise():
    with pytest.raises(ValueError, match="unknown categories"):
        ms.generate(2, 0, categories=["flying"])
    with pytest.raises(ValueError, match="size >= 16"):
        ms.sample_clip(np.random.default_rng(0), "still", size=8)
    with pytest.raises(ValueError, match="two different named colours"):
        ms.Actor("circle", "red", "turn", to_color="red")
    with pytest.raises(ValueError, match="unknown direction"):
        ms.Actor("circle", "red", "move", "sideways")


def test_prompt_suites_are_disjoint_held_out_compositions_and_shipped():
    suites = ms.build_prompt_suites()
    train, held = {p for _, p in suites["train"]}, {p for _, p in suites["heldout"]}
    assert train and held and not train & held
    assert {c for c, _ in suites["heldout"]} == set(ms.CATEGORIES) == {c for c, _ in suites["train"]}
    assert all(ms.is_heldout(parse_prompt(p)) for p in held)
    assert not any(ms.is_heldout(parse_prompt(p)) for p in train)
    for split in ms.SUITE_SPLITS:  # the shipped files are what the builder writes
        assert ms.prompt_suite(split) == suites[split]
    rng = np.random.default_rng(0)
    for _ in range(200):
        clip = ms.sample_clip(rng, ms.CATEGORIES[int(rng.integers(len(ms.CATEGORIES)))], exclude_heldout=True)
        assert clip.caption not in held and not ms.is_heldout(clip.script)


# ---------------------------------------------------------------------------------------------- verifier
def test_rendered_clips_pass_their_own_captions():
    acc = accuracy(6, seed=11)
    assert set(acc) == set(ms.CATEGORIES)
    assert all(strict == 1.0 and clauses == 1.0 for strict, clauses in acc.values()), acc


@pytest.mark.parametrize("kind", sorted(NEGATIVES))
def test_hand_made_negatives_are_rejected(kind):
    rng = np.random.default_rng([7, len(kind)])
    cat = NEGATIVES[kind][0]
    for i in range(3):
        clip = ms.clip_at(i, 21, categories=[cat])
        assert evaluate(clip.video, clip.caption).strict  # the source clip itself passes
        video, prompt = negative_video(kind, clip, rng)
        res = evaluate(video, prompt)
        assert not res.strict, (kind, prompt, res.clauses)


def test_clause_kinds_and_jitter_fails_only_smoothness():
    clip = ms.clip_at(1, 4, categories=["motion"])
    res = evaluate(clip.video, clip.caption)
    assert res.kinds == ["identity", "action", "temporal"] and res.score == 1.0
    jittery, prompt = negative_video("jittery_motion", clip, np.random.default_rng(0))
    bad = evaluate(jittery, prompt)
    assert dict(zip(bad.kinds, (ok for _, ok in bad.clauses)))["temporal"] is False
    assert bad.kind_scores()["identity"] == 1.0


def test_an_empty_clip_earns_nothing_on_any_prompt():
    empty = np.zeros((ms.FRAMES, ms.SIZE, ms.SIZE, 3), np.uint8)
    for cat in ms.CATEGORIES:
        clip = ms.clip_at(0, 8, categories=[cat])
        assert evaluate(empty, clip.caption).score == 0.0, cat


def test_tracking_keeps_identity_through_a_colour_change_and_two_movers():
    clip = ms.clip_at(0, 5, categories=["color_change"])
    res = evaluate(clip.video, clip.caption)
    assert res.strict and len(res.tracks) == 1 and res.tracks[0].present().all()
    two = ms.clip_at(0, 5, categories=["two_moving"])
    res2 = evaluate(two.video, two.caption)
    assert res2.strict and len(res2.tracks) == 2 and len(res2.clauses) == 6


def test_parse_errors_name_the_problem():
    assert parse_prompt("A video of a red circle moving left.").actors[0].direction == "left"
    assert parse_prompt("a circle bouncing").actors[0].color is None
    for bad, why in [
        ("", "empty"),
        ("a red circle flying", "unknown action"),
        ("a red hexagon moving left", "unknown shape"),
        ("a red circle moving sideways", "unknown direction"),
        ("two red circles moving left", "does not start with"),
        ("a circle turning blue", "starting colour"),
        ("a red circle moving left and a red circle moving up", "cannot be told apart"),
        ("a red circle, moving left", "only words"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_prompt(bad)


def test_bad_media_raise_clear_errors():
    clip = ms.clip_at(0, 0)
    with pytest.raises(ValueError, match="4 dims"):
        evaluate(clip.video[0], clip.caption)
    nan = ms.to_tensor(clip.video).clone()
    nan[3, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"frames \[3\] contain NaN"):
        evaluate(nan, clip.caption)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        as_video_array(ms.to_tensor(clip.video) * 3)
    with pytest.raises(ValueError, match="at least 3 frames"):
        evaluate(clip.video[:2], clip.caption)
    # layouts: uint8 T,H,W,3 and float T,3,H,W agree
    assert evaluate(clip.video, clip.caption).clauses == evaluate(ms.to_tensor(clip.video), clip.caption).clauses


def test_track_links_nearest_detections():
    from mmalign.embedded.shapeeval import Detection

    def det(x, y):
        return Detection("circle", "red", 30, x, y, (0, 0, 1, 1))

    frames = [[det(5, 5), det(20, 20)], [det(21, 20), det(6, 5)], [], [det(22, 21)], [det(30, 5)]]
    tracks = track(frames, max_jump=3, max_gap=1)
    assert [t.present().tolist() for t in tracks] == [[True, True, False, False, False], [True, True, False, True, False], [False, False, False, False, True]]


# ---------------------------------------------------------------------------------------------- reward
@pytest.fixture(scope="module")
def batch():
    videos, caps, _ = ms.generate(7, seed=2)
    return videos, caps


def test_motioneval_reward_is_registered_and_batch_invariant(batch):
    videos, caps = batch
    assert "motioneval" in mmalign.list_rewards()
    reward = mmalign.load_reward("motioneval", batch_size=3)
    assert reward.modality == "video" and not reward.differentiable
    # mismatched prompts (rotated by one) so that scores differ across items
    prompts = caps[1:] + caps[:1]
    out = reward(videos, prompts)
    assert out.all_valid and out.scores.shape == (7,)
    single = torch.cat([reward(videos[i : i + 1], prompts[i]).scores for i in range(7)])
    assert torch.equal(out.scores, single)
    assert torch.equal(out.scores, reward(videos, prompts).scores)  # deterministic
    assert set(out.components) == {"strict", "num_clauses", "identity", "action", "temporal"}
    own = reward(videos, caps)
    assert torch.equal(own.scores, torch.ones(7)) and torch.equal(own.components["strict"], torch.ones(7))
    assert float(out.scores.mean()) < 1.0
    u8 = (videos * 255).round().to(torch.uint8)
    assert torch.equal(reward(u8, caps).scores, own.scores)


def test_motioneval_reward_reports_bad_items(batch):
    videos, caps = batch
    reward = mmalign.load_reward("motioneval")
    bad = videos.clone()
    bad[1, 4] = math.nan
    prompts = list(caps)
    prompts[2] = "a red circle flying"
    prompts[3] = "   "
    out = reward(bad, prompts)
    assert out.valid.tolist() == [True, False, False, False, True, True, True]
    assert "non-finite" in out.reasons[1] and "unknown action" in out.reasons[2] and out.reasons[3] == "empty prompt"
    assert torch.isnan(out.scores[1:4]).all() and out.scores[0] == 1.0
    with pytest.raises(ValueError, match="B,T,3,H,W"):
        reward(videos[0], caps[0])  # a single clip without the batch dimension
    with pytest.raises(ValueError, match="prompts"):
        reward(videos, caps[:3])
    with pytest.raises(ValueError, match="outside the MovingShapes grammar"):
        mmalign.load_reward("motioneval", on_unparseable="raise")(videos[:1], ["a red circle flying"])
    zero = mmalign.load_reward("motioneval", on_unparseable="zero")(videos[:1], ["a red circle flying"])
    assert zero.all_valid and zero.scores.tolist() == [0.0]
    with pytest.raises(ValueError, match="unknown MotionEval thresholds"):
        mmalign.load_reward("motioneval", thresholds={"max_speed": 3})


# ---------------------------------------------------------------------------------------------- media
def test_mp4_and_gif_are_written_and_read_back(tmp_path, batch):
    from mmalign.media import load_media, read_video, save_media, save_video_mp4

    videos, caps = batch
    path = save_video_mp4(videos[1], tmp_path / "clip.mp4", fps=8, upscale=1)
    back = read_video(path)
    assert back.shape == videos[1].shape
    assert float((back - videos[1]).abs().mean()) < 0.05  # lossy but close
    paths = save_media(videos[:2], "video", tmp_path / "out", fps=8)
    assert [p.suffix for p in paths] == [".gif", ".gif"] and all(p.with_suffix(".mp4").is_file() for p in paths)
    items, reasons = load_media([str(path), str(tmp_path / "missing.mp4")], "video")
    assert reasons[0] is None and "does not exist" in reasons[1]
    with pytest.raises(ValueError, match="T,3,H,W"):
        save_video_mp4(videos[0, :, 0], tmp_path / "bad.mp4")
    bad = videos[0].clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        save_video_mp4(bad, tmp_path / "nan.mp4")
    # the verifier reads the written MP4 (H.264 at 4x) like the clip itself
    big = save_video_mp4(videos[1], tmp_path / "big.mp4", fps=8, upscale=4)
    frames = torch.nn.functional.avg_pool2d(read_video(big), 4)
    assert evaluate(frames, caps[1]).strict

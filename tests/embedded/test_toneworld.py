"""ToneWorld (generator, prompt suites) and ToneEval (verifier, ``toneeval`` reward)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmalign
from mmalign.embedded import toneworld as tw
from mmalign.embedded.toneeval import ToneEvalReward, detect_events, evaluate, parse_prompt
from mmalign.rewards.preprocess import resample_audio


def _scene(*events: tuple[float, float, float, str]) -> tw.Scene:
    """Events (onset, duration, frequency, timbre) at amplitude 0.5."""
    return tw.Scene(tuple(tw.Event(o, d, f, t, 0.5, "low", None) for o, d, f, t in events))


# ---------------------------------------------------------------------------------------------- generator
def test_examples_are_deterministic_and_match_their_captions():
    a = tw.example_at(7, seed=3)
    b = tw.example_at(7, seed=3)
    assert a.caption == b.caption and np.array_equal(a.audio, b.audio)
    assert not np.array_equal(a.audio, tw.example_at(8, seed=3).audio)
    audio, caps, cats = tw.generate(10, seed=0)
    assert audio.shape == (10, 1, 8000) and audio.dtype == torch.float32
    assert float(audio.abs().max()) <= 1.0 and cats[:5] == list(tw.CATEGORIES)
    ds = tw.ToneWorldDataset(10, seed=0)
    x, cap = ds[3]
    assert torch.equal(x, audio[3]) and cap == caps[3]
    for i in range(25):
        ex = tw.example_at(i, seed=1)
        assert ex.spec.prompt() == ex.caption and ex.spec.category == ex.category
        assert parse_prompt(ex.caption) == ex.spec
        evs = ex.scene.events
        assert len(evs) == ex.spec.num_events
        assert all(e2.onset - e1.offset >= tw.MIN_GAP - 1e-9 for e1, e2 in zip(evs, evs[1:]))
        assert evs[0].onset >= tw.MARGIN - 1e-9 and evs[-1].offset <= tw.CLIP_SECONDS - tw.MARGIN + 1e-9
        for e, spec in zip(evs, ex.spec.events()):
            assert e.frequency in tw.PITCHES[e.pitch] and e.frequency % tw.FRAME_RATE == 0
            assert spec.pitch in (None, e.pitch) and spec.timbre in (None, e.timbre)
            lo, hi = tw.DURATIONS[spec.duration]
            assert lo <= e.duration <= hi


def test_render_is_the_formula_at_any_rate():
    scene = _scene((0.1, 0.3, 500.0, "beep"))
    for rate in (8000, 16000):
        x = tw.render(scene, rate)
        t = np.arange(x.shape[0]) / rate
        mid = (t > 0.12) & (t < 0.38)  # inside the ramps: 0.5 sin(2 pi 500 t)
        np.testing.assert_allclose(x[mid], 0.5 * np.sin(2 * np.pi * 500 * t[mid]), atol=1e-6)
        assert np.all(x[t < 0.099] == 0) and np.all(x[t > 0.401] == 0)
    with pytest.raises(ValueError, match="timbre"):
        tw.render(_scene((0.1, 0.1, 500.0, "bell")))


def test_prompt_suites_are_disjoint_by_category_and_held_out_compositions():
    train = tw.build_prompt_suites()["train"]
    held = tw.build_prompt_suites()["heldout"]
    assert {c for c, _ in train} == {c for c, _ in held} == set(tw.CATEGORIES)
    assert not {p for _, p in train} & {p for _, p in held}
    for cat, p in train + held:
        req = parse_prompt(p)
        assert req.category == cat
        assert tw.is_heldout(req) == ((cat, p) in held)
    shipped = [tuple(line.split("\t")) for line in tw.prompt_suite_path("heldout").read_text().splitlines()]
    assert shipped == held  # the shipped file is what the code builds
    for i in range(30):  # exclude_heldout keeps held-out captions out of generated training clips
        assert not tw.is_heldout(tw.example_at(i, 2, exclude_heldout=True).spec)


def test_parse_prompt_rejects_text_outside_the_grammar_with_the_reason():
    assert parse_prompt("Two short beeps then a long beep.").num_events == 3
    for bad, why in [("", "empty"), ("a dog barking", "sound"), ("two beep", "agree"), ("a loud beep", "unexpected word 'loud'"),
                     ("five beeps", "count"), ("four beeps then a buzz", "at most 4")]:
        with pytest.raises(ValueError, match=why):
            parse_prompt(bad)


# ---------------------------------------------------------------------------------------------- verifier
def test_ground_truth_passes_and_hand_made_negatives_fail():
    rng = np.random.default_rng(0)
    rejected = {k: [] for k in tw.EDIT_KINDS}
    for i in range(30):
        ex = tw.example_at(i, seed=11)
        res = evaluate(ex.audio, ex.caption)
        assert res.strict and res.score == 1.0, (ex.caption, res.clauses)
        for kind in tw.EDIT_KINDS:
            edited = tw.edit_caption(ex.spec, kind, rng)
            if edited is not None:
                rejected[kind].append(not evaluate(ex.audio, edited).strict)
    assert all(len(v) > 0 and all(v) for v in rejected.values()), {k: (sum(v), len(v)) for k, v in rejected.items()}


def test_specific_negatives_wrong_count_order_rhythm_timbre():
    low_high = tw.render(_scene((0.1, 0.15, 300.0, "beep"), (0.5, 0.15, 1000.0, "beep")))
    assert evaluate(low_high, "a low beep then a high beep").strict
    swapped = evaluate(low_high, "a high beep then a low beep")
    assert swapped.clauses[0][1] and not swapped.strict and swapped.score == pytest.approx(3 / 5)  # count and timbres right, both pitches wrong
    assert not evaluate(low_high, "three beeps").strict
    assert evaluate(low_high, "two beeps").strict
    short_long = tw.render(_scene((0.1, 0.08, 500.0, "beep"), (0.3, 0.32, 500.0, "beep")))
    assert evaluate(short_long, "a short beep then a long beep").strict
    assert not evaluate(short_long, "a long beep then a short beep").strict
    assert not evaluate(short_long, "two short beeps").strict
    buzz = tw.render(_scene((0.2, 0.2, 200.0, "buzz")))  # its 2nd harmonic (400 Hz) must not read as the pitch
    assert evaluate(buzz, "a low buzz").strict and not evaluate(buzz, "a low beep").strict
    legato = tw.render(_scene((0.1, 0.2, 300.0, "beep"), (0.3, 0.2, 1200.0, "beep")))  # no gap: split by pitch
    assert evaluate(legato, "a low beep then a high beep").strict
    silence = np.zeros(8000, np.float32)
    res = evaluate(silence, "a beep")
    assert res.events == [] and res.score == 0.0


def test_pitch_survives_resampling_16k_to_8k_and_matches_the_formula():
    rate = 16000
    t16 = np.arange(rate) / rate
    x16 = torch.from_numpy((0.5 * np.sin(2 * np.pi * 1100.0 * t16)).astype(np.float32))
    x8 = resample_audio(x16, 16000, 8000)
    t8 = np.arange(8000) / 8000
    ref = 0.5 * np.sin(2 * np.pi * 1100.0 * t8)
    np.testing.assert_allclose(x8.numpy()[200:-200], ref[200:-200], atol=2e-3)  # band-limited sinc: the same sine
    for audio, sr in ((x16, 16000), (x8, 8000)):
        (ev,) = detect_events(audio[None], sr)
        assert ev.f0 == pytest.approx(1100.0, rel=0.005) and ev.pitch == "high" and ev.timbre == "beep"
    # a whole clip rendered at 16 kHz reads the same as at 8 kHz (the reward resamples in torch)
    ex = tw.example_at(3, seed=5)
    hi = tw.render(ex.scene, 16000)
    assert evaluate(hi, ex.caption, 16000).strict
    d8 = detect_events(ex.audio, 8000)
    d16 = detect_events(hi, 16000)
    assert [e.pitch for e in d8] == [e.pitch for e in d16]
    assert all(abs(a.onset - b.onset) < 0.005 and abs(a.f0 / b.f0 - 1) < 0.005 for a, b in zip(d8, d16))


# ---------------------------------------------------------------------------------------------- reward
def test_toneeval_reward_registered_batched_and_per_clause():
    reward = mmalign.load_reward("toneeval")
    assert isinstance(reward, ToneEvalReward) and reward.modality == "audio" and not reward.differentiable
    audio, caps, _ = tw.generate(6, seed=4)
    prompts = [caps[0], caps[1], "a high beep then a low beep then a high beep", caps[3], caps[4], caps[5]]
    out = reward(audio, prompts, sample_rate=8000)
    assert out.valid.all() and out.scores.dtype == torch.float32
    assert set(out.components) == {"strict", "count", "num_clauses", "num_events"}
    singles = torch.cat([reward(audio[i : i + 1], prompts[i : i + 1], sample_rate=8000).scores for i in range(6)])
    assert torch.equal(singles, out.scores)  # batch score == one-by-one
    assert out.scores[2] < 1.0 and out.components["strict"][2] == 0.0
    assert out.scores[[0, 1, 3, 4, 5]].eq(1.0).all()
    # stereo at 16 kHz (channels averaged, resampled in torch) scores the same clips the same
    stereo = torch.from_numpy(np.stack([tw.render(tw.example_at(i, 4).scene, 16000) for i in range(6)]))[:, None].repeat(1, 2, 1)
    out16 = reward(stereo, prompts, sample_rate=16000)
    assert torch.equal(out16.components["strict"], out.components["strict"])


def test_toneeval_reward_bad_media_and_prompts(tmp_path):
    reward = mmalign.load_reward("toneeval")
    audio, caps, _ = tw.generate(3, seed=0)
    with pytest.raises(ValueError, match="sample_rate"):
        reward(audio, caps)
    with pytest.raises(ValueError, match="zero-length"):
        reward(torch.zeros(2, 1, 0), caps[:2], sample_rate=8000)
    with pytest.raises(ValueError, match="B,C,N"):
        reward(torch.zeros(8000), caps[:1], sample_rate=8000)
    with pytest.raises(ValueError, match="B,C,N"):
        reward(torch.zeros(1, 1, 2, 8000), caps[:1], sample_rate=8000)
    bad = audio.clone()
    bad[1, 0, 100] = float("nan")
    out = reward(bad, caps, sample_rate=8000)
    assert out.valid.tolist() == [True, False, True] and "NaN" in out.reasons[1] and math.isnan(out.scores[1])
    out = reward(audio, [caps[0], "a purple elephant", ""], sample_rate=8000)
    assert out.valid.tolist() == [True, False, False]
    assert "outside the ToneWorld grammar" in out.reasons[1] and out.reasons[2] == "empty prompt"
    assert mmalign.load_reward("toneeval", on_unparseable="zero")(audio[:1], ["a purple elephant"], sample_rate=8000).scores[0] == 0.0
    from mmalign.media import save_wav

    path = save_wav(torch.from_numpy(tw.render(tw.example_at(0, 0).scene, 16000))[None], tmp_path / "clip.wav", 16000)
    out = reward([str(path)], [caps[0]], sample_rate=8000)  # read at 16 kHz, resampled to the given rate
    assert out.valid.all() and out.scores[0] == 1.0

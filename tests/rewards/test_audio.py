"""CLAP reward: pure-torch log-mel vs ClapFeatureExtractor, the score formula, deterministic windows."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ClapFeatureExtractor
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

from mmalign.media import save_wav
from mmalign.rewards import load_reward
from mmalign.rewards.audio import ClapReward, LogMelSpectrogram, mel_filter_bank, split_windows, window_count
from mmalign.rewards.preprocess import resample_audio
from mmalign.testing import tiny_reward
from mmalign.testing.media_rewards import tiny_clap_processor

PROMPTS = ["a dog barking", "rain on a roof", "a piano melody", "a car passing by"]
SR = 48_000


@pytest.fixture(scope="module")
def clap():
    return tiny_reward("clap")


def noise(b, n, channels=1, seed=0, amp=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, channels, n, generator=g) * 2 - 1) * amp


def by_hand(reward: ClapReward, window_features: torch.Tensor, windows_per_item: int, prompts):
    """The CLAP formula on the same model: mean of unit window embeddings vs the unit text embedding."""
    model = reward.model
    with torch.no_grad():
        pooled = model.audio_model(input_features=window_features, is_longer=torch.zeros(len(window_features), 1, dtype=torch.bool)).pooler_output
        audio = F.normalize(model.audio_projection(pooled), dim=-1).view(len(prompts), windows_per_item, -1).mean(1)
        tok = reward.tokenizer(list(prompts), padding=True, return_tensors="pt")
        text = F.normalize(model.text_projection(model.text_model(**tok).pooler_output), dim=-1)
    return (F.normalize(audio, dim=-1) * text).sum(-1)


# ----------------------------------------------------------------------------- the log-mel front end


@pytest.mark.parametrize("norm,scale", [("slaney", "slaney"), (None, "htk")])
def test_mel_filter_bank_matches_transformers(norm, scale):
    ours = mel_filter_bank(513, 64, 50, 14_000, SR, norm=norm, mel_scale=scale)
    theirs = hf_mel_filter_bank(513, 64, 50, 14_000, SR, norm=norm, mel_scale=scale)
    np.testing.assert_allclose(ours, theirs, rtol=1e-7, atol=1e-9)


def test_log_mel_equals_clap_feature_extractor_on_a_short_clip(clap):
    # the published extractor settings (64 mel bins, 10 s at 48 kHz), non-fusion path, a 0.7 s clip
    fe = ClapFeatureExtractor(frequency_min=50, frequency_max=14_000, truncation="rand_trunc", padding="repeatpad")
    wave = noise(1, 33_600, seed=1)[0, 0]
    ref = fe(wave.double().numpy(), sampling_rate=SR, truncation="rand_trunc", return_tensors="pt")["input_features"][0, 0]
    mel = LogMelSpectrogram(n_mels=64, frequency_min=50, frequency_max=14_000)
    ours = mel(split_windows(wave[None], 480_000, 480_000, "repeatpad")[0, 0])
    assert ours.shape == ref.shape == (1001, 64)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=2e-3)  # dB; float32 STFT vs numpy float64
    # the tiny reward's own features (16 bins, 1 s windows) against its own feature extractor
    fe = ClapFeatureExtractor(feature_size=16, max_length_s=1, frequency_min=50, frequency_max=14_000, truncation="rand_trunc")
    ref = fe(wave[:20_000].double().numpy(), sampling_rate=SR, return_tensors="pt")["input_features"]
    ours = clap.features(split_windows(wave[None, :20_000], clap.window_samples, clap.hop_samples, clap.padding)[:, 0])
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=2e-3)


# ----------------------------------------------------------------------------- the score


def test_clap_score_equals_the_formula_on_the_same_model(clap):
    fe = ClapFeatureExtractor(feature_size=16, max_length_s=1, frequency_min=50, frequency_max=14_000, truncation="rand_trunc")
    audio = noise(4, 30_000, seed=2)
    out = clap(audio, PROMPTS, sample_rate=SR)
    feats = fe([a[0].double().numpy() for a in audio], sampling_rate=SR, return_tensors="pt")["input_features"].float()
    expected = by_hand(clap, feats, 1, PROMPTS)
    torch.testing.assert_close(out.scores, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.components["cosine"], out.scores)
    assert out.scores.dtype == torch.float32 and ((out.scores >= -1) & (out.scores <= 1)).all()
    assert clap.provenance()["preprocessing"]["score"] == "cosine"

    scaled = tiny_reward("clap", scale_by_logit=True)
    out2 = scaled(audio, PROMPTS, sample_rate=SR)
    torch.testing.assert_close(out2.components["cosine"], out.scores)
    torch.testing.assert_close(out2.scores, out.scores * scaled.model.logit_scale_t.exp().detach())


def test_long_clips_use_deterministic_windows(clap):
    n = int(2.5 * SR)  # 2.5 s with 1 s windows
    wave = noise(1, n, seed=3)
    w = clap.window_samples
    assert w == SR and clap.hop_samples == SR
    windows = split_windows(wave[:, 0], w, w)
    assert windows.shape == (1, math.ceil(n / w), w) == (1, 3, w)
    torch.testing.assert_close(windows[0, 1], wave[0, 0, w : 2 * w])
    torch.testing.assert_close(windows[0, 2, : n - 2 * w], wave[0, 0, 2 * w :])
    assert (windows[0, 2, n - 2 * w :] == 0).all()  # the last window is zero-padded
    a = clap(wave, PROMPTS[:1], sample_rate=SR).scores
    b = clap(wave, PROMPTS[:1], sample_rate=SR).scores
    assert torch.equal(a, b)
    feats = clap.features(windows[0])
    torch.testing.assert_close(a, by_hand(clap, feats, 3, PROMPTS[:1]), rtol=1e-4, atol=1e-4)

    overlapping = tiny_reward("clap", hop_seconds=0.5)
    assert window_count(n, w, SR // 2) == 1 + math.ceil((n - w) / (SR // 2)) == 4
    assert split_windows(wave[:, 0], w, SR // 2).shape == (1, 4, w)
    assert torch.isfinite(overlapping(wave, PROMPTS[:1], sample_rate=SR).scores).all()
    assert window_count(w, w, w) == 1 and window_count(w + 1, w, w) == 2


def test_resampling_mono_mixdown_and_sample_rate(clap):
    audio16 = noise(2, 8_000, seed=4)
    out16 = clap(audio16, PROMPTS[:2], sample_rate=16_000)
    up = resample_audio(audio16, 16_000, SR)
    out48 = clap(up, PROMPTS[:2], sample_rate=SR)
    torch.testing.assert_close(out16.scores, out48.scores, rtol=1e-5, atol=1e-5)
    stereo = noise(2, 20_000, channels=2, seed=5)
    torch.testing.assert_close(clap(stereo, PROMPTS[:2], sample_rate=SR).scores,
                               clap(stereo.mean(1, keepdim=True), PROMPTS[:2], sample_rate=SR).scores)
    with pytest.raises(ValueError, match="sample_rate"):
        clap(audio16, PROMPTS[:2])


def test_gradients_reach_the_waveform_and_batches_agree():
    reward = tiny_reward("clap", batch_size=3)
    audio = noise(4, 12_000, seed=6).requires_grad_(True)
    out = reward(audio, PROMPTS, sample_rate=SR)
    out.scores.sum().backward()
    assert torch.isfinite(audio.grad).all() and (audio.grad.abs().sum(dim=(1, 2)) > 0).all()
    singles = torch.cat([reward(audio[i : i + 1].detach(), PROMPTS[i : i + 1], sample_rate=SR).scores for i in range(4)])
    torch.testing.assert_close(out.scores.detach(), singles, rtol=1e-4, atol=1e-5)


def test_invalid_items_and_files(clap, tmp_path):
    audio = noise(3, 10_000, seed=7)
    audio[1, 0, 5] = float("nan")
    out = clap(audio, PROMPTS[:3], sample_rate=SR)
    assert out.valid.tolist() == [True, False, True] and "non-finite" in out.reasons[1]
    out = clap(audio[[0, 2]], ["", PROMPTS[1]], sample_rate=SR)
    assert out.reasons == ["empty prompt", None]

    good = save_wav(audio[0], tmp_path / "good.wav", SR)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    out = clap([str(good), str(corrupt), str(tmp_path / "missing.wav")], PROMPTS[:3], sample_rate=SR)
    assert out.valid.tolist() == [True, False, False]
    assert out.reasons[1].startswith("unreadable audio") and out.reasons[2].startswith("unreadable audio")
    torch.testing.assert_close(out.scores[0], clap(audio[:1], PROMPTS[:1], sample_rate=SR).scores[0], rtol=1e-3, atol=1e-3)


def test_long_prompts_warn_and_loading_by_name(clap):
    with pytest.warns(UserWarning, match="token limit"):
        out = clap(noise(1, 4_000), ["a dog " * 60], sample_rate=SR)
    assert out.all_valid
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clap(noise(1, 4_000), ["a dog"], sample_rate=SR)
    same = load_reward("clap", model=clap.model, processor=tiny_clap_processor())
    assert isinstance(same, ClapReward) and same.sampling_rate == SR and same.window_samples == SR
    with pytest.raises(OSError, match="offline"):
        load_reward("clap", model_id="laion/does-not-exist-here", offline=True)


def test_fused_checkpoints_get_the_extractors_fusion_features():
    from transformers import ClapConfig, ClapModel

    from mmalign.rewards.audio import load_clap
    from mmalign.testing.tokenizers import roberta_tokenizer

    tok = roberta_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=2,
                max_position_embeddings=79, projection_dim=16)
    audio = dict(spec_size=64, num_mel_bins=16, window_size=4, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                 hidden_size=32, projection_dim=16, enable_fusion=True, fusion_type="aff_2d")
    reward = load_clap(model=ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).eval(), processor=tiny_clap_processor())
    wave = noise(2, 20_000, seed=8)
    fe = ClapFeatureExtractor(feature_size=16, max_length_s=1, frequency_min=50, frequency_max=14_000, truncation="fusion")
    ref = fe([w[0].double().numpy() for w in wave], sampling_rate=SR, return_tensors="pt")["input_features"]
    ours = reward.features(split_windows(wave[:, 0], reward.window_samples, reward.hop_samples)[:, 0])
    assert ours.shape == ref.shape == (2, 4, 101, 16)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=2e-3)
    out = reward(wave, PROMPTS[:2], sample_rate=SR)
    assert out.all_valid and reward.provenance()["preprocessing"]["log_mel"]["filters"] == "htk (fusion)"

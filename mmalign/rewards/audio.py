"""CLAP text-audio reward with deterministic windows and a differentiable, pure-torch log-mel front end.

:class:`ClapReward` (``clap``, default weights ``laion/clap-htsat-unfused``, transformers ``ClapModel``):

- audio is mixed down to mono and resampled to the model's rate (48 kHz) with
  :func:`~mmalign.rewards.preprocess.resample_audio` when ``sample_rate`` differs;
- clips are split into fixed windows of the model's length (``max_length_s`` of its feature extractor:
  10 s = 480,000 samples) every ``hop`` samples (default: one window, no overlap). A clip of N > W
  samples gets ``1 + ceil((N - W) / hop)`` windows (``ceil(N / W)`` with the default hop), the last one
  zero-padded; a clip of N <= W samples is one window padded as the feature extractor pads short clips
  (``repeatpad``: tiled floor(W / N) times, then zeros). No random crops, and never transformers'
  default ``truncation="fusion"``;
- each window becomes a log-mel spectrogram computed here in torch, reproducing ``ClapFeatureExtractor``
  for the non-fusion path (``rand_trunc``): centred STFT (reflect padding) with a periodic Hann window of
  ``fft_window_size`` samples and ``hop_length`` hop, power spectrum, Slaney-scale Slaney-normalised
  mel filters between ``frequency_min`` and ``frequency_max``, floor 1e-10, 10 * log10 (dB). Fused
  checkpoints (``enable_fusion``) get the HTK filters and the 4 identical channels the extractor gives
  short clips, always with ``is_longer`` False (the extractor marks a random clip of an all-short batch
  as longer; we never do). So gradients reach the waveform;
- window embeddings are L2-normalised and averaged (then renormalised);
- score = cosine(text embedding, audio embedding) in [-1, 1]: the raw cosine, NOT multiplied by the
  model's logit scale (``scale_by_logit=True`` multiplies by ``exp(logit_scale_t)``, the scale of
  ``ClapModel``'s ``logits_per_text``). Component ``cosine``: the raw cosine in both cases.

Text goes through the processor's RoBERTa tokenizer, truncated (with a warning,
:func:`~mmalign.rewards.preprocess.warn_if_truncated`) to the text model's limit.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Reward, ScoreBatch
from .preprocess import resample_audio, warn_if_truncated
from ..hub import resolve_dtype, resolve_offline

Padding = Literal["repeatpad", "repeat", "pad"]


# ----------------------------------------------------------------------------- mel filters (numpy, float64)


def hz_to_mel(freq: np.ndarray | float, mel_scale: str = "slaney") -> np.ndarray:
    """Hertz -> mel on the HTK (2595 log10(1 + f/700)) or Slaney (linear below 1 kHz, log above) scale."""
    freq = np.asarray(freq, dtype=np.float64)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
    mels = 3.0 * freq / 200.0
    logstep = 27.0 / np.log(6.4)
    return np.where(freq >= 1000.0, 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) * logstep, mels)


def mel_to_hz(mels: np.ndarray | float, mel_scale: str = "slaney") -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mels = np.asarray(mels, dtype=np.float64)
    if mel_scale == "htk":
        return 700.0 * (np.power(10.0, mels / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
    freq = 200.0 * mels / 3.0
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(logstep * (mels - 15.0)), freq)


def mel_filter_bank(num_frequency_bins: int, num_mel_filters: int, min_frequency: float, max_frequency: float,
                    sampling_rate: int, norm: str | None = "slaney", mel_scale: str = "slaney") -> np.ndarray:
    """Triangular mel filters, ``num_frequency_bins x num_mel_filters`` (float64), as librosa / transformers
    ``audio_utils.mel_filter_bank`` build them (triangles in Hz; ``norm="slaney"``: area-normalised)."""
    if min_frequency > max_frequency:
        raise ValueError(f"min_frequency {min_frequency} > max_frequency {max_frequency}")
    mel_freqs = np.linspace(hz_to_mel(min_frequency, mel_scale), hz_to_mel(max_frequency, mel_scale), num_mel_filters + 2)
    filter_freqs = mel_to_hz(mel_freqs, mel_scale)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    if norm == "slaney":
        fb = fb * (2.0 / (filter_freqs[2 : num_mel_filters + 2] - filter_freqs[:num_mel_filters]))[None, :]
    elif norm is not None:
        raise ValueError(f"norm must be None or 'slaney', got {norm!r}")
    return fb


class LogMelSpectrogram(nn.Module):
    """Waveform ``...,N`` -> log-mel ``...,frames,n_mels`` in dB, as ``ClapFeatureExtractor`` computes it
    (see the module docstring), in torch and differentiable. ``frames = 1 + N // hop_length``."""

    def __init__(self, *, sampling_rate: int = 48_000, n_mels: int = 64, fft_window_size: int = 1024, hop_length: int = 480,
                 frequency_min: float = 0.0, frequency_max: float = 14_000.0, fusion: bool = False, top_db: float | None = None,
                 mel_floor: float = 1e-10) -> None:
        super().__init__()
        self.sampling_rate, self.n_mels, self.n_fft, self.hop_length = int(sampling_rate), int(n_mels), int(fft_window_size), int(hop_length)
        self.top_db, self.mel_floor, self.fusion = top_db, float(mel_floor), bool(fusion)
        norm, scale = (None, "htk") if fusion else ("slaney", "slaney")  # the extractor's mel_filters / mel_filters_slaney
        fb = mel_filter_bank(self.n_fft // 2 + 1, self.n_mels, frequency_min, frequency_max, self.sampling_rate, norm=norm, mel_scale=scale)
        self.register_buffer("mel_filters", torch.from_numpy(fb).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64).float(), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        lead = wave.shape[:-1]
        x = wave.reshape(-1, wave.shape[-1]).float()
        spec = torch.stft(x, self.n_fft, hop_length=self.hop_length, win_length=self.n_fft, window=self.window.to(x.device),
                          center=True, pad_mode="reflect", onesided=True, return_complex=True)
        ri = torch.view_as_real(spec)
        power = ri[..., 0] ** 2 + ri[..., 1] ** 2  # R, freq, frames (no sqrt: finite gradients at 0)
        mel = torch.einsum("rft,fm->rtm", power, self.mel_filters.to(x.device))
        db = 10.0 * torch.log10(mel.clamp(min=self.mel_floor))  # mel_floor then power_to_db(reference=1, min 1e-10)
        if self.top_db is not None:
            db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - float(self.top_db))
        return db.reshape(*lead, *db.shape[-2:])


# ----------------------------------------------------------------------------- windows


def window_count(num_samples: int, window: int, hop: int) -> int:
    """Windows covering a clip: 1 if it fits, else ``1 + ceil((N - W) / hop)``."""
    return 1 if num_samples <= window else 1 + math.ceil((num_samples - window) / hop)


def split_windows(wave: Tensor, window: int, hop: int, padding: Padding = "repeatpad") -> Tensor:
    """``B,N`` mono audio -> ``B,n_windows,W`` (see the module docstring); differentiable."""
    n = wave.shape[-1]
    if n <= window:
        if n < window and padding in ("repeatpad", "repeat"):
            reps = window // n if padding == "repeatpad" else window // n + 1
            wave = wave.repeat(1, reps)[:, :window]
        return F.pad(wave, (0, window - wave.shape[-1]))[:, None]
    count = window_count(n, window, hop)
    total = (count - 1) * hop + window
    return F.pad(wave, (0, total - n)).unfold(-1, window, hop)


# ----------------------------------------------------------------------------- the reward


class ClapReward(Reward):
    """CLAP text-audio similarity (see the module docstring)."""

    name = "clap"
    modality = "audio"
    needs = frozenset({"prompt"})
    differentiable = True
    higher_is_better = True
    score_range = (-1.0, 1.0)

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        sampling_rate: int = 48_000,
        feature_size: int = 64,
        fft_window_size: int = 1024,
        hop_length: int = 480,
        frequency_min: float = 0.0,
        frequency_max: float = 14_000.0,
        max_length_s: float = 10,
        top_db: float | None = None,
        padding: Padding = "repeatpad",
        hop_seconds: float | None = None,
        scale_by_logit: bool = False,
        max_text_length: int | None = None,
        window_batch_size: int | None = None,
        batch_size: int = 16,
        weights_id: str | None = None,
    ) -> None:
        if padding not in ("repeatpad", "repeat", "pad"):
            raise ValueError(f"padding must be 'repeatpad', 'repeat' or 'pad', got {padding!r}")
        audio_config = model.config.audio_config
        fusion = bool(getattr(audio_config, "enable_fusion", False))
        if int(feature_size) != int(audio_config.num_mel_bins):
            raise ValueError(f"clap: the feature extractor gives {feature_size} mel bins, the model expects {audio_config.num_mel_bins}")
        window = int(round(max_length_s * sampling_rate))
        hop = window if hop_seconds is None else int(round(hop_seconds * sampling_rate))
        if not 0 < hop:
            raise ValueError(f"hop_seconds must be > 0, got {hop_seconds}")
        text_limit = int(getattr(model.config.text_config, "max_position_embeddings", 514)) - 2  # RoBERTa: positions from pad+1
        tok_limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(tok_limit, int) and tok_limit < 10**6:
            text_limit = min(text_limit, tok_limit)
        text_limit = int(max_text_length or text_limit)
        if scale_by_logit:
            scale = math.exp(float(model.logit_scale_t.detach()))
            self.score_range = (-scale, scale)  # type: ignore[misc]
        super().__init__(
            batch_size=batch_size,
            weights_id=weights_id,
            preprocessing={
                "sampling_rate": int(sampling_rate), "mono": "mean of channels", "resample": "preprocess.resample_audio (windowed sinc)",
                "window_samples": window, "hop_samples": hop, "short_clip_padding": padding, "last_window": "zero-padded",
                "window_pooling": "mean of L2-normalised window embeddings",
                "log_mel": {"n_mels": int(feature_size), "fft_window_size": int(fft_window_size), "hop_length": int(hop_length),
                            "frequency_min": float(frequency_min), "frequency_max": float(frequency_max),
                            "filters": "htk (fusion)" if fusion else "slaney", "top_db": top_db, "stft": "centred, reflect, periodic hann"},
                "text_max_tokens": text_limit, "score": "logit_scale_t.exp() * cosine" if scale_by_logit else "cosine",
            },
        )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.log_mel = LogMelSpectrogram(sampling_rate=sampling_rate, n_mels=feature_size, fft_window_size=fft_window_size,
                                         hop_length=hop_length, frequency_min=frequency_min, frequency_max=frequency_max,
                                         fusion=fusion, top_db=top_db)
        self.fusion = fusion
        self.sampling_rate = int(sampling_rate)
        self.window_samples = window
        self.hop_samples = hop
        self.padding = padding
        self.scale_by_logit = bool(scale_by_logit)
        self.max_text_length = text_limit
        self.window_batch_size = int(window_batch_size or batch_size)

    def train(self, mode: bool = True) -> "ClapReward":
        super().train(mode)
        self.model.eval()  # HTSAT's batch norm must keep its running statistics
        return self

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -------------------------------------------------------------- embeddings
    def features(self, windows: Tensor) -> Tensor:
        """``n,W`` windows -> model input ``n,C,frames,n_mels`` (C = 4 for fused checkpoints)."""
        mel = self.log_mel(windows)[:, None]
        return mel.expand(-1, 4, -1, -1) if self.fusion else mel

    def audio_embeddings(self, wave: Tensor) -> Tensor:
        """Mono ``B,N`` at the model's rate -> ``B,D`` float32 unit vectors (window mean; differentiable)."""
        windows = split_windows(wave, self.window_samples, self.hop_samples, self.padding)
        b, nw, w = windows.shape
        flat = windows.reshape(b * nw, w)
        embs = []
        for start in range(0, flat.shape[0], self.window_batch_size):
            feats = self.features(flat[start : start + self.window_batch_size]).to(device=self.device, dtype=self.model_dtype)
            is_longer = torch.zeros(feats.shape[0], 1, dtype=torch.bool, device=feats.device)
            pooled = self.model.audio_model(input_features=feats, is_longer=is_longer).pooler_output
            embs.append(F.normalize(self.model.audio_projection(pooled).float(), dim=-1))
        emb = torch.cat(embs).reshape(b, nw, -1).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> Tensor:
        """``B`` texts -> ``B,D`` float32 unit vectors (each distinct text encoded once)."""
        unique = list(dict.fromkeys(texts))
        warn_if_truncated(self.tokenizer, unique, self.max_text_length)
        tok = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        emb = F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)
        return emb[torch.tensor([unique.index(t) for t in texts], device=emb.device)]

    def mono_at_model_rate(self, samples: Tensor, sample_rate: int | None) -> Tensor:
        """``B,C,N`` at ``sample_rate`` -> mono ``B,N`` at the model's rate."""
        if sample_rate is None:
            raise ValueError(f"{self.name} needs the audio's sample_rate= (the model works at {self.sampling_rate} Hz; "
                             "other rates are resampled, WAV files are read at that rate)")
        wave = samples.mean(dim=1)
        if int(sample_rate) != self.sampling_rate:
            wave = resample_audio(wave, int(sample_rate), self.sampling_rate)
        return wave

    def score(self, samples, prompts, references, metadata, **media_info) -> ScoreBatch:
        wave = self.mono_at_model_rate(samples, media_info.get("sample_rate"))
        audio = self.audio_embeddings(wave.to(self.device))
        text = self.text_embeddings(list(prompts))
        cos = (audio * text).sum(-1)
        scores = cos * self.model.logit_scale_t.detach().float().exp() if self.scale_by_logit else cos
        return ScoreBatch(scores, {"cosine": cos})


def load_clap(
    model_id: str = "laion/clap-htsat-unfused",
    *,
    model: nn.Module | None = None,
    processor: Any = None,
    tokenizer: Any = None,
    feature_extractor: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 16,
    offline: bool | None = None,
    cache_dir: str | None = None,
    hop_seconds: float | None = None,
    padding: Padding | None = None,
    scale_by_logit: bool = False,
    max_text_length: int | None = None,
    window_batch_size: int | None = None,
    weights_id: str | None = None,
) -> ClapReward:
    """CLAP reward (see the module docstring). ``model`` (a ``ClapModel``) and ``processor`` (a
    ``ClapProcessor``: its ``tokenizer`` and ``feature_extractor``, which may also be given separately)
    may be pre-built; what is missing is loaded from ``model_id`` (``offline=None`` follows
    ``HF_HUB_OFFLINE``). The feature extractor only supplies its settings (rate, window length, STFT and
    mel parameters); the features themselves are computed in torch. ``padding`` overrides its short-clip
    padding; ``hop_seconds`` the window hop (default: the window length).
    """
    torch_dtype = resolve_dtype(dtype)
    offline = resolve_offline(offline)
    where = "local files only (offline)" if offline else "the hub or local files"
    if processor is not None:
        tokenizer = tokenizer or processor.tokenizer
        feature_extractor = feature_extractor or processor.feature_extractor
    if tokenizer is None or feature_extractor is None:
        from transformers import ClapProcessor

        try:
            loaded = ClapProcessor.from_pretrained(model_id, local_files_only=offline, cache_dir=cache_dir)
        except (OSError, ValueError) as err:
            raise OSError(f"clap: could not load the processor of {model_id!r} from {where}: {err}") from err
        tokenizer = tokenizer or loaded.tokenizer
        feature_extractor = feature_extractor or loaded.feature_extractor
    if model is None:
        from transformers import ClapModel

        try:
            model = ClapModel.from_pretrained(model_id, local_files_only=offline, cache_dir=cache_dir, dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise OSError(f"clap: could not load {model_id!r} from {where}: {err}") from err
        weights_id = weights_id or model_id
    else:
        weights_id = weights_id or getattr(model.config, "_name_or_path", None) or "custom ClapModel"
    if device is not None or torch_dtype is not None:
        model = model.to(device=device, dtype=torch_dtype)
    fe = feature_extractor
    reward = ClapReward(
        model,
        tokenizer,
        sampling_rate=int(fe.sampling_rate),
        feature_size=int(fe.feature_size),
        fft_window_size=int(fe.fft_window_size),
        hop_length=int(fe.hop_length),
        frequency_min=float(fe.frequency_min),
        frequency_max=float(fe.frequency_max),
        max_length_s=float(fe.max_length_s),
        top_db=getattr(fe, "top_db", None),
        padding=padding or getattr(fe, "padding", "repeatpad"),
        hop_seconds=hop_seconds,
        scale_by_logit=scale_by_logit,
        max_text_length=max_text_length,
        window_batch_size=window_batch_size,
        batch_size=batch_size,
        weights_id=weights_id,
    )
    return reward.to(device) if device is not None else reward


__all__ = ["ClapReward", "LogMelSpectrogram", "hz_to_mel", "load_clap", "mel_filter_bank", "mel_to_hz", "split_windows", "window_count"]

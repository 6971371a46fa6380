"""ToneEval: a rule-based verifier of ToneWorld captions on (generated) audio.

1. :func:`parse_prompt` turns a caption of the ToneWorld grammar into
   :class:`~mmalign.embedded.toneworld.Requirements` (segments of events, in order); anything else
   raises ``ValueError`` saying why.
2. :func:`detect_events` finds the sound events of a mono clip (any sample rate; resampled in torch to
   8 kHz with :func:`~mmalign.rewards.preprocess.resample_audio`):

   - *onsets*: short-time energy in 16 ms frames every 4 ms (deterministic framing of the whole clip,
     no random crops); a frame is active above
     ``max(peak - rel_db, min(noise + noise_margin_db, peak - min_contrast_db), floor_db)`` (noise: the
     10th percentile of frame levels); gaps shorter than
     ``min_gap`` are closed and blips shorter than ``min_event`` dropped;
   - a sustained change of pitch class inside an active region (legato "low then high") splits it;
   - *pitch*: subharmonic summation over the event's Hann-windowed spectrum,
     ``S(f0) = sum_h 0.84^(h-1) |X(h f0)|`` (Hermes 1988, "Measurement of pitch by subharmonic
     summation"), f0 in [120, 2000] Hz, refined by parabolic interpolation; classes by
     :data:`~mmalign.embedded.toneworld.PITCH_BOUNDS`;
   - *timbre*: harmonic ratio ``(|X(2 f0)|^2 + |X(3 f0)|^2) / |X(f0)|^2``, each power less the spectrum's
     median power (the noise floor): ``buzz`` above
     ``buzz_ratio``, else ``beep``;
   - *duration*: offset - onset, ``long`` from ``DURATION_BOUND`` (0.2 s) on.
3. :func:`check` aligns the expected events with the detected ones (monotone alignment, dynamic
   programming: a matched pair costs its attribute mismatches, an unmatched expected event costs more
   than any mismatch, an extra detection costs 1) and returns the clauses: ``exactly N sounds``, then
   one clause per named attribute of each caption segment (pitch, duration, timbre), passed when every
   event of the segment is matched to a detection with that attribute. Order is checked through the
   alignment: "a low beep then a high beep" against high-then-low fails both pitch clauses.
   ``score`` = fraction of clauses passed, ``strict`` = all passed.

:class:`ToneEvalReward` exposes it as the ``toneeval`` reward: audio ``B,C,N`` in [-1, 1] with
``sample_rate=`` (channels averaged to mono), components ``strict``, ``count`` (the count clause),
``num_clauses`` and ``num_events`` (detected). Not differentiable.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from ..rewards.base import RewardOutput, ScoreBatch
from ..rewards.preprocess import resample_audio
from .shapeeval import VerifierReward, thresholds_from_options
from .toneworld import (
    DURATION_BOUND,
    DURATION_WORDS,
    MAX_EVENTS,
    NOUNS,
    PITCH_BOUNDS,
    PITCH_WORDS,
    PLURALS,
    SAMPLE_RATE,
    EventSpec,
    Requirements,
    Segment,
)

__all__ = [
    "Thresholds",
    "DetectedEvent",
    "ToneEvalResult",
    "parse_prompt",
    "detect_events",
    "check",
    "evaluate",
    "to_mono_8k",
    "ToneEvalReward",
    "load_toneeval",
    "tiny_toneeval",
]


# ---------------------------------------------------------------------------------------------- thresholds
@dataclass(frozen=True)
class Thresholds:
    """Detector settings (times in seconds, levels in dB of the mean-square amplitude)."""

    frame: float = 0.016  # energy frame length
    hop: float = 0.004  # energy frame hop
    rel_db: float = 25.0  # active: within this many dB of the clip's loudest frame ...
    noise_margin_db: float = 8.0  # ... at least this far above the noise floor (the 10th percentile of frame levels),
    min_contrast_db: float = 10.0  # ... a margin capped at peak - this (a clip that is one long tone has no silent floor) ...
    floor_db: float = -55.0  # ... and above this absolute level (a clip quieter than it is silent)
    min_gap: float = 0.025  # shorter silences inside a sound are closed
    min_event: float = 0.03  # shorter active stretches are ignored
    split_min_run: float = 0.04  # a pitch-class run this long inside an active region splits it
    f0_min: float = 120.0
    f0_max: float = 2000.0
    buzz_ratio: float = 0.1  # harmonic ratio above which a sound is a buzz

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "Thresholds" | None) -> "Thresholds":
        if isinstance(options, Thresholds):
            return options
        return thresholds_from_options(cls, options, "ToneEval")


# ---------------------------------------------------------------------------------------------- parsing
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_NOUN_FORMS = {**{n: (n, 1) for n in NOUNS}, **{p: (n, 2) for n, p in PLURALS.items()}}  # word -> (noun, plural?)


def _outside(prompt: str, why: str) -> ValueError:
    return ValueError(f"prompt {prompt!r} is outside the ToneWorld grammar: {why}")


def parse_prompt(prompt: str) -> Requirements:
    """Caption -> :class:`Requirements` (``ValueError`` naming the problem for anything else)."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = re.sub(r"\s+", " ", prompt.strip().lower().rstrip("."))
    if not text:
        raise _outside(prompt, "it is empty")
    segments = []
    for part in text.split(" then "):
        words = part.split()
        if len(words) < 2:
            raise _outside(prompt, f"segment {part!r} needs a count and a sound (e.g. 'a beep', 'two high tones')")
        if words[0] not in _COUNTS:
            raise _outside(prompt, f"segment {part!r} must start with a count ({', '.join(_COUNTS)})")
        count = _COUNTS[words[0]]
        if words[-1] not in _NOUN_FORMS:
            raise _outside(prompt, f"segment {part!r} must end with a sound ({', '.join(_NOUN_FORMS)})")
        noun, form = _NOUN_FORMS[words[-1]]
        if (count == 1) != (form == 1):
            raise _outside(prompt, f"segment {part!r}: count {words[0]!r} does not agree with {words[-1]!r}")
        pitch = duration = None
        for w in words[1:-1]:
            if w in PITCH_WORDS and pitch is None:
                pitch = w
            elif w in DURATION_WORDS and duration is None:
                duration = w
            else:
                raise _outside(prompt, f"unexpected word {w!r} in {part!r} (pitch: {', '.join(PITCH_WORDS)}; duration: {', '.join(DURATION_WORDS)})")
        segments.append(Segment(count, noun, pitch, duration))
    total = sum(s.count for s in segments)
    if total > MAX_EVENTS:
        raise _outside(prompt, f"it asks for {total} sounds; ToneWorld clips hold at most {MAX_EVENTS}")
    return Requirements(tuple(segments))


# ---------------------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class DetectedEvent:
    onset: float  # seconds
    offset: float
    f0: float  # Hz
    pitch: str
    harmonic_ratio: float
    timbre: str
    level_db: float  # mean-square level of its loudest frame

    @property
    def duration(self) -> float:
        return self.offset - self.onset

    @property
    def duration_class(self) -> str:
        return "long" if self.duration >= DURATION_BOUND else "short"


def pitch_class(f0: float) -> str:
    lo, hi = PITCH_BOUNDS
    return "low" if f0 < lo else ("medium" if f0 < hi else "high")


def to_mono_8k(audio: Tensor | np.ndarray, sample_rate: int) -> np.ndarray:
    """``C,N`` or ``N`` audio at ``sample_rate`` -> mono float64 ``N'`` at 8 kHz (channel mean, then
    :func:`~mmalign.rewards.preprocess.resample_audio`). Raises ``ValueError`` on a wrong rank, an empty
    or non-finite clip."""
    x = torch.as_tensor(audio).detach().float().cpu()
    if x.ndim == 2:
        x = x.mean(0)
    elif x.ndim != 1:
        raise ValueError(f"toneeval: expected one clip C,N or N, got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError("toneeval: zero-length audio clip")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("toneeval: audio contains NaN or inf samples")
    if int(sample_rate) != SAMPLE_RATE:
        x = resample_audio(x, int(sample_rate), SAMPLE_RATE)
    return x.double().numpy()


def _spectrum(x: np.ndarray, n_fft: int) -> np.ndarray:
    """|rfft| of Hann-windowed ``...,L`` frames, zero-padded to n_fft."""
    w = np.hanning(x.shape[-1] + 2)[1:-1]
    return np.abs(np.fft.rfft(x * w, n=n_fft))


def _shs(mag: np.ndarray, n_fft: int, th: Thresholds, harmonics: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Subharmonic summation (Hermes 1988) of magnitude spectra ``...,bins``: (candidate f0s, scores ``...,K``)."""
    cands = th.f0_min * 2.0 ** (np.arange(int(np.log2(th.f0_max / th.f0_min) * 96) + 1) / 96)  # 1/96 octave grid
    binhz = SAMPLE_RATE / n_fft
    score = np.zeros(mag.shape[:-1] + (len(cands),))
    for h in range(1, harmonics + 1):
        f = h * cands
        ok = f < 0.95 * SAMPLE_RATE / 2
        pos = f[ok] / binhz
        i0 = np.floor(pos).astype(int)
        frac = pos - i0
        vals = mag[..., i0] * (1 - frac) + mag[..., i0 + 1] * frac  # linear interpolation between bins
        score[..., ok] += 0.84 ** (h - 1) * vals
    return cands, score


def _f0(seg: np.ndarray, th: Thresholds) -> tuple[float, float]:
    """(f0, harmonic ratio) of one event's samples, from its Welch-averaged magnitude spectrum (Hann frames
    of at most 64 ms, half overlapping, zero-padded to 2048 points: spectral peaks stay wider than the
    1/96-octave f0 grid whatever the event's length)."""
    n_fft = 2048
    length = min(512, len(seg))
    starts = range(0, len(seg) - length + 1, max(1, length // 2))
    frames = np.stack([seg[s : s + length] for s in starts])
    mag = np.sqrt(np.mean(_spectrum(frames, n_fft) ** 2, axis=0))
    cands, score = _shs(mag, n_fft, th)
    k = int(np.argmax(score))
    f0 = float(cands[k])
    # refine on the spectrum: the largest bin within 3% of the candidate, parabolic interpolation (log magnitude)
    binhz = SAMPLE_RATE / n_fft

    def peak(f: float) -> tuple[float, float]:
        lo, hi = int(np.floor(f * 0.97 / binhz)), int(np.ceil(f * 1.03 / binhz)) + 1
        hi = min(hi, len(mag) - 1)
        if lo >= hi:
            return f, 0.0
        i = lo + int(np.argmax(mag[lo:hi]))
        if 0 < i < len(mag) - 1:
            a, b, c = np.log(mag[i - 1 : i + 2] + 1e-12)
            den = a - 2 * b + c
            d = 0.5 * (a - c) / den if den < 0 else 0.0
            return (i + d) * binhz, float(mag[i])
        return i * binhz, float(mag[i])

    f0, a1 = peak(f0)
    # noise floor: the median power of the spectrum (tones occupy few bins); subtracted from every harmonic
    floor = float(np.median(mag[int(100 / binhz) :] ** 2))
    harm = 0.0
    for h in (2, 3):
        if h * f0 < 0.95 * SAMPLE_RATE / 2:
            harm += max(peak(h * f0)[1] ** 2 - floor, 0.0)
    return f0, harm / max(a1**2 - floor, 1e-20)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of the True runs of a 1-D bool array."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def detect_events(audio: Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE, thresholds: Thresholds | Mapping[str, Any] | None = None) -> list[DetectedEvent]:
    """Sound events of one clip (``C,N`` or ``N`` at ``sample_rate``), in time order (see the module docstring)."""
    th = Thresholds.from_options(thresholds)
    x = to_mono_8k(audio, sample_rate)
    frame, hop = int(round(th.frame * SAMPLE_RATE)), int(round(th.hop * SAMPLE_RATE))
    padded = np.pad(x, (frame // 2, frame // 2))
    n_frames = 1 + (len(padded) - frame) // hop if len(padded) >= frame else 0
    if n_frames == 0:
        return []
    idx = np.arange(n_frames)[:, None] * hop + np.arange(frame)[None]
    frames = padded[idx]  # frame k is centred on sample k * hop
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
    peak = float(db.max())
    if peak < th.floor_db:
        return []
    noise = float(np.percentile(db, 10))
    active = db > max(peak - th.rel_db, min(noise + th.noise_margin_db, peak - th.min_contrast_db), th.floor_db)
    runs = _runs(active)
    merged: list[list[int]] = []
    for a, b in runs:  # close short gaps
        if merged and (a - merged[-1][1]) * hop / SAMPLE_RATE < th.min_gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    # frame-wise pitch classes for splitting legato changes (32 ms frames every hop)
    pframe = 256
    ppad = np.pad(x, (pframe // 2, pframe // 2))
    events: list[DetectedEvent] = []
    for a, b in merged:
        pieces = [(a, b)]
        if (b - a) * hop / SAMPLE_RATE >= 2 * th.split_min_run:
            pidx = np.arange(a, b)[:, None] * hop + np.arange(pframe)[None]
            mags = _spectrum(ppad[pidx], 1024)
            cands, score = _shs(mags, 1024, th)
            cls = np.searchsorted(np.array(PITCH_BOUNDS), cands[np.argmax(score, axis=1)], side="right")
            min_run = max(1, int(round(th.split_min_run * SAMPLE_RATE / hop)))
            runs_c: list[list[int]] = []  # [class, start, end) relative to a
            for i, c in enumerate(cls.tolist()):
                if runs_c and runs_c[-1][0] == c:
                    runs_c[-1][2] = i + 1
                else:
                    runs_c.append([c, i, i + 1])
            long_runs = [r for r in runs_c if r[2] - r[1] >= min_run]
            # a split only where two sustained runs of different classes follow each other
            if len(long_runs) >= 2 and any(p[0] != q[0] for p, q in zip(long_runs, long_runs[1:])):
                cuts = []
                for p, q in zip(long_runs, long_runs[1:]):
                    if p[0] != q[0]:
                        cuts.append(a + (p[2] + q[1]) // 2)
                bounds = [a, *cuts, b]
                pieces = list(zip(bounds[:-1], bounds[1:]))
        for s, e in pieces:
            if (e - s) * hop / SAMPLE_RATE < th.min_event:
                continue
            onset, offset = s * hop / SAMPLE_RATE, (e - 1) * hop / SAMPLE_RATE
            seg = x[int(onset * SAMPLE_RATE) : int(offset * SAMPLE_RATE) + 1]
            if len(seg) < 16:
                continue
            f0, ratio = _f0(seg, th)
            events.append(DetectedEvent(onset, offset, f0, pitch_class(f0), ratio, "buzz" if ratio > th.buzz_ratio else "beep", float(db[s:e].max())))
    return events


# ---------------------------------------------------------------------------------------------- checking
@dataclass
class ToneEvalResult:
    clauses: list[tuple[str, bool]]
    score: float
    strict: bool
    category: str
    events: list[DetectedEvent]
    requirements: Requirements

    @property
    def count_ok(self) -> bool:
        return self.clauses[0][1]


_ATTRS = ("pitch", "duration", "timbre")


def _satisfied(e: EventSpec, d: DetectedEvent) -> dict[str, bool]:
    out = {}
    if e.pitch:
        out["pitch"] = d.pitch == e.pitch
    if e.duration:
        out["duration"] = d.duration_class == e.duration
    if e.timbre:
        out["timbre"] = d.timbre == e.timbre
    return out


def align(expected: list[EventSpec], detected: list[DetectedEvent]) -> list[int | None]:
    """For each expected event, the index of its matched detection (None: unmatched); monotone in time.

    Dynamic programming (edit distance): match = number of unmet attributes, unmatched expected event =
    its number of attributes + 1, extra detection = 1; ties prefer matching, then earlier detections."""
    m, n = len(expected), len(detected)
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(m + 1)]
    back: list[list[tuple[int, int] | None]] = [[None] * (n + 1) for _ in range(m + 1)]
    cost[0][0] = 0.0
    for i in range(m + 1):
        for j in range(n + 1):
            c = cost[i][j]
            if c == inf:
                continue
            if i < m and j < n:
                sat = _satisfied(expected[i], detected[j])
                nc = c + sum(not v for v in sat.values())
                if nc < cost[i + 1][j + 1]:
                    cost[i + 1][j + 1], back[i + 1][j + 1] = nc, (i, j)
            if i < m:
                e = expected[i]
                nc = c + 1 + sum(getattr(e, a) is not None for a in _ATTRS)
                if nc < cost[i + 1][j]:
                    cost[i + 1][j], back[i + 1][j] = nc, (i, j)
            if j < n and c + 1 < cost[i][j + 1]:
                cost[i][j + 1], back[i][j + 1] = c + 1, (i, j)
    match: list[int | None] = [None] * m
    i, j = m, n
    while (i, j) != (0, 0):
        pi, pj = back[i][j]  # type: ignore[misc]
        if pi == i - 1 and pj == j - 1:
            match[pi] = pj
        i, j = pi, pj
    return match


def check(requirements: Requirements, detected: list[DetectedEvent]) -> list[tuple[str, bool]]:
    """The caption's clauses (description, passed): the count first, then per segment and attribute."""
    expected = requirements.events()
    match = align(expected, detected)
    n = requirements.num_events
    clauses = [(f"exactly {n} sound{'s' if n != 1 else ''} (found {len(detected)})", len(detected) == n)]
    start = 0
    for j, seg in enumerate(requirements.segments):
        idx = list(range(start, start + seg.count))
        start += seg.count
        where = f"sound {idx[0] + 1}" if len(idx) == 1 else f"sounds {idx[0] + 1}-{idx[-1] + 1}"
        for attr, value in (("pitch", seg.pitch), ("duration", seg.duration), ("timbre", seg.timbre)):
            if value is None:
                continue
            ok = all(match[i] is not None and _satisfied(expected[i], detected[match[i]])[attr] for i in idx)  # type: ignore[index]
            clauses.append((f"{where}: {value}", ok))
    return clauses


def evaluate(audio: Tensor | np.ndarray, prompt: str | Requirements, sample_rate: int = SAMPLE_RATE,
             thresholds: Thresholds | Mapping[str, Any] | None = None) -> ToneEvalResult:
    """Check one clip against a caption (``ValueError`` for captions outside the grammar or bad audio)."""
    req = prompt if isinstance(prompt, Requirements) else parse_prompt(prompt)
    events = detect_events(audio, sample_rate, thresholds)
    clauses = check(req, events)
    passed = sum(ok for _, ok in clauses)
    return ToneEvalResult(clauses, passed / len(clauses), passed == len(clauses), req.category, events, req)


# ---------------------------------------------------------------------------------------------- reward
class ToneEvalReward(VerifierReward):
    """ToneEval as a reward: score = fraction of the caption's clauses the clip satisfies.

    Input: audio ``B,C,N`` (or ``B,N``) in [-1, 1] with ``sample_rate=`` (any rate; resampled to 8 kHz),
    or WAV paths. Components: ``strict``, ``count`` (1.0 when the number of sounds is right),
    ``num_clauses``, ``num_events`` (detected). Captions outside the grammar (``on_unparseable``):
    "invalid" (default: the item is invalid with the parse error as reason), "zero" or "raise"."""

    name = "toneeval"
    modality = "audio"

    def __init__(self, *, batch_size: int = 64, thresholds: Thresholds | Mapping[str, Any] | None = None, on_unparseable: str = "invalid") -> None:
        self.thresholds = Thresholds.from_options(thresholds)
        self.on_unparseable = self.check_on_unparseable(on_unparseable)
        super().__init__(
            batch_size=batch_size,
            weights_id=None,
            preprocessing={"input": "audio B,C,N in [-1,1] + sample_rate", "mono": "mean of channels",
                           "resample": f"preprocess.resample_audio to {SAMPLE_RATE} Hz", "framing": "whole clip, fixed 16 ms frames every 4 ms",
                           "thresholds": asdict(self.thresholds), "on_unparseable": on_unparseable},
        )

    parse = staticmethod(parse_prompt)

    def score(self, samples: Tensor, prompts, references, metadata, **media_info) -> ScoreBatch:
        rate = media_info.get("sample_rate")
        waves = samples.detach().float().cpu()
        scores, strict, count, ncl, nev = [], [], [], [], []
        for wave, prompt in zip(waves, prompts):
            try:
                req = parse_prompt(prompt)
            except ValueError:
                if self.on_unparseable == "raise":
                    raise
                fill = 0.0 if self.on_unparseable == "zero" else math.nan
                scores.append(fill), strict.append(fill), count.append(fill), ncl.append(0.0), nev.append(math.nan)
                continue
            res = evaluate(wave, req, int(rate), self.thresholds)
            scores.append(res.score)
            strict.append(float(res.strict))
            count.append(float(res.count_ok))
            ncl.append(float(len(res.clauses)))
            nev.append(float(len(res.events)))
        as_t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        return ScoreBatch(as_t(scores), {"strict": as_t(strict), "count": as_t(count), "num_clauses": as_t(ncl), "num_events": as_t(nev)})

    def forward(self, samples: Any, prompts: Any = None, *, sample_rate: int | None = None, **kwargs: Any) -> RewardOutput:
        if sample_rate is None:
            raise ValueError(f"toneeval needs the audio's sample_rate= (it analyses audio at {SAMPLE_RATE} Hz and resamples other rates)")
        if isinstance(samples, Tensor):
            if samples.ndim not in (2, 3):
                raise ValueError(f"toneeval: audio must be a tensor B,C,N (or B,N), got shape {tuple(samples.shape)}")
            if samples.shape[-1] == 0:
                raise ValueError(f"toneeval: zero-length audio (shape {tuple(samples.shape)})")
        return super().forward(samples, prompts, sample_rate=sample_rate, **kwargs)


def load_toneeval(**options: Any) -> ToneEvalReward:
    """The ``toneeval`` reward. Options: ``batch_size``, ``thresholds`` (dict of :class:`Thresholds`
    fields), ``on_unparseable`` ("invalid" | "zero" | "raise")."""
    return ToneEvalReward(**options)


def tiny_toneeval(seed: int = 0, **options: Any) -> ToneEvalReward:
    """Same reward as :func:`load_toneeval` (no weights; ``seed`` is accepted and unused)."""
    del seed
    return load_toneeval(**options)


def _main(argv: list[str] | None = None) -> None:  # python -m mmalign.embedded.toneeval WAV PROMPT
    p = argparse.ArgumentParser(description="Check a WAV file against a ToneWorld caption.")
    p.add_argument("wav")
    p.add_argument("prompt")
    args = p.parse_args(argv)
    from ..media import read_wav

    wave, rate = read_wav(args.wav)
    res = evaluate(wave, args.prompt, rate)
    for desc, ok in res.clauses:
        print(f"[{'x' if ok else ' '}] {desc}")
    print(f"score {res.score:.3f}  strict {res.strict}  category {res.category}")
    for e in res.events:
        print(f"  {e.onset:.3f}-{e.offset:.3f} s  f0 {e.f0:7.1f} Hz ({e.pitch})  {e.duration_class}  {e.timbre} (ratio {e.harmonic_ratio:.2f})  {e.level_db:.1f} dB")


if __name__ == "__main__":
    _main()

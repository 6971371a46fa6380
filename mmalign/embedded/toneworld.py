"""ToneWorld: short synthetic audio clips of beeps and buzzes with compositional captions.

The world
---------
* Clips are ``CLIP_SECONDS`` (1 s) of mono audio at ``SAMPLE_RATE`` (8 kHz), float in [-1, 1].
* A clip holds 1-4 non-overlapping sound *events* separated by at least ``MIN_GAP`` (60 ms) of silence.
  Each event has
  - a *pitch class*: ``low`` (200 or 300 Hz), ``medium`` (500 or 600 Hz), ``high`` (1000, 1100 or
    1200 Hz) -- classes an octave-ish apart (neighbouring classes differ by >= 5/3);
  - a *duration class*: ``short`` (60-100 ms) or ``long`` (280-360 ms); events whose caption names no
    duration last 100-180 ms;
  - a *timbre*: ``beep`` (a pure sine) or ``buzz`` (fundamental plus 2nd and 3rd harmonics at
    amplitudes 0.6 and 0.45: a bright, buzzy tone);
  - a loudness (peak amplitude 0.3-0.6, nuisance) and 10 ms raised-cosine attack and release ramps.
* Every frequency is an integer multiple of ``FRAME_RATE`` = 100 Hz (the mel frame rate of the embedded
  text-to-audio model, hop 80 samples), and every event is ``sin(2 pi f t)`` in *absolute* clip time t:
  a tone then has the same phase at every mel-frame boundary, so a small frame-synchronous vocoder
  reconstructs it from its spectrogram (see :mod:`mmalign.embedded.pretrain_audio`). Rendering at other
  sample rates (``render(scene, sample_rate=16000)``) is exact too.

Captions (the grammar ToneEval parses)::

    caption  := segment (" then " segment)*
    segment  := COUNT [DURATION] [PITCH] NOUN
    COUNT    := a | two | three | four
    DURATION := short | long
    PITCH    := low | medium | high
    NOUN     := beep(s) | buzz(es) | tone(s)        (tone: either timbre)

"two short beeps then a long beep" asks for exactly three events in that order: two short sine tones,
then a long one. Unnamed attributes are drawn at random (so "three tones" may mix pitches and timbres).

=========== ========================================================= ================================
category    captions                                                  what it tests
=========== ========================================================= ================================
count       "a beep", "three tones", "two high beeps"                 number of events (+ their pitch)
pitch       "a high beep", "a short low tone"                         pitch class of one event
order       "a low beep then a high beep", "two medium tones then a    pitch sequence
            low tone", "a low beep then a high beep then a low beep"
rhythm      "a short beep then a long beep", "two short tones then a   duration pattern
            long tone"
timbre      "a buzz", "a high buzz", "a low beep then a high buzz"     sine vs buzzy tone
=========== ========================================================= ================================

Prompt suites
-------------
``assets/prompts/toneworld_{train,heldout}.txt`` (``category<TAB>prompt``), built by
:func:`build_prompt_suites` (``python -m mmalign.embedded.verify_toneeval --write-suites``). Held-out
prompts contain a composition no train prompt contains: a held-out count-pitch pair
(``HELDOUT_COUNTS``), duration-pitch pair (``HELDOUT_DURATION_PITCH``), pitch transition
(``HELDOUT_TRANSITIONS``), duration pattern (``HELDOUT_RHYTHMS``) or pitch-timbre pair
(``HELDOUT_TIMBRES``). ``exclude_heldout=True`` keeps them out of generated training examples too.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .shapeworld import assets_dir  # one $MMALIGN_ASSETS rule for every embedded world

# ---------------------------------------------------------------------------------------------- world
SAMPLE_RATE: int = 8000
CLIP_SECONDS: float = 1.0
FRAME_RATE: int = 100  # Hz: every tone frequency is a multiple of it (phase-locked to 80-sample frames)
PITCHES: dict[str, tuple[float, ...]] = {"low": (200.0, 300.0), "medium": (500.0, 600.0), "high": (1000.0, 1100.0, 1200.0)}
PITCH_WORDS: tuple[str, ...] = tuple(PITCHES)
#: class boundaries (Hz), geometric midpoints between neighbouring classes: low < 387 <= medium < 775 <= high
PITCH_BOUNDS: tuple[float, float] = (float(np.sqrt(300.0 * 500.0)), float(np.sqrt(600.0 * 1000.0)))
DURATIONS: dict[str | None, tuple[float, float]] = {"short": (0.06, 0.10), "long": (0.28, 0.36), None: (0.10, 0.18)}
DURATION_WORDS: tuple[str, ...] = ("short", "long")
DURATION_BOUND: float = 0.2  # seconds: ToneEval calls an event long from here on
TIMBRES: dict[str, tuple[float, ...]] = {"beep": (1.0,), "buzz": (1.0, 0.6, 0.45)}  # harmonic amplitudes
NOUNS: dict[str, str | None] = {"beep": "beep", "buzz": "buzz", "tone": None}  # noun -> timbre (None: any)
PLURALS: dict[str, str] = {"beep": "beeps", "buzz": "buzzes", "tone": "tones"}
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
CATEGORIES: tuple[str, ...] = ("count", "pitch", "order", "rhythm", "timbre")
MAX_EVENTS = 4
MIN_GAP = 0.06  # seconds of silence between events
MARGIN = 0.03  # seconds of silence before the first and after the last event
RAMP = 0.01  # attack / release (raised cosine), seconds
AMPLITUDE = (0.3, 0.6)

HELDOUT_COUNTS: frozenset[tuple[int, str]] = frozenset({(3, "low"), (4, "high"), (2, "medium")})
HELDOUT_DURATION_PITCH: frozenset[tuple[str, str]] = frozenset({("long", "high"), ("short", "low")})
HELDOUT_TRANSITIONS: frozenset[tuple[str, str]] = frozenset({("high", "medium")})
HELDOUT_RHYTHMS: frozenset[tuple[str, ...]] = frozenset({("long", "short", "short"), ("short", "long", "short")})
HELDOUT_TIMBRES: frozenset[tuple[str, str]] = frozenset({("high", "buzz")})


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Segment:
    """``count`` consecutive events of one description; None attributes are unconstrained."""

    count: int
    noun: str = "beep"  # beep | buzz | tone
    pitch: str | None = None
    duration: str | None = None

    def __post_init__(self) -> None:
        if self.noun not in NOUNS:
            raise ValueError(f"unknown sound noun {self.noun!r}; ToneWorld nouns are {tuple(NOUNS)}")
        if self.pitch is not None and self.pitch not in PITCHES:
            raise ValueError(f"unknown pitch {self.pitch!r}; ToneWorld pitches are {PITCH_WORDS}")
        if self.duration is not None and self.duration not in DURATION_WORDS:
            raise ValueError(f"unknown duration {self.duration!r}; ToneWorld durations are {DURATION_WORDS}")
        if not 1 <= self.count <= MAX_EVENTS:
            raise ValueError(f"a segment holds 1..{MAX_EVENTS} events, got {self.count}")

    @property
    def timbre(self) -> str | None:
        return NOUNS[self.noun]

    def phrase(self) -> str:
        words = [NUMBER_WORDS[self.count]]
        words += [w for w in (self.duration, self.pitch) if w]
        words.append(self.noun if self.count == 1 else PLURALS[self.noun])
        return " ".join(words)

    def describe(self) -> str:
        return self.phrase()


@dataclass(frozen=True)
class EventSpec:
    """What one expected event must be (None: anything)."""

    pitch: str | None
    duration: str | None
    timbre: str | None
    segment: int  # index of the caption segment it comes from


@dataclass(frozen=True)
class Requirements:
    """A caption's segments, in order."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if not self.segments:
            raise ValueError("a ToneWorld caption needs at least one segment")
        if self.num_events > MAX_EVENTS:
            raise ValueError(f"a ToneWorld clip holds at most {MAX_EVENTS} events, the caption asks for {self.num_events}")

    @property
    def num_events(self) -> int:
        return sum(s.count for s in self.segments)

    def events(self) -> list[EventSpec]:
        return [EventSpec(s.pitch, s.duration, s.timbre, j) for j, s in enumerate(self.segments) for _ in range(s.count)]

    def prompt(self) -> str:
        """The canonical caption (what :func:`sample_example` writes and ToneEval parses back)."""
        return " then ".join(s.phrase() for s in self.segments)

    @property
    def category(self) -> str:
        segs = self.segments
        if any(s.noun == "buzz" for s in segs):
            return "timbre"
        if len(segs) >= 2:
            if all(s.pitch for s in segs) and not any(s.duration for s in segs):
                return "order"
            if all(s.duration for s in segs) and not any(s.pitch for s in segs):
                return "rhythm"
            return "compound"
        (s,) = segs
        if s.count >= 2 or not s.pitch:
            return "count" if not s.duration else "compound"
        return "pitch"


def is_heldout(req: Requirements) -> bool:
    """Whether the caption uses a held-out composition (such captions are only in the held-out suite)."""
    for s in req.segments:
        if s.pitch and s.count > 1 and (s.count, s.pitch) in HELDOUT_COUNTS:
            return True
        if s.pitch and s.duration and (s.duration, s.pitch) in HELDOUT_DURATION_PITCH:
            return True
        if s.pitch and s.timbre and (s.pitch, s.timbre) in HELDOUT_TIMBRES:
            return True
    for a, b in zip(req.segments, req.segments[1:]):
        if a.pitch and b.pitch and (a.pitch, b.pitch) in HELDOUT_TRANSITIONS:
            return True
    durs = tuple(e.duration for e in req.events())
    if all(durs) and len(durs) >= 2 and durs in HELDOUT_RHYTHMS:
        return True
    return False


# ---------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Event:
    """One sound: ``onset`` and ``duration`` in seconds, fundamental ``frequency`` in Hz, ``timbre``
    (a key of TIMBRES), peak ``amplitude``; ``pitch`` / ``duration_class`` are its classes."""

    onset: float
    duration: float
    frequency: float
    timbre: str
    amplitude: float
    pitch: str
    duration_class: str | None

    @property
    def offset(self) -> float:
        return self.onset + self.duration


@dataclass(frozen=True)
class Scene:
    events: tuple[Event, ...]
    seconds: float = CLIP_SECONDS


def render(scene: Scene, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Synthesize a scene: float32 waveform ``N`` (N = seconds * sample_rate) in [-1, 1].

    Event k is ``a_k env_k(t) sum_h c_h sin(2 pi h f_k t) / sum_h c_h`` with t the absolute clip time,
    ``c`` the timbre's harmonic amplitudes (harmonics at or above 0.95 x Nyquist dropped: band-limited),
    and ``env`` 1 inside the event with raised-cosine ramps of RAMP seconds."""
    if sample_rate < 2000:
        raise ValueError(f"ToneWorld needs sample_rate >= 2000 Hz, got {sample_rate}")
    n = int(round(scene.seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    out = np.zeros(n, np.float64)
    for ev in scene.events:
        if ev.timbre not in TIMBRES:
            raise ValueError(f"unknown timbre {ev.timbre!r}; ToneWorld timbres are {tuple(TIMBRES)}")
        i0, i1 = max(0, int(np.floor(ev.onset * sample_rate))), min(n, int(np.ceil(ev.offset * sample_rate)) + 1)
        tt = t[i0:i1]
        rel = tt - ev.onset
        env = np.clip(np.minimum(rel, ev.duration - rel) / RAMP, 0.0, 1.0)
        env = 0.5 - 0.5 * np.cos(np.pi * env)  # raised cosine from 0 to 1 over RAMP
        coefs = [(h + 1, c) for h, c in enumerate(TIMBRES[ev.timbre]) if (h + 1) * ev.frequency < 0.95 * sample_rate / 2]
        norm = sum(c for _, c in coefs)
        tone = sum(c * np.sin(2 * np.pi * h * ev.frequency * tt) for h, c in coefs) / norm
        out[i0:i1] += ev.amplitude * env * tone
    return np.clip(out, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Example:
    audio: np.ndarray  # float32 N at SAMPLE_RATE
    caption: str
    category: str
    spec: Requirements
    scene: Scene


def _place(rng: np.random.Generator, req: Requirements, seconds: float) -> Scene | None:
    """Draw every event's attributes and onsets (gaps >= MIN_GAP); None when the durations do not fit."""
    specs = req.events()
    durs = [float(rng.uniform(*DURATIONS[e.duration])) for e in specs]
    free = seconds - 2 * MARGIN - sum(durs) - (len(durs) - 1) * MIN_GAP
    if free < 0:
        return None
    slots = rng.dirichlet(np.ones(len(durs) + 1)) * free  # extra silence before, between and after events
    events = []
    t = MARGIN + slots[0]
    for k, (e, d) in enumerate(zip(specs, durs)):
        pitch = e.pitch or PITCH_WORDS[int(rng.integers(len(PITCH_WORDS)))]
        freqs = PITCHES[pitch]
        freq = freqs[int(rng.integers(len(freqs)))]
        timbre = e.timbre or ("beep", "buzz")[int(rng.integers(2))]
        amp = float(rng.uniform(*AMPLITUDE))
        events.append(Event(float(t), d, freq, timbre, amp, pitch, e.duration))
        t += d + MIN_GAP + slots[k + 1]
    return Scene(tuple(events), seconds)


def _check_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    cats = tuple(categories) if categories else CATEGORIES
    bad = [c for c in cats if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; ToneWorld categories are {CATEGORIES}")
    return cats


def sample_example(rng: np.random.Generator, category: str, sample_rate: int = SAMPLE_RATE, *, exclude_heldout: bool = False,
                   seconds: float = CLIP_SECONDS) -> Example:
    """A random clip of ``category``: a caption drawn uniformly from the category's prompts (train
    prompts only with ``exclude_heldout``), rendered with random unnamed attributes and timing."""
    (category,) = _check_categories([category])
    pool = _pool(category, exclude_heldout)
    for _ in range(1000):
        req = pool[int(rng.integers(len(pool)))]
        scene = _place(rng, req, seconds)
        if scene is None:
            continue
        return Example(render(scene, sample_rate), req.prompt(), category, req, scene)
    raise RuntimeError(f"could not place a {category} clip in {seconds} s")  # pragma: no cover


def example_at(index: int, seed: int, categories: Sequence[str] | None = None, *, sample_rate: int = SAMPLE_RATE,
               exclude_heldout: bool = False) -> Example:
    """Example number ``index`` of the stream ``seed``: categories cycle in order, each example has its
    own generator ``default_rng([seed, index])`` (reproducible on its own)."""
    cats = _check_categories(categories)
    rng = np.random.default_rng([int(seed), int(index)])
    return sample_example(rng, cats[index % len(cats)], sample_rate, exclude_heldout=exclude_heldout)


def generate(n: int, seed: int, categories: Sequence[str] | None = None, *, sample_rate: int = SAMPLE_RATE,
             exclude_heldout: bool = False) -> tuple[torch.Tensor, list[str], list[str]]:
    """``n`` examples of stream ``seed``: (audio float ``N, 1, samples`` in [-1, 1], captions, categories).

    Equal to :class:`ToneWorldDataset` item by item."""
    exs = [example_at(i, seed, categories, sample_rate=sample_rate, exclude_heldout=exclude_heldout) for i in range(n)]
    n_samples = int(round(CLIP_SECONDS * sample_rate))
    audio = torch.from_numpy(np.stack([e.audio for e in exs]))[:, None] if exs else torch.zeros(0, 1, n_samples)
    return audio, [e.caption for e in exs], [e.category for e in exs]


class ToneWorldDataset(torch.utils.data.Dataset):
    """``n`` ToneWorld examples; item ``i`` is (audio float ``1, samples``, caption), see :func:`example_at`."""

    def __init__(self, n: int, seed: int = 0, categories: Sequence[str] | None = None, *, sample_rate: int = SAMPLE_RATE,
                 exclude_heldout: bool = False) -> None:
        self.n, self.seed, self.sample_rate = int(n), int(seed), int(sample_rate)
        self.categories = _check_categories(categories)
        self.exclude_heldout = exclude_heldout

    def __len__(self) -> int:
        return self.n

    def example(self, index: int) -> Example:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} examples")
        return example_at(index % self.n, self.seed, self.categories, sample_rate=self.sample_rate, exclude_heldout=self.exclude_heldout)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        ex = self.example(index)
        return torch.from_numpy(ex.audio)[None], ex.caption


# ---------------------------------------------------------------------------------------------- prompt suites
SUITE_SPLITS = ("train", "heldout")


def all_specs(category: str) -> list[Requirements]:
    """Every caption of a category (the grammar is small enough to enumerate)."""
    R, S = Requirements, Segment
    plain = ("beep", "tone")
    if category == "count":
        out = [R((S(1, n),)) for n in plain]
        out += [R((S(c, n, p),)) for c in (2, 3, 4) for p in (None, *PITCH_WORDS) for n in plain]
        return out
    if category == "pitch":
        return [R((S(1, n, p, d),)) for d in (None, *DURATION_WORDS) for p in PITCH_WORDS for n in plain]
    if category == "order":
        out = []
        for n in plain:
            for p1, p2 in itertools.permutations(PITCH_WORDS, 2):
                out += [R((S(c1, n, p1), S(c2, n, p2))) for c1, c2 in ((1, 1), (2, 1), (1, 2))]
            for p1, p2, p3 in itertools.product(PITCH_WORDS, repeat=3):
                if p1 != p2 and p2 != p3:
                    out.append(R((S(1, n, p1), S(1, n, p2), S(1, n, p3))))
        return out
    if category == "rhythm":
        out = []
        for n in plain:
            for d1, d2 in (("short", "long"), ("long", "short")):
                out += [R((S(c1, n, None, d1), S(c2, n, None, d2))) for c1, c2 in ((1, 1), (2, 1), (1, 2))]
            out += [R((S(1, n, None, a), S(1, n, None, b), S(1, n, None, a))) for a, b in (("short", "long"), ("long", "short"))]
        return out
    if category == "timbre":
        out = [R((S(1, "buzz"),)), R((S(2, "buzz"),)), R((S(3, "buzz"),))]
        out += [R((S(1, "buzz", p),)) for p in PITCH_WORDS]
        out += [R((S(1, "beep"), S(1, "buzz"))), R((S(1, "buzz"), S(1, "beep")))]
        for p1, p2 in itertools.permutations(PITCH_WORDS, 2):
            out += [R((S(1, "beep", p1), S(1, "buzz", p2))), R((S(1, "buzz", p1), S(1, "beep", p2)))]
        return out
    raise ValueError(f"unknown category {category!r}; ToneWorld categories are {CATEGORIES}")


_POOLS: dict[tuple[str, bool], list[Requirements]] = {}


def _pool(category: str, exclude_heldout: bool) -> list[Requirements]:
    key = (category, exclude_heldout)
    if key not in _POOLS:
        specs = [r for r in all_specs(category) if _fits_clip(r)]
        _POOLS[key] = [r for r in specs if not (exclude_heldout and is_heldout(r))]
    return _POOLS[key]


def _fits_clip(req: Requirements, seconds: float = CLIP_SECONDS) -> bool:
    """Whether the longest draw of every event still fits the clip."""
    longest = sum(DURATIONS[e.duration][1] for e in req.events())
    return longest + 2 * MARGIN + (req.num_events - 1) * MIN_GAP <= seconds


def build_prompt_suites() -> dict[str, list[tuple[str, str]]]:
    """{split: [(category, prompt)]}: every caption of the grammar, split by :func:`is_heldout`."""
    suites: dict[str, list[tuple[str, str]]] = {s: [] for s in SUITE_SPLITS}
    for cat in CATEGORIES:
        for req in all_specs(cat):
            if not _fits_clip(req):
                continue
            suites["heldout" if is_heldout(req) else "train"].append((cat, req.prompt()))
    return suites


def prompt_suite_path(split: str) -> Path:
    """Path of a ToneWorld prompt suite: ``split`` is "train" or "heldout"."""
    if split not in SUITE_SPLITS:
        raise ValueError(f"unknown prompt suite {split!r}; choose one of {SUITE_SPLITS}")
    path = assets_dir() / "prompts" / f"toneworld_{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set MMALIGN_ASSETS to the folder holding prompts/toneworld_{split}.txt")
    return path


def write_prompt_suites(directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write :func:`build_prompt_suites` to ``directory`` (default ``assets/prompts``)."""
    directory = Path(directory) if directory is not None else assets_dir() / "prompts"
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in build_prompt_suites().items():
        path = directory / f"toneworld_{split}.txt"
        path.write_text("".join(f"{c}\t{p}\n" for c, p in rows), encoding="utf-8")
        paths[split] = path
    return paths


__all__ = [
    "CATEGORIES", "CLIP_SECONDS", "EDIT_KINDS", "edit_caption", "DURATIONS", "DURATION_BOUND", "DURATION_WORDS", "Event", "EventSpec", "Example", "FRAME_RATE",
    "NOUNS", "PITCHES", "PITCH_BOUNDS", "PITCH_WORDS", "Requirements", "SAMPLE_RATE", "Scene", "Segment", "TIMBRES",
    "ToneWorldDataset", "all_specs", "build_prompt_suites", "example_at", "generate", "is_heldout", "prompt_suite_path",
    "render", "sample_example", "write_prompt_suites",
]


# ---------------------------------------------------------------------------------------------- edits
EDIT_KINDS: tuple[str, ...] = ("count", "pitch", "order", "duration", "timbre")


def edit_caption(req: Requirements, kind: str, rng: np.random.Generator) -> Requirements | None:
    """A minimal edit of a caption that makes it *false* for any clip of ``req`` (hard negatives, and
    the verifier's negative cases), or None when ``kind`` does not apply:

    - ``count``: one segment's count changed by +-1 (staying within 1..MAX_EVENTS in total);
    - ``pitch``: one named pitch replaced by another;
    - ``order``: the segments reversed (only when that changes the expected event sequence);
    - ``duration``: one named duration flipped (short <-> long);
    - ``timbre``: one named timbre flipped (beep <-> buzz).
    """
    segs = list(req.segments)
    if kind == "count":
        j = int(rng.integers(len(segs)))
        options = [c for c in (segs[j].count - 1, segs[j].count + 1) if 1 <= c and req.num_events - segs[j].count + c <= MAX_EVENTS]
        if not options:
            return None
        segs[j] = Segment(options[int(rng.integers(len(options)))], segs[j].noun, segs[j].pitch, segs[j].duration)
    elif kind == "pitch":
        named = [j for j, s in enumerate(segs) if s.pitch]
        if not named:
            return None
        j = named[int(rng.integers(len(named)))]
        others = [p for p in PITCH_WORDS if p != segs[j].pitch]
        segs[j] = Segment(segs[j].count, segs[j].noun, others[int(rng.integers(len(others)))], segs[j].duration)
    elif kind == "order":
        new = Requirements(tuple(reversed(segs)))
        return new if [(e.pitch, e.duration, e.timbre) for e in new.events()] != [(e.pitch, e.duration, e.timbre) for e in req.events()] else None
    elif kind == "duration":
        named = [j for j, s in enumerate(segs) if s.duration]
        if not named:
            return None
        j = named[int(rng.integers(len(named)))]
        segs[j] = Segment(segs[j].count, segs[j].noun, segs[j].pitch, "long" if segs[j].duration == "short" else "short")
    elif kind == "timbre":
        named = [j for j, s in enumerate(segs) if s.timbre]
        if not named:
            return None
        j = named[int(rng.integers(len(named)))]
        segs[j] = Segment(segs[j].count, "buzz" if segs[j].noun == "beep" else "beep", segs[j].pitch, segs[j].duration)
    else:
        raise ValueError(f"unknown edit {kind!r}; edits are {EDIT_KINDS}")
    return Requirements(tuple(segs))

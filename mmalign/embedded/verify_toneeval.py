"""How well ToneEval reads ToneWorld: strict and per-clause accuracy per category on rendered ground-truth
clips (each checked against its own caption), the rejection rate of hand-made negative captions (a
wrong count, pitch, order, duration or timbre: :func:`~mmalign.embedded.toneworld.edit_caption`),
and the same on degraded copies (resampled, noisy, quieter) as a stand-in for generated audio.

    python -m mmalign.embedded.verify_toneeval --n 200                 # clean clips at 8 kHz and 16 kHz
    python -m mmalign.embedded.verify_toneeval --n 100 --degraded      # plus noisy / quiet copies
    python -m mmalign.embedded.verify_toneeval --vocoder assets/toneworld-audioldm   # through the shipped vocoder
    python -m mmalign.embedded.verify_toneeval --write-suites          # rewrite assets/prompts/toneworld_*.txt

``--n`` is per category and per condition. Exits with status 1 when the clean strict accuracy of some
category, or the rejection rate of some negative kind, falls below ``--min-accuracy`` (default 0.99).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from .shapeworld import load_prompt_suite
from .toneeval import evaluate
from .toneworld import CATEGORIES, EDIT_KINDS, SAMPLE_RATE, edit_caption, example_at, render, write_prompt_suites

# name -> (render sample rate, degrade settings): noise std relative to the clip's peak, gain
CONDITIONS: dict[str, tuple[int, dict[str, float]]] = {
    "clean": (SAMPLE_RATE, {}),
    "clean16k": (16000, {}),
    "clean44k": (44100, {}),
    "noise-30dB": (SAMPLE_RATE, {"noise": 10 ** (-30 / 20)}),
    "noise-20dB": (SAMPLE_RATE, {"noise": 10 ** (-20 / 20)}),
    "quiet-30dB": (SAMPLE_RATE, {"gain": 10 ** (-30 / 20)}),
}


def degrade(audio: np.ndarray, rng: np.random.Generator, noise: float = 0.0, gain: float = 1.0) -> np.ndarray:
    """Scale by ``gain`` and add white noise of std ``noise`` times the clip's peak."""
    peak = float(np.abs(audio).max()) or 1.0
    return (audio * gain + rng.normal(0, noise * peak * gain, size=audio.shape)).astype(np.float32)


def accuracy(n: int, condition: str = "clean", seed: int = 0, vocoder: Any = None) -> dict[str, dict[str, float]]:
    """{category: {strict, clauses, neg_<kind>...}} over ``n`` clips per category (negatives: share of
    edited captions the clip is rejected for, i.e. not strictly satisfied)."""
    rate, settings = CONDITIONS[condition]
    rng = np.random.default_rng([seed, 7, len(condition)])
    out: dict[str, dict[str, float]] = {}
    for cat in CATEGORIES:
        strict = clauses = total = 0
        neg: dict[str, list[bool]] = defaultdict(list)
        for i in range(n):
            ex = example_at(i, seed, [cat])
            audio = ex.audio if rate == SAMPLE_RATE else render(ex.scene, rate)
            if settings:
                audio = degrade(audio, rng, **settings)
            if vocoder is not None:
                audio = vocoder(audio)
            res = evaluate(audio, ex.caption, rate)
            strict += res.strict
            clauses += sum(ok for _, ok in res.clauses)
            total += len(res.clauses)
            for kind in EDIT_KINDS:
                edited = edit_caption(ex.spec, kind, rng)
                if edited is not None:
                    neg[kind].append(not evaluate(audio, edited, rate).strict)
        out[cat] = {"strict": strict / n, "clauses": clauses / total, **{f"neg_{k}": float(np.mean(v)) for k, v in neg.items()}}
    return out


def load_vocoder(path: str):
    """mel -> vocoder round trip of a shipped ToneWorld AudioLDM (its ``vocoder/``) at 8 kHz."""
    from transformers import SpeechT5HifiGan

    from .pretrain_audio import ToneMel

    voc = SpeechT5HifiGan.from_pretrained(f"{path}/vocoder", local_files_only=True).eval()
    mel = ToneMel()

    @torch.no_grad()
    def run(audio: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(audio, np.float32))[None]
        return voc(mel(x))[0, : x.shape[-1]].clamp(-1, 1).numpy()

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="clips per category and condition (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--degraded", action="store_true", help="also report " + ", ".join(c for c in CONDITIONS if not c.startswith("clean")))
    p.add_argument("--vocoder", default=None, help="a ToneWorld AudioLDM directory: also verify clips passed through its mel + vocoder")
    p.add_argument("--min-accuracy", type=float, default=0.99, help="fail when a clean category's strict accuracy or negative rejection is below this")
    p.add_argument("--write-suites", action="store_true", help="rewrite the ToneWorld prompt suites in assets/prompts and exit")
    args = p.parse_args(argv)

    if args.write_suites:
        for split, path in write_prompt_suites().items():
            print(f"{split}: {len(load_prompt_suite(path))} prompts -> {path}")
        return 0

    conditions = [c for c in CONDITIONS if c.startswith("clean") or args.degraded]
    runs: list[tuple[str, Any]] = [(c, None) for c in conditions]
    if args.vocoder:
        runs.append(("vocoded", load_vocoder(args.vocoder)))
    worst = 1.0
    for cond, voc in runs:
        t0 = time.perf_counter()
        acc = accuracy(args.n, "clean" if cond == "vocoded" else cond, args.seed, voc)
        dt = time.perf_counter() - t0
        rate = CONDITIONS.get(cond, (SAMPLE_RATE, None))[0]
        print(f"\nToneEval on ToneWorld, {cond} ({rate} Hz): {args.n} clips per category ({dt:.1f} s)")
        kinds = [k for k in EDIT_KINDS if any(f"neg_{k}" in r for r in acc.values())]
        print(f"  {'category':<10} {'strict':>8} {'clauses':>8}   rejected negatives: " + " ".join(f"{k:>9}" for k in kinds))
        for cat, r in acc.items():
            negs = " ".join(f"{r[f'neg_{k}']:>9.3f}" if f"neg_{k}" in r else f"{'-':>9}" for k in kinds)
            print(f"  {cat:<10} {r['strict']:>8.3f} {r['clauses']:>8.3f}   {' ' * 20}{negs}")
        mean_s = float(np.mean([r["strict"] for r in acc.values()]))
        print(f"  {'mean':<10} {mean_s:>8.3f} {float(np.mean([r['clauses'] for r in acc.values()])):>8.3f}")
        if cond.startswith("clean"):
            worst = min(worst, *(v for r in acc.values() for k, v in r.items() if k == "strict" or k.startswith("neg_")))
    ok = worst >= args.min_accuracy
    print(f"\nclean: worst category strict accuracy / negative rejection rate: {worst:.3f} ({'ok' if ok else 'BELOW'} {args.min_accuracy})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

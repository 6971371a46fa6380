"""How well ShapeEval reads ShapeWorld: strict and per-clause accuracy per category on rendered
ground-truth images (each image checked against its own caption), optionally degraded (blur, noise,
colour shifts) as a stand-in for imperfect generated images.

    python -m mmalign.embedded.verify_shapeeval --n 200                  # clean renders, 32 and 64 px
    python -m mmalign.embedded.verify_shapeeval --n 100 --degraded       # plus blurred / noisy copies
    python -m mmalign.embedded.verify_shapeeval --write-suites           # rewrite assets/prompts suites

``--n`` is per category and per image size. Exits with status 1 when the clean strict accuracy of some
category falls below ``--min-accuracy`` (default 0.99).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .shapeeval import evaluate
from .shapeworld import CATEGORIES, example_at, load_prompt_suite, write_prompt_suites

# name -> degrade() settings; blur sigma in pixels at 32 px (scaled with the image size)
CONDITIONS = {
    "clean": {},
    "blur0.8": {"blur": 0.8},
    "blur1.2": {"blur": 1.2},
    "noise0.1": {"noise": 0.1},
    "mixed": {"blur": 0.8, "noise": 0.05, "jitter": 0.04, "gain": 0.85},
    "harsh": {"blur": 0.7, "noise": 0.1, "jitter": 0.06, "gain": 0.75},
}


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    out = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    out = sum(k[i] * out[i : i + img.shape[0]] for i in range(2 * r + 1))
    out = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * out[:, i : i + img.shape[1]] for i in range(2 * r + 1))


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 0.0, noise: float = 0.0, jitter: float = 0.0, gain: float = 1.0) -> np.ndarray:
    """A uint8 H,W,3 image blurred (Gaussian sigma ``blur`` pixels per 32 px of side), scaled by ``gain``,
    shifted by a per-image colour offset of std ``jitter`` and given pixel noise of std ``noise``
    (fractions of the full range)."""
    img = image.astype(np.float64)
    if blur > 0:
        img = _blur(img, blur * min(image.shape[:2]) / 32)
    img = img * gain + rng.normal(0, jitter * 255, size=(1, 1, 3)) + rng.normal(0, noise * 255, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def accuracy(n: int, size: int, condition: str = "clean", seed: int = 0) -> dict[str, tuple[float, float]]:
    """{category: (strict accuracy, clause accuracy)} over ``n`` images per category."""
    rng = np.random.default_rng([seed, size, 7])
    out = {}
    for cat in CATEGORIES:
        strict = clauses = total = 0
        for i in range(n):
            ex = example_at(i, seed, size, [cat])
            img = degrade(ex.image, rng, **CONDITIONS[condition]) if CONDITIONS[condition] else ex.image
            res = evaluate(img, ex.caption)
            strict += res.strict
            clauses += sum(ok for _, ok in res.clauses)
            total += len(res.clauses)
        out[cat] = (strict / n, clauses / total)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images per category and size (default 200)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes (default 32 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--degraded", action="store_true", help="also report blurred / noisy copies: " + ", ".join(c for c in CONDITIONS if c != "clean"))
    p.add_argument("--min-accuracy", type=float, default=0.99, help="fail when a category's clean strict accuracy is below this")
    p.add_argument("--write-suites", action="store_true", help="rewrite the ShapeWorld prompt suites in assets/prompts and exit")
    args = p.parse_args(argv)

    if args.write_suites:
        for split, path in write_prompt_suites().items():
            print(f"{split}: {len(load_prompt_suite(path))} prompts -> {path}")
        return 0

    conditions = list(CONDITIONS) if args.degraded else ["clean"]
    worst = 1.0
    for size in args.sizes:
        for cond in conditions:
            t0 = time.perf_counter()
            acc = accuracy(args.n, size, cond, args.seed)
            dt = time.perf_counter() - t0
            print(f"\nShapeEval on ShapeWorld, {size}x{size}, {cond}: {args.n} images per category ({dt:.1f} s)")
            print(f"  {'category':<14} {'strict':>8} {'clauses':>8}")
            for cat, (s, c) in acc.items():
                print(f"  {cat:<14} {s:>8.3f} {c:>8.3f}")
            mean_s = float(np.mean([s for s, _ in acc.values()]))
            mean_c = float(np.mean([c for _, c in acc.values()]))
            print(f"  {'mean':<14} {mean_s:>8.3f} {mean_c:>8.3f}")
            if cond == "clean":
                worst = min(worst, min(s for s, _ in acc.values()))
    ok = worst >= args.min_accuracy
    print(f"\nclean strict accuracy, worst category: {worst:.3f} ({'ok' if ok else 'BELOW'} {args.min_accuracy})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

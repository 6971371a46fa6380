"""pass@k of a verifier over an ``mmalign eval`` report with several samples per prompt: the share of
prompts that get at least one strictly correct sample in k draws (the headroom a policy that
concentrated on its own successes could reach).

    mmalign eval --config configs/evalmodel_embedded.yaml samples_per_prompt=16 out=runs/passk16
    python -m mmalign.embedded.passk runs/passk16/report.json            # key shapeeval.strict, k = 1, 4, 16

Unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1): with n samples of which c pass,
pass@k = 1 - C(n - c, k) / C(n, k), averaged over prompts; k larger than a prompt's n is not reported.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that k of n samples (c of them correct) drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_table(samples: Sequence[dict], key: str, ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """``{category | "overall": {"prompts": P, "pass@k": ...}}`` from report samples (each with ``category``,
    ``prompt`` and ``key`` = 0/1); a k above the smallest samples-per-prompt is left out."""
    by_prompt: dict[tuple[str, str], list[float]] = defaultdict(list)
    for s in samples:
        if key not in s:
            raise ValueError(f"sample {s.get('file', s.get('prompt'))!r} has no {key!r} (keys: {sorted(s)})")
        v = float(s[key])
        if v not in (0.0, 1.0):
            raise ValueError(f"{key} must be 0 or 1 (a strict verdict), got {v} for prompt {s['prompt']!r}")
        by_prompt[(s["category"], s["prompt"])].append(v)
    if not by_prompt:
        raise ValueError("the report holds no samples")
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for (cat, _), vals in by_prompt.items():
        groups[cat].append(vals)
        groups["overall"].append(vals)
    table = {}
    for cat, prompts in sorted(groups.items(), key=lambda kv: (kv[0] == "overall", kv[0])):
        n_min = min(len(v) for v in prompts)
        row: dict[str, float] = {"prompts": len(prompts)}
        for k in ks:
            if k <= n_min:
                row[f"pass@{k}"] = sum(pass_at_k(len(v), int(sum(v)), k) for v in prompts) / len(prompts)
        table[cat] = row
    return table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="report.json of `mmalign eval` with samples_per_prompt > 1")
    p.add_argument("--key", default="shapeeval.strict", help="the per-sample 0/1 verdict in the report's samples")
    p.add_argument("--k", default="1,4,16", help="comma-separated k values")
    args = p.parse_args(argv)
    ks = [int(x) for x in args.k.split(",") if x.strip()]
    if not ks or min(ks) < 1:
        p.error("--k takes positive integers")
    with open(args.report) as f:
        table = pass_at_k_table(json.load(f)["samples"], args.key, ks)
    for cat, row in table.items():
        print(f"{cat:14s} prompts {int(row['prompts']):4d}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "prompts"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

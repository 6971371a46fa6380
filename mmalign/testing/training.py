"""Shared check for trainer tests: does a few steps of training move a reward on held-out seeds, and the
opposite way when the reward's sign is flipped?"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

#: the ``tiny:verifiable`` reward "mean colour close to blue", as a ``rewards=[...]`` override; ``{sign}`` = weight
BLUE_REWARD = "rewards=[{{name: 'tiny:verifiable', weight: {sign}, metadata: {{target_color: [0, 0, 1]}}}}]"
EVAL_KEY = "eval/mean_color_match"


def sign_flipped_reward_shift(make_trainer: Callable[[float, str], Any], steps: int,
                              check: Callable[[Any, list, dict], None] | None = None) -> dict[float, float]:
    """Train twice, on the blue reward (sign 1) and on its negation (sign -1): ``make_trainer(sign,
    rewards_override)`` builds each run. Returns ``{sign: (eval mean after - before) / baseline eval std}``
    of the (unsigned) reward on the eval seeds. Asserts for every run: finite losses and grad norms,
    finite weights, trainable weights changed; ``check(trainer, history, weights_before)`` adds more."""
    moved = {}
    for sign in (1.0, -1.0):
        t = make_trainer(sign, BLUE_REWARD.format(sign=sign))
        base = t.evaluate(0)
        before = {n: p.detach().clone() for n, p in t.named_trainable}
        hist = t.fit()
        after = t.evaluate(steps)[f"{EVAL_KEY}/mean"]
        assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in hist)
        assert all(torch.isfinite(p).all() for p in t.trainable_params)
        assert sum(float((p.detach() - before[n]).abs().sum()) for n, p in t.named_trainable) > 0
        if check is not None:
            check(t, hist, before)
        moved[sign] = (after - base[f"{EVAL_KEY}/mean"]) / base[f"{EVAL_KEY}/std"]
    return moved

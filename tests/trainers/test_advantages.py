"""GRPO advantages against hand-computed values (plain Python floats, not the code under test)."""
import math

import pytest
import torch

from mmalign.trainers.advantages import aggregate_rewards, group_advantages

EPS = 1e-4


def _pstd(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _close(t, expected, tol=1e-5):
    assert t.dtype == torch.float32
    assert t.tolist() == pytest.approx(expected, abs=tol)


R = [1.0, 2.0, 3.0, 10.0, 10.0, 16.0]
G = [0, 0, 0, 1, 1, 1]


def test_group_std():
    # group 0: mean 2, pop std sqrt(2/3); group 1: mean 12, deviations -2,-2,4, pop std sqrt(8)
    s0, s1 = math.sqrt(2 / 3), math.sqrt(8.0)
    expected = [-1 / (s0 + EPS), 0.0, 1 / (s0 + EPS), -2 / (s1 + EPS), -2 / (s1 + EPS), 4 / (s1 + EPS)]
    _close(group_advantages(torch.tensor(R), torch.tensor(G)), expected)


def test_global_std_and_none():
    s = _pstd(R)  # std of the whole batch (Flow-GRPO global_std), centred on each group's mean
    centred = [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]
    _close(group_advantages(torch.tensor(R), torch.tensor(G), std="global"), [c / (s + EPS) for c in centred])
    _close(group_advantages(torch.tensor(R), torch.tensor(G), std="none"), centred)


def test_group_of_one_and_unsorted_ids_give_zero():
    r = torch.tensor([5.0, 1.0, 3.0])
    g = torch.tensor([7, 2, 2])
    for mode in ("group", "global", "none"):
        a = group_advantages(r, g, std=mode)
        assert a[0].item() == 0.0
    # the pair: mean 2, std 1
    _close(group_advantages(r, g), [0.0, -1 / (1 + EPS), 1 / (1 + EPS)])


def test_zero_std_group_is_exactly_zero_even_without_eps():
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.7])
    g = torch.tensor([0, 0, 0, 1, 1])
    for eps in (1e-4, 0.0):
        a = group_advantages(r, g, eps=eps)
        assert a[:3].tolist() == [0.0, 0.0, 0.0]
        assert not torch.isnan(a).any()
    # a whole batch of equal rewards with global std and eps=0: still zeros, no 0/0
    assert group_advantages(torch.full((4,), 2.5), torch.tensor([0, 0, 1, 1]), std="global", eps=0.0).tolist() == [0.0] * 4


def test_clipping_active_and_inactive():
    # 49 zeros and a one: mean 0.02, pop std 0.14 -> outlier 0.98/0.14 = 7, the others -0.02/0.14
    r = torch.zeros(50)
    r[-1] = 1.0
    g = torch.zeros(50, dtype=torch.long)
    raw = group_advantages(r, g, eps=0.0, clip=None)
    assert raw[-1].item() == pytest.approx(7.0, rel=1e-5)
    assert raw[0].item() == pytest.approx(-0.02 / 0.14, rel=1e-4)
    clipped = group_advantages(r, g, eps=0.0)  # default clip 5
    assert clipped[-1].item() == 5.0
    assert clipped[0].item() == pytest.approx(-0.02 / 0.14, rel=1e-4)  # inactive below the bound
    assert group_advantages(r, g, eps=0.0, clip=2.0)[-1].item() == 2.0


def test_nan_rewards_raise_naming_items():
    r = torch.tensor([1.0, float("nan"), 2.0, float("nan")])
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        group_advantages(r, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]))


def test_bad_arguments():
    r = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="integer"):
        group_advantages(r, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(r, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="std mode"):
        group_advantages(r, torch.tensor([0, 0]), std="batch")


def test_float32_out_of_other_dtypes_and_detached():
    r64 = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    a = group_advantages(r64, torch.tensor([0, 0]))
    _close(a, [-1 / (1 + EPS), 1 / (1 + EPS)])
    assert not a.requires_grad
    assert group_advantages(r64.detach().bfloat16(), torch.tensor([0, 0])).dtype == torch.float32


# ----------------------------------------------------------------------------- multi-reward
RA = [1.0, 2.0, 3.0, 4.0]
RB = [0.0, 0.0, 0.0, 1.0]
GG = [0, 0, 1, 1]
K = 0.5 / (0.5 + EPS)  # +-0.5 deviations over a std of 0.5


def test_sum_then_normalize():
    # a + 2b = [1, 2, 3, 6]: group 0 mean 1.5 std 0.5; group 1 mean 4.5 std 1.5
    a = aggregate_rewards({"a": torch.tensor(RA), "b": torch.tensor(RB)}, {"a": 1.0, "b": 2.0}, torch.tensor(GG))
    _close(a, [-K, K, -1.5 / (1.5 + EPS), 1.5 / (1.5 + EPS)])


def test_normalize_then_sum():
    # a: [-K, K, -K, K]; b: group 0 constant -> 0, group 1 [0, 1] -> [-K, K]; total a + 2b
    rewards = {"a": torch.tensor(RA), "b": torch.tensor(RB)}
    a = aggregate_rewards(rewards, {"a": 1.0, "b": 2.0}, torch.tensor(GG), mode="normalize_then_sum")
    _close(a, [-K, K, -3 * K, 3 * K])
    # the clip applies once, to the weighted sum
    c = aggregate_rewards(rewards, {"a": 1.0, "b": 2.0}, torch.tensor(GG), mode="normalize_then_sum", clip=2.0)
    _close(c, [-K, K, -2.0, 2.0])


def test_aggregate_kwargs_pass_through():
    a = aggregate_rewards({"a": torch.tensor(RA)}, {"a": 1.0}, torch.tensor(GG), std="none")
    _close(a, [-0.5, 0.5, -0.5, 0.5])


def test_aggregate_name_mismatch_and_nan_raise():
    g = torch.tensor(GG)
    with pytest.raises(ValueError, match="no weight for \\['b'\\]"):
        aggregate_rewards({"a": torch.tensor(RA), "b": torch.tensor(RB)}, {"a": 1.0}, g)
    with pytest.raises(ValueError, match="unknown reward"):
        aggregate_rewards({"a": torch.tensor(RA)}, {"a": 1.0, "c": 1.0}, g)
    with pytest.raises(ValueError, match="mode"):
        aggregate_rewards({"a": torch.tensor(RA)}, {"a": 1.0}, g, mode="mean")
    with pytest.raises(ValueError, match=r"rewards\['b'\].*\[2\]"):
        aggregate_rewards({"a": torch.tensor(RA), "b": torch.tensor([0.0, 0.0, float("nan"), 1.0])},
                          {"a": 1.0, "b": 1.0}, g)

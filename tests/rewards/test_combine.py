"""Normalisers, weighted sums and ensembles, checked by hand on CallableReward members."""
import math

import numpy as np
import pytest
import torch

import mmalign
from mmalign.rewards import CallableReward, load_reward
from mmalign.rewards.combine import (Ensemble, GroupZScore, Rank, RunningZScore, WeightedSum, ZScore, load_ensemble,
                                     load_weighted_sum, make_normalizer, resolve_reward)

NAN = float("nan")


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def close(a, b, **kw):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), equal_nan=True, **kw)


# ----------------------------------------------------------------------------- normalisers
def test_fixed_zscore_given_and_fitted():
    z = ZScore(mean=2.0, std=4.0)
    close(z(t(2, 6, -2, NAN)), [0, 1, -1, NAN])
    cal = np.array([1.0, 2.0, 4.0, 9.0])
    fitted = ZScore().fit(torch.tensor([*cal, NAN]))
    assert fitted.mean == pytest.approx(cal.mean()) and fitted.std == pytest.approx(cal.std())
    close(fitted(t(9.0)), [(9 - cal.mean()) / cal.std()])
    with pytest.raises(RuntimeError, match="not calibrated"):
        ZScore()(t(1, 2))
    with pytest.raises(ValueError, match="both mean and std"):
        ZScore(mean=1.0)
    # the valid mask keeps items out of the output (and of a fit)
    close(z(t(2, 6), valid=torch.tensor([True, False])), [0, NAN])


def test_running_zscore_matches_numpy_welford():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3, 2, n) for n in (5, 1, 17, 8)]
    nz = RunningZScore(warmup=0)
    for b in batches:
        nz.update(torch.tensor(b))
    allv = np.concatenate(batches)
    assert nz.count == len(allv)
    assert nz.mean == pytest.approx(allv.mean(), rel=1e-12)
    assert nz.var == pytest.approx(allv.var(), rel=1e-12)
    close(nz(t(5.0)), [(5.0 - allv.mean()) / allv.std()], rtol=1e-6, atol=1e-6)
    # NaN / invalid scores never enter the statistics
    nz.update(t(NAN, 1e6), valid=torch.tensor([True, False]))
    assert nz.count == len(allv)
    nz.frozen = True
    nz.update(t(100.0))
    assert nz.count == len(allv)


def test_running_zscore_warmup_uses_the_batch_statistics():
    nz = RunningZScore(warmup=10)
    nz.update(t(1, 2, 3))
    out = nz(t(1, 2, 3))  # 3 < warmup: batch z-score
    close(out, (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]))
    close(nz(t(7.0)), [0.0])  # one item: its own mean
    nz.update(torch.arange(10.0))
    assert nz.count == 13
    ref = np.concatenate([[1, 2, 3], np.arange(10.0)])
    close(nz(t(4.0)), [(4 - ref.mean()) / ref.std()], rtol=1e-6, atol=1e-6)


def test_group_zscore_by_keys_and_eps():
    g = GroupZScore(eps=1e-6)
    scores = t(1, 3, 10, 20, 30, 5, NAN)
    groups = ["a", "a", "b", "b", "b", "c", "a"]
    out = g(scores, groups=groups)
    b = np.array([10, 20, 30.0])
    expect = [-1 / (1 + 1e-6), 1 / (1 + 1e-6), *((b - b.mean()) / (b.std() + 1e-6)), 0.0, NAN]
    close(out, expect, rtol=1e-6, atol=1e-6)
    # without groups: the whole batch is one group
    close(g(t(1, 3)), [-1 / (1 + 1e-6), 1 / (1 + 1e-6)])
    # tensor group ids work as keys
    close(g(t(1, 3, 5), groups=torch.tensor([0, 0, 1])), [-1 / (1 + 1e-6), 1 / (1 + 1e-6), 0.0])
    with pytest.raises(ValueError, match="group keys"):
        g(t(1, 2), groups=[0])


def test_group_zscore_is_differentiable():
    s = t(1, 3, 5, 9).requires_grad_(True)
    GroupZScore()(s, groups=[0, 0, 1, 1]).pow(2).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_rank_with_ties_to_unit_interval():
    r = Rank()
    close(r(t(3, 1, 2, 2, NAN, 5)), [0.75, 0.0, 0.375, 0.375, NAN, 1.0])
    close(r(t(4, 4, 4)), [0.5, 0.5, 0.5])
    close(r(t(7.0)), [0.5])
    close(r(t(NAN)), [NAN])
    assert not r.differentiable


def test_make_normalizer_specs():
    assert make_normalizer("none").kind == "none"
    assert make_normalizer(None).kind == "none"
    z = make_normalizer({"kind": "zscore", "mean": 1.0, "std": 2.0})
    assert isinstance(z, ZScore) and z.mean == 1.0
    assert isinstance(make_normalizer("running_zscore"), RunningZScore)
    assert isinstance(make_normalizer("group"), GroupZScore) and isinstance(make_normalizer("rank"), Rank)
    shared = RunningZScore()
    assert make_normalizer(shared) is not shared  # members never share statistics
    with pytest.raises(ValueError, match="unknown normaliser 'bogus'"):
        make_normalizer("bogus")
    with pytest.raises(ValueError, match="normaliser 'zscore'"):
        make_normalizer({"kind": "zscore", "nope": 1})


# ----------------------------------------------------------------------------- members
class Counting:
    """A scoring callable that counts calls and can poison chosen items with NaN."""

    def __init__(self, fn, nan_items=()):
        self.fn, self.calls, self.nan_items = fn, 0, set(nan_items)

    def __call__(self, samples, prompts, **kw):
        self.calls += 1
        out = self.fn(samples)
        for i in self.nan_items:
            if i < len(out):
                out = out.clone()
                out[i] = NAN
        return out


def brightness(x):
    return x.mean(dim=(1, 2, 3))


def redness(x):
    return x[:, 0].mean(dim=(1, 2))


def member(fn, name, nan_items=(), **kw):
    c = Counting(fn, nan_items)
    return CallableReward(c, name=name, needs=kw.pop("needs", ()), differentiable=kw.pop("differentiable", True), **kw), c


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 8, 8, generator=g)


def test_weighted_sum_by_hand(images):
    a, ca = member(brightness, "bright")
    b, cb = member(redness, "red")
    ws = load_weighted_sum([a, b], weights=[2.0, -0.5])
    out = ws(images, ["p"] * 4)
    close(out.scores, 2.0 * brightness(images) - 0.5 * redness(images))
    assert set(out.components) == {"bright", "red"}
    close(out.components["red"], redness(images))
    assert out.valid.all() and out.reasons == [None] * 4 and out.uncertainty is None
    assert ca.calls == cb.calls == 1  # each member once per batch
    prov = out.provenance
    assert prov["reward"] == "weighted_sum" and prov["weights"] == {"bright": 2.0, "red": -0.5}
    assert set(prov["members"]) == {"bright", "red"}


def test_weighted_sum_gradients_and_differentiability(images):
    a, _ = member(brightness, "bright")
    b, _ = member(redness, "red")
    ws = WeightedSum([a, b], [1.0, 1.0])
    assert ws.differentiable
    x = images.clone().requires_grad_(True)
    ws(x).scores.sum().backward()
    expect = torch.full_like(images, 1 / (3 * 64))
    expect[:, 0] += 1 / 64
    close(x.grad, expect)
    assert not WeightedSum([a, b], normalize="rank").differentiable
    c, _ = member(brightness, "plain", differentiable=False)
    assert not WeightedSum([a, c]).differentiable


def test_weighted_sum_normalisers_per_member(images):
    a, _ = member(brightness, "bright")
    b, _ = member(redness, "red")
    ws = WeightedSum([a, b], [1.0, 1.0], normalize=["rank", {"kind": "zscore", "mean": 0.5, "std": 0.25}])
    out = ws(images)
    rank = Rank()(brightness(images))
    close(out.components["bright"], rank)
    close(out.components["red"], (redness(images) - 0.5) / 0.25)
    close(out.scores, rank + (redness(images) - 0.5) / 0.25)
    close(out.components["raw/red"], redness(images))
    with pytest.raises(ValueError, match="normalisers for 2 rewards"):
        WeightedSum([a, b], normalize=["rank"] * 3)
    with pytest.raises(ValueError, match="3 weights for 2 rewards"):
        WeightedSum([a, b], [1, 2, 3])


def test_weighted_sum_group_normalisation_by_prompt_or_group_id(images):
    a, _ = member(brightness, "bright")
    ws = WeightedSum([a], normalize="group")
    s = brightness(images)
    out = ws(images, ["x", "x", "y", "y"])
    expect = torch.cat([GroupZScore()(s[:2]), GroupZScore()(s[2:])])
    close(out.scores, expect)
    meta = [{"group_id": g} for g in (0, 1, 0, 1)]
    a2, _ = member(brightness, "bright", needs=("metadata",))
    out = WeightedSum([a2], normalize="group")(images, ["x"] * 4, metadata=meta)
    close(out.scores[[0, 2]], GroupZScore()(s[[0, 2]]))


def test_weighted_sum_running_normaliser_updates_per_batch_and_calibrate(images):
    a, _ = member(brightness, "bright")
    ws = WeightedSum([a], normalize={"kind": "running", "warmup": 0})
    ws(images[:2])
    ws(images[2:])
    nz = ws.normalizers[0]
    assert nz.count == 4 and nz.mean == pytest.approx(float(brightness(images).double().mean()), rel=1e-6)
    z = WeightedSum([a], normalize="zscore").calibrate(images)
    s = brightness(images).double().numpy()
    assert z.normalizers[0].mean == pytest.approx(s.mean(), rel=1e-6) and z.normalizers[0].std == pytest.approx(s.std(), rel=1e-5)


def test_invalid_items_propagate_with_the_member_reason(images):
    a, _ = member(brightness, "bright")
    b, _ = member(redness, "red", nan_items=[1])  # the callable sees valid items 0, 2, 3: its item 1 is item 2
    ws = WeightedSum([a, b], normalize="rank")
    x = images.clone()
    x[1, 0, 0, 0] = NAN
    out = ws(x, ["p"] * 4)
    assert out.valid.tolist() == [True, False, False, True]
    assert out.reasons[1] == "non-finite (NaN/inf) pixel values"
    assert out.reasons[2] == "red: red produced a non-finite score"
    assert math.isnan(out.scores[1]) and math.isnan(out.scores[2])
    assert torch.isfinite(out.scores[[0, 3]]).all()
    # a member's valid items keep their component; the rank of 'bright' ignores the NaN pixel item only
    assert torch.isfinite(out.components["bright"][[0, 2, 3]]).all()
    # empty prompts are reported as such when any member reads prompts
    c, _ = member(brightness, "needs_prompt", needs=("prompt",))
    out = WeightedSum([a, c])(images[:2], ["", "ok"])
    assert out.valid.tolist() == [False, True] and out.reasons[0] == "empty prompt"
    with pytest.raises(ValueError, match="needs prompts"):
        WeightedSum([a, c])(images[:2])


def test_unreadable_files_are_invalid_not_fatal(tmp_path, images):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    a, _ = member(brightness, "bright")
    out = WeightedSum([a])([good, bad])
    assert out.valid.tolist() == [True, False] and out.reasons[1].startswith("unreadable image")


def test_ensemble_mean_min_uncertainty_by_hand(images):
    a, ca = member(brightness, "bright")
    b, cb = member(redness, "red")
    sa, sb = brightness(images), redness(images)
    mean, var = (sa + sb) / 2, ((sa - sb) / 2) ** 2
    out = load_ensemble([a, b])(images)
    close(out.scores, mean)
    close(out.uncertainty, var.sqrt())
    close(out.components["bright"], sa)
    assert ca.calls == cb.calls == 1
    close(Ensemble([a, b], "min")(images).scores, torch.minimum(sa, sb))
    close(Ensemble([a, b], "uncertainty", lam=3.0)(images).scores, mean - 3.0 * var)
    ens = Ensemble([a, b], "uncertainty")
    assert ens.differentiable and ens(images).provenance["aggregate"] == "uncertainty"


def test_ensemble_lower_is_better_worst_case_and_checks(images):
    a, _ = member(brightness, "bright", higher_is_better=False)
    b, _ = member(redness, "red", higher_is_better=False)
    sa, sb = brightness(images), redness(images)
    ens = Ensemble([a, b], "min")
    assert not ens.higher_is_better
    close(ens(images).scores, torch.maximum(sa, sb))
    close(Ensemble([a, b], "uncertainty", lam=1.0)(images).scores, (sa + sb) / 2 + ((sa - sb) / 2) ** 2)
    c, _ = member(brightness, "up")
    with pytest.raises(ValueError, match="disagree on direction"):
        Ensemble([a, c])
    with pytest.raises(ValueError, match="unknown ensemble aggregate"):
        Ensemble([c], "median")
    with pytest.raises(ValueError, match="lam"):
        Ensemble([c], "uncertainty", lam=-1)
    audio = CallableReward(lambda x, p: x.mean((1, 2)), name="loud", modality="audio", needs=())
    with pytest.raises(ValueError, match="different modalities"):
        Ensemble([c, audio])


def test_ensemble_invalid_items_and_gradients(images):
    a, _ = member(brightness, "bright", nan_items=[0])
    b, _ = member(redness, "red")
    x = images.clone().requires_grad_(True)
    out = Ensemble([a, b], "uncertainty")(x)
    assert out.valid.tolist() == [False, True, True, True] and out.reasons[0].startswith("bright: ")
    out.scores[out.valid].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].abs().sum() == 0 and x.grad[1].abs().sum() > 0


def test_resolve_reward_specs():
    fn = lambda x, p: x.mean((1, 2, 3))  # noqa: E731
    assert resolve_reward(fn).name == "<lambda>"
    r = resolve_reward("mmalign.testing.combine:tiny_brightness")
    assert r.name == "brightness" and r.differentiable
    m = resolve_reward({"name": "mmalign.testing.combine:tiny_brightness", "options": {"name": "b2"}})
    assert m.name == "b2"
    assert resolve_reward(r) is r
    with pytest.raises(TypeError, match="already built"):
        resolve_reward(r, batch_size=2)
    with pytest.raises(ValueError, match="cannot import reward"):
        resolve_reward("nope.module:thing")
    with pytest.raises(TypeError, match="must be a Reward class or a factory"):
        resolve_reward("math:pi")
    with pytest.raises(mmalign.registry.RegistryError, match="unknown reward"):
        resolve_reward("definitely_not_a_reward")
    with pytest.raises(TypeError, match="cannot build a reward"):
        resolve_reward(3)


def test_registered_factories_build_combinations(images):
    ws = load_reward("weighted_sum", rewards=["mmalign.testing.combine:tiny_brightness", brightness_reward()], weights=[1, 1])
    close(ws(images).scores, 2 * brightness(images))
    ens = mmalign.load_reward("ensemble", rewards=[brightness_reward()], aggregate="min")
    close(ens(images).scores, brightness(images))
    assert ws.member_names == ["brightness", "brightness#2"]


def brightness_reward():
    return CallableReward(lambda x, p: brightness(x), name="brightness", needs=(), differentiable=True)


def test_tiny_builders_compose_real_tiny_rewards(images):
    pytest.importorskip("mmalign.rewards.clip")
    pytest.importorskip("mmalign.rewards.rules")
    from mmalign.testing import tiny_reward

    ws = tiny_reward("weighted_sum")
    out = ws(images, ["a red circle"] * 4)
    assert out.valid.all() and set(out.components) == {"jpeg_size", "clipscore"}
    close(out.scores, 0.05 * out.components["jpeg_size"] + 0.01 * out.components["clipscore"])
    ens = tiny_reward("ensemble", aggregate="uncertainty", lam=0.1)
    out = ens(images, ["a red circle"] * 4)
    assert out.valid.all() and out.uncertainty is not None and len(out.components) == 3
    comp = torch.stack(list(out.components.values()))
    close(out.uncertainty, comp.std(0, unbiased=False), rtol=1e-5, atol=1e-5)


def test_ensemble_calibrated_zscores(images):
    a, _ = member(brightness, "bright")
    b, _ = member(redness, "red")
    ens = Ensemble([a, b], normalize="zscore").calibrate(images)
    out = ens(images)
    za = (brightness(images) - brightness(images).mean()) / brightness(images).std(unbiased=False)
    close(out.components["bright"], za, rtol=1e-5, atol=1e-5)

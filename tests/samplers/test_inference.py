"""Inference-time alignment: the ReNO regulariser and loss against hand values, ReNO on a tiny model
(raises a reward, returns the best of its trace, norm regulariser, gradient clipping), best-of-N, the
zero-order search and its budget, reward guidance, `mmalign sample` end to end, and clear errors."""
import json
import math
from pathlib import Path

import pytest
import torch

from mmalign.cli import main
from mmalign.rewards import CallableReward
from mmalign.samplers import SamplerConfig, sample
from mmalign.samplers.inference import (
    BestOfNConfig,
    GuidanceConfig,
    NoiseOptConfig,
    SearchConfig,
    _best_per_prompt,
    best_of_n,
    noise_neighbors,
    optimize_noise,
    reward_guided_sample,
    search,
)
from mmalign.testing import tiny_adapter
from mmalign.trainers.losses import reno_loss, reno_regularizer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares"]
SC = SamplerConfig(num_steps=2, guidance_scale=1.0)
T = torch.tensor


def brightness(**kw):
    return CallableReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="brightness", needs=(), differentiable=True, **kw)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def adapter():
    return tiny_adapter("sd3")


# ----------------------------------------------------------------------------- ReNO math (arXiv 2406.04312)
def test_reno_regularizer_hand_value():
    z = T([[1.0, 2.0, 2.0], [0.0, 0.0, 2.0]])  # d = 3; norms 3 and 2
    # ||z||^2 / 2 - (d - 1) log ||z||
    assert reno_regularizer(z).tolist() == pytest.approx([4.5 - 2 * math.log(3), 2.0 - 2 * math.log(2)], abs=1e-6)
    z.requires_grad_(True)
    reno_regularizer(z).sum().backward()
    # gradient z - (d - 1) z / ||z||^2: (1 - 2/9) z and (1 - 2/4) z
    assert z.grad.tolist() == [pytest.approx([7 / 9, 14 / 9, 14 / 9], abs=1e-6), pytest.approx([0.0, 0.0, 1.0], abs=1e-6)]


def test_reno_loss_hand_value():
    z = T([[1.0, 2.0, 2.0], [0.0, 0.0, 2.0]])
    r1, r2 = T([0.5, 1.0]), T([3.0, -1.0])
    reg = [4.5 - 2 * math.log(3), 2.0 - 2 * math.log(2)]
    # mean_B( -(2 r1 + 0.5 r2) + 0.1 reg )
    rows = [-(2 * 0.5 + 0.5 * 3.0) + 0.1 * reg[0], -(2 * 1.0 + 0.5 * -1.0) + 0.1 * reg[1]]
    assert reno_loss([r1, r2], [2.0, 0.5], z, 0.1).item() == pytest.approx(sum(rows) / 2, abs=1e-6)


# ----------------------------------------------------------------------------- ReNO on a tiny model
@pytest.mark.parametrize("opt", [{}, {"optimizer": "adam", "lr": 0.1}])
def test_reno_raises_the_reward_and_returns_the_best_of_its_trace(adapter, opt):
    cfg = NoiseOptConfig(iterations=6, **opt)
    r = optimize_noise(adapter, PROMPTS, [(brightness(), 100.0)], cfg, SC, gen(0))
    total = r.trace["total"]
    assert total.shape == (6, 2) and torch.isfinite(total).all()
    assert (total[-1] > total[0]).all()  # the reward went up on every prompt
    assert torch.equal(r.scores, total.max(dim=0).values) and torch.equal(r.best_index, total.argmax(dim=0))
    assert (r.best_index > 0).all() and (r.scores > r.initial_scores).all()
    # the returned sample is the best one: its reward, and the noise regenerates it
    assert (100 * brightness()(r.samples).scores).tolist() == pytest.approx(r.scores.tolist(), abs=1e-4)
    torch.testing.assert_close(sample(adapter, PROMPTS, SC, latents=r.noise).samples, r.samples, atol=1e-5, rtol=0)
    # iteration 0 is plain ODE sampling of the initial noise (drawn from the same generator)
    torch.testing.assert_close(r.initial_samples, sample(adapter, PROMPTS, SC, generator=gen(0)).samples, atol=1e-6, rtol=0)
    torch.testing.assert_close(r.trace["reg"][0], reno_regularizer(adapter.init_noise(2, gen(0))), atol=1e-3, rtol=0)
    # only the noise was optimised: no weight gradients, requires_grad restored
    assert all(p.grad is None for p in adapter.denoiser.parameters())
    assert all(p.requires_grad for p in adapter.denoiser.parameters())
    json.dumps(r.to_json())  # strict JSON


def test_gradient_checkpointing_gives_the_same_optimisation(adapter):
    cfg = NoiseOptConfig(iterations=3)
    plain = optimize_noise(adapter, PROMPTS, [(brightness(), 100.0)], cfg, SC, gen(0))
    ckpt = optimize_noise(adapter, PROMPTS, [(brightness(), 100.0)], NoiseOptConfig(iterations=3, gradient_checkpointing=True), SC, gen(0))
    for key in ("total", "grad_norm", "noise_norm"):
        torch.testing.assert_close(ckpt.trace[key], plain.trace[key], atol=1e-5, rtol=1e-5)


def test_regulariser_keeps_the_noise_norm_near_sqrt_d(adapter):
    """Without clipping, a strong reward pushes the noise off the typical shell of N(0, I); the ReNO
    regulariser (minimal at ||z|| = sqrt(d - 1)) holds it there."""
    d = math.prod(adapter.latent_shape(1)[1:])
    end = {}
    for lam in (0.0, 0.1):
        cfg = NoiseOptConfig(iterations=8, reg_weight=lam, max_grad_norm=None)
        r = optimize_noise(adapter, PROMPTS, [(brightness(), 100.0)], cfg, SC, gen(0))
        assert (r.trace["total"][-1] > r.trace["total"][0]).all()
        end[lam] = (r.trace["noise_norm"][-1] - math.sqrt(d - 1)).abs()
    assert (end[0.0] > 3.0).all(), end  # drifted by more than 3 (10%)
    assert (end[0.1] < 0.5).all(), end


def test_gradient_clipping_bounds_each_update(adapter):
    z0 = adapter.init_noise(2, gen(3))
    cfg = NoiseOptConfig(iterations=3, optimizer="sgd", lr=1.0, momentum=0.0, nesterov=False, max_grad_norm=0.05, reg_weight=0.0)
    r = optimize_noise(adapter, PROMPTS, [(brightness(), 100.0)], cfg, SC, noise=z0)
    g, clipped, upd = r.trace["grad_norm"][:-1], r.trace["clipped_grad_norm"][:-1], r.trace["update_norm"][:-1]
    assert (g > 0.05).all()  # clipping was active
    assert (clipped <= 0.05 + 1e-6).all()
    torch.testing.assert_close(upd, clipped, atol=1e-5, rtol=1e-4)  # plain SGD, lr 1: the step is the clipped gradient
    steps = (r.noise - z0).flatten(1).norm(dim=1)
    assert (steps <= 0.05 * r.best_index.float() + 1e-5).all() and (r.best_index > 0).all()


# ----------------------------------------------------------------------------- best-of-N
def test_best_of_n_picks_the_argmax_and_is_deterministic(adapter):
    r = best_of_n(adapter, PROMPTS, brightness(), n=4, sampler=SC, generator=gen(0))
    total = r.trace["total"]
    assert total.shape == (4, 2)
    assert torch.equal(r.best_index, total.argmax(dim=0)) and torch.equal(r.scores, total.max(dim=0).values)
    assert torch.equal(r.initial_scores, total[0])
    assert brightness()(r.samples).scores.tolist() == pytest.approx(r.scores.tolist(), abs=1e-6)
    for i, p in enumerate(PROMPTS):  # the returned noise regenerates the chosen candidate
        torch.testing.assert_close(sample(adapter, [p], SC, latents=r.noise[i : i + 1]).samples[0], r.samples[i], atol=1e-6, rtol=0)
    again = best_of_n(adapter, PROMPTS, brightness(), n=4, sampler=SC, generator=gen(0), batch_size=3)
    assert torch.equal(again.samples, r.samples) and torch.equal(again.trace["total"], total)  # per seed, any batch size
    other = best_of_n(adapter, PROMPTS, brightness(), n=4, sampler=SC, generator=gen(1))
    assert not torch.equal(other.trace["total"], total)
    # any reward: a non-differentiable one, several weighted ones
    plain = CallableReward(lambda x, p: -x.mean(dim=(1, 2, 3)), name="darkness", needs=(), differentiable=False)
    mixed = best_of_n(adapter, PROMPTS, [(brightness(), 1.0), (plain, 0.5)], n=4, sampler=SC, generator=gen(0))
    torch.testing.assert_close(mixed.trace["total"], 0.5 * total, atol=1e-6, rtol=0)
    assert set(mixed.reward_scores) == {"brightness", "darkness"}


def test_invalid_candidates_are_never_chosen():
    value, index = _best_per_prompt(T([[math.nan, 1.0, 3.0, math.nan], [math.nan, math.nan, math.nan, 2.0]]))
    assert index.tolist() == [2, 3] and value.tolist() == [3.0, 2.0]


# ----------------------------------------------------------------------------- search
def test_noise_neighbors_keep_the_norm_at_the_given_cosine():
    z = torch.randn(3, 4, 8, 8, generator=gen(0))
    nb = noise_neighbors(z, 5, 0.9, gen(1))
    assert nb.shape == (3, 5, 4, 8, 8)
    flat, nflat = z.flatten(1), nb.flatten(2)
    torch.testing.assert_close(nflat.norm(dim=2), flat.norm(dim=1, keepdim=True).expand(3, 5), atol=1e-4, rtol=0)
    cos = torch.nn.functional.cosine_similarity(nflat, flat.unsqueeze(1), dim=2)
    torch.testing.assert_close(cos, torch.full((3, 5), 0.9), atol=1e-5, rtol=0)
    assert torch.cdist(nflat[0], nflat[0]).triu(1).max() > 0  # distinct directions
    with pytest.raises(ValueError, match="cosine"):
        noise_neighbors(z, 2, 1.0)


@pytest.mark.parametrize("mode", ["zero_order", "random"])
def test_search_respects_its_budget(adapter, mode):
    seen = []

    def counting(x, prompts):
        seen.append(x.shape[0])
        return x.mean(dim=(1, 2, 3))

    reward = CallableReward(counting, name="counted", needs=())  # not differentiable: search does not need it
    for budget, rounds in ((7, [0, 1, 1, 1, 2, 2, 2]), (6, [0, 1, 1, 1, 2, 2]), (1, [0])):
        seen.clear()
        r = search(adapter, PROMPTS, reward, SearchConfig(budget=budget, neighbors=3, mode=mode), SC, gen(0))
        assert sum(seen) == budget * len(PROMPTS) and r.reward_calls == budget
        assert r.trace["total"].shape == (budget, 2) and r.trace["round"][:, 0].tolist() == rounds
        assert torch.equal(r.scores, r.trace["total"].max(dim=0).values)
        assert torch.equal(r.best_index, r.trace["total"].argmax(dim=0))
        assert r.trace["counted"].shape == (budget, 2)
    assert (r.scores >= r.initial_scores).all()
    z0 = adapter.init_noise(2, gen(0))
    r = search(adapter, PROMPTS, reward, SearchConfig(budget=4, neighbors=3, cosine=0.9), SC, noise=z0, generator=gen(5))
    if mode == "zero_order":  # candidates lie on the pivot's sphere
        torch.testing.assert_close(r.noise.flatten(1).norm(dim=1), z0.flatten(1).norm(dim=1), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- reward guidance
def test_reward_guidance_reuses_the_callback_and_raises_the_reward(adapter):
    sc = SamplerConfig(num_steps=3, guidance_scale=4.5)
    off = reward_guided_sample(adapter, PROMPTS, brightness(), GuidanceConfig(scale=0.0), sc, gen(0))
    torch.testing.assert_close(off.samples, off.initial_samples, atol=1e-5, rtol=0)  # the pipeline = mmalign's ODE
    on = reward_guided_sample(adapter, PROMPTS, brightness(), GuidanceConfig(scale=200.0, max_grad_norm=5.0), sc, gen(0))
    torch.testing.assert_close(on.initial_samples, off.initial_samples)
    assert (on.scores > on.initial_scores).all() and on.trace["total"].shape == (3, 2)
    plain = CallableReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="flat", needs=())
    with pytest.raises(ValueError, match="'flat' is not"):
        reward_guided_sample(adapter, PROMPTS, plain, GuidanceConfig(scale=1.0), sc, gen(0))


# ----------------------------------------------------------------------------- errors
def test_clear_errors(adapter):
    plain = CallableReward(lambda x, p: x.mean(dim=(1, 2, 3)), name="verifier", needs=())
    with pytest.raises(ValueError, match=r"'verifier' is not differentiable.*best_of_n / search"):
        optimize_noise(adapter, PROMPTS, [brightness(), plain], NoiseOptConfig(iterations=2), SC)
    with pytest.raises(ValueError, match="sampler.method must be 'ode'"):
        optimize_noise(adapter, PROMPTS, brightness(), NoiseOptConfig(iterations=2), SamplerConfig(method="flow_grpo", num_steps=2))
    with pytest.raises(ValueError, match="no reward given"):
        best_of_n(adapter, PROMPTS, [], n=2, sampler=SC)
    with pytest.raises(ValueError, match=r"noise has shape \(1, 4, 16, 16\), expected \(2, 4, 16, 16\)"):
        optimize_noise(adapter, PROMPTS, brightness(), NoiseOptConfig(iterations=2), SC, noise=adapter.init_noise(1))
    nan = CallableReward(lambda x, p: torch.full((x.shape[0],), math.nan), name="nanny", needs=(), differentiable=True)
    with pytest.raises(ValueError, match="could not be scored by reward nanny: nanny produced a non-finite score"):
        optimize_noise(adapter, PROMPTS, nan, NoiseOptConfig(iterations=2), SC)
    with pytest.raises(ValueError, match="no candidate of prompt 0 .* nanny"):
        best_of_n(adapter, PROMPTS, nan, n=2, sampler=SC)
    with pytest.raises(ValueError, match="group_size must be 1"):
        best_of_n(adapter, PROMPTS, brightness(), n=2, sampler=SamplerConfig(num_steps=2, group_size=2))
    for bad, match in [
        (lambda: NoiseOptConfig(iterations=0), "iterations"), (lambda: NoiseOptConfig(lr=0.0), "lr"),
        (lambda: NoiseOptConfig(max_grad_norm=0.0), "max_grad_norm"), (lambda: NoiseOptConfig(reg_weight=-1.0), "reg_weight"),
        (lambda: NoiseOptConfig(momentum=0.0), "nesterov needs"), (lambda: NoiseOptConfig(optimizer="lbfgs"), "optimizer"),
        (lambda: SearchConfig(budget=0), "budget"), (lambda: SearchConfig(cosine=1.0), "cosine"),
        (lambda: SearchConfig(mode="beam"), "mode"), (lambda: BestOfNConfig(n=0), "best_of_n.n"),
        (lambda: GuidanceConfig(scale=-1.0), "scale"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


# ----------------------------------------------------------------------------- registry and CLI
def test_registered_as_samplers():
    import mmalign
    from mmalign.registry import SAMPLERS

    assert {"best_of_n", "reno", "search", "reward_guidance"} <= set(mmalign.list_samplers())
    assert SAMPLERS.get("reno") is optimize_noise and SAMPLERS.get("best_of_n") is best_of_n


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_cli_optimize_noise_end_to_end(tmp_path, capsys):
    out = tmp_path / "reno"
    code = main(["sample", "--model", "tiny:sd3", "--optimize-noise", "--reward", "clipscore",
                 "-o", f"model_id={ROOT / 'assets/shapeworld-clip'}", "--report-reward", "shapeeval",
                 "prompts=[a red circle left of a blue square, two blue squares]", "sampler.num_steps=2",
                 "inference.reno.iterations=3", "threads=1", f"out={out}"])
    assert code == 0, capsys.readouterr().err
    trace = json.loads((out / "trace.json").read_text())
    assert trace["method"] == "reno" and len(trace["trace"]) == 3 and trace["weights"] == {"clipscore": 1.0}
    for i in range(2):  # the best is the maximum of the per-iteration totals
        assert trace["best_total"][i] == max(row["total"][i] for row in trace["trace"])
    report = trace["report"]
    assert report["clipscore"]["role"] == "optimised" and report["shapeeval"]["role"] == "report"
    assert "shapeeval.strict" in report
    assert report["clipscore"]["after_mean"] >= report["clipscore"]["before_mean"]
    for name in ("sample_000.png", "initial_001.png", "grid.png", "before_after.png", "samples.json", "report.txt"):
        assert (out / name).is_file(), name
    assert (out / "trace.png").is_file() == _has_matplotlib()
    assert "before" in capsys.readouterr().out


def test_cli_best_of_n_shipped_config_and_search_with_a_verifier(tmp_path, capsys):
    out = tmp_path / "bon"
    code = main(["sample", "--config", str(ROOT / "configs/sample_best_of_n_embedded.yaml"), "inference.best_of_n.n=2",
                 "sampler.num_steps=2", "prompts=[two yellow circles]", f"model.name={ROOT / 'assets/shapeworld-sd3'}",
                 f"inference.rewards=[{{name: clipscore, options: {{model_id: '{ROOT / 'assets/shapeworld-clip'}'}}}}]",
                 "inference.plot=false", f"out={out}"])
    assert code == 0, capsys.readouterr().err
    trace = json.loads((out / "trace.json").read_text())
    assert trace["method"] == "best_of_n" and len(trace["trace"]) == 2 and not (out / "trace.png").exists()
    out = tmp_path / "search"  # a non-differentiable verifier is fine for search
    code = main(["sample", "--model", "tiny:sd3", "--reward", "shapeeval", "inference.method=search",
                 "inference.search.budget=3", "inference.search.neighbors=2", "prompts=[two blue squares]",
                 "sampler.num_steps=2", "inference.plot=false", f"out={out}"])
    assert code == 0, capsys.readouterr().err
    trace = json.loads((out / "trace.json").read_text())
    assert trace["method"] == "search" and trace["reward_calls_per_prompt"] == 3 and len(trace["trace"]) == 3


def test_cli_errors(capsys):
    for argv, needle in [
        (["sample", "--optimize-noise", "--reward", "shapeeval", "sampler.num_steps=2", "inference.reno.iterations=2"],
         "'shapeeval' is not differentiable"),
        (["sample", "inference.method=reno"], "needs at least one reward in inference.rewards"),
        (["sample", "-o", "x=1"], "applies to --reward"),
        (["sample", "--optimize-noise", "--reward", "brightness"], "unknown reward 'brightness'"),
        (["sample", "inference.reno.lr=-1", "inference.method=reno", "inference.rewards=[{name: shapeeval}]"], "reno.lr"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)


def test_shipped_inference_configs_validate():
    from mmalign.config import load_config
    from mmalign.jobs import SampleJobConfig

    reno = load_config(SampleJobConfig, ROOT / "configs/sample_reno_embedded.yaml")
    assert reno.inference.method == "reno" and reno.sampler.method == "ode"
    assert [r.name for r in reno.inference.rewards] == ["clipscore"] and reno.inference.report_rewards[0].name == "shapeeval"
    bon = load_config(SampleJobConfig, ROOT / "configs/sample_best_of_n_embedded.yaml")
    assert bon.inference.method == "best_of_n" and bon.inference.best_of_n.n == 8

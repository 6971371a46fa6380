"""Trainer losses against hand-computed values (expected numbers from plain Python floats)."""
import math

import pytest
import torch

from mmalign.trainers.losses import (
    d3po_loss,
    denoising_loss,
    diffusion_dpo_loss,
    diffusion_target,
    flow_matching_target,
    latent_kl,
    ppo_clip_loss,
    prdp_loss,
    ratio_normalize,
    reno_loss,
    reno_regularizer,
    rwr_weights,
    weighted_denoising_loss,
)

T = torch.tensor


def _softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- PPO clip
def test_ppo_ratio_one_is_minus_mean_advantage():
    lp = T([-1.0, -2.0, 0.5])
    adv = T([1.0, -2.0, 0.5])
    loss, stats = ppo_clip_loss(lp, lp.clone(), adv, 1e-4)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3, abs=1e-7)
    assert stats["clip_frac"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0
    assert stats["approx_kl"].item() == 0.0


RATIOS = [1.5, 0.5, 1.1, 0.7]
ADV = [1.0, 1.0, -1.0, -1.0]


def _ppo_inputs():
    old = T([-1.0, -2.0, -3.0, -4.0])
    lp = (old + T([math.log(r) for r in RATIOS])).requires_grad_(True)
    return lp, old, T(ADV)


def test_ppo_clipping_active_values_and_stats():
    lp, old, adv = _ppo_inputs()
    loss, stats = ppo_clip_loss(lp, old, adv, 0.2)
    # per sample max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.5, 1.1, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.8) / 4, abs=1e-6)
    assert stats["clip_frac"].item() == 0.5  # samples 0 and 3: the clipped branch wins
    assert stats["out_of_range_frac"].item() == 0.75  # 1.5, 0.5, 0.7 are outside [0.8, 1.2]
    assert stats["ratio_mean"].item() == pytest.approx(sum(RATIOS) / 4, abs=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in RATIOS) / 4, abs=1e-6)
    assert all(not v.requires_grad and v.ndim == 0 for v in stats.values())


def test_ppo_gradient_zero_where_clipped():
    lp, old, adv = _ppo_inputs()
    loss, _ = ppo_clip_loss(lp, old, adv, 0.2)
    loss.backward()
    # d/dlp of -A * exp(lp - old) / B = -A * r / 4 where unclipped; exactly 0 where clipped
    assert lp.grad.tolist() == pytest.approx([0.0, -0.5 / 4, 1.1 / 4, 0.0], abs=1e-6)
    assert lp.grad[0].item() == 0.0 and lp.grad[3].item() == 0.0


def test_ppo_clipping_inactive():
    lp, old, adv = _ppo_inputs()
    loss, stats = ppo_clip_loss(lp, old, adv, 1.0)  # every ratio inside [0, 2]
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 1.1 + 0.7) / 4, abs=1e-6)
    assert stats["clip_frac"].item() == 0.0
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-1.5 / 4, -0.5 / 4, 1.1 / 4, 0.7 / 4], abs=1e-6)


def test_ppo_float32_and_nan_and_shapes():
    lp = T([0.1, 0.2], dtype=torch.float64)
    loss, _ = ppo_clip_loss(lp, lp.bfloat16(), T([1.0, -1.0], dtype=torch.float64), 0.1)
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError, match="old_log_prob"):
        ppo_clip_loss(T([0.0, 0.0]), T([0.0, float("nan")]), T([1.0, 1.0]), 0.1)
    with pytest.raises(ValueError, match="advantages"):
        ppo_clip_loss(T([0.0, 0.0]), T([0.0, 0.0]), T([float("nan"), 1.0]), 0.1)
    with pytest.raises(ValueError, match="shapes"):
        ppo_clip_loss(T([0.0, 0.0]), T([0.0, 0.0]), T([1.0]), 0.1)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_clip_loss(T([0.0]), T([0.0]), T([1.0]), 0.0)


# ----------------------------------------------------------------------------- GRPO-Guard ratio normalisation
def test_ratio_normalize_centres_per_timestep():
    lr = T([0.1, 0.2, 0.3, 0.6])
    assert ratio_normalize(lr).tolist() == pytest.approx([-0.2, -0.1, 0.0, 0.3], abs=1e-6)
    ts = T([0, 0, 5, 5])  # step 0: mean 0.15; step 5: mean 0.45
    assert ratio_normalize(lr, ts).tolist() == pytest.approx([-0.05, 0.05, -0.15, 0.15], abs=1e-6)
    # dividing by each step's (population) std 0.05 / 0.15 gives +-1, rescaled to target_std
    assert ratio_normalize(lr, ts, divide_std=True).tolist() == pytest.approx([-1, 1, -1, 1], abs=1e-4)
    assert ratio_normalize(lr, ts, divide_std=True, target_std=0.5).tolist() == pytest.approx([-0.5, 0.5, -0.5, 0.5], abs=1e-4)
    # a step with one sample, and all-zero log-ratios (on-policy): 0, no NaN, also in the gradient
    x = T([0.0, 0.0, 0.7], requires_grad=True)
    out = ratio_normalize(x, T([1, 1, 2]), divide_std=True)
    assert out.tolist() == [0.0, 0.0, 0.0]
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_ppo_normalize_ratio_makes_clip_two_sided():
    # every ratio < 1 (left-shifted, as at low-noise steps): positive advantages never reach 1 + c
    old = torch.zeros(4)
    lp = T([-0.3, -0.25, -0.2, -0.15])
    adv = torch.ones(4)
    _, plain = ppo_clip_loss(lp, old, adv, 0.02)
    assert plain["clip_frac"].item() == 0.0
    loss, guard = ppo_clip_loss(lp, old, adv, 0.02, normalize_ratio=True)
    # re-centred log-ratios -0.075, -0.025, 0.025, 0.075: exp(0.025) > 1.02, so the top two are clipped
    assert guard["clip_frac"].item() == 0.5
    expected = [-math.exp(-0.075), -math.exp(-0.025), -1.02, -1.02]
    assert loss.item() == pytest.approx(sum(expected) / 4, abs=1e-6)
    assert guard["ratio_mean"].item() == pytest.approx(sum(math.exp(v) for v in (-0.075, -0.025, 0.025, 0.075)) / 4, abs=1e-6)
    assert guard["raw_ratio_mean"].item() == pytest.approx(sum(math.exp(v) for v in (-0.3, -0.25, -0.2, -0.15)) / 4, abs=1e-6)
    assert guard["approx_kl"].item() == pytest.approx(plain["approx_kl"].item())  # on the raw log-ratio


# ----------------------------------------------------------------------------- KL
def test_latent_kl_values():
    mean = T([[1.0, 2.0], [1.0, 1.0]])
    ref = torch.zeros(2, 2)
    # mean over dims of squared diff: 2.5 and 1.0; / (2 * 0.25)
    assert latent_kl(mean, ref, 0.5).tolist() == pytest.approx([5.0, 2.0])
    assert latent_kl(mean, ref, T([0.5, 1.0])).tolist() == pytest.approx([5.0, 0.5])
    img = mean.reshape(2, 1, 1, 2).expand(2, 3, 2, 2)  # a B,C,H,W layout: same mean over dims
    assert latent_kl(img, torch.zeros_like(img), T(0.5)).tolist() == pytest.approx([5.0, 2.0])
    with pytest.raises(ValueError, match="std"):
        latent_kl(mean, ref, 0.0)
    with pytest.raises(ValueError, match="ref_mean"):
        latent_kl(mean, T([[0.0, float("nan")], [0.0, 0.0]]), 0.5)


# ----------------------------------------------------------------------------- DPO family
def test_diffusion_dpo_equal_errors_is_log2():
    e = T([0.3, 0.1, 0.2])
    loss, stats = diffusion_dpo_loss(e, e, e, e, 5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["implicit_acc"].item() == 0.5
    assert stats["reward_margin"].item() == 0.0


def test_diffusion_dpo_values():
    ew, el, rw, rl = T([0.1, 0.3]), T([0.2, 0.1]), T([0.15, 0.2]), T([0.15, 0.2])
    # inside = -beta/2 * ((ew - rw) - (el - rl)) with beta = 2: 0.1 and -0.2
    loss, stats = diffusion_dpo_loss(ew.requires_grad_(True), el, rw, rl, 2.0)
    assert loss.item() == pytest.approx((_softplus(-0.1) + _softplus(0.2)) / 2, abs=1e-6)
    assert stats["implicit_acc"].item() == 0.5
    assert stats["reward_margin"].item() == pytest.approx(-0.05, abs=1e-6)
    assert stats["reward_chosen"].item() == pytest.approx((0.05 - 0.1) / 2, abs=1e-6)
    loss.backward()
    assert (ew.grad > 0).all()  # a larger error on the chosen sample raises the loss
    with pytest.raises(ValueError, match="ref_err_l"):
        diffusion_dpo_loss(ew, el, rw, T([0.0, float("nan")]), 2.0)


def test_d3po_values():
    lw, rw = T([-1.0, -2.0]), T([-1.5, -2.0])
    ll, rl = T([-1.0, -1.0]), T([-1.2, -0.5])
    # log-ratios w: 0.5, 0; l: 0.2, -0.5; inside = 0.5 * (0.3, 0.5)
    loss, stats = d3po_loss(lw, ll, rw, rl, 0.5)
    assert loss.item() == pytest.approx((_softplus(-0.15) + _softplus(-0.25)) / 2, abs=1e-6)
    assert stats["implicit_acc"].item() == 1.0
    assert stats["reward_margin"].item() == pytest.approx(0.2, abs=1e-6)
    # per-step (B, S) inputs: every step is its own term, same numbers
    loss2, _ = d3po_loss(lw.reshape(1, 2), ll.reshape(1, 2), rw.reshape(1, 2), rl.reshape(1, 2), 0.5)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-7)
    # public-code ratio clamp to [0.9, 1.1]: w -> log 1.1, 0; l -> log 1.1, log 0.9
    loss3, _ = d3po_loss(lw, ll, rw, rl, 0.5, clip_range=0.1)
    assert loss3.item() == pytest.approx((math.log(2) + _softplus(-0.5 * -math.log(0.9))) / 2, abs=1e-6)
    e = T([-1.0, -3.0])
    assert d3po_loss(e, e, e, e, 1.0)[0].item() == pytest.approx(math.log(2), abs=1e-6)


def test_prdp_values_and_proximal_clip():
    la = T([[0.1, -0.3], [0.05, 0.02]])
    lb = T([[0.2, 0.0], [-0.1, 0.4]])
    ra, rb = T([1.0, 0.5]), T([0.0, 1.0])
    # no clip: pred = 2 * ([-0.2, 0.07] - [0.2, 0.3]) = [-0.8, -0.46]; target [1, -0.5]
    loss, stats = prdp_loss(la, lb, ra, rb, 2.0, None)
    assert loss.item() == pytest.approx((1.8**2 + 0.04**2) / 2, abs=1e-5)
    assert stats["pred_mean"].item() == pytest.approx(-0.63, abs=1e-6)
    assert stats["target_mean"].item() == pytest.approx(0.25, abs=1e-6)
    assert stats["clip_frac"].item() == 0.0
    assert stats["pred_target_corr"].item() == pytest.approx(-1.0, abs=1e-5)  # two pairs: perfectly anti-correlated
    # clip 0.25 (pi_ref = pi_old: old log-ratios 0): -0.3 -> -0.25 and 0.4 -> 0.25, clipped pred = [-0.7, -0.16].
    # Errors: unclipped [1.8^2, 0.04^2], clipped [1.7^2, 0.34^2]: PRDP eq. 18 keeps the larger of each pair
    la_g, lb_g = la.clone().requires_grad_(True), lb.clone().requires_grad_(True)
    loss, stats = prdp_loss(la_g, lb_g, ra, rb, 2.0, 0.25)
    assert loss.item() == pytest.approx((1.8**2 + 0.34**2) / 2, abs=1e-5)
    assert stats["clip_frac"].item() == 0.25 and stats["clipped_loss_frac"].item() == 0.5
    loss.backward()
    # pair 0 (unclipped branch): every step, even the clipped one, gets 2 * (pred - target) * beta / B = 2 * -1.8 * 2 / 2
    assert la_g.grad[0].tolist() == pytest.approx([-3.6, -3.6], abs=1e-5)
    assert lb_g.grad[0].tolist() == pytest.approx([3.6, 3.6], abs=1e-5)
    # pair 1 (clipped branch): 2 * (-0.16 + 0.5) * 2 / 2 = 0.68; its clipped step (lb 0.4) passes nothing
    assert la_g.grad[1].tolist() == pytest.approx([0.68, 0.68], abs=1e-5)
    assert lb_g.grad[1].tolist() == pytest.approx([-0.68, 0.0], abs=1e-5)
    # a (B,) log-ratio is one step
    one, _ = prdp_loss(T([0.1]), T([0.0]), T([0.5]), T([0.0]), 1.0, None)
    assert one.item() == pytest.approx(0.16, abs=1e-6)
    with pytest.raises(ValueError, match="reward_b"):
        prdp_loss(la, lb, ra, T([0.0, float("nan")]), 2.0, None)
    with pytest.raises(ValueError, match="old_log_ratio_a and old_log_ratio_b"):
        prdp_loss(la, lb, ra, rb, 2.0, 0.25, old_log_ratio_a=la)


def test_prdp_clip_is_around_the_sampling_policy_not_the_reference():
    """pi_ref = the pretrained model, pi_old = the sampling snapshot: r = log pi_theta/pi_ref per step,
    old = log pi_old/pi_ref; the clip bounds r - old (PRDP eq. 20), the regression uses r itself."""
    la, oa = T([[0.5, 0.1]]), T([[0.2, 0.1]])  # step 0 moved by 0.3 from pi_old, step 1 not at all
    zero = T([[0.0, 0.0]])
    # target 0.3: pred = 0.6 (err 0.09); clipped 0.2 + 0.1 + 0.1 = 0.4 (err 0.01): the unclipped error is larger
    la_g = la.clone().requires_grad_(True)
    loss, stats = prdp_loss(la_g, zero, T([0.3]), T([0.0]), 1.0, 0.1, old_log_ratio_a=oa, old_log_ratio_b=zero)
    assert loss.item() == pytest.approx(0.09, abs=1e-6)
    assert stats["clip_frac"].item() == 0.25 and stats["clipped_loss_frac"].item() == 0.0
    loss.backward()
    assert la_g.grad[0].tolist() == pytest.approx([0.6, 0.6], abs=1e-6)  # 2 * (0.6 - 0.3)
    # target 1.0: unclipped err 0.16, clipped err (0.4 - 1)^2 = 0.36 wins; the clipped step passes nothing
    la_g = la.clone().requires_grad_(True)
    loss, _ = prdp_loss(la_g, zero, T([1.0]), T([0.0]), 1.0, 0.1, old_log_ratio_a=oa, old_log_ratio_b=zero)
    assert loss.item() == pytest.approx(0.36, abs=1e-6)  # clipping around 0 instead of old would give (0.2 - 1)^2
    loss.backward()
    assert la_g.grad[0].tolist() == pytest.approx([0.0, -1.2], abs=1e-6)
    # beta scales the prediction: beta * 0.6 against the target
    loss, _ = prdp_loss(la, zero, T([0.3]), T([0.0]), 0.5, None, old_log_ratio_a=oa, old_log_ratio_b=zero)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- reward-weighted regression
def test_rwr_weights_exp():
    r = T([0.0, math.log(2), math.log(4)])  # exp: 1, 2, 4, mean 7/3
    assert rwr_weights(r).tolist() == pytest.approx([3 / 7, 6 / 7, 12 / 7], abs=1e-6)
    assert rwr_weights(2 * r, tau=2.0).tolist() == pytest.approx([3 / 7, 6 / 7, 12 / 7], abs=1e-6)
    big = rwr_weights(T([1000.0, 1000.0 + math.log(2)]))  # no overflow
    assert big.tolist() == pytest.approx([2 / 3, 4 / 3], abs=1e-4)
    capped = rwr_weights(r, max_weight=1.5)  # clamped after normalisation, not renormalised
    assert capped.tolist() == pytest.approx([3 / 7, 6 / 7, 1.5], abs=1e-6)


def test_rwr_weights_topk():
    r = T([0.3, 0.9, 0.1, 0.9])
    assert rwr_weights(r, kind="topk", top_k=2).tolist() == [0.0, 2.0, 0.0, 2.0]  # B / k on the two best
    assert rwr_weights(r, kind="topk", top_k=1).tolist() == [0.0, 4.0, 0.0, 0.0]  # a tie: the earlier item
    assert rwr_weights(r, kind="topk", top_k=3).tolist() == pytest.approx([4 / 3, 4 / 3, 0.0, 4 / 3])
    for bad in (0, 5, None):
        with pytest.raises(ValueError, match="top_k"):
            rwr_weights(r, kind="topk", top_k=bad)


def test_rwr_weights_normalized_and_rank():
    assert rwr_weights(T([1.0, 2.0, 5.0]), kind="normalized").tolist() == pytest.approx([0.0, 0.6, 2.4], abs=1e-6)
    assert rwr_weights(T([3.0, 3.0]), kind="normalized").tolist() == [1.0, 1.0]
    # ranks 4, 1, 2.5, 2.5 -> 2 * rank / (B + 1)
    assert rwr_weights(T([3.0, 1.0, 2.0, 2.0]), kind="rank").tolist() == pytest.approx([1.6, 0.4, 1.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="kind"):
        rwr_weights(T([1.0]), kind="softmax")
    with pytest.raises(ValueError, match="rewards"):
        rwr_weights(T([1.0, float("nan")]))


def test_weighted_denoising_loss():
    l = T([1.0, 2.0, 3.0], requires_grad=True)
    w = T([0.0, 1.0, 2.0])
    loss = weighted_denoising_loss(l, w)
    assert loss.item() == pytest.approx(8 / 3, abs=1e-6)
    loss.backward()
    assert l.grad.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3], abs=1e-7)


# ----------------------------------------------------------------------------- ReNO
def test_reno_regularizer_values():
    assert reno_regularizer(T([[3.0, 4.0]])).tolist() == pytest.approx([12.5 - math.log(5)], abs=1e-5)
    assert reno_regularizer(torch.ones(1, 2, 2)).tolist() == pytest.approx([2 - 3 * math.log(2)], abs=1e-5)


def test_reno_regularizer_minimum_at_sqrt_d_minus_1():
    d = 16
    u = torch.ones(1, 4, 4) / 4.0  # unit norm
    scales = [math.sqrt(d - 1) * f for f in (0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)]
    vals = [reno_regularizer(s * u).item() for s in scales]
    assert min(range(len(vals)), key=vals.__getitem__) == 3
    z = (math.sqrt(d - 1) * u).requires_grad_(True)
    reno_regularizer(z).sum().backward()
    assert z.grad.abs().max().item() < 1e-5  # stationary point


def test_reno_loss():
    z = T([[3.0, 4.0], [0.0, 1.0]])
    r1, r2 = T([1.0, 2.0]), T([0.5, 0.5])
    reg = [12.5 - math.log(5), 0.5]
    per = [-1.0 * r1[i].item() - 2.0 * r2[i].item() + 0.1 * reg[i] for i in range(2)]
    assert reno_loss([r1, r2], [1.0, 2.0], z, 0.1).item() == pytest.approx(sum(per) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="weight"):
        reno_loss([r1, r2], [1.0], z, 0.1)
    with pytest.raises(ValueError, match=r"rewards\[1\]"):
        reno_loss([r1, T([0.0, float("nan")])], [1.0, 1.0], z, 0.1)


# ----------------------------------------------------------------------------- denoising targets
def test_denoising_loss_and_targets():
    o = T([[1.0, 2.0], [3.0, 4.0]])
    t = T([[0.0, 0.0], [3.0, 2.0]])
    assert denoising_loss(o, t).tolist() == pytest.approx([2.5, 2.0])
    assert denoising_loss(o, t, reduction="sum").tolist() == pytest.approx([5.0, 4.0])
    assert denoising_loss(o.reshape(2, 1, 1, 2), t.reshape(2, 1, 1, 2)).shape == (2,)
    with pytest.raises(ValueError, match="target"):
        denoising_loss(o, T([[0.0, float("nan")], [0.0, 0.0]]))

    x0, noise = T([[1.0, -1.0], [2.0, 0.0]]), T([[0.5, 0.5], [1.0, -1.0]])
    assert flow_matching_target(x0, noise).tolist() == [[-0.5, 1.5], [-1.0, -1.0]]
    assert diffusion_target(x0, noise, 0.64, "epsilon").tolist() == noise.tolist()
    v = diffusion_target(x0, noise, 0.64, "v_prediction")  # 0.8 * noise - 0.6 * x0
    assert v.flatten().tolist() == pytest.approx([-0.2, 1.0, -0.4, -0.8], abs=1e-6)
    v_rows = diffusion_target(x0, noise, T([0.64, 0.36]), "v_prediction")  # row 1: 0.6 noise - 0.8 x0
    assert v_rows.flatten().tolist() == pytest.approx([-0.2, 1.0, -1.0, -0.6], abs=1e-6)
    assert diffusion_target(x0, noise, 0.5, "sample").tolist() == x0.tolist()
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(x0, noise, 0.5, "flow")
    with pytest.raises(ValueError, match="alphas_cumprod_t"):
        diffusion_target(x0, noise, 0.0)

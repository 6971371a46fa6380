"""DenseGRPO (arXiv 2601.20218): GRPO for flow models with a dense reward at every denoising step,
and a per-timestep noise level calibrated from those rewards.

The paper has no public code; this module follows its description, on top of :class:`GRPOTrainer`
(same rollouts, PPO clip, KL, windows, checkpoints), changing two things:

**Per-step rewards as reward gains.** For a trajectory x_0 (noise) ... x_K (final latent), let
C(x_j) be the deterministic ODE completion of the latent x_j from step j to the end
(:func:`mmalign.samplers.ode_complete`, with at most ``dense.completion_steps`` Euler / DDIM steps over
the remaining schedule) and C(x_K) = x_K. Step k (x_k -> x_{k+1}) gets the reward gain

    g_k = R(decode(C(x_{k+1}))) - R(decode(C(x_k)))          (DenseGRPO, arXiv 2601.20218)

so the gains telescope: sum_k g_k = R(final sample) - R(C(x_0)). Each latent index is completed and
scored once (the "after" of step k is the "before" of step k+1), only for the trained steps, in
batches of this process's rows. Several trained rewards: one gain per reward, combined per step by
``grpo.reward_aggregation`` with their weights.

**Per-step advantages.** At each trained step k the gains are normalised within each prompt group,
exactly as GRPO normalises final rewards (``grpo.adv_std`` group / global / none, ``adv_eps``,
``adv_clip``): A_{i,k} = clip((g_{i,k} - mean_group(g_{.,k})) / (std + eps)). The PPO loss of step k
then uses A_{.,k} instead of one advantage per sample.

**Noise-level calibration** (:class:`NoiseCalibrator`). The paper observes that one noise level for
all timesteps gives some steps too little exploration and others too much, and adapts a
timestep-specific noise level from the dense rewards. The rule used here (this package's own, stated
in full in :class:`NoiseCalibrator`): per step, a multiplier m_k of the sampler's noise level, moved by
a factor ``1 + calibration_rate`` each training step: down when the step's noise loses reward on
average (mean gain below ``-drop_tolerance`` times its within-group spread) or explores far more than
the target, up when its within-group gain spread is below ``low_spread`` times the target (by default
the mean spread over the steps: exploration balanced across timesteps). The rollout's sampler gets
``noise_levels = base_k * m_k`` (:attr:`SamplerConfig.noise_levels`); the state is saved in checkpoints
(:meth:`Trainer.extra_state`), so resuming continues exactly.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..models.base import Conditioning
from ..samplers import SamplerConfig, ode_complete
from ..types import Rollout
from .grpo import GRPOTrainConfig, GRPOTrainer


@dataclass
class DenseGRPOConfig:
    """DenseGRPO's own hyperparameters (dense step rewards and noise calibration)."""

    completion_steps: int | None = 2
    """ODE steps of each completion that scores an intermediate latent (evenly spaced over the remaining
    schedule); null = every remaining step (exact but costly). More steps: more accurate dense rewards."""
    calibrate: bool = True
    """Calibrate a per-timestep noise level from the dense rewards (see :class:`NoiseCalibrator`)."""
    calibration_rate: float = 0.05
    """Multiplicative step of a noise multiplier per training step: x (1 + rate) up, / (1 + rate) down."""
    stats_decay: float = 0.5
    """EMA decay of each step's gain spread and mean gain over training steps (0: this step's only)."""
    target_spread: float | None = None
    """Target within-group std of a step's gains, in reward units; null = the mean over the steps seen
    (balance the exploration across timesteps)."""
    low_spread: float = 0.5
    """Raise a step's noise when its gain spread is below ``low_spread`` x target."""
    high_spread: float = 2.0
    """Lower a step's noise when its gain spread is above ``high_spread`` x target."""
    drop_tolerance: float = 1.0
    """Lower a step's noise when its mean gain is below ``-drop_tolerance`` x its gain spread (the noise
    loses more reward on average than the spread it explores)."""
    min_multiplier: float = 0.25
    """Lower bound of a step's noise multiplier."""
    max_multiplier: float = 2.0
    """Upper bound of a step's noise multiplier."""

    def __post_init__(self) -> None:
        if self.completion_steps is not None and (isinstance(self.completion_steps, bool) or self.completion_steps < 1):
            raise ValueError(f"completion_steps must be >= 1 or null, got {self.completion_steps}")
        if not self.calibration_rate > 0:
            raise ValueError(f"calibration_rate must be > 0, got {self.calibration_rate}")
        if not 0 <= self.stats_decay < 1:
            raise ValueError(f"stats_decay must be in [0, 1), got {self.stats_decay}")
        if self.target_spread is not None and not self.target_spread > 0:
            raise ValueError(f"target_spread must be > 0 or null, got {self.target_spread}")
        if not 0 < self.low_spread < self.high_spread:
            raise ValueError(f"need 0 < low_spread < high_spread, got low_spread={self.low_spread}, high_spread={self.high_spread}")
        if self.drop_tolerance < 0:
            raise ValueError(f"drop_tolerance must be >= 0, got {self.drop_tolerance}")
        if not 0 < self.min_multiplier <= 1 <= self.max_multiplier:
            raise ValueError(f"need 0 < min_multiplier <= 1 <= max_multiplier, got {self.min_multiplier}, {self.max_multiplier}")


@dataclass(kw_only=True)
class DenseGRPOTrainConfig(GRPOTrainConfig):
    """``mmalign train`` with ``algorithm: dense_grpo`` (every GRPO section, plus ``dense``)."""

    algorithm: str = "dense_grpo"
    """Must be ``dense_grpo`` for this config."""
    dense: DenseGRPOConfig = field(default_factory=DenseGRPOConfig)
    """Dense step rewards and per-timestep noise calibration."""
    supports_partial_chain: ClassVar[bool] = False  # step gains need the whole chain's completions

    def __post_init__(self) -> None:
        super().__post_init__()
        s, d = self.sampler, self.dense
        if d.calibrate:
            if self.eval.method == "train" and self.eval.num_steps not in (None, s.num_steps):
                raise ValueError(f"eval.num_steps {self.eval.num_steps}: eval.method train samples with the calibrated "
                                 f"noise levels, one per training step ({s.num_steps}); use eval.method: ode or the training num_steps")
            if s.method == "ddpm":
                raise ValueError("dense.calibrate: a ddpm sampler has no noise level to calibrate "
                                 "(use ddim with eta > 0, or set dense.calibrate: false)")
            if s.method == "cps":
                top = max(s.noise_levels or [s.noise_level]) * d.max_multiplier
                if top > 1:
                    raise ValueError(f"dense.max_multiplier: cps noise levels must stay <= 1 (std = sigma_next * sin(a pi / 2)), "
                                     f"but noise_level x max_multiplier reaches {top:g}")


class NoiseCalibrator:
    """Per-timestep noise multipliers updated from dense reward gains (DenseGRPO's reward-aware
    exploration calibration, arXiv 2601.20218; the rule below is this package's own).

    State per step k (K = number of sampling steps): multiplier m_k (starts at 1), EMA gain spread
    s_k and EMA mean gain d_k (None until the step is first seen). :meth:`update`, per trained step k
    with at least one group of >= 2 valid gains:

    1. spread = mean over those groups of the population std of the group's gains at step k;
       mean = mean of the valid gains at step k;
    2. s_k, d_k = spread, mean the first time, else ``decay * old + (1 - decay) * new``;
    3. target T = ``target_spread``, or the mean of s over every step seen so far;
    4. lower (m_k <- max(min_m, m_k / (1 + rate))) if d_k < -drop_tolerance * s_k (reward drops) or
       s_k > high_spread * T (too much exploration); else raise (m_k <- min(max_m, m_k * (1 + rate)))
       if s_k < low_spread * T (too little); else keep.

    A step whose gains are all equal everywhere (T = 0) is kept: there is nothing to compare with.
    """

    def __init__(self, num_steps: int, config: DenseGRPOConfig) -> None:
        self.cfg = config
        self.multipliers = torch.ones(num_steps, dtype=torch.float64)
        self.spread = torch.zeros(num_steps, dtype=torch.float64)
        self.mean_gain = torch.zeros(num_steps, dtype=torch.float64)
        self.seen = torch.zeros(num_steps, dtype=torch.bool)

    @property
    def num_steps(self) -> int:
        return self.multipliers.numel()

    def levels(self, base: list[float]) -> list[float]:
        """The calibrated noise levels ``base_k * m_k`` (K python floats)."""
        if len(base) != self.num_steps:
            raise ValueError(f"{len(base)} base noise levels for {self.num_steps} calibrated steps")
        return [float(b) * float(m) for b, m in zip(base, self.multipliers)]

    @staticmethod
    def gain_stats(gains: Tensor, valid: Tensor, group_ids: Tensor) -> tuple[float, float] | None:
        """(mean over groups of the within-group population std, mean) of the valid ``gains`` (B,);
        None when no group has two valid gains."""
        g, gid = gains[valid].double(), group_ids[valid]
        stds = [g[gid == u].std(unbiased=False) for u in gid.unique() if int((gid == u).sum()) >= 2]
        if not stds:
            return None
        return float(torch.stack(stds).mean()), float(g.mean())

    def update(self, gains: Tensor, valid: Tensor, group_ids: Tensor, steps: list[int]) -> dict[int, int]:
        """Update from one training step's gains (B,K; only columns ``steps`` are read), their
        validity (B,K bool) and the group ids (B,). Returns ``{k: +1 raised / -1 lowered / 0 kept}``."""
        if gains.ndim != 2 or gains.shape[1] != self.num_steps:
            raise ValueError(f"gains must have shape (B, {self.num_steps}), got {tuple(gains.shape)}")
        if valid.shape != gains.shape or group_ids.shape != gains.shape[:1]:
            raise ValueError(f"valid {tuple(valid.shape)} / group_ids {tuple(group_ids.shape)} do not match gains {tuple(gains.shape)}")
        c, decay = self.cfg, self.cfg.stats_decay
        updated = []
        for k in steps:
            if not 0 <= k < self.num_steps:
                raise ValueError(f"step {k} out of range for {self.num_steps} calibrated steps")
            stats = self.gain_stats(gains[:, k], valid[:, k], group_ids)
            if stats is None:
                continue
            spread, mean = stats
            if not (math.isfinite(spread) and math.isfinite(mean)):
                raise ValueError(f"noise calibration: non-finite gain statistics at step {k} (spread {spread}, mean {mean})")
            if bool(self.seen[k]):
                spread = decay * float(self.spread[k]) + (1 - decay) * spread
                mean = decay * float(self.mean_gain[k]) + (1 - decay) * mean
            self.spread[k], self.mean_gain[k], self.seen[k] = spread, mean, True
            updated.append(k)
        target = c.target_spread if c.target_spread is not None else (float(self.spread[self.seen].mean()) if bool(self.seen.any()) else 0.0)
        changes: dict[int, int] = {}
        for k in updated:
            s, d, m = float(self.spread[k]), float(self.mean_gain[k]), float(self.multipliers[k])
            if target <= 0 and not d < -c.drop_tolerance * s:
                changes[k] = 0
            elif d < -c.drop_tolerance * s or s > c.high_spread * target:
                self.multipliers[k] = max(c.min_multiplier, m / (1 + c.calibration_rate))
                changes[k] = -1
            elif s < c.low_spread * target:
                self.multipliers[k] = min(c.max_multiplier, m * (1 + c.calibration_rate))
                changes[k] = 1
            else:
                changes[k] = 0
        return changes

    def state_dict(self) -> dict[str, Tensor]:
        return {"multipliers": self.multipliers.clone(), "spread": self.spread.clone(),
                "mean_gain": self.mean_gain.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted({"multipliers", "spread", "mean_gain", "seen"} - set(state))
        if missing:
            raise ValueError(f"noise calibration state lacks {missing}")
        if state["multipliers"].numel() != self.num_steps:
            raise ValueError(f"noise calibration state has {state['multipliers'].numel()} steps, this run samples "
                             f"{self.num_steps} (sampler.num_steps changed?)")
        self.multipliers = state["multipliers"].to(torch.float64).clone()
        self.spread = state["spread"].to(torch.float64).clone()
        self.mean_gain = state["mean_gain"].to(torch.float64).clone()
        self.seen = state["seen"].to(torch.bool).clone()


def step_gains(at: dict[int, Tensor], steps: list[int]) -> Tensor:
    """Reward gains (B,K) from the completion rewards ``at[j]`` (B,) of latent indices j: column k of
    a trained step is ``at[k + 1] - at[k]`` (DenseGRPO, arXiv 2601.20218), NaN elsewhere. K = the
    number of columns ``max(at)``."""
    if not at:
        raise ValueError("step_gains: no completion rewards")
    num = max(at)
    missing = sorted({j for k in steps for j in (k, k + 1)} - set(at))
    if missing:
        raise ValueError(f"step_gains: no completion rewards of latent indices {missing}")
    first = next(iter(at.values()))
    gains = torch.full((first.shape[0], num), float("nan"), dtype=torch.float32, device=first.device)
    for k in steps:
        gains[:, k] = at[k + 1].float() - at[k].float()
    return gains


class DenseGRPOTrainer(GRPOTrainer):
    """DenseGRPO (see the module docstring): GRPO with per-step reward gains as advantages and a
    calibrated per-timestep noise level.

    ``DenseGRPOTrainer(load_train_config("configs/train_dense_grpo_embedded.yaml")).fit()``.
    """

    config_class = DenseGRPOTrainConfig

    def setup(self) -> None:
        super().setup()
        s = self.cfg.sampler
        self.base_noise = [s.step_noise(k) for k in range(s.num_steps)]
        self.calibrator = NoiseCalibrator(s.num_steps, self.cfg.dense) if self.cfg.dense.calibrate else None

    # ------------------------------------------------------------------ calibration state
    def extra_state(self) -> dict[str, Any]:
        return {} if self.calibrator is None else {"noise_calibration": self.calibrator.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.calibrator is None:
            if state.get("noise_calibration") is not None:
                raise ValueError("the checkpoint holds a noise calibration but dense.calibrate is false "
                                 "(resume with dense.calibrate: true, or start a new run)")
            return
        if "noise_calibration" not in state:
            raise ValueError("the checkpoint has no noise calibration state but dense.calibrate is true")
        self.calibrator.load_state_dict(state["noise_calibration"])

    def step_sampler(self, step: int) -> SamplerConfig:
        """GRPO's step sampler with the calibrated per-step noise levels."""
        s = super().step_sampler(step)
        if self.calibrator is not None:
            s = dataclasses.replace(s, noise_levels=self.calibrator.levels(self.base_noise))
        return s

    def eval_sampler(self) -> SamplerConfig:
        """The evaluation sampler; with ``eval.method: train`` it uses the calibrated noise levels."""
        s = super().eval_sampler()
        if self.calibrator is not None and s.method != "ode":
            if s.num_steps != self.calibrator.num_steps:
                raise ValueError(f"eval.method train with eval.num_steps {s.num_steps}: the calibrated noise levels are per "
                                 f"training step ({self.calibrator.num_steps}); use eval.method: ode or the training num_steps")
            s = dataclasses.replace(s, noise_levels=self.calibrator.levels(self.base_noise))
        return s

    # ------------------------------------------------------------------ dense rewards
    @torch.no_grad()
    def completion_scores(self, rollout: Rollout, indices: list[int], conditioning: Conditioning,
                          sampler: SamplerConfig) -> tuple[dict[str, Tensor], Tensor, list[str]]:
        """Trained rewards of the ODE completions of this process's latents at ``indices`` (each < K).

        Returns ``({label: (b, J)}, valid (b, J) bool, reasons)`` (columns in the order of ``indices``).
        Completions run in ``sampler.micro_batch`` row chunks, are decoded ``grpo.group_size`` rows at a
        time and scored one latent index at a time.
        """
        adapter, b, K = self.adapter, rollout.batch_size, rollout.num_steps
        chunk = self.cfg.grpo.group_size
        cols: dict[str, list[Tensor]] = {e.label: [] for e in self.rewards.trained}
        oks, reasons = [], []
        for j in indices:
            with self.autocast():
                done = ode_complete(adapter, rollout.latents[:, j], j, K, conditioning,
                                    max_steps=self.cfg.dense.completion_steps, micro_batch=sampler.micro_batch)
                media = torch.cat([adapter.decode(done[i: i + chunk]).float().cpu() for i in range(0, b, chunk)])
            outs = self.rewards.score(media, rollout.prompts, categories=rollout.meta["categories"], group_ids=rollout.group_ids,
                                      fps=adapter.fps, sample_rate=adapter.sample_rate, which="trained")
            ok = torch.ones(b, dtype=torch.bool)
            for label, o in outs.items():
                cols[label].append(o.scores.detach().float().cpu())
                ok &= o.valid.cpu()
                reasons += [f"{label} on the ODE completion from step {j}: {r}" for r in o.reasons if r is not None]
            oks.append(ok)
        return {label: torch.stack(c, 1) for label, c in cols.items()}, torch.stack(oks, 1), reasons

    def step_advantages(self, step: int, rollout: Rollout, sampler: SamplerConfig, steps: list[int],
                        conditioning: Conditioning) -> tuple[Tensor, dict[str, Any]]:
        """Per-step advantages (b, K) from the reward gains of the trained steps (module docstring),
        and the metrics: final rewards, ``gain/step_k`` (mean gain, weighted over the trained rewards),
        ``noise/step_k`` (the noise level this rollout used), calibration changes."""
        scores, valid, group_ids, reasons, metrics = self.score_samples(rollout)
        K, b, g = rollout.num_steps, rollout.batch_size, self.cfg.grpo
        indices = sorted({j for k in steps for j in (k, k + 1)} - {K})
        t0 = time.perf_counter()
        local, local_ok, comp_reasons = self.completion_scores(rollout, indices, conditioning, sampler)
        metrics["completion_seconds"] = round(time.perf_counter() - t0, 4)
        metrics["completions"] = len(indices) * int(group_ids.numel())
        ok_cols = self.gather(local_ok.float()) > 0.5
        if not bool(ok_cols.all()) and g.on_invalid_reward == "raise":
            shown = "; ".join(comp_reasons[:5]) or "see the other processes"
            raise ValueError(f"step {self.step + 1}: {int((~ok_cols).sum())} ODE completions were not scored by a trained "
                             f"reward ({shown}); set grpo.on_invalid_reward=zero_advantage to train on the rest")

        # reward of the completion of every needed latent index (the final sample's at index K), full batch
        at_valid = {K: valid, **{j: ok_cols[:, c] for c, j in enumerate(indices)}}
        gains, step_valid = {}, torch.zeros(int(group_ids.numel()), K, dtype=torch.bool)
        for e in self.rewards.trained:
            cols = self.gather(local[e.label])
            at = {K: scores[e.label], **{j: cols[:, c] for c, j in enumerate(indices)}}
            gains[e.label] = step_gains(at, steps)
        for k in steps:
            step_valid[:, k] = at_valid[k] & at_valid[k + 1]

        adv_all = torch.zeros(int(group_ids.numel()), K)
        for k in steps:  # GRPO's group normalisation, one step's gains at a time
            adv_all[:, k] = self.advantages({label: gn[:, k] for label, gn in gains.items()}, step_valid[:, k],
                                            group_ids, reasons + comp_reasons)
        metrics["advantage/abs_mean"] = float(adv_all[:, steps].abs().mean())
        weighted = sum(e.weight * gains[e.label] for e in self.rewards.trained)
        for k in steps:
            ok = step_valid[:, k]
            metrics[f"gain/step_{k}"] = float(weighted[ok, k].mean()) if bool(ok.any()) else float("nan")
        metrics["gain/sum_mean"] = float(torch.nan_to_num(weighted[:, steps]).sum(1).mean())
        for k in range(K):
            if bool(rollout.stochastic[k]):
                metrics[f"noise/step_{k}"] = sampler.step_noise(k)
        if self.calibrator is not None:
            changes = self.calibrator.update(torch.nan_to_num(weighted), step_valid, group_ids, steps)
            metrics["calibration/raised"] = sum(1 for v in changes.values() if v > 0)
            metrics["calibration/lowered"] = sum(1 for v in changes.values() if v < 0)
        return adv_all[self.rank * b: (self.rank + 1) * b].to(self.adapter.device), metrics

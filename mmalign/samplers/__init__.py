"""Samplers: pure step functions (``steps``) and trajectory recording (``trajectory``)."""
from __future__ import annotations

import functools

from ..registry import SAMPLERS
from .steps import (
    StepOutput,
    ddim_step,
    diffusion_noise_to,
    ddpm_step,
    flow_noise_to,
    flow_ode_step,
    flow_sde_step,
    flow_x0,
    flow_x1,
    gaussian_log_prob,
)
from .trajectory import SamplerConfig, StepLogProbs, log_prob, noise_to_step, ode_complete, random_sde_window, sample, step

for _name, _doc in {
    "ode": "deterministic: Euler for flow models, DDIM eta=0 for diffusion models",
    "flow_grpo": "Flow-GRPO SDE, sigma_t = a*sqrt(t/(1-t)) (arXiv 2505.05470)",
    "dance": "DanceGRPO SDE, std = eta*sqrt(-dt) (arXiv 2505.07818)",
    "cps": "coefficient-preserving flow SDE, std = sigma_next*sin(a*pi/2)",
    "ddim": "DDIM with eta, DDPO log-prob (arXiv 2305.13301)",
    "ddpm": "ancestral DDPM posterior step",
}.items():
    # SAMPLERS.get(name)(num_steps=..., ...) builds that method's SamplerConfig.
    SAMPLERS.register(_name, functools.partial(SamplerConfig, method=_name), description=_doc)

# Inference-time alignment (mmalign.samplers.inference): SAMPLERS.get(name) is the function
# (adapter, prompts, rewards, ...) -> InferenceResult; loaded lazily.
for _name, _target, _doc in [
    ("best_of_n", "best_of_n", "best-of-N: N samples per prompt, keep the highest weighted reward (any reward)"),
    ("reno", "optimize_noise", ("ReNO: optimise the initial noise against differentiable rewards, norm "
                                "regulariser, grad clipping (arXiv 2406.04312)")),
    ("search", "search", "zero-order / random search over initial noises with a reward-call budget (arXiv 2501.09732)"),
    ("reward_guidance", "reward_guided_sample", "reward gradient on the predicted x0 added at every step (RewardCallback)"),
]:
    SAMPLERS.register(_name, f"mmalign.samplers.inference:{_target}", description=_doc)

__all__ = [
    "SamplerConfig", "StepLogProbs", "StepOutput", "ddim_step", "ddpm_step", "diffusion_noise_to", "flow_noise_to", "flow_ode_step", "flow_sde_step",
    "flow_x0", "flow_x1", "gaussian_log_prob", "log_prob", "noise_to_step", "ode_complete", "random_sde_window", "sample", "step",
]

"""Rewards: one API for image, video, audio and VLM scorers, and their composition.

``mmalign.load_reward(name, **options)`` builds a registered reward; ``mmalign.list_rewards()`` lists
them. Any plain callable ``(samples, prompts, **metadata) -> scores`` is accepted too (see
:func:`as_reward`). Importing this package never imports transformers or open_clip.
"""
from __future__ import annotations

from typing import Any, Callable

from ..registry import REWARDS
from .base import CallableReward, InvalidSampleError, Reward, RewardOutput, ScoreBatch, as_reward

# name -> (lazy factory "module:function", description). Factories take keyword options only.
_REWARDS = {
    "clipscore": ("mmalign.rewards.clip:load_clipscore", "CLIPScore: max(100 * cos(image, text), 0) (Hessel et al. 2021)"),
    "pickscore": ("mmalign.rewards.clip:load_pickscore", "PickScore: logit_scale.exp() * cos (yuvalkirstain/PickScore_v1)"),
    "hpsv2": ("mmalign.rewards.clip:load_hpsv2", "HPSv2: open_clip ViT-H-14 cosine, longest-side resize + pad"),
    "hpsv2.1": ("mmalign.rewards.clip:load_hpsv21", "HPSv2.1: HPSv2 with the v2.1 weights"),
    "aesthetic": ("mmalign.rewards.clip:load_aesthetic", "LAION aesthetic v2: MLP on L2-normalised CLIP ViT-L/14 image embeddings"),
    "goal_clip": ("mmalign.rewards.clip:load_goal_clip", "goal-baseline CLIP reward: baseline direction projected out (VLM-RM)"),
    "vqascore": ("mmalign.rewards.vlm:load_vqascore", "VLM P('Yes') for a templated question about the sample (VQAScore)"),
    "vlm_compare": ("mmalign.rewards.vlm:load_vlm_compare", "VLM P('Yes') that the sample beats a reference on criteria (RewardDance)"),
    "qalign": ("mmalign.rewards.vlm:load_qalign", "expected rating over rating words (Q-Align)"),
    "artifacts": ("mmalign.rewards.artifacts:load_artifacts", "artifact assessor: taxonomy of flaws asked as yes/no questions (MagicMirror-style)"),
    "video_frames": ("mmalign.rewards.video:load_video_frames", "an image reward over sampled frames, weighted"),
    "temporal_consistency": ("mmalign.rewards.video:load_temporal_consistency", "similarity of neighbouring frames' embeddings"),
    "video_vlm": ("mmalign.rewards.vlm:load_video_vlm", "VLM yes-token reward over sampled frames"),
    "clap": ("mmalign.rewards.audio:load_clap", "CLAP text-audio similarity with deterministic windows"),
    "jpeg_size": ("mmalign.rewards.rules:load_jpeg_size", "JPEG size in kB at quality 95 (incompressibility, DDPO)"),
    "jpeg_compressibility": ("mmalign.rewards.rules:load_jpeg_compressibility", "negated JPEG size in kB (compressibility, DDPO)"),
    "verifiable": ("mmalign.rewards.rules:load_verifiable", "a verifiable rule: a function of the sample and metadata"),
    "shapeeval": ("mmalign.embedded.shapeeval:load_shapeeval", "ShapeEval: rule-based verifier of ShapeWorld prompts (per-clause credit; strict in components)"),
    "toneeval": ("mmalign.embedded.toneeval:load_toneeval", "ToneEval: rule-based verifier of ToneWorld audio captions (onsets, pitch, duration, timbre; per-clause credit)"),
    "motioneval": ("mmalign.embedded.motioneval:load_motioneval", "MotionEval: rule-based verifier of MovingShapes video prompts (tracks objects; per-clause credit)"),
    "weighted_sum": ("mmalign.rewards.combine:load_weighted_sum", "weighted sum of rewards, each normalised"),
    "ensemble": ("mmalign.rewards.combine:load_ensemble", "ensemble: mean, worst-case (min) or mean - lambda * variance"),
}
for _name, (_target, _doc) in _REWARDS.items():
    REWARDS.register(_name, _target, description=_doc)


def load_reward(name: str | Reward | Callable[..., Any], **options: Any) -> Reward:
    """A reward by registered name (``options`` go to its factory), or a Reward / callable as it is."""
    if isinstance(name, str):
        return REWARDS.get(name)(**options)
    return as_reward(name, **options)


__all__ = ["CallableReward", "InvalidSampleError", "REWARDS", "Reward", "RewardOutput", "ScoreBatch", "as_reward", "load_reward"]

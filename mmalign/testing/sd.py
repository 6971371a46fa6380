"""Tiny, seeded Stable Diffusion 1.x/2.x and SDXL pipelines (diffusers ``get_dummy_components`` style).

Real diffusers pipelines with random weights: a two-level ``UNet2DConditionModel``
(block_out_channels 32/64, sample_size 8), a two-level ``AutoencoderKL`` (vae_scale_factor 2, so the
default image is 16x16), small CLIP text encoders and the offline CLIP tokenizer truncated to 1000
merges (:func:`mmalign.testing.tokenizers.clip_tokenizer`). The scheduler is a ``DDIMScheduler`` with
Stable Diffusion 1.5's betas so the pipeline's own ``__call__`` and mmalign's DDIM sampler can be
compared step for step. Everything is float32 on CPU; nothing is downloaded.

``overrides``: a key naming a pipeline component (``unet``, ``vae``, ``text_encoder``,
``text_encoder_2``, ``tokenizer``, ``tokenizer_2``, ``scheduler``) takes either a ready component that
replaces the built one, or a dict of config overrides for it (e.g.
``scheduler={"prediction_type": "v_prediction"}``, ``unet={"sample_size": 16}``). Any other key goes
to the pipeline constructor (e.g. ``force_zeros_for_empty_prompt=False`` for SDXL).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .components import TINY_CLIP_MERGES, TINY_CLIP_WIDTH, tiny_clip_text_encoder
from .tokenizers import clip_tokenizer

# SD 1.5's scheduler config (scaled_linear 0.00085..0.012, leading spacing, offset 1), as DDIM.
_SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

def _component(
    name: str,
    seed: int,
    overrides: dict[str, Any],
    build: Callable[[dict[str, Any]], Any],
) -> Any:
    """Build component ``name`` from ``build(config_overrides)`` after seeding, unless the caller
    passed a ready-made component for it."""
    given = overrides.pop(name, None)
    if given is not None and not isinstance(given, dict):
        return given
    # Seeding before every component (as diffusers' tests do) makes each one's weights independent of
    # the others' sizes, so overriding one component does not change the rest.
    torch.manual_seed(seed)
    return build(dict(given or {}))


def _tiny_vae(extra: dict[str, Any]):
    from diffusers import AutoencoderKL

    cfg: dict[str, Any] = dict(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
        scaling_factor=0.18215,
    )
    cfg.update(extra)
    return AutoencoderKL(**cfg).eval()


def _tiny_scheduler(extra: dict[str, Any]):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**_SD15_SCHEDULER, **extra})


def _build(seed: int, overrides: dict[str, Any], xl: bool) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    overrides = dict(overrides)
    if not xl and {"text_encoder_2", "tokenizer_2"} & overrides.keys():
        raise TypeError("text_encoder_2 / tokenizer_2 only exist in SDXL pipelines (use tiny_sdxl_pipeline)")
    text_dim = TINY_CLIP_WIDTH

    def unet(extra: dict[str, Any]) -> UNet2DConditionModel:
        cfg: dict[str, Any] = dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=text_dim,
            norm_num_groups=32,
        )
        if xl:
            # SDXL: hidden states of both encoders concatenated (32 + 32), and the "text_time" added
            # embedding = 6 size/crop ids * addition_time_embed_dim + the pooled projection (32).
            cfg.update(
                cross_attention_dim=2 * text_dim,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 2),
                projection_class_embeddings_input_dim=6 * 8 + text_dim,
            )
        cfg.update(extra)
        return UNet2DConditionModel(**cfg).eval()

    # The random state is restored afterwards: building a test model must not reseed the caller.
    with torch.random.fork_rng(devices=[]):
        components: dict[str, Any] = {
            "unet": _component("unet", seed, overrides, unet),
            "scheduler": _component("scheduler", seed, overrides, _tiny_scheduler),
            "vae": _component("vae", seed, overrides, _tiny_vae),
        }
        tok = overrides.pop("tokenizer", None) or clip_tokenizer(TINY_CLIP_MERGES)
        components["tokenizer"] = tok
        components["text_encoder"] = _component(
            "text_encoder", seed, overrides, lambda extra: tiny_clip_text_encoder(tok, **extra)
        )
        if xl:
            tok2 = overrides.pop("tokenizer_2", None) or clip_tokenizer(TINY_CLIP_MERGES)
            components["tokenizer_2"] = tok2
            components["text_encoder_2"] = _component(
                "text_encoder_2",
                seed,
                overrides,
                lambda extra: tiny_clip_text_encoder(tok2, projection=True, **{"projection_dim": text_dim, **extra}),
            )
    if xl:
        # No invisible watermark: it would change decoded images (and needs an optional package).
        pipe = StableDiffusionXLPipeline(**components, add_watermarker=False, **overrides)
    else:
        pipe = StableDiffusionPipeline(
            **components,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
            **overrides,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_sd_pipeline(seed: int = 0, **overrides: Any):
    """A tiny random ``StableDiffusionPipeline`` (weights seeded by ``seed``): latents 4x8x8, images
    3x16x16, DDIM scheduler with SD 1.5 betas, no safety checker. See the module docstring for
    ``overrides``."""
    return _build(seed, overrides, xl=False)


def tiny_sdxl_pipeline(seed: int = 0, **overrides: Any):
    """A tiny random ``StableDiffusionXLPipeline`` (two CLIP encoders, "text_time" added conditioning),
    latents 4x8x8, images 3x16x16, DDIM scheduler with SD 1.5 betas, no watermark. See the module
    docstring for ``overrides``."""
    return _build(seed, overrides, xl=True)


__all__ = ["TINY_CLIP_MERGES", "tiny_sd_pipeline", "tiny_sdxl_pipeline"]

"""Model adapters over real diffusers pipelines, one module per family, registered lazily.

``mmalign.list_models()`` lists the families; ``mmalign.load_model(family_or_path, ...)`` builds one.
"""
from __future__ import annotations

from ..registry import MODELS
from .base import Conditioning, ModelAdapter, Schedule, check_negative_prompts, check_prompts

# family name -> (lazy target, description). Importing this package never imports diffusers.
_FAMILIES = {
    "sd": ("mmalign.models.sd:StableDiffusionAdapter", "Stable Diffusion 1.x/2.x (UNet, DDIM/DDPM, epsilon or v)"),
    "sdxl": ("mmalign.models.sd:StableDiffusionXLAdapter", "Stable Diffusion XL (UNet, two CLIP encoders, DDIM/DDPM)"),
    "sd3": ("mmalign.models.sd3:StableDiffusion3Adapter", "Stable Diffusion 3/3.5 (MMDiT, flow matching)"),
    "flux": ("mmalign.models.flux:FluxAdapter", "FLUX.1 dev/schnell (flow matching, packed latents)"),
    "wan": ("mmalign.models.wan:WanAdapter", "Wan 2.1 text-to-video (flow matching, UMT5)"),
    "cogvideox": ("mmalign.models.cogvideox:CogVideoXAdapter", "CogVideoX text-to-video (DDIM, v-prediction)"),
    "audioldm": ("mmalign.models.audioldm:AudioLDMAdapter", "AudioLDM text-to-audio (UNet on mel latents, DDIM)"),
}
for _name, (_target, _doc) in _FAMILIES.items():
    MODELS.register(_name, _target, description=_doc)

__all__ = ["Conditioning", "ModelAdapter", "Schedule", "check_negative_prompts", "check_prompts", "MODELS"]

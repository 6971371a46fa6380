"""FLUX.1 dev / schnell (rectified-flow DiT with packed latents) over diffusers' ``FluxPipeline``.

Guidance: FLUX.1-dev is guidance-distilled. Its ``guidance_scale`` (default 3.5) is not classifier-free
guidance but an input of the transformer (``guidance``, embedded like the timestep) when
``transformer.config.guidance_embeds`` is set; schnell has no guidance input and ignores it. So a
plain FLUX :class:`~mmalign.models.base.Conditioning` has ``uncond=None`` and one transformer call per
step.

True CFG (as ``FluxPipeline(true_cfg_scale=..., negative_prompt=...)``): build the adapter with
``true_cfg_scale > 1`` (or pass it to :meth:`FluxAdapter.encode_prompts`) *and* give negative prompts.
Then ``uncond`` holds the negative prompts' embeddings, ``Conditioning.guidance_scale`` is the
true-CFG scale (what :meth:`~mmalign.models.base.ModelAdapter.denoise` combines with) and the embedded
guidance stays in ``cond["guidance"]`` / ``uncond["guidance"]``. As in the pipeline, without negative
prompts there is no true CFG (a warning says so).
"""
from __future__ import annotations

import warnings
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from .base import Conditioning, check_negative_prompts, check_prompts
from .sd3 import FlowMatchingImageAdapter


class FluxAdapter(FlowMatchingImageAdapter):
    """FLUX.1 adapter.

    - Conditioning: ``cond = {"encoder_hidden_states": B,S,D (T5), "pooled_projections": B,P (CLIP),
      "guidance": B float32 (only when the transformer embeds guidance)}``;
      ``shared = {"txt_ids": S,3, "img_ids": N,3}`` (no batch dimension, as the transformer wants).
    - Latents: packed 2x2 patches, B, N=(h/2)*(w/2), 4*C: what ``FluxPipeline(latents=...)`` takes.
    - Timestep: the scheduler's ``t`` / 1000 (the pipeline's scaling), expanded to the batch.
    """

    family: ClassVar[str] = "flux"
    pipeline_class: ClassVar[str] = "FluxPipeline"
    default_model_id: ClassVar[str] = "black-forest-labs/FLUX.1-dev"
    #: FLUX.1-dev's embedded guidance (ignored by schnell, which has no guidance embedding)
    default_guidance_scale: ClassVar[float] = 3.5
    default_max_sequence_length: ClassVar[int] = 512

    def __init__(
        self,
        pipeline: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        true_cfg_scale: float = 1.0,
    ) -> None:
        super().__init__(pipeline, height=height, width=width, max_sequence_length=max_sequence_length)
        self.true_cfg_scale = float(true_cfg_scale)

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the (distilled) guidance scale as an input (dev: yes)."""
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    # ---------------------------------------------------------------- sizes
    def _size_multiple(self) -> int:
        # VAE downsampling, then 2x2 packing of the latent
        return self.vae_scale_factor * 2

    def num_tokens(self) -> int:
        """N = (h/2) * (w/2) packed image tokens."""
        h, w = self.latent_size()
        return (h // 2) * (w // 2)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int]:
        """(B, (h/2)*(w/2), 4*C) packed tokens, the layout ``FluxPipeline(latents=...)`` takes."""
        return (batch_size, self.num_tokens(), int(self.denoiser.config.in_channels))

    def image_ids(self, dtype: torch.dtype | None = None) -> Tensor:
        """N,3 positional ids of the packed image tokens (the pipeline's ``_prepare_latent_image_ids``)."""
        h, w = self.latent_size()
        return self.pipeline._prepare_latent_image_ids(1, h // 2, w // 2, self.execution_device, dtype or self.dtype)

    # ---------------------------------------------------------------- schedule
    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        # FluxPipeline always passes explicit sigmas and a resolution-dependent mu
        config = self.pipeline.scheduler.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            self.num_tokens(),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return {"sigmas": sigmas, "mu": mu}

    # ---------------------------------------------------------------- conditioning
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        return self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.execution_device,
            max_sequence_length=self.max_sequence_length,
        )

    @torch.no_grad()  # text encoders are frozen: embeddings are inputs, not trained
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
        *,
        true_cfg_scale: float | None = None,
    ) -> Conditioning:
        """Encode B prompts with the pipeline's ``encode_prompt``.

        ``guidance_scale`` (default 3.5) is the embedded guidance; ``true_cfg_scale`` (default: the
        adapter's, 1.0) > 1 with ``negative_prompts`` turns on true CFG (see module docstring).
        """
        prompts = check_prompts(prompts)
        negative = check_negative_prompts(negative_prompts, len(prompts))
        scale = self._guidance(guidance_scale)
        true_cfg = self.true_cfg_scale if true_cfg_scale is None else float(true_cfg_scale)
        do_true_cfg = true_cfg > 1.0 and negative is not None
        if true_cfg > 1.0 and negative is None:
            warnings.warn(
                f"flux: true_cfg_scale={true_cfg} has no effect without negative prompts (as in FluxPipeline)",
                stacklevel=2,
            )

        embeds, pooled, text_ids = self._encode(prompts)
        batch = len(prompts)
        extra: dict[str, Tensor] = {}
        if self.guidance_embeds:
            # per row, so Conditioning.select / repeat_interleave / the [uncond, cond] batch carry it
            extra["guidance"] = torch.full((batch,), scale, device=embeds.device, dtype=torch.float32)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled, **extra}
        uncond = None
        if do_true_cfg:
            neg_embeds, neg_pooled, _ = self._encode(negative)
            uncond = {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled, **extra}
        return Conditioning(
            prompts=prompts,
            cond=cond,
            uncond=uncond,
            # the scale denoise() combines [uncond, cond] with; without true CFG there is no
            # combination and this records the embedded guidance the caller asked for
            guidance_scale=true_cfg if do_true_cfg else scale,
            negative_prompts=negative if do_true_cfg else None,
            shared={"txt_ids": text_ids, "img_ids": self.image_ids(embeds.dtype)},
        )

    # ---------------------------------------------------------------- model
    def predict(self, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor], shared: dict[str, Any]) -> Tensor:
        """One transformer call: packed latents B,N,4C (float32), timestep scalar or B in [0,1000]
        -> velocity B,N,4C float32."""
        batch = self._check_batch(latents, cond)
        img_ids = shared["img_ids"]
        if latents.ndim != 3 or latents.shape[1] != img_ids.shape[0]:
            raise ValueError(
                f"flux: latents {tuple(latents.shape)} do not match the conditioning's {img_ids.shape[0]} image "
                "tokens (was the adapter's height/width changed after encoding?)"
            )
        dtype = self.dtype
        guidance = cond.get("guidance")
        if self.guidance_embeds and guidance is None:
            raise ValueError("flux: this transformer embeds guidance but the conditioning has no 'guidance'")
        # the pipeline casts t to the latents' dtype before dividing by 1000
        t = self._batch_timestep(timestep, batch, latents.device).to(dtype) / 1000
        out = self.denoiser(
            hidden_states=latents.to(dtype),
            timestep=t,
            guidance=guidance if self.guidance_embeds else None,
            pooled_projections=cond["pooled_projections"].to(dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            txt_ids=shared["txt_ids"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out.float()

    def _unpack(self, latents: Tensor) -> Tensor:
        height, width = self.image_size()
        return self.pipeline._unpack_latents(latents, height, width, self.vae_scale_factor)


__all__ = ["FluxAdapter"]

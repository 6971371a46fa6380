"""Stable Diffusion 3 / 3.5 (MMDiT, rectified flow) over diffusers' ``StableDiffusion3Pipeline``.

Also home of :class:`FlowMatchingImageAdapter`, the small base shared with FLUX
(:mod:`mmalign.models.flux`): image size defaults/validation, the scheduler-copy schedule, VAE decode
and the DiT LoRA targets.

Conventions (diffusers'): x_sigma = (1 - sigma) * x_data + sigma * noise, the transformer predicts the
velocity v = noise - x_data and an Euler step is x_next = x + (sigma_next - sigma) * v.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from .base import Conditioning, ModelAdapter, Schedule, check_negative_prompts, check_num_steps, check_prompts

#: attention projections of an MMDiT block: image stream (to_q/k/v, to_out.0), text stream
#: (add_*_proj, to_add_out); unqualified so SD3.5's second self-attention (``attn2``) and FLUX's
#: single-stream blocks (to_q/k/v only) are covered too.
DIT_ATTENTION_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


class FlowMatchingImageAdapter(ModelAdapter):
    """Shared parts of the flow-matching DiT image families (SD3, FLUX).

    Subclasses define :meth:`encode_prompts`, :meth:`latent_shape`, :meth:`predict`,
    :meth:`_size_multiple` and :meth:`_schedule_kwargs` (how their pipeline calls ``set_timesteps``).
    """

    lora_target_modules: ClassVar[tuple[str, ...]] = DIT_ATTENTION_LORA_TARGETS
    #: the pipeline ``__call__``'s ``max_sequence_length`` default (T5 tokens)
    default_max_sequence_length: ClassVar[int] = 256

    def __init__(
        self,
        pipeline: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
    ) -> None:
        super().__init__(pipeline, height=height, width=width)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.image_size()  # fail fast on a bad height/width

    # ---------------------------------------------------------------- properties
    @property
    def denoiser(self) -> nn.Module:
        return self.pipeline.transformer

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    @property
    def execution_device(self) -> torch.device:
        """Where the pipeline runs its text encoders (honours diffusers' CPU offload hooks)."""
        return self.pipeline._execution_device

    # ---------------------------------------------------------------- sizes
    def _size_multiple(self) -> int:
        """Height and width must be multiples of this many pixels."""
        raise NotImplementedError

    def _default_size(self) -> int:
        """The pipeline's default height/width in pixels."""
        return int(self.pipeline.default_sample_size * self.vae_scale_factor)

    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels: the adapter's, else the pipeline's default; validated."""
        height = self._default_size() if self.height is None else self.height
        width = self._default_size() if self.width is None else self.width
        multiple = self._size_multiple()
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                hint = f"; try {max(multiple, value // multiple * multiple)}" if isinstance(value, int) else ""
                raise ValueError(
                    f"{self.family}: {name}={value!r} must be a positive multiple of {multiple} pixels "
                    f"(VAE factor {self.vae_scale_factor} x patch {multiple // self.vae_scale_factor}){hint}"
                )
        return height, width

    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the unpacked VAE latent."""
        height, width = self.image_size()
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    # ---------------------------------------------------------------- schedule
    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        """Keyword arguments of the pipeline's ``retrieve_timesteps`` call besides the step count."""
        raise NotImplementedError

    def schedule(self, num_steps: int) -> Schedule:
        """The pipeline's own timesteps (K) and sigmas (K+1, ending at the terminal 0).

        ``set_timesteps`` runs on a copy of the scheduler so the pipeline's state is untouched.
        """
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        check_num_steps(num_steps)
        original = self.pipeline.scheduler
        scheduler = type(original).from_config(original.config)
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.execution_device, **self._schedule_kwargs(num_steps))
        return Schedule(
            kind="flow",
            timesteps=timesteps.to(torch.float32),
            prediction_type="flow",
            sigmas=scheduler.sigmas.to(device=timesteps.device, dtype=torch.float32),
        )

    # ---------------------------------------------------------------- decode
    def _unpack(self, latents: Tensor) -> Tensor:
        """Pipeline layout -> VAE latents B,C,h,w (identity unless the family packs tokens)."""
        return latents

    def decode(self, latents: Tensor) -> Tensor:
        """Final latents (pipeline layout) -> images B,3,H,W float32 in [0,1], differentiably.

        Same maths as the pipeline's ``output_type="pt"`` path: undo the VAE's latent normalisation
        (``latents / scaling_factor + shift_factor``), decode, map [-1,1] -> [0,1] (clamped).
        """
        expected = tuple(self.latent_shape(latents.shape[0]))
        if tuple(latents.shape) != expected:
            raise ValueError(f"{self.family}: latents of shape {tuple(latents.shape)} to decode, expected {expected}")
        vae = self.pipeline.vae
        z = self._unpack(latents)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pt").float()

    # ---------------------------------------------------------------- helpers
    def _guidance(self, guidance_scale: float | None) -> float:
        return float(self.default_guidance_scale if guidance_scale is None else guidance_scale)

    def _check_batch(self, latents: Tensor, cond: dict[str, Tensor]) -> int:
        batch = latents.shape[0]
        for key, value in cond.items():
            if value.shape[0] != batch:
                raise ValueError(f"{self.family}: cond[{key!r}] has batch {value.shape[0]}, latents have {batch}")
        return batch

    @staticmethod
    def _batch_timestep(timestep: Tensor | float, batch: int, device: torch.device) -> Tensor:
        """A scalar (or per-row, B) timestep as a float32 vector of length B."""
        t = torch.as_tensor(timestep, device=device).to(torch.float32).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} values for a batch of {batch}")
        return t


class StableDiffusion3Adapter(FlowMatchingImageAdapter):
    """SD3 / SD3.5 adapter.

    - Conditioning: ``cond = {"encoder_hidden_states": B,77+S,D, "pooled_projections": B,P}`` from the
      pipeline's ``encode_prompt`` (two CLIPs + optional T5, S = ``max_sequence_length``); ``uncond``
      (negative prompts, "" by default) only when ``guidance_scale > 1``, combined like the pipeline.
    - Latents: B,C,h,w with h = height / vae_scale_factor.
    - Timestep: the scheduler's ``t`` in [0, 1000] expanded to the batch.
    """

    family: ClassVar[str] = "sd3"
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    default_model_id: ClassVar[str] = "stabilityai/stable-diffusion-3.5-medium"
    default_guidance_scale: ClassVar[float] = 4.5
    default_max_sequence_length: ClassVar[int] = 256

    def _size_multiple(self) -> int:
        return self.vae_scale_factor * int(self.pipeline.patch_size)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """(B, C, h, w): the layout ``StableDiffusion3Pipeline(latents=...)`` takes."""
        h, w = self.latent_size()
        return (batch_size, int(self.denoiser.config.in_channels), h, w)

    def _schedule_kwargs(self, num_steps: int) -> dict[str, Any]:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        config = self.pipeline.scheduler.config
        if not config.get("use_dynamic_shifting", None):
            return {}  # static shift from the scheduler config
        # resolution-dependent shift, with the SD3 pipeline's own defaults (max_shift 1.16)
        h, w = self.latent_size()
        patch = int(self.denoiser.config.patch_size)
        mu = calculate_shift(
            (h // patch) * (w // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        return {"mu": mu}

    @torch.no_grad()  # text encoders are frozen: embeddings are inputs, not trained
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> Conditioning:
        """Encode B prompts with the pipeline's ``encode_prompt``; negatives ("" by default) only
        when ``guidance_scale`` (default 4.5) > 1."""
        prompts = check_prompts(prompts)
        negative = check_negative_prompts(negative_prompts, len(prompts))
        scale = self._guidance(guidance_scale)
        do_cfg = scale > 1.0
        embeds, neg_embeds, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.execution_device,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative,
            max_sequence_length=self.max_sequence_length,
        )
        uncond = None
        if do_cfg:
            negative = negative if negative is not None else [""] * len(prompts)
            uncond = {"encoder_hidden_states": neg_embeds, "pooled_projections": neg_pooled}
        return Conditioning(
            prompts=prompts,
            cond={"encoder_hidden_states": embeds, "pooled_projections": pooled},
            uncond=uncond,
            guidance_scale=scale,
            negative_prompts=negative if do_cfg else None,
        )

    def predict(self, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor], shared: dict[str, Any]) -> Tensor:
        """One transformer call: latents B,C,h,w (float32), timestep scalar or B in [0,1000] ->
        velocity B,C,h,w float32."""
        batch = self._check_batch(latents, cond)
        dtype = self.dtype
        out = self.denoiser(
            hidden_states=latents.to(dtype),
            # the SD3 pipeline feeds the float32 scheduler timestep as is
            timestep=self._batch_timestep(timestep, batch, latents.device),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            return_dict=False,
            **shared,
        )[0]
        return out.float()



__all__ = ["DIT_ATTENTION_LORA_TARGETS", "FlowMatchingImageAdapter", "StableDiffusion3Adapter"]

"""Stable Diffusion 1.x/2.x and SDXL: UNet diffusion models with a DDIM/DDPM discretisation.

Both adapters wrap a loaded diffusers pipeline and use its own pieces: ``pipeline.encode_prompt`` for
the text conditioning, ``pipeline._get_add_time_ids`` for SDXL's size/crop conditioning, the UNet for
one raw prediction (epsilon or v), and the VAE for decoding. Nothing of the pipelines is forked.

Sampling view. mmalign samples these models with DDIM/DDPM steps (:mod:`mmalign.samplers`), i.e. on the
discretisation ``diffusers.DDIMScheduler`` would use for the pipeline's scheduler config. When the
pipeline's scheduler *is* a ``DDIMScheduler``, an mmalign ODE rollout (``method="ode"`` or ``"ddim"``
with eta 0) reproduces ``pipeline(..., latents=x_T)`` step for step. Schedulers that are not DDIM
(``PNDMScheduler``, which SD 1.5 ships with; ``EulerDiscreteScheduler``, which SDXL ships with) are
replaced *for the schedule only* by a ``DDIMScheduler`` built from their config (same betas, spacing,
offset and prediction type); the pipeline object itself is left untouched. To compare with the pipeline
in that case, give it the same view: ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``.

Initial noise. diffusers pipelines multiply user-supplied ``latents`` by
``scheduler.init_noise_sigma``; that is 1.0 for DDIM/DDPM, so :meth:`ModelAdapter.init_noise`
(standard normal) is exactly the pipeline's ``x_T`` (for Euler-type schedulers it is not 1, another
reason why the schedule is the DDIM view).
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from .base import Conditioning, ModelAdapter, Schedule, check_negative_prompts, check_num_steps, check_prompts

# Keys of the per-row conditioning dicts that go into the UNet's ``added_cond_kwargs`` (SDXL).
_ADDED_COND_KEYS = ("text_embeds", "time_ids")


class StableDiffusionAdapter(ModelAdapter):
    """Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): one CLIP text encoder, UNet, KL VAE.

    Latents are ``B, C, H / s, W / s`` (C = ``unet.config.in_channels``, s = ``pipeline.vae_scale_factor``),
    exactly the pipeline's ``latents=`` layout. The VAE and text encoder(s) are frozen
    (``requires_grad_(False)``) on construction: alignment trains the UNet (usually a LoRA on it), and
    frozen decoders keep reward back-propagation (DRaFT/AlignProp) from filling their ``.grad``.

    Args:
        pipeline: a loaded ``StableDiffusionPipeline`` (or SDXL pipeline for the subclass).
        height, width: image size in pixels; default ``unet.config.sample_size * vae_scale_factor``, as
            the pipeline does. Must be multiples of :attr:`size_multiple`.
    """

    family: ClassVar[str] = "sd"
    modality: ClassVar[str] = "image"
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    default_model_id: ClassVar[str] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    default_guidance_scale: ClassVar[float] = 7.5
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    #: the safety checker is a second CLIP model that :meth:`decode` never runs, so
    #: :meth:`~ModelAdapter.from_pretrained` does not load it unless asked (``safety_checker=...``).
    pretrained_defaults: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}
    #: decode a float16 VAE in float32 when its config says ``force_upcast`` (the SDXL pipeline does;
    #: the SD pipeline does not).
    upcast_vae_when_forced: ClassVar[bool] = False

    def __init__(self, pipeline: Any, *, height: int | None = None, width: int | None = None) -> None:
        super().__init__(pipeline, height=height, width=width)
        for name in ("vae", "text_encoder", "text_encoder_2"):
            module = getattr(pipeline, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
        default_h, default_w = self._default_size()
        self.height = self._check_size("height", default_h if height is None else height)
        self.width = self._check_size("width", default_w if width is None else width)
        self._vae_fp32: tuple[nn.Module, nn.Module] | None = None  # (source VAE, its float32 copy)

    # ---------------------------------------------------------------- sizes
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the published checkpoints)."""
        return int(self.pipeline.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: of the VAE scale factor (whole latent cells) and of 8
        (the pipelines' ``check_inputs`` rejects anything else, and latents must stay usable there)."""
        return math.lcm(8, self.vae_scale_factor)

    def _default_size(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor

    def _check_size(self, what: str, value: Any) -> int:
        m = self.size_multiple
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % m:
            raise ValueError(
                f"{self.family}: {what}={value!r} must be a positive integer multiple of {m} pixels "
                f"(VAE scale factor {self.vae_scale_factor}; the pipeline needs multiples of 8)"
            )
        return value

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """``(B, C, height / s, width / s)``: the pipeline's ``latents=`` shape."""
        s = self.vae_scale_factor
        return (batch_size, int(self.denoiser.config.in_channels), self.height // s, self.width // s)

    # ---------------------------------------------------------------- properties
    @property
    def denoiser(self) -> nn.Module:
        """The pipeline's ``UNet2DConditionModel``."""
        return self.pipeline.unet

    @property
    def _embedded_guidance(self) -> bool:
        """Guidance-distilled UNets (LCM: ``time_cond_proj_dim`` set) take the guidance scale as an
        embedding and have no unconditional branch; the pipelines then switch CFG off."""
        return self.denoiser.config.time_cond_proj_dim is not None

    # ---------------------------------------------------------------- prompts
    def _encode(
        self, prompts: list[str], negative: list[str] | None, do_cfg: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """Per-row conditioning dicts (cond, uncond) from the pipeline's ``encode_prompt``."""
        embeds, negative_embeds = self.pipeline.encode_prompt(
            prompts,
            self.device,
            1,  # num_images_per_prompt: groups are expanded by the sampler
            do_cfg,
            negative_prompt=negative,
        )
        return {"encoder_hidden_states": embeds}, (
            {"encoder_hidden_states": negative_embeds} if do_cfg else None
        )

    @torch.no_grad()  # text encoders are frozen; the conditioning is data for the UNet
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> Conditioning:
        """Encode B prompts with the pipeline's ``encode_prompt``.

        ``cond["encoder_hidden_states"]``: B, 77, D (D = cross-attention dim; SDXL adds ``text_embeds``
        B, P and ``time_ids`` B, 6). ``uncond`` has the same keys and is only computed when
        ``guidance_scale > 1``. Without ``negative_prompts`` the pipeline's default is used: the empty
        prompt "" (and for SDXL with ``force_zeros_for_empty_prompt``, zero embeddings, as the pipeline
        does); ``Conditioning.negative_prompts`` is then None.
        """
        prompts = check_prompts(prompts)
        # None stays None so the pipeline applies its own default ("" or SDXL's zero embeddings)
        negative = check_negative_prompts(negative_prompts, len(prompts))
        guidance = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        do_cfg = guidance > 1.0 and not self._embedded_guidance
        cond, uncond = self._encode(prompts, negative, do_cfg)
        if self._embedded_guidance:
            cond["timestep_cond"] = self._guidance_embedding(guidance, len(prompts))
        return Conditioning(
            prompts=prompts, cond=cond, uncond=uncond, guidance_scale=guidance, negative_prompts=negative
        )

    def _guidance_embedding(self, guidance: float, batch: int) -> Tensor:
        """B, time_cond_proj_dim: the pipeline's guidance embedding for distilled UNets (w - 1, as it does)."""
        w = torch.tensor(guidance - 1.0).repeat(batch)
        emb = self.pipeline.get_guidance_scale_embedding(w, embedding_dim=self.denoiser.config.time_cond_proj_dim)
        return emb.to(self.device)

    # ---------------------------------------------------------------- schedule
    def _ddim_view(self) -> Any:
        """A fresh ``DDIMScheduler`` for the pipeline's scheduler config (a copy: the pipeline's own
        scheduler state is never touched). Non-DDIM schedulers (PNDM, Euler, DDPM, ...) become DDIM with
        the same betas/spacing/offset/prediction type; see the module docstring."""
        from diffusers import DDIMScheduler, DDPMScheduler

        source = self.pipeline.scheduler
        cls = type(source) if isinstance(source, DDIMScheduler) else DDIMScheduler
        view = cls.from_config(source.config)
        if isinstance(source, (DDIMScheduler, DDPMScheduler)) and (
            source.config.get("clip_sample", False) or source.config.get("thresholding", False)
        ):
            warnings.warn(
                f"{self.family}: the pipeline's scheduler clips/thresholds predicted samples; mmalign's DDIM "
                "steps do not, so rollouts will differ from the pipeline's own output",
                stacklevel=3,
            )
        return view

    def schedule(self, num_steps: int) -> Schedule:
        """The DDIM discretisation for ``num_steps`` steps.

        ``timesteps`` (K, int64): the scheduler's ``set_timesteps(num_steps)`` timesteps (a DDIM
        scheduler built from the config when the pipeline's is not DDIM; module docstring).
        ``alphas_cumprod`` (K+1, float32): alpha_bar at each timestep, then the alpha_bar DDIM's last
        step lands on, exactly ``DDIMScheduler.step``'s ``alpha_prod_t_prev``
        (``prev_t = t - num_train_timesteps // num_inference_steps``; ``final_alpha_cumprod`` when
        ``prev_t < 0``). Raises ValueError when a step of the scheduler's spacing does not land on the
        next timestep (``timestep_spacing="linspace"``, or ``"trailing"`` with ``num_train_timesteps``
        not divisible by ``num_steps``), since no DDIM trajectory then matches the pipeline's.
        """
        check_num_steps(num_steps)
        sched = self._ddim_view()
        prediction_type = sched.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{self.family}: scheduler prediction_type {prediction_type!r} is not supported "
                "(expected 'epsilon' or 'v_prediction')"
            )
        sched.set_timesteps(num_steps, device="cpu")
        timesteps = sched.timesteps.to(torch.long)
        stride = sched.config.num_train_timesteps // sched.num_inference_steps
        table = sched.alphas_cumprod.to(torch.float32)

        def alpha_prev(t: int) -> Tensor:  # DDIMScheduler.step's alpha_prod_t_prev
            prev = t - stride
            return table[prev] if prev >= 0 else torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float32)

        steps = [int(t) for t in timesteps]
        landing = [t - stride for t in steps[:-1]]
        off = [(k, steps[k], landing[k], steps[k + 1]) for k in range(len(steps) - 1) if landing[k] != steps[k + 1]]
        if off:
            k, t, lands, nxt = off[0]
            raise ValueError(
                f"{self.family}: with timestep_spacing={sched.config.timestep_spacing!r} and {num_steps} steps, "
                f"DDIM step {k} goes from t={t} to t={lands} but the next step starts at t={nxt} "
                f"({len(off)} such steps), so the schedule has no consistent alphas_cumprod. Use "
                "timestep_spacing='leading', or a num_steps that divides num_train_timesteps "
                f"({sched.config.num_train_timesteps}) with 'trailing'."
            )
        alphas = torch.stack([table[t] for t in steps] + [alpha_prev(steps[-1])]).float()
        return Schedule(
            kind="diffusion", timesteps=timesteps, prediction_type=prediction_type, alphas_cumprod=alphas
        )

    # ---------------------------------------------------------------- denoiser
    def predict(self, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor], shared: dict[str, Any]) -> Tensor:
        """One raw UNet call: ``latents`` B,C,h,w (float32) at ``timestep`` (scalar or B) -> B,C,h,w float32
        in the schedule's prediction type. ``cond`` holds per-row tensors (``encoder_hidden_states``, and
        for SDXL ``text_embeds``/``time_ids``, which become ``added_cond_kwargs``); ``shared`` entries
        are passed to the UNet as they are (e.g. ``cross_attention_kwargs``)."""
        unet = self.denoiser
        dtype = unet.dtype
        batch = latents.shape[0]
        t = torch.as_tensor(timestep, device=latents.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} entries for a batch of {batch}")
        kwargs = dict(cond)
        try:
            hidden = kwargs.pop("encoder_hidden_states")
        except KeyError:
            raise ValueError(f"{self.family}: conditioning lacks 'encoder_hidden_states' (keys: {sorted(cond)})") from None
        added = {k: kwargs.pop(k).to(dtype) for k in _ADDED_COND_KEYS if k in kwargs}
        timestep_cond = kwargs.pop("timestep_cond", None)
        if kwargs:
            raise ValueError(f"{self.family}: unexpected conditioning keys {sorted(kwargs)}")
        out = unet(
            latents.to(dtype),
            t,
            encoder_hidden_states=hidden.to(dtype),
            timestep_cond=None if timestep_cond is None else timestep_cond.to(dtype),
            added_cond_kwargs=added or None,
            return_dict=False,
            **shared,
        )[0]
        return out.float()

    # ---------------------------------------------------------------- decoding
    def _decode_vae(self) -> nn.Module:
        """The VAE to decode with: the pipeline's, or (when :attr:`upcast_vae_when_forced` and the VAE is
        float16 with ``force_upcast``) a cached float32 copy. A copy, not the pipeline's in-place
        ``vae.to(float32)`` round trip, because autograd keeps references to the weights used in the
        forward pass: casting them back to float16 before ``backward`` would break the gradient."""
        vae = self.pipeline.vae
        if not (self.upcast_vae_when_forced and vae.dtype == torch.float16 and vae.config.get("force_upcast", False)):
            return vae
        if self._vae_fp32 is None or self._vae_fp32[0] is not vae:
            self._vae_fp32 = (vae, copy.deepcopy(vae).to(torch.float32).requires_grad_(False))
        return self._vae_fp32[1]

    def _unscale_latents(self, latents: Tensor) -> Tensor:
        """Model latents -> VAE latents: ``z * std / scaling + mean`` when the VAE config has
        ``latents_mean``/``latents_std`` (as the SDXL pipeline does), else ``z / scaling (+ shift_factor)``."""
        cfg = self.pipeline.vae.config
        scaling = cfg.scaling_factor
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(1, c, 1, 1)
            std_t = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(1, c, 1, 1)
            return latents * std_t / scaling + mean_t
        shift = cfg.get("shift_factor")
        return latents / scaling + (shift if shift is not None else 0.0)

    def decode(self, latents: Tensor) -> Tensor:
        """B,C,h,w latents -> B,3,H,W float32 images in [0, 1] (``clamp(x / 2 + 0.5)``, as the pipeline's
        ``output_type="pt"``). Differentiable w.r.t. ``latents`` (no ``no_grad``, no PIL)."""
        vae = self._decode_vae()
        z = self._unscale_latents(latents.float()).to(device=next(vae.parameters()).device, dtype=vae.dtype)
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders, "text_time" added
    conditioning. Everything else is :class:`StableDiffusionAdapter`.

    Per-row conditioning adds ``text_embeds`` (B, P: pooled projection of the second encoder) and
    ``time_ids`` (B, 6: ``original_size + crops_coords_top_left + target_size`` from the pipeline's
    ``_get_add_time_ids``), which :meth:`predict` passes as ``added_cond_kwargs``.

    Args:
        original_size, target_size: (height, width) micro-conditioning; default ``(height, width)``,
            as the pipeline does. ``crops_coords_top_left`` defaults to ``(0, 0)``.
    """

    family: ClassVar[str] = "sdxl"
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    default_model_id: ClassVar[str] = "stabilityai/stable-diffusion-xl-base-1.0"
    default_guidance_scale: ClassVar[float] = 5.0
    pretrained_defaults: ClassVar[dict[str, Any]] = {}
    upcast_vae_when_forced: ClassVar[bool] = True

    def __init__(
        self,
        pipeline: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(pipeline, height=height, width=width)
        self.original_size = tuple(original_size or (self.height, self.width))
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = tuple(target_size or (self.height, self.width))

    def _add_time_ids(self, pooled: Tensor) -> Tensor:
        """1, 6: the pipeline's added time ids for this adapter's sizes."""
        pipe = self.pipeline
        if pipe.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids(
            self.original_size,
            self.crops_coords_top_left,
            self.target_size,
            dtype=pooled.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        return ids.to(pooled.device)

    def _encode(
        self, prompts: list[str], negative: list[str] | None, do_cfg: bool
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative,
        )
        # The pipeline uses the same ids for both branches unless negative sizes are given.
        time_ids = self._add_time_ids(pooled).repeat(len(prompts), 1)
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
        if not do_cfg:
            return cond, None
        uncond = {"encoder_hidden_states": negative_embeds, "text_embeds": negative_pooled, "time_ids": time_ids.clone()}
        return cond, uncond


__all__ = ["StableDiffusionAdapter", "StableDiffusionXLAdapter"]

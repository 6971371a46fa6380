"""Wan 2.1 text-to-video (``diffusers.WanPipeline``): flow matching with a UMT5 text encoder.

Layout and conventions, all taken from the pipeline itself:

- latents: ``B, C, F', h, w`` (``C = transformer.in_channels``, ``F' = (num_frames - 1) // 4 + 1``,
  ``h, w = height // 8, width // 8``), exactly what ``WanPipeline(latents=...)`` accepts;
- text: ``pipeline.encode_prompt`` (UMT5, ``max_sequence_length`` tokens, zero-padded past each prompt);
- denoiser: ``WanTransformer3DModel`` predicting the flow velocity ``noise - data``;
- guidance: the pipeline runs the conditional and unconditional branches as two separate transformer
  calls; :meth:`WanAdapter.denoise` does the same by default (``batch_cfg=True`` batches them instead);
- schedule: the published checkpoints ship ``UniPCMultistepScheduler`` (a multistep solver with flow
  sigmas). mmalign samples with single-step Euler/SDE updates, so :meth:`WanAdapter.schedule` uses the
  sigmas of a ``FlowMatchEulerDiscreteScheduler`` with the same shift (``flow_shift``) and number of
  training timesteps. When the pipeline already holds a ``FlowMatchEulerDiscreteScheduler`` (as the tiny
  test pipeline does), a copy of it is used, so mmalign's ODE sampler equals ``pipe(...)`` step for step;
- decode: de-normalise with the VAE's ``latents_mean`` / ``latents_std`` as the pipeline does, decode,
  map [-1, 1] to [0, 1] and lay frames out as ``B, T, 3, H, W``.

Wan 2.2 TI2V-style pipelines (``expand_timesteps=True``) are supported; two-expert Wan 2.2 pipelines
(``transformer_2`` / ``boundary_ratio``) are not (the trainable denoiser would change mid-trajectory).

Also home of the pieces shared with CogVideoX (:mod:`mmalign.models.cogvideox`), whose pipeline has the
same ``encode_prompt`` and the same ``4k + 1`` frame rule: :func:`encode_video_prompts` and
:func:`check_num_frames`.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from .base import Conditioning, ModelAdapter, Schedule, check_negative_prompts, check_num_steps, check_prompts


def check_num_frames(label: str, num_frames: Any, temporal: int, usual: int) -> None:
    """Raise unless ``num_frames`` is ``temporal * k + 1`` (``usual``: the family's default, for the message)."""
    t, f = temporal, num_frames
    if isinstance(f, bool) or not isinstance(f, int) or f < 1 or (f - 1) % t:
        raise ValueError(
            f"{label} num_frames must be {t}k+1 (1, {t + 1}, {2 * t + 1}, ..., {usual}), got {f!r}: "
            f"the VAE keeps the first frame and compresses the rest {t}x in time"
        )


def encode_video_prompts(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | str | None,
    guidance_scale: float | None,
    dtype: torch.dtype | None = None,
) -> Conditioning:
    """``adapter.pipeline.encode_prompt`` (Wan / CogVideoX signature) on B prompts and, when
    ``guidance_scale > 1``, on the negative prompts ("" by default); embeddings cast to ``dtype`` if given.
    ``adapter`` needs ``default_guidance_scale``, ``max_sequence_length`` and ``device``."""
    prompts = check_prompts(prompts)
    scale = adapter.default_guidance_scale if guidance_scale is None else float(guidance_scale)
    do_cfg = scale > 1.0
    negative = check_negative_prompts(negative_prompts, len(prompts))
    if negative is None and do_cfg:
        negative = [""] * len(prompts)
    pos, neg = adapter.pipeline.encode_prompt(
        prompt=prompts,
        negative_prompt=negative if do_cfg else None,
        do_classifier_free_guidance=do_cfg,
        num_videos_per_prompt=1,
        max_sequence_length=adapter.max_sequence_length,
        device=adapter.device,
    )
    cond = {"encoder_hidden_states": pos if dtype is None else pos.to(dtype)}
    uncond = {"encoder_hidden_states": neg if dtype is None else neg.to(dtype)} if do_cfg else None
    return Conditioning(prompts=prompts, cond=cond, uncond=uncond, guidance_scale=scale, negative_prompts=negative)


class VideoTransformerAdapter(ModelAdapter):
    """What the transformer video families (Wan, CogVideoX) share: the denoiser and the frame rate."""

    modality = "video"
    #: frames per second of decoded video when neither the adapter nor the pipeline config sets one
    default_fps: ClassVar[int] = 16
    _fps: float | None = None

    @property
    def denoiser(self) -> nn.Module:
        return self.pipeline.transformer

    @property
    def fps(self) -> float:
        if self._fps is not None:
            return self._fps
        return self.pipeline.config.get("fps", self.default_fps)


class WanAdapter(VideoTransformerAdapter):
    """Adapter over a ``diffusers.WanPipeline`` (Wan 2.1 T2V 1.3B / 14B).

    Args:
        pipeline: a loaded ``WanPipeline``.
        height, width: video size in pixels (default 480 x 832, the pipeline's defaults; multiples of
            ``vae_scale_factor_spatial * patch_size`` and of 16).
        num_frames: frames per video, ``4k + 1`` (default 81).
        max_sequence_length: text tokens (default 512, the pipeline's ``__call__`` default).
        batch_cfg: run the unconditional and conditional branches as one batch (faster, more memory)
            instead of two calls like the pipeline (identical up to float rounding).
        fps: frames per second of decoded video (default: the pipeline config's ``fps`` if present, else 16).

    A pipeline may carry a plain ``mmalign_defaults`` dict (height/width/num_frames) that replaces the
    480x832x81 defaults; the tiny test pipeline uses it.
    """

    family: ClassVar[str] = "wan"
    modality = "video"
    pipeline_class: ClassVar[str] = "WanPipeline"
    default_model_id: ClassVar[str] = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    default_guidance_scale: ClassVar[float] = 5.0
    # Self- and cross-attention projections of every WanTransformerBlock (attn1 / attn2).
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    #: WanPipeline.__call__ defaults
    default_size: ClassVar[dict[str, int]] = {"height": 480, "width": 832, "num_frames": 81}
    default_fps: ClassVar[int] = 16
    default_max_sequence_length: ClassVar[int] = 512

    def __init__(
        self,
        pipeline: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        max_sequence_length: int | None = None,
        batch_cfg: bool = False,
        fps: float | None = None,
    ) -> None:
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError("WanAdapter needs a WanPipeline with a `transformer`")
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("boundary_ratio") is not None:
            raise NotImplementedError(
                "two-expert Wan 2.2 pipelines (transformer_2 / boundary_ratio) are not supported: "
                "the denoiser switches at a timestep boundary"
            )
        defaults = {**self.default_size, **(getattr(pipeline, "mmalign_defaults", None) or {})}
        super().__init__(
            pipeline,
            height=defaults["height"] if height is None else height,
            width=defaults["width"] if width is None else width,
        )
        self.num_frames: int = defaults["num_frames"] if num_frames is None else num_frames
        self.max_sequence_length: int = (
            self.default_max_sequence_length if max_sequence_length is None else int(max_sequence_length)
        )
        self.batch_cfg = bool(batch_cfg)
        self._fps = fps
        self._check_size()

    # ---------------------------------------------------------------- validation
    def _check_size(self) -> None:
        pipe = self.pipeline
        patch = pipe.transformer.config.patch_size
        for name, value, p in (("height", self.height, patch[1]), ("width", self.width, patch[2])):
            # WanPipeline.check_inputs wants multiples of 16, and patchification multiples of vae*patch.
            multiple = math.lcm(16, pipe.vae_scale_factor_spatial * p)
            if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"Wan {name} must be a positive multiple of {multiple} pixels, got {value!r}")
        check_num_frames("Wan", self.num_frames, pipe.vae_scale_factor_temporal, usual=81)
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")

    # ---------------------------------------------------------------- properties

    @property
    def num_latent_frames(self) -> int:
        return (self.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1

    # ---------------------------------------------------------------- the pieces
    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> Conditioning:
        """UMT5 embeddings via ``WanPipeline.encode_prompt``.

        Returns ``cond["encoder_hidden_states"]``: B,S,D (S = ``max_sequence_length``) in the transformer's
        dtype, and ``uncond`` of the same shape when ``guidance_scale > 1`` (negative prompts default to "").
        The text encoder is frozen, so this runs without gradients.
        """
        # The pipeline casts the embeddings to the transformer's dtype before the loop.
        return encode_video_prompts(self, prompts, negative_prompts, guidance_scale, dtype=self.dtype)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int, int]:
        """``(B, C, F', h, w)``: the ``latents=`` layout of ``WanPipeline``."""
        s = self.pipeline.vae_scale_factor_spatial
        return (
            batch_size,
            self.pipeline.transformer.config.in_channels,
            self.num_latent_frames,
            self.height // s,
            self.width // s,
        )

    def _euler_scheduler(self) -> Any:
        """A fresh Euler flow scheduler equivalent to the pipeline's (never the pipeline's own object)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = self.pipeline.scheduler
        if isinstance(sched, FlowMatchEulerDiscreteScheduler):
            return type(sched).from_config(sched.config)
        cfg = sched.config
        if "flow_shift" in cfg and (cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == "flow_prediction"):
            # UniPC (the published scheduler) is multistep; mmalign steps are single-step, so take the
            # Euler discretisation with the same shift. Its sigmas are the ones FlowMatchEuler-based
            # Wan pipelines and RL code (Flow-GRPO, DanceGRPO) use.
            return FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=float(cfg["flow_shift"])
            )
        raise ValueError(
            f"WanAdapter cannot derive flow-matching sigmas from {type(sched).__name__}; use "
            "FlowMatchEulerDiscreteScheduler or UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=...)"
        )

    def schedule(self, num_steps: int) -> Schedule:
        """Euler flow schedule: ``sigmas`` K+1 (from 1 down to 0), ``timesteps`` K (= 1000 * sigma).

        Equals what ``pipe.scheduler`` holds after ``pipe(num_inference_steps=K)`` when the pipeline uses
        ``FlowMatchEulerDiscreteScheduler``; see the module docstring for UniPC pipelines.
        """
        check_num_steps(num_steps)
        sched = self._euler_scheduler()
        # Same call as WanPipeline.__call__ (no `mu`: Wan uses a static shift).
        sched.set_timesteps(num_steps, device=self.device)
        return Schedule(
            kind="flow",
            timesteps=sched.timesteps.float(),
            prediction_type="flow",
            sigmas=sched.sigmas.float(),
        )

    def _timestep_input(self, timestep: Tensor, latents: Tensor) -> Tensor:
        """Broadcast a scalar (or per-sample B) timestep the way the pipeline does."""
        b = latents.shape[0]
        t = timestep.to(latents.device)
        t = t.expand(b) if t.ndim == 0 else t
        if self.pipeline.config.get("expand_timesteps", False):
            # Wan 2.2 TI2V: one timestep per token, F' x ceil(h/2) x ceil(w/2) (the pipeline's mask[:, ::2, ::2]).
            seq = latents[0, 0, :, ::2, ::2].numel()
            t = t[:, None].expand(b, seq)
        return t

    def predict(self, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor], shared: dict[str, Any]) -> Tensor:
        """One transformer call: latents B,C,F',h,w (float32), timestep scalar or B -> velocity B,C,F',h,w float32."""
        x = latents.to(self.dtype)
        out = self.pipeline.transformer(
            hidden_states=x,
            timestep=self._timestep_input(torch.as_tensor(timestep), x),
            encoder_hidden_states=cond["encoder_hidden_states"].to(device=x.device, dtype=self.dtype),
            attention_kwargs=shared.get("attention_kwargs"),
            return_dict=False,
        )[0]
        return out.float()

    def denoise(self, latents: Tensor, timestep: Tensor | float, conditioning: Conditioning) -> Tensor:
        """Guided velocity B,C,F',h,w float32. Like ``WanPipeline``, the conditional and unconditional
        branches are two transformer calls (unless ``batch_cfg``), combined as uncond + g * (cond - uncond)."""
        if self.batch_cfg or not conditioning.do_cfg:
            return super().denoise(latents, timestep, conditioning)
        if latents.shape[0] != len(conditioning):
            raise ValueError(
                f"latents batch {latents.shape[0]} does not match conditioning batch {len(conditioning)}"
            )
        t = torch.as_tensor(timestep, device=latents.device)
        cond = self.predict(latents, t, conditioning.cond, conditioning.shared)
        uncond = self.predict(latents, t, conditioning.uncond, conditioning.shared)
        return uncond + conditioning.guidance_scale * (cond - uncond)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents B,C,F',h,w -> video B,T,3,H,W float32 in [0, 1] (T = 4(F'-1)+1), differentiable.

        Mirrors ``WanPipeline``: ``z / (1 / latents_std) + latents_mean``, ``vae.decode``, then the video
        processor's ``x / 2 + 0.5`` clamped to [0, 1].
        """
        vae = self.pipeline.vae
        z = latents.to(device=self.vae_device, dtype=vae.dtype)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # B,3,T,H,W in [-1, 1]
        video = (video.float() / 2 + 0.5).clamp(0, 1)
        return video.permute(0, 2, 1, 3, 4).to(latents.device)

    # Wan's VAE is causal in time (causal 3D convolutions run latent frame by latent frame with a cache):
    # with temporal factor r, latent frame 0 decodes to frame 0 and latent frame j >= 1 to frames
    # r(j-1)+1..rj, from earlier frames only
    causal_frame_decoding: ClassVar[bool] = True

    def decode_prefix(self, latents: Tensor, num_frames: int) -> Tensor:
        """The first ``num_frames`` frames of :meth:`decode`, decoding only the 1 + ceil((n-1)/r) latent
        frames they come from (latents B,C,F',h,w -> B,n,3,H,W; r = the VAE's temporal factor)."""
        r = self.pipeline.vae_scale_factor_temporal
        total = r * (latents.shape[2] - 1) + 1
        n = int(num_frames)
        if not 1 <= n <= total:
            raise ValueError(f"num_frames must be in [1, {total}], got {num_frames}")
        return self.decode(latents[:, :, : (n - 1 + r - 1) // r + 1])[:, :n]

    @torch.no_grad()  # the VAE is frozen: encoded videos are training data
    def encode_media(self, media: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Video B,T,3,H,W in [0, 1] -> latents B,C,F',h,w: the inverse of :meth:`decode`
        (``vae.encode``, then ``(z - latents_mean) / latents_std``); the posterior mean, or a sample of it
        when ``generator`` is given."""
        if media.ndim != 5 or media.shape[2] != 3:
            raise ValueError(f"{self.family}: encode_media takes video B,T,3,H,W, got shape {tuple(media.shape)}")
        vae = self.pipeline.vae
        x = (media.float() * 2 - 1).permute(0, 2, 1, 3, 4).to(device=self.vae_device, dtype=vae.dtype)
        posterior = vae.encode(x).latent_dist
        z = (posterior.mean if generator is None else posterior.sample(generator)).float()
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(z.device)
        std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(z.device)
        z = (z - mean) / std
        expected = tuple(self.latent_shape(z.shape[0]))
        if tuple(z.shape) != expected:
            raise ValueError(f"{self.family}: video {tuple(media.shape[1:])} encodes to latents {tuple(z.shape)}, expected "
                             f"{expected}: give videos with the model's frame count and size")
        return z.to(self.device)

    @property
    def vae_device(self) -> torch.device:
        return next(self.pipeline.vae.parameters()).device


__all__ = ["WanAdapter", "check_num_frames", "encode_video_prompts"]

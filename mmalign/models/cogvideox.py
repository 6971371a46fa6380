"""CogVideoX text-to-video (``diffusers.CogVideoXPipeline``): DDIM-style diffusion with v-prediction.

Layout and conventions, all taken from the pipeline itself:

- latents: ``B, F', C, h, w`` (frames before channels; ``F' = (num_frames - 1) // 4 + 1``, padded up to a
  multiple of ``patch_size_t`` for CogVideoX 1.5 as the pipeline does), exactly what
  ``CogVideoXPipeline(latents=...)`` accepts (its ``init_noise_sigma`` is 1);
- text: ``pipeline.encode_prompt`` (T5, ``max_sequence_length`` tokens);
- denoiser: ``CogVideoXTransformer3DModel``, v-prediction, with 3D rotary embeddings from the pipeline's
  ``_prepare_rotary_positional_embeddings`` when the config enables them (CogVideoX-5b / 1.5);
- guidance: ``[uncond, cond]`` as one batch, like the pipeline (the base class ``denoise``);
- schedule: ``CogVideoXDDIMScheduler`` (a copy, never the pipeline's object) after the pipeline's own
  ``set_timesteps(K, device)``; ``alphas_cumprod`` holds alpha_bar at each step's timestep and, last, the
  alpha_bar the final step lands on (``final_alpha_cumprod`` when ``t - T // K < 0``);
- decode: drop the 1.5 padding frames, ``/ scaling_factor``, ``vae.decode`` on ``B, C, F', h, w``, map
  [-1, 1] to [0, 1] and lay frames out as ``B, T, 3, H, W``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from .base import Conditioning, Schedule, check_num_steps
from .wan import VideoTransformerAdapter, check_num_frames, encode_video_prompts

logger = logging.getLogger(__name__)


class CogVideoXAdapter(VideoTransformerAdapter):
    """Adapter over a ``diffusers.CogVideoXPipeline`` (CogVideoX 2b / 5b / 1.5-5b text-to-video).

    Args:
        pipeline: a loaded ``CogVideoXPipeline``.
        height, width: video size in pixels; default ``transformer.sample_height/width * 8``
            (480 x 720), as the pipeline computes it. Multiples of ``8 * patch_size``.
        num_frames: frames per video, ``4k + 1``; default ``transformer.sample_frames`` (49).
        max_sequence_length: text tokens; default ``transformer.max_text_seq_length`` (226, the
            pipeline's default for the published models).
        fps: frames per second of decoded video (default: the pipeline config's ``fps`` if present, else 8).
    """

    family: ClassVar[str] = "cogvideox"
    modality = "video"
    pipeline_class: ClassVar[str] = "CogVideoXPipeline"
    default_model_id: ClassVar[str] = "THUDM/CogVideoX-2b"
    default_guidance_scale: ClassVar[float] = 6.0
    # Fused self-attention over [text, video] tokens in every CogVideoXBlock (attn1); the usual
    # CogVideoX LoRA targets (diffusers' / cogvideox-factory's training scripts).
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    default_fps: ClassVar[int] = 8

    def __init__(
        self,
        pipeline: Any,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        max_sequence_length: int | None = None,
        fps: float | None = None,
    ) -> None:
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError("CogVideoXAdapter needs a CogVideoXPipeline with a `transformer`")
        cfg = pipeline.transformer.config
        s = pipeline.vae_scale_factor_spatial
        super().__init__(
            pipeline,
            height=cfg.sample_height * s if height is None else height,
            width=cfg.sample_width * s if width is None else width,
        )
        self.num_frames: int = cfg.sample_frames if num_frames is None else num_frames
        self.max_sequence_length: int = cfg.max_text_seq_length if max_sequence_length is None else int(max_sequence_length)
        self._fps = fps
        self._rotary_cache: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}
        self._warned_steps: set[int] = set()
        self._check_size()

    # ---------------------------------------------------------------- validation
    def _check_size(self) -> None:
        pipe = self.pipeline
        multiple = math.lcm(8, pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size)
        for name, value in (("height", self.height), ("width", self.width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"CogVideoX {name} must be a positive multiple of {multiple} pixels, got {value!r}")
        check_num_frames("CogVideoX", self.num_frames, pipe.vae_scale_factor_temporal, usual=49)
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")

    # ---------------------------------------------------------------- properties

    @property
    def padding_frames(self) -> int:
        """Latent frames the pipeline prepends so ``F'`` divides ``patch_size_t`` (CogVideoX 1.5; else 0)."""
        p_t = self.pipeline.transformer.config.patch_size_t
        f = (self.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1
        return 0 if p_t is None or f % p_t == 0 else p_t - f % p_t

    @property
    def num_latent_frames(self) -> int:
        """``F'`` including :attr:`padding_frames`."""
        return (self.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1 + self.padding_frames

    # ---------------------------------------------------------------- the pieces
    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> Conditioning:
        """T5 embeddings via ``CogVideoXPipeline.encode_prompt``.

        Returns ``cond["encoder_hidden_states"]``: B,S,D (S = ``max_sequence_length``), and ``uncond`` of
        the same shape when ``guidance_scale > 1`` (negative prompts default to ""). The text encoder is
        frozen, so this runs without gradients.
        """
        return encode_video_prompts(self, prompts, negative_prompts, guidance_scale)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int, int]:
        """``(B, F', C, h, w)``: the ``latents=`` layout of ``CogVideoXPipeline``."""
        s = self.pipeline.vae_scale_factor_spatial
        return (
            batch_size,
            self.num_latent_frames,
            self.pipeline.transformer.config.in_channels,
            self.height // s,
            self.width // s,
        )

    def _ddim_scheduler(self) -> Any:
        """A fresh ``CogVideoXDDIMScheduler`` with the pipeline scheduler's config.

        For ``CogVideoXDPMScheduler`` (a multistep solver some users swap in) the same alphas are used
        with single DDIM steps, mmalign's step rule.
        """
        from diffusers import CogVideoXDDIMScheduler

        sched = self.pipeline.scheduler
        if isinstance(sched, CogVideoXDDIMScheduler):
            return type(sched).from_config(sched.config)
        if hasattr(sched, "alphas_cumprod") and "num_train_timesteps" in sched.config:
            return CogVideoXDDIMScheduler.from_config(sched.config)
        raise ValueError(f"CogVideoXAdapter cannot derive a DDIM schedule from {type(sched).__name__}")

    def schedule(self, num_steps: int) -> Schedule:
        """DDIM schedule: ``timesteps`` K (long), ``alphas_cumprod`` K+1 (float32), v-prediction.

        ``timesteps`` equal ``pipe.scheduler.timesteps`` after ``pipe(num_inference_steps=K)``. Entry k < K of
        ``alphas_cumprod`` is alpha_bar at ``timesteps[k]``; entry K is what the scheduler's last ``step``
        lands on (``alphas_cumprod[t - T // K]``, or ``final_alpha_cumprod`` below 0). With "trailing" or
        "linspace" spacing and K not dividing T, the scheduler's intermediate steps land on
        ``t - T // K``, one or two timesteps away from the next step's timestep; a single chain cannot
        hold both, so mmalign uses the next step's timestep (a consistent DDIM chain) and logs a warning
        once; sampling then differs slightly from ``pipe(...)`` (K = 2, 4, 5, 10, 20, 25, 50 match exactly).
        """
        check_num_steps(num_steps)
        sched = self._ddim_scheduler()
        # CogVideoXPipeline: retrieve_timesteps(scheduler, K, device) -> scheduler.set_timesteps(K, device=device)
        sched.set_timesteps(num_steps, device=self.device)
        timesteps = sched.timesteps.to(torch.long)
        ac = sched.alphas_cumprod.to(device=self.device)
        stride = sched.config.num_train_timesteps // sched.num_inference_steps
        lands = timesteps - stride
        last = int(lands[-1])
        final = ac[last] if last >= 0 else torch.as_tensor(sched.final_alpha_cumprod, device=self.device)
        if num_steps > 1 and not torch.equal(lands[:-1], timesteps[1:]) and num_steps not in self._warned_steps:
            self._warned_steps.add(num_steps)
            logger.warning(
                "CogVideoX scheduler steps with %d steps land on timesteps %s but evaluate the model at %s; "
                "mmalign uses the latter as alpha_bar targets",
                num_steps, lands[:-1].tolist(), timesteps[1:].tolist(),
            )
        alphas = torch.cat([ac[timesteps], final.reshape(1).to(ac.dtype)])
        return Schedule(
            kind="diffusion",
            timesteps=timesteps,
            prediction_type=sched.config.prediction_type,
            alphas_cumprod=alphas.float(),
        )

    def _rotary(self, latents: Tensor) -> tuple[Tensor, Tensor] | None:
        """``image_rotary_emb`` for latents B,F',C,h,w, from the pipeline's own helper (cached per size)."""
        if not self.pipeline.transformer.config.use_rotary_positional_embeddings:
            return None
        s = self.pipeline.vae_scale_factor_spatial
        f, h, w = latents.shape[1], latents.shape[3] * s, latents.shape[4] * s
        key = (f, h, w, latents.device)
        if key not in self._rotary_cache:
            self._rotary_cache[key] = self.pipeline._prepare_rotary_positional_embeddings(h, w, f, latents.device)
        return self._rotary_cache[key]

    def predict(self, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor], shared: dict[str, Any]) -> Tensor:
        """One transformer call: latents B,F',C,h,w (float32), integer timestep scalar or B ->
        v-prediction B,F',C,h,w float32."""
        x = latents.to(self.dtype)
        t = torch.as_tensor(timestep).to(x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.pipeline.transformer(
            hidden_states=x,
            encoder_hidden_states=cond["encoder_hidden_states"].to(device=x.device, dtype=self.dtype),
            timestep=t,
            image_rotary_emb=self._rotary(x),
            attention_kwargs=shared.get("attention_kwargs"),
            return_dict=False,
        )[0]
        return out.float()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents B,F',C,h,w -> video B,T,3,H,W float32 in [0, 1], differentiable.

        Mirrors ``CogVideoXPipeline``: drop the padding frames, ``decode_latents`` (permute to
        B,C,F',h,w and ``/ scaling_factor``), then the video processor's ``x / 2 + 0.5`` clamped to [0, 1].
        """
        vae = self.pipeline.vae
        z = latents[:, self.padding_frames :] if self.padding_frames else latents
        z = z.to(device=next(vae.parameters()).device, dtype=vae.dtype).permute(0, 2, 1, 3, 4)
        video = vae.decode(1 / self.pipeline.vae_scaling_factor_image * z).sample  # B,3,T,H,W in [-1, 1]
        video = (video.float() / 2 + 0.5).clamp(0, 1)
        return video.permute(0, 2, 1, 3, 4).to(latents.device)


__all__ = ["CogVideoXAdapter"]

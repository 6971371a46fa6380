"""AudioLDM text-to-audio (diffusers ``AudioLDMPipeline``): a UNet denoising mel-spectrogram latents.

How the pipeline conditions its UNet, and so how this adapter does:

- the prompt goes through a CLAP text encoder (``ClapTextModelWithProjection``); its L2-normalised
  projected embedding (B,D) is the UNet's *class* embedding: ``unet(x, t, encoder_hidden_states=None,
  class_labels=embeds)`` (``class_embed_type="simple_projection"``). There is no token sequence.
- latents are ``B,C,T/s,M/s``: T mel frames for the requested duration, M mel bins (the vocoder's
  ``model_in_dim``), s the VAE scale factor;
- the VAE decodes to a 1-channel mel spectrogram ``B,1,T,M`` and the ``SpeechT5HifiGan`` vocoder turns
  it into a waveform ``B,N`` that is cut to the requested duration;
- the published checkpoints use DDIM with epsilon prediction.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from .base import Conditioning, Modality, ModelAdapter, Schedule, check_negative_prompts, check_num_steps, check_prompts


class AudioLDMAdapter(ModelAdapter):
    """mmalign adapter over a diffusers ``AudioLDMPipeline``.

    Args:
        pipeline: a loaded ``AudioLDMPipeline``.
        audio_length_in_s: duration of the generated clips in seconds. ``None`` uses the pipeline's
            default, ``unet.config.sample_size * vae_scale_factor * prod(upsample_rates) / sampling_rate``
            (5.12 s for the published checkpoints). As in the pipeline, the number of mel frames is rounded
            up to a multiple of the VAE scale factor and the decoded waveform is cut back to the duration.
    """

    family: ClassVar[str] = "audioldm"
    modality: ClassVar[Modality] = "audio"
    pipeline_class: ClassVar[str] = "AudioLDMPipeline"
    default_model_id: ClassVar[str] = "cvssp/audioldm-s-full-v2"
    default_guidance_scale: ClassVar[float] = 2.5
    # The UNet's attention projections: self-attention of the mid/cross blocks and the "cross" attention,
    # which AudioLDM runs on the block's own features (encoder_hidden_states=None).
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipeline: Any, *, audio_length_in_s: float | None = None) -> None:
        super().__init__(pipeline)
        # Only the denoiser is ever trained. Freezing the rest means a reward backpropagated through
        # decode() reaches the latents without accumulating gradients on VAE/vocoder weights.
        for name in ("text_encoder", "vae", "vocoder"):
            module = getattr(pipeline, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
        frames, num_samples, seconds = self._frames_for_duration(audio_length_in_s)
        #: requested duration in seconds
        self.audio_length_in_s: float = seconds
        #: mel frames the UNet/VAE work on (rounded up to a multiple of the VAE scale factor)
        self.num_frames: int = frames
        #: waveform samples kept after vocoding (the pipeline's ``original_waveform_length``)
        self.num_samples: int = num_samples

    # ---------------------------------------------------------------- sizes
    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    @property
    def sample_rate(self) -> int:
        """Waveform sample rate in Hz (the vocoder's ``sampling_rate``)."""
        return int(self.pipeline.vocoder.config.sampling_rate)

    @property
    def num_mel_bins(self) -> int:
        return int(self.pipeline.vocoder.config.model_in_dim)

    def _frames_for_duration(self, audio_length_in_s: float | None) -> tuple[int, int, float]:
        """(mel frames, waveform samples, seconds) for a duration, with the pipeline's own arithmetic.

        The float operations mirror ``AudioLDMPipeline.__call__`` step for step so that the frame count
        and the cut length agree with the pipeline for every duration (``int()`` truncation included).
        """
        pipe = self.pipeline
        vocoder_config = pipe.vocoder.config
        scale = self.vae_scale_factor
        # seconds of audio per mel frame
        upsample_factor = math.prod(vocoder_config.upsample_rates) / vocoder_config.sampling_rate
        if self.num_mel_bins % scale != 0:
            raise ValueError(
                f"the vocoder's {self.num_mel_bins} mel bins are not divisible by the VAE scale factor {scale}"
            )
        if audio_length_in_s is None:
            audio_length_in_s = pipe.unet.config.sample_size * scale * upsample_factor
        if isinstance(audio_length_in_s, bool) or not isinstance(audio_length_in_s, (int, float)):
            raise TypeError(f"audio_length_in_s must be a number of seconds, got {type(audio_length_in_s).__name__}")
        minimum = upsample_factor * scale
        if not math.isfinite(audio_length_in_s) or audio_length_in_s < minimum:
            raise ValueError(
                f"audio_length_in_s must be a finite number of seconds >= {minimum:g} (one latent frame: "
                f"{scale} mel frames of {upsample_factor:g} s), got {audio_length_in_s!r}"
            )
        frames = int(audio_length_in_s / upsample_factor)
        num_samples = int(audio_length_in_s * vocoder_config.sampling_rate)
        if frames % scale != 0:
            frames = int(math.ceil(frames / scale)) * scale
        return frames, num_samples, float(audio_length_in_s)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        """``(B, C, T/s, M/s)``: the pipeline's ``latents=`` layout for :attr:`audio_length_in_s`."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        scale = self.vae_scale_factor
        return (
            batch_size,
            int(self.pipeline.unet.config.in_channels),
            self.num_frames // scale,
            self.num_mel_bins // scale,
        )

    # ---------------------------------------------------------------- modules
    @property
    def denoiser(self) -> nn.Module:
        return self.pipeline.unet

    # ---------------------------------------------------------------- prompts
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | str | None = None,
        guidance_scale: float | None = None,
    ) -> Conditioning:
        """CLAP-encode B prompts (and, with guidance, B negative prompts, "" by default).

        Returns ``cond = {"class_labels": B,D}`` (L2-normalised CLAP text embeddings, the pipeline's
        ``_encode_prompt``) and ``uncond`` likewise when ``guidance_scale > 1``, else None. A single
        negative string applies to every prompt; a list must have one entry per prompt. Without
        guidance the negative prompts are not used (as in the pipeline) and not recorded.
        """
        prompts = check_prompts(prompts)
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        do_cfg = scale > 1.0
        negatives = check_negative_prompts(negative_prompts, len(prompts))
        if not do_cfg:
            negatives = None  # as in the pipeline: no guidance, no negatives
        elif negatives is None:
            negatives = [""] * len(prompts)
        # the text encoder is frozen: no graph through it
        with torch.no_grad():
            embeds = self.pipeline._encode_prompt(
                prompts,
                self.device,
                1,
                do_cfg,
                negative_prompt=negatives,
            )
        embeds = embeds.detach()
        if do_cfg:
            # the pipeline returns [negative; positive] stacked along the batch
            uncond_embeds, cond_embeds = embeds.chunk(2)
            uncond = {"class_labels": uncond_embeds}
        else:
            cond_embeds, uncond = embeds, None
        return Conditioning(
            prompts=prompts,
            cond={"class_labels": cond_embeds},
            uncond=uncond,
            guidance_scale=scale,
            negative_prompts=negatives,
        )

    # ---------------------------------------------------------------- schedule
    def _ddim_scheduler(self):
        """A fresh DDIM scheduler with the pipeline's scheduler config (the pipeline's own is untouched)."""
        from diffusers import DDIMScheduler

        own = self.pipeline.scheduler
        if isinstance(own, DDIMScheduler):
            return type(own).from_config(own.config)
        # e.g. a user swapped in PNDM/LMS: keep its betas and prediction type, step with DDIM
        return DDIMScheduler.from_config(own.config)

    def schedule(self, num_steps: int) -> Schedule:
        """DDIM timesteps (K) and alpha_bar values (K+1) for ``num_steps`` steps.

        ``alphas_cumprod[k]`` is alpha_bar at ``timesteps[k]``; the last entry is the alpha_bar the final
        step lands on as ``DDIMScheduler.step`` computes it: ``prev_t = t - T // K`` and
        ``final_alpha_cumprod`` when ``prev_t < 0``.
        """
        num_steps = check_num_steps(num_steps)
        sched = self._ddim_scheduler()
        sched.set_timesteps(num_steps, device="cpu")
        timesteps = sched.timesteps.to(torch.long)
        alphas = sched.alphas_cumprod.to(torch.float32)
        final = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float32).reshape(())
        ratio = sched.config.num_train_timesteps // sched.num_inference_steps

        def alpha_at(t: int) -> Tensor:
            return alphas[t] if t >= 0 else final

        # DDIM steps from t to t - T//K. With "leading" spacing (the published config) that is the next
        # timestep, so K+1 alpha_bar values describe the whole trajectory; with other spacings the
        # scheduler itself lands between timesteps and a K+1 schedule cannot reproduce it.
        prev = [int(t) - ratio for t in timesteps]
        if any(p != int(n) for p, n in zip(prev[:-1], timesteps[1:])):
            warnings.warn(
                f"DDIM with timestep_spacing={sched.config.timestep_spacing!r} steps to t - {ratio}, not to the next "
                "timestep; mmalign's sampler will follow the listed timesteps and differ from the pipeline",
                stacklevel=2,
            )
        alphas_cumprod = torch.stack([alpha_at(int(t)) for t in timesteps] + [alpha_at(prev[-1])])
        return Schedule(
            kind="diffusion",
            timesteps=timesteps,
            prediction_type=sched.config.prediction_type,
            alphas_cumprod=alphas_cumprod,
        )

    # ---------------------------------------------------------------- denoiser
    def predict(self, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor], shared: dict[str, Any]) -> Tensor:
        """One UNet call: ``latents`` B,C,h,w (float32), ``timestep`` scalar or (B,) or (B/n,) integer
        training timesteps, ``cond["class_labels"]`` B,D. Returns the UNet output B,C,h,w in float32."""
        unet = self.pipeline.unet
        dtype = unet.dtype
        batch = latents.shape[0]
        t = torch.as_tensor(timestep, device=latents.device).reshape(-1)
        if t.numel() not in (1, batch):
            # per-sample timesteps given for B rows while the batch was doubled for CFG ([uncond; cond])
            if batch % t.numel():
                raise ValueError(f"{t.numel()} timesteps for a batch of {batch} latents")
            t = t.repeat(batch // t.numel())
        if t.numel() == 1:
            t = t.reshape(())
        out = unet(
            latents.to(dtype),
            t,
            encoder_hidden_states=None,
            class_labels=cond["class_labels"].to(device=latents.device, dtype=dtype),
            return_dict=False,
        )[0]
        return out.float()

    # ---------------------------------------------------------------- decoding
    def decode(self, latents: Tensor) -> Tensor:
        """Latents B,C,h,w -> waveform B,1,N float32 in [-1,1] (N = :attr:`num_samples`), differentiable.

        VAE decode to a mel spectrogram B,1,T,M, vocoder to B,N', then cut to the requested duration as
        the pipeline does, and clamp to the audio range.
        """
        pipe = self.pipeline
        vae = pipe.vae
        z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        mel = vae.decode(z, return_dict=False)[0]  # B,1,T,M
        vocoder = pipe.vocoder
        waveform = vocoder(mel.squeeze(1).to(vocoder.dtype))  # B,N'
        waveform = waveform[:, : self.num_samples].float()
        return waveform.clamp(-1.0, 1.0).unsqueeze(1)


__all__ = ["AudioLDMAdapter"]

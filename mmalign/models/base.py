"""The model-adapter interface: what alignment needs from a diffusers pipeline, without forking it.

An adapter holds a loaded diffusers pipeline and exposes small, typed pieces:

- :meth:`ModelAdapter.encode_prompts` -> :class:`Conditioning` (with/without CFG, negative prompts);
- :meth:`ModelAdapter.schedule` -> :class:`Schedule` (the pipeline's own timesteps and sigmas/alphas);
- :meth:`ModelAdapter.denoise` -> the model output (velocity / epsilon / v) with guidance applied;
- :meth:`ModelAdapter.init_noise`, :meth:`ModelAdapter.latent_shape`;
- :meth:`ModelAdapter.decode` -> canonical media (image ``B,3,H,W`` / video ``B,T,3,H,W`` in [0,1];
  audio ``B,C,N`` in [-1,1] at :attr:`ModelAdapter.sample_rate`);
- :meth:`ModelAdapter.add_lora` attaches a peft LoRA to the denoiser with per-family target modules.

Latents are in the pipeline's own ``latents=`` layout (packed tokens for FLUX, ``B,F,C,h,w`` for
CogVideoX, ...), so an mmalign trajectory can be handed back to ``pipeline(latents=...)``.
Sampling math runs in float32; only the denoiser call is cast to the pipeline's dtype.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from ..hub import env_offline

Modality = Literal["image", "video", "audio"]
PredictionType = Literal["flow", "epsilon", "v_prediction"]


def check_prompts(prompts: Sequence[str] | str, what: str = "prompts") -> list[str]:
    """Validate a prompt list: a non-empty list of strings (a lone string becomes a list of one)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{what}: the prompt list is empty; give at least one prompt")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what}: entries {bad[:5]} are not strings ({type(prompts[bad[0]]).__name__})")
    return prompts


def check_negative_prompts(negative_prompts: Sequence[str] | str | None, batch_size: int) -> list[str] | None:
    """Validate negative prompts for ``batch_size`` prompts: None stays None; a single string applies to
    every prompt; a list must hold one string per prompt ("" entries are allowed)."""
    if negative_prompts is None:
        return None
    if isinstance(negative_prompts, str):
        return [negative_prompts] * batch_size
    negative = check_prompts(negative_prompts, "negative_prompts")
    if len(negative) != batch_size:
        raise ValueError(
            f"negative_prompts: {len(negative)} negative prompts for {batch_size} prompts; "
            "give one per prompt, or a single string for all"
        )
    return negative


@dataclass
class Conditioning:
    """Encoded prompts, ready for :meth:`ModelAdapter.denoise`.

    ``cond`` / ``uncond`` map denoiser keyword names to tensors whose first dimension is the batch B
    (e.g. ``encoder_hidden_states``: B,S,D). ``shared`` holds keyword arguments without a batch
    dimension (e.g. FLUX ``txt_ids``) that are passed as they are. ``uncond`` is None when
    classifier-free guidance is off (``guidance_scale <= 1``) or the family has no unconditional branch.
    """

    prompts: list[str]
    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None = None
    guidance_scale: float = 1.0
    negative_prompts: list[str] | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def do_cfg(self) -> bool:
        return self.uncond is not None and self.guidance_scale > 1.0

    def select(self, index: Tensor | Sequence[int]) -> "Conditioning":
        """The conditioning of rows ``index`` (e.g. a training minibatch of a rollout)."""
        rows = index.tolist() if isinstance(index, Tensor) else list(index)
        idx = torch.as_tensor(rows, dtype=torch.long)

        def pick(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            return None if d is None else {k: v[idx.to(v.device)] for k, v in d.items()}

        return Conditioning(
            prompts=[self.prompts[i] for i in rows],
            cond=pick(self.cond),
            uncond=pick(self.uncond),
            guidance_scale=self.guidance_scale,
            negative_prompts=None if self.negative_prompts is None else [self.negative_prompts[i] for i in rows],
            shared=dict(self.shared),
        )

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate conditionings of consecutive row chunks (same guidance and shared inputs)."""
        if not parts:
            raise ValueError("Conditioning.cat needs at least one part")
        first = parts[0]

        def join(dicts: list[dict[str, Tensor] | None]) -> dict[str, Tensor] | None:
            return None if dicts[0] is None else {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}

        negs = [p.negative_prompts for p in parts]
        return Conditioning(
            prompts=[q for p in parts for q in p.prompts],
            cond=join([p.cond for p in parts]),
            uncond=join([p.uncond for p in parts]),
            guidance_scale=first.guidance_scale,
            negative_prompts=None if negs[0] is None else [q for n in negs for q in n],
            shared=dict(first.shared),
        )

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each prompt's conditioning repeated ``n`` times in place (for groups of samples per prompt)."""
        return self.select([i for i in range(len(self)) for _ in range(n)])


@dataclass
class Schedule:
    """The discretisation a pipeline uses for ``num_steps`` steps.

    flow:      ``sigmas`` (K+1, float32, decreasing to the last value, usually 0) and the denoiser's
               ``timesteps`` (K); x_sigma = (1 - sigma) * x_data + sigma * noise.
    diffusion: ``alphas_cumprod`` (K+1, float32): alpha_bar at each step's timestep and, last, the
               alpha_bar the final step lands on (the scheduler's ``final_alpha_cumprod``);
               ``timesteps`` (K) are the integer training timesteps.
    """

    kind: Literal["flow", "diffusion"]
    timesteps: Tensor
    prediction_type: PredictionType
    sigmas: Tensor | None = None
    alphas_cumprod: Tensor | None = None

    def __post_init__(self) -> None:
        k = len(self.timesteps)
        if k < 1:
            raise ValueError("a schedule needs at least one step")
        if self.kind == "flow":
            if self.sigmas is None or len(self.sigmas) != k + 1:
                raise ValueError(f"flow schedule needs K+1={k + 1} sigmas, got {None if self.sigmas is None else len(self.sigmas)}")
        elif self.kind == "diffusion":
            if self.alphas_cumprod is None or len(self.alphas_cumprod) != k + 1:
                raise ValueError("diffusion schedule needs K+1 alphas_cumprod values")
        else:
            raise ValueError(f"unknown schedule kind {self.kind!r}")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def check_num_steps(num_steps: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return num_steps


ADAPTER_OPTIONS_FILE = "mmalign_adapter.json"


def saved_adapter_kwargs(model_id: str | os.PathLike) -> dict[str, Any]:
    """Adapter defaults a local pipeline directory ships in ``mmalign_adapter.json``
    (``{"adapter_kwargs": {...}}``, e.g. the ``max_sequence_length`` a model was trained with); {} for
    hub ids and directories without the file. Explicit ``adapter_kwargs`` override them."""
    path = Path(str(model_id)) / ADAPTER_OPTIONS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        kwargs = data["adapter_kwargs"]
        if not isinstance(kwargs, dict):
            raise TypeError("adapter_kwargs is not a mapping")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise OSError(f"{path} is corrupt: {err}") from None
    return kwargs


class ModelAdapter(ABC):
    """Base class of every family adapter. Subclasses set the class attributes and the abstract methods.

    Subclasses register themselves in :data:`mmalign.registry.MODELS` (lazily, from
    ``mmalign/models/__init__.py``) under :attr:`family`.
    """

    family: ClassVar[str]
    modality: ClassVar[Modality] = "image"
    #: diffusers pipeline class name used by :meth:`from_pretrained`
    pipeline_class: ClassVar[str]
    #: a published checkpoint of this family (real HF id; never downloaded by tests)
    default_model_id: ClassVar[str]
    #: module names (peft ``target_modules``) a LoRA attaches to by default
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    #: the family's usual guidance scale when none is given
    default_guidance_scale: ClassVar[float] = 1.0
    #: keyword defaults :meth:`from_pretrained` passes to the pipeline's ``from_pretrained`` (the
    #: caller's keywords take precedence), e.g. components the family never uses
    pretrained_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, pipeline: Any, *, height: int | None = None, width: int | None = None) -> None:
        self.pipeline = pipeline
        self.height = height
        self.width = width

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        model_id: str | os.PathLike | None = None,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        offline: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        variant: str | None = None,
        adapter_kwargs: dict[str, Any] | None = None,
        **pipeline_kwargs: Any,
    ) -> "ModelAdapter":
        """Load the family's diffusers pipeline by HF id or local directory and wrap it.

        ``offline=True`` (or the env var ``HF_HUB_OFFLINE=1`` / ``MMALIGN_OFFLINE=1``) loads from local
        files only, failing fast instead of downloading. ``pipeline_kwargs`` go to the pipeline's
        ``from_pretrained`` on top of the family's :attr:`pretrained_defaults`.
        """
        import diffusers

        model_id = model_id or cls.default_model_id
        if offline is None:
            offline = env_offline()
        pipe_cls = getattr(diffusers, cls.pipeline_class)
        kwargs: dict[str, Any] = {**cls.pretrained_defaults, **_absent_components(pipe_cls, model_id), **pipeline_kwargs}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        if revision is not None:
            kwargs["revision"] = revision
        if variant is not None:
            kwargs["variant"] = variant
        try:
            pipe = pipe_cls.from_pretrained(str(model_id), local_files_only=offline, **kwargs)
        except (OSError, ValueError) as err:
            where = "local files only (offline)" if offline else "the hub or local files"
            raise OSError(f"could not load {cls.family} pipeline {model_id!r} from {where}: {err}") from err
        pipe.to(device)
        return cls(pipe, **{**saved_adapter_kwargs(model_id), **(adapter_kwargs or {})})

    # ---------------------------------------------------------------- properties
    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The network a trainer updates (UNet or transformer)."""

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def sample_rate(self) -> int | None:
        """Audio sample rate in Hz (audio families only)."""
        return None

    @property
    def fps(self) -> float | None:
        """Frames per second of decoded video (video families only)."""
        return None

    # ---------------------------------------------------------------- the pieces
    @abstractmethod
    def encode_prompts(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
    ) -> Conditioning:
        """Encode prompts (B) and, when guidance is on, the negative prompts ("" by default)."""

    @abstractmethod
    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of a batch of initial latents in the pipeline's ``latents=`` layout."""

    @abstractmethod
    def schedule(self, num_steps: int) -> Schedule:
        """The pipeline's own timesteps and sigmas/alphas for ``num_steps`` steps."""

    @abstractmethod
    def predict(self, latents: Tensor, timestep: Tensor, cond: dict[str, Tensor], shared: dict[str, Any]) -> Tensor:
        """One raw denoiser call on a batch (no guidance). ``latents`` float32; returns float32."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Final latents -> canonical media (see module docstring). Differentiable w.r.t. ``latents``."""

    #: True when the VAE decodes video frames causally, so that a latent prefix decodes to exactly the
    #: first frames of the whole video (:meth:`decode_prefix` then saves work)
    causal_frame_decoding: ClassVar[bool] = False

    def decode_prefix(self, latents: Tensor, num_frames: int) -> Tensor:
        """Video latents -> the first ``num_frames`` frames B,num_frames,3,H,W of :meth:`decode`. Here:
        decode everything, then cut; families with :attr:`causal_frame_decoding` decode only the latent
        frames those need."""
        if self.modality != "video":
            raise ValueError(f"{self.family}: decode_prefix is for video models, this one makes {self.modality}")
        video = self.decode(latents)
        if not 1 <= int(num_frames) <= video.shape[1]:
            raise ValueError(f"num_frames must be in [1, {video.shape[1]}], got {num_frames}")
        return video[:, : int(num_frames)]

    @torch.no_grad()  # the VAE is frozen: encoded images are training data, not trained
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images B,3,H,W in [0,1] (at the adapter's image size) -> latents B,*L in the pipeline's
        ``latents=`` layout: the inverse of :meth:`decode` (VAE encoder, then the latent normalisation
        that decode undoes: ``(z - mean) * scaling / std`` with ``latents_mean``/``latents_std``, else
        ``(z - shift_factor) * scaling``; packed into tokens with the pipeline's ``_pack_latents`` where
        the family packs, e.g. FLUX). The VAE posterior's mean, or a sample of it when ``generator`` is
        given (as diffusers' training scripts do). Image families with an ``AutoencoderKL``-style VAE."""
        if self.modality != "image":
            raise NotImplementedError(f"{self.family}: encode_images is for image families, this one makes {self.modality}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.family}: encode_images takes images B,3,H,W, got shape {tuple(images.shape)}")
        vae = self.pipeline.vae
        x = (images.float() * 2 - 1).to(device=next(vae.parameters()).device, dtype=vae.dtype)
        posterior = vae.encode(x).latent_dist
        z = (posterior.mean if generator is None else posterior.sample(generator)).float()
        cfg = vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            view = (1, z.shape[1], 1, 1)
            z = (z - torch.tensor(mean, device=z.device).view(view)) * cfg.scaling_factor / torch.tensor(std, device=z.device).view(view)
        else:
            z = (z - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor
        b = z.shape[0]
        expected = tuple(self.latent_shape(b))
        if tuple(z.shape) != expected and len(expected) == 3 and hasattr(self.pipeline, "_pack_latents"):
            z = self.pipeline._pack_latents(z, b, z.shape[1], z.shape[2], z.shape[3])
        if tuple(z.shape) != expected:
            raise ValueError(f"{self.family}: images of size {tuple(images.shape[-2:])} encode to latents {tuple(z.shape)}, "
                             f"expected {expected}: give images at the model's size")
        return z.to(self.device)

    def encode_media(self, media: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Media in the canonical layout of :meth:`decode`'s output -> latents B,*L (the inverse of
        :meth:`decode`). Images for image families (:meth:`encode_images`); video families override it."""
        if self.modality == "image":
            return self.encode_images(media, generator)
        raise NotImplementedError(f"{self.family}: encoding {self.modality} into latents is not implemented")

    def denoise(self, latents: Tensor, timestep: Tensor | float, conditioning: Conditioning) -> Tensor:
        """Model output for ``latents`` (B,*L) at ``timestep`` with classifier-free guidance applied.

        Returns float32 in the schedule's ``prediction_type`` (velocity for flow families).
        The unconditional and conditional halves run as one batch, ``[uncond, cond]``, like diffusers.
        """
        if latents.shape[0] != len(conditioning):
            raise ValueError(
                f"latents batch {latents.shape[0]} does not match conditioning batch {len(conditioning)}"
            )
        t = torch.as_tensor(timestep, device=latents.device)
        per_row = t.ndim > 0 and t.numel() > 1
        if per_row and t.shape[0] != latents.shape[0]:
            raise ValueError(f"{t.shape[0]} per-row timesteps for a batch of {latents.shape[0]} latents")
        if not conditioning.do_cfg:
            return self.predict(latents, t, conditioning.cond, conditioning.shared).float()
        both = {k: torch.cat([conditioning.uncond[k], v]) for k, v in conditioning.cond.items()}
        t2 = torch.cat([t, t]) if per_row else t
        out = self.predict(torch.cat([latents, latents]), t2, both, conditioning.shared).float()
        uncond, cond = out.chunk(2)
        return uncond + conditioning.guidance_scale * (cond - uncond)

    def encode_in_chunks(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        guidance_scale: float | None = None,
        micro_batch: int | None = None,
    ) -> Conditioning:
        """:meth:`encode_prompts` in fixed-size chunks (see :meth:`denoise_in_chunks` for why)."""
        prompts = check_prompts(prompts)
        negative_prompts = check_negative_prompts(negative_prompts, len(prompts))
        if micro_batch is None or micro_batch >= len(prompts):
            return self.encode_prompts(prompts, negative_prompts, guidance_scale)
        parts = []
        for start in range(0, len(prompts), micro_batch):
            end = start + micro_batch
            neg = None if negative_prompts is None else negative_prompts[start:end]
            parts.append(self.encode_prompts(prompts[start:end], neg, guidance_scale))
        return Conditioning.cat(parts)

    def denoise_in_chunks(
        self, latents: Tensor, timestep: Tensor | float, conditioning: Conditioning, micro_batch: int | None = None
    ) -> Tensor:
        """:meth:`denoise` over rows in fixed-size chunks of ``micro_batch`` (None: the whole batch).

        Why: a denoiser's float result for one row can depend on how many rows share the call
        (matmul blocking, kernel choice). Sampling and training with the same ``micro_batch`` make
        every row's computation identical, so recomputed log-probs equal the recorded ones bit for
        bit and the PPO ratio is exactly 1 at any training batch size (a multiple of ``micro_batch``).
        """
        b = latents.shape[0]
        if micro_batch is None or micro_batch >= b:
            return self.denoise(latents, timestep, conditioning)
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        outs = []
        for start in range(0, b, micro_batch):
            rows = list(range(start, min(start + micro_batch, b)))
            t = torch.as_tensor(timestep)
            t_rows = t[start : rows[-1] + 1] if t.ndim > 0 and t.numel() == b and b > 1 else timestep  # per-row timesteps
            outs.append(self.denoise(latents[start : rows[-1] + 1], t_rows, conditioning.select(rows)))
        return torch.cat(outs)

    def init_noise(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        *,
        group_size: int = 1,
    ) -> Tensor:
        """Standard-normal initial latents (float32). With ``group_size > 1`` the batch is made of
        ``batch_size // group_size`` groups whose members share one noise (DanceGRPO-style)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group_size < 1 or batch_size % group_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of group_size {group_size}")
        shape = self.latent_shape(batch_size // group_size)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(self.device)
        return noise.repeat_interleave(group_size, dim=0) if group_size > 1 else noise

    # ---------------------------------------------------------------- training helpers
    def add_lora(
        self,
        rank: int = 8,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> nn.Module:
        """Attach a peft LoRA to :attr:`denoiser` (in place) and return it.

        Only LoRA weights are then trainable. ``disable_lora()`` gives the frozen base (the reference
        model for KL/DPO without a second copy in memory).
        """
        from peft import LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=list(target_modules or self.lora_target_modules),
        )
        self.freeze()
        self.denoiser.add_adapter(config, adapter_name=adapter_name)
        return self.denoiser

    def freeze(self) -> None:
        """Turn off gradients of every module of the pipeline (text encoders, VAE, vocoder, denoiser),
        so a reward backpropagated through :meth:`decode` accumulates nothing on frozen weights."""
        for component in self.pipeline.components.values():
            if isinstance(component, nn.Module):
                component.requires_grad_(False)

    @contextmanager
    def disable_lora(self) -> Iterator[None]:
        """Run the denoiser without its LoRA layers inside the block (the reference policy)."""
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, modality={self.modality!r}, dtype={self.dtype})"


def _absent_components(pipe_cls: Any, model_id: Any) -> dict[str, None]:
    """For a local pipeline directory: components the pipeline class takes but ``model_index.json`` does
    not list (or lists as null), passed as None. ``save_pretrained`` omits components that were None
    (e.g. SD3 without T5), and ``from_pretrained`` would otherwise refuse to load the directory."""
    import inspect
    import json
    from pathlib import Path

    index = Path(str(model_id)) / "model_index.json"
    if not index.is_file():
        return {}
    try:
        listed = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # from_pretrained reports the corrupt file itself
    params = inspect.signature(pipe_cls.__init__).parameters
    return {
        name: None
        for name, p in params.items()
        if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
        and (name not in listed or listed[name] in (None, [None, None]))
    }


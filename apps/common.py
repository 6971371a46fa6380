"""Shared pieces of the Gradio apps: settings and bounds, cached models and rewards, checkpoints,
seeds and reward specs parsed from text, scoring, and media rendered as self-contained HTML.

Nothing here imports gradio, so the callbacks' logic is testable (and usable) without it.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

#: ``progress(fraction, desc=...)``: gr.Progress in the apps, a no-op (or a recorder) in tests
ProgressFn = Callable[..., Any]

#: the shipped embedded models, the apps' defaults (paths relative to the repository / working directory)
EMBEDDED_MODEL = "assets/shapeworld-sd3"
EMBEDDED_CLIP = "assets/shapeworld-clip"

#: reward specs offered in the apps: ``name key=value ...`` (values parsed as YAML)
IMAGE_REWARD_CHOICES = ["shapeeval", f"clipscore model_id={EMBEDDED_CLIP}", "jpeg_size", "tiny:clipscore", "tiny:aesthetic"]


def _registered(names: Sequence[str]) -> list[str]:
    """Those of ``names`` that are registered rewards (the embedded video / audio verifiers, when shipped)."""
    from mmalign.rewards import REWARDS

    known = set(REWARDS.names())
    return [n for n in names if n in known]


VIDEO_REWARD_CHOICES = [*_registered(["motioneval"]), "tiny:temporal_consistency", "tiny:video_frames"]
AUDIO_REWARD_CHOICES = [*_registered(["toneeval"]), "tiny:clap"]
REWARD_CHOICES = IMAGE_REWARD_CHOICES + VIDEO_REWARD_CHOICES + AUDIO_REWARD_CHOICES
DEFAULT_REWARDS = ["shapeeval", f"clipscore model_id={EMBEDDED_CLIP}"]
MODEL_CHOICES = [EMBEDDED_MODEL, "tiny:sd3", "tiny:wan", "tiny:audioldm"]


def model_choices(default: str = EMBEDDED_MODEL, assets: str | os.PathLike = "assets") -> list[str]:
    """The models offered in the model fields: ``default``, every pipeline directory shipped under
    ``assets/`` (e.g. the embedded video / audio models when present), then the tiny families."""
    shipped = sorted(str(Path(assets) / p.parent.name) for p in Path(assets).glob("*/model_index.json"))
    return list(dict.fromkeys([default, *shipped, *MODEL_CHOICES]))


def noop_progress(*args: Any, **kwargs: Any) -> None:
    """A progress callback that ignores its updates."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one click may ask for (every callback checks them with a clear message)."""

    max_steps: int = 100
    max_samples: int = 16
    max_side: int = 2048
    max_iterations: int = 50
    max_candidates: int = 16
    max_files: int = 64


@dataclass
class AppSettings:
    """What every app is built with: the torch device and dtype for models and rewards, defaults and bounds."""

    device: str = "cpu"
    dtype: str = "float32"
    model: str = EMBEDDED_MODEL
    limits: Limits = field(default_factory=Limits)
    cache_size: int = 4
    #: initial values of the generation controls (tests and demos lower them)
    default_steps: int = 8
    default_samples: int = 2
    default_iterations: int = 8
    #: reward specs ticked at start (``name key=value ...``)
    rewards: list[str] = field(default_factory=lambda: list(DEFAULT_REWARDS))
    #: side B's inference-time method at start (side A samples plainly): none, reno or best_of_n
    side_b_inference: str = "reno"

    @property
    def reward_choices(self) -> list[str]:
        """The offered reward specs: the shipped list plus any start-up reward not in it."""
        return list(dict.fromkeys([*self.rewards, *REWARD_CHOICES]))

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {self.cache_size}")
        if self.side_b_inference not in ("none", "reno", "best_of_n"):
            raise ValueError(f"side_b_inference must be none, reno or best_of_n, got {self.side_b_inference!r}")

    @staticmethod
    def auto_device() -> str:
        """``cuda`` when a GPU is visible, else ``cpu``."""
        return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- bounds
def check_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``, or a ValueError that names the field and the bound."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")
    if not low <= int(number) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {int(number)}")
    return int(number)


def check_float(value: Any, name: str, low: float, high: float) -> float:
    """``value`` as a finite float in ``[low, high]``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return number


def check_prompt(prompt: Any) -> str:
    """A non-empty prompt, stripped."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("enter a prompt (or pick one from a prompt suite)")
    return prompt.strip()


def parse_seeds(text: Any, count: Any, limits: Limits) -> list[int]:
    """Seeds from the seed field: ``"7"`` gives ``count`` consecutive seeds 7, 8, ...; ``"3, 9, 12"``
    gives exactly those (``count`` is then ignored). Bounded by ``limits.max_samples``."""
    raw = str(text if text is not None else "").strip() or "0"
    parts = [p.strip() for p in raw.replace(";", ",").split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"seeds must be a whole number (the first seed) or a comma-separated list of them, got {raw!r}") from None
    if any(v < 0 or v >= 2**63 for v in values):
        raise ValueError(f"seeds must be in [0, 2^63), got {raw!r}")
    if len(values) == 1:
        n = check_int(count, "samples", 1, limits.max_samples)
        return [values[0] + i for i in range(n)]
    if len(values) > limits.max_samples:
        raise ValueError(f"{len(values)} seeds given; at most {limits.max_samples} samples per side")
    if len(set(values)) != len(values):
        raise ValueError(f"seeds repeat in {raw!r}; give distinct seeds")
    return values


def parse_reward_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"clipscore model_id=assets/shapeworld-clip batch_size=8"`` -> ``("clipscore", {...})``
    (option values parsed as YAML, as in ``mmalign score -o``)."""
    import yaml

    tokens = str(spec).split()
    if not tokens:
        raise ValueError("empty reward spec")
    options: dict[str, Any] = {}
    for token in tokens[1:]:
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ValueError(f"reward spec {spec!r}: option {token!r} is not key=value")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"reward spec {spec!r}: option {token!r} is not a valid value ({err})") from None
    return tokens[0], options


def selected_rewards(choices: Sequence[str] | None, custom: str | None = None) -> list[str]:
    """The reward specs ticked in the checkbox group plus one per non-empty line of ``custom``,
    in order, without repeats."""
    specs = [c for c in (choices or []) if c and c.strip()]
    specs += [line.strip() for line in (custom or "").splitlines() if line.strip()]
    seen: list[str] = []
    for s in specs:
        if s not in seen:
            seen.append(s)
    return seen


# ----------------------------------------------------------------------------- caches
class LRUCache:
    """A small thread-safe least-recently-used cache: ``get(key, build)`` builds each key once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.RLock()
        self.builds = 0

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = build()
            self.builds += 1
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return value

    def __len__(self) -> int:
        return len(self._items)


class Resources:
    """Models and rewards of one app process, each loaded once (LRU-bounded) on the app's device."""

    def __init__(self, settings: AppSettings | None = None) -> None:
        self.settings = settings or AppSettings()
        self.models = LRUCache(self.settings.cache_size)
        self.rewards = LRUCache(4 * self.settings.cache_size)
        #: generation mutates model state (LoRA layers, requires_grad in ReNO): one at a time
        self.lock = threading.RLock()

    def model(self, name: str, checkpoint: str | None = None):
        """The adapter of ``name`` (``tiny:<family>``, a pipeline directory or an HF id), with the
        trained weights of ``checkpoint`` applied when given (see :func:`apply_checkpoint`)."""
        name = (name or "").strip()
        if not name:
            raise ValueError("choose a model: a pipeline directory (e.g. assets/shapeworld-sd3), tiny:<family> or an HF id")
        checkpoint = (checkpoint or "").strip() or None
        key = (name, checkpoint, self.settings.device, self.settings.dtype)
        return self.models.get(key, lambda: self._load_model(name, checkpoint))

    def _load_model(self, name: str, checkpoint: str | None):
        from mmalign.loading import load_model

        name = resolve_asset(name)
        if not name.startswith("tiny:") and not Path(name).exists() and name.startswith(("assets/", "runs/", "./", "../", "/")):
            raise ValueError(f"model directory {name!r} does not exist (working directory: {os.getcwd()})")
        adapter = load_model(name, device=self.settings.device, torch_dtype=self.settings.dtype)
        if checkpoint:
            apply_checkpoint(adapter, checkpoint)
        if hasattr(adapter.pipeline, "set_progress_bar_config"):
            adapter.pipeline.set_progress_bar_config(disable=True)
        return adapter

    def reward(self, spec: str):
        """The reward a spec names (``name key=value ...``), built once, in eval mode on the app's device."""
        name, options = parse_reward_spec(spec)
        key = (spec.strip(), self.settings.device)
        return self.rewards.get(key, lambda: self._load_reward(name, options))

    def _load_reward(self, name: str, options: dict[str, Any]):
        from mmalign.rewards.combine import resolve_reward

        model_id = options.get("model_id")
        if isinstance(model_id, str):
            model_id = options["model_id"] = resolve_asset(model_id)
            if model_id.startswith(("assets/", "./", "../", "runs/")) and not Path(model_id).exists():
                raise ValueError(f"reward {name}: model_id {model_id!r} does not exist (working directory: {os.getcwd()})")
        return resolve_reward(name, **options).to(self.settings.device).eval()


def resolve_asset(path: str) -> str:
    """``assets/...`` relative to the working directory when it is there, else the clone's own ``assets/``
    next to the ``mmalign`` package (so the defaults work from any directory of a clone); other names as given."""
    if not path.startswith("assets/") or Path(path).exists():
        return path
    import mmalign

    in_repo = Path(mmalign.__file__).resolve().parent.parent / path
    return str(in_repo) if in_repo.exists() else path


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """The directory holding trained weights: a trainer checkpoint (``trainer_state.json`` +
    ``trained.safetensors``), a run directory (its latest checkpoint), or a diffusers LoRA directory
    (``pytorch_lora_weights.safetensors``)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint {str(p)!r} does not exist")
    pointer = p / "checkpoints" / "latest"
    if pointer.is_file():
        p = p / "checkpoints" / pointer.read_text().strip()
    elif (p / "checkpoints").is_dir():
        done = sorted(c for c in (p / "checkpoints").glob("step_*") if (c / "trainer_state.json").is_file())
        if not done:
            raise ValueError(f"run {str(path)!r} has no complete checkpoint under checkpoints/")
        p = done[-1]
    if (p / "trainer_state.json").is_file() and (p / "trained.safetensors").is_file():
        return p
    if (p / "pytorch_lora_weights.safetensors").is_file():
        return p
    raise ValueError(f"{str(path)!r} is neither a training checkpoint (trainer_state.json + trained.safetensors), "
                     "a run directory with checkpoints/, nor a diffusers LoRA directory (pytorch_lora_weights.safetensors)")


def apply_checkpoint(adapter: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Load trained weights into ``adapter`` in place; returns what was loaded.

    A trainer checkpoint with ``lora: true`` attaches a LoRA of the run's rank, alpha and target modules
    and loads it; a full-finetuning checkpoint overwrites the denoiser's weights; a diffusers LoRA
    directory goes through the pipeline's ``load_lora_weights``. Mismatching tensors raise naming them.
    """
    directory = resolve_checkpoint_dir(path)
    if (directory / "trainer_state.json").is_file():
        return _apply_trainer_checkpoint(adapter, directory)
    if not hasattr(adapter.pipeline, "load_lora_weights"):
        raise ValueError(f"{type(adapter.pipeline).__name__} cannot load diffusers LoRA weights from {directory}")
    adapter.pipeline.load_lora_weights(str(directory))
    return {"kind": "diffusers_lora", "path": str(directory)}


def _apply_trainer_checkpoint(adapter: Any, directory: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((directory / "trainer_state.json").read_text())
    config = state.get("config") or {}
    weights = load_file(str(directory / "trained.safetensors"))
    if state.get("lora"):
        lora = config.get("lora") or {}
        adapter.add_lora(int(lora.get("rank", 8)), lora.get("alpha"), lora.get("target_modules"))
    params = dict(adapter.denoiser.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        trained_on = (config.get("model") or {}).get("name")
        raise ValueError(f"checkpoint {directory} does not fit this model (trained on {trained_on!r}): "
                         f"{len(missing)} tensors have no parameter here, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            target = params[name]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint {directory}: tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"the model's has {tuple(target.shape)}")
            target.copy_(tensor.to(target.device, target.dtype))
    adapter.denoiser.eval()
    return {"kind": "lora" if state.get("lora") else "full", "path": str(directory), "step": state.get("step"),
            "algorithm": state.get("algorithm"), "trained_on": (config.get("model") or {}).get("name")}


def with_resolution(adapter: Any, height: Any, width: Any, limits: Limits) -> Any:
    """The adapter itself when both sizes are 0 / empty (the model's default), else a shallow copy
    sampling at ``height`` x ``width`` (image and video families; sizes checked by the adapter)."""
    h = 0 if height in (None, "") else check_int(height, "height", 0, limits.max_side)
    w = 0 if width in (None, "") else check_int(width, "width", 0, limits.max_side)
    if h == 0 and w == 0:
        return adapter
    if adapter.modality == "audio" or not hasattr(adapter, "height"):
        raise ValueError(f"{adapter.family} makes {adapter.modality}: height/width do not apply (leave them at 0)")
    import copy

    resized = copy.copy(adapter)
    resized.height = h or None
    resized.width = w or None
    try:
        resized.latent_shape(1)
    except ValueError as err:
        raise ValueError(f"resolution {h or 'default'} x {w or 'default'}: {err}") from None
    return resized


# ----------------------------------------------------------------------------- sampling helpers
def media_kwargs(adapter: Any) -> dict[str, Any]:
    """``fps`` / ``sample_rate`` for reward calls on the adapter's media (what the rewards need)."""
    return {k: v for k, v in (("fps", adapter.fps), ("sample_rate", adapter.sample_rate)) if v is not None}


def seeded_noise(adapter: Any, seeds: Sequence[int]) -> Tensor:
    """Initial latents, one row per seed: row i depends on ``seeds[i]`` alone, so both sides of a
    comparison (and any sample count) start from the same noise for the same seed."""
    rows = [adapter.init_noise(1, torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(rows)


# ----------------------------------------------------------------------------- scoring
@dataclass
class Score:
    """One reward's verdict on one sample."""

    reward: str
    score: float
    components: dict[str, float]
    reason: str | None = None
    higher_is_better: bool = True

    @property
    def valid(self) -> bool:
        return self.reason is None and math.isfinite(self.score)


def _component_value(value: Tensor, i: int) -> float | None:
    row = value[i] if value.ndim >= 1 and value.shape[0] > i else value
    if row.numel() == 0:
        return None
    return float(row.float().mean()) if row.numel() > 1 else float(row)


def score_samples(resources: Resources, specs: Sequence[str], samples: Any, prompts: list[str], modality: str,
                  extra: dict[str, Any] | None = None) -> list[list[Score]]:
    """Score every sample with every reward: ``result[i]`` is sample i's list of :class:`Score`
    (one per spec, in order). A reward of another modality than the samples is an error naming both."""
    per_sample: list[list[Score]] = [[] for _ in prompts]
    for spec in specs:
        reward = resources.reward(spec)
        if getattr(reward, "modality", modality) != modality:
            raise ValueError(f"reward {spec!r} scores {reward.modality} samples, but these are {modality} samples "
                             f"(pick a {modality} reward, e.g. {', '.join(choices_for(modality)[:2])})")
        with torch.no_grad():
            out = reward(samples, prompts, **(extra or {}))
        for i in range(len(prompts)):
            comps = {}
            for key, value in out.components.items():
                v = _component_value(value.detach().cpu(), i) if isinstance(value, Tensor) else None
                if v is not None:
                    comps[key] = v
            per_sample[i].append(Score(spec, float(out.scores[i]), comps, out.reasons[i],
                                       bool(getattr(reward, "higher_is_better", True))))
    return per_sample


def choices_for(modality: str) -> list[str]:
    """The offered reward specs for samples of ``modality``."""
    return {"image": IMAGE_REWARD_CHOICES, "video": VIDEO_REWARD_CHOICES, "audio": AUDIO_REWARD_CHOICES}.get(modality, [])


def mean_scores(rows: Sequence[Sequence[Score]]) -> dict[str, float]:
    """Per reward, the mean score over the samples it could score (NaN when none)."""
    out: dict[str, float] = {}
    if not rows:
        return out
    for j, first in enumerate(rows[0]):
        values = [r[j].score for r in rows if r[j].valid]
        out[first.reward] = sum(values) / len(values) if values else float("nan")
    return out


def format_number(x: float) -> str:
    """A short human form of a score (NaN shown as 'n/a')."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


# ----------------------------------------------------------------------------- media as HTML
def _upscale_factor(height: int, width: int, target: int = 192) -> int:
    return max(1, target // max(1, max(height, width)))


def image_data_uri(image: Tensor, display: int = 192) -> str:
    """3,H,W in [0,1] -> a PNG (small images, nearest-upscaled to about ``display`` px) or JPEG data URI."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr)
    factor = _upscale_factor(img.height, img.width, display)
    if factor > 1:
        img = img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    buf = io.BytesIO()
    if img.width * img.height > 512 * 512:
        img.save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    else:
        img.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def mp4_data_uri(video: Tensor, fps: float | None, display: int = 192) -> str | None:
    """T,3,H,W in [0,1] -> an H.264 MP4 data URI, or None where mmalign cannot write MP4 (no PyAV)."""
    from mmalign import media

    writer = getattr(media, "save_video_mp4", None)
    if writer is None:
        return None
    import tempfile

    factor = _upscale_factor(video.shape[-2], video.shape[-1], display)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "video.mp4"
        try:
            writer(video.detach().float().cpu(), path, fps=fps or 8.0, upscale=factor)
        except ImportError:
            return None
        data = path.read_bytes()
    return f"data:video/mp4;base64,{base64.b64encode(data).decode()}"


def gif_data_uri(video: Tensor, fps: float | None, display: int = 192) -> str:
    """T,3,H,W in [0,1] -> an animated, looping GIF data URI (plays in any browser)."""
    from PIL import Image

    arr = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    frames = [Image.fromarray(a) for a in arr]
    factor = _upscale_factor(frames[0].height, frames[0].width, display)
    if factor > 1:
        frames = [f.resize((f.width * factor, f.height * factor), Image.NEAREST) for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / max(fps or 8.0, 1e-3)), loop=0)
    return f"data:image/gif;base64,{base64.b64encode(buf.getvalue()).decode()}"


def wav_data_uri(audio: Tensor, sample_rate: int) -> str:
    """C,N in [-1,1] -> a 16-bit PCM WAV data URI."""
    import wave

    pcm = (audio.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).T.contiguous().cpu().numpy()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(audio.shape[0])
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return f"data:audio/wav;base64,{base64.b64encode(buf.getvalue()).decode()}"


def media_html(sample: Tensor, modality: str, *, fps: float | None = None, sample_rate: int | None = None,
               css_class: str = "mm-media", display: int = 192) -> str:
    """One sample as an HTML element: ``<img>`` (image), ``<video controls>`` (video as H.264 MP4 where
    PyAV is installed, else an animated GIF in an ``<img>``) or ``<audio controls>``."""
    if modality == "image":
        return f'<img class="{css_class}" src="{image_data_uri(sample, display)}" alt="image sample">'
    if modality == "video":
        mp4 = mp4_data_uri(sample, fps, display)
        if mp4 is not None:  # a real player (controls, looping) where PyAV can write H.264
            return f'<video class="{css_class} mm-video" controls autoplay loop muted playsinline src="{mp4}"></video>'
        return f'<img class="{css_class} mm-video" src="{gif_data_uri(sample, fps, display)}" alt="video sample">'
    if modality == "audio":
        if sample_rate is None:
            raise ValueError("audio needs its sample rate to be played")
        return f'<audio class="{css_class} mm-audio" controls src="{wav_data_uri(sample, sample_rate)}"></audio>'
    raise ValueError(f"unknown modality {modality!r}")


def scores_html(scores: Sequence[Score], css_class: str = "mm-scores") -> str:
    """A sample's rewards as a small table: score (or why it was not scored) and its components."""
    rows = []
    for s in scores:
        if s.valid:
            comps = ", ".join(f"{escape(k)} {format_number(v)}" for k, v in s.components.items())
            value = f'<b class="mm-score">{format_number(s.score)}</b>'
            detail = f'<span class="mm-components">{comps}</span>' if comps else ""
        else:
            value = '<b class="mm-score mm-invalid">not scored</b>'
            detail = f'<span class="mm-components">{escape(s.reason or "non-finite score")}</span>'
        arrow = "" if s.higher_is_better else " (lower is better)"
        rows.append(f'<tr><td class="mm-reward">{escape(s.reward)}{arrow}</td><td>{value}</td><td>{detail}</td></tr>')
    return f'<table class="{css_class}">{"".join(rows)}</table>'


APP_CSS = """
.mm-pairs {border-collapse: collapse; width: 100%;}
.mm-pairs > tbody > tr > td, .mm-pairs > tbody > tr > th {border: 1px solid #8884; padding: 6px; vertical-align: top; text-align: left;}
.mm-media {image-rendering: pixelated; max-width: 100%;}
table.mm-scores {font-size: 0.85em; border-collapse: collapse; border: none !important; width: auto; margin: 4px 0;}
table.mm-scores td {border: none !important; padding: 1px 8px 1px 0 !important; background: none !important;}
.mm-components {color: #888; font-size: 0.9em;}
.mm-better td {color: #1a7f37; }
.mm-invalid {color: #c33;}
.mm-strip {display: flex; flex-wrap: wrap; gap: 12px;}
.mm-strip figure {margin: 0; max-width: 240px;}
"""


def list_prompt_suites(roots: Sequence[str | os.PathLike] = ("assets/prompts", "configs/prompts")) -> list[str]:
    """Prompt files (``.txt``) found under ``roots`` (relative to the working directory)."""
    found: list[str] = []
    for root in roots:
        p = Path(root)
        if p.is_dir():
            found += sorted(str(f) for f in p.glob("*.txt"))
    return found


def read_suite(path: str | os.PathLike) -> list[str]:
    """The prompts of a suite file: ``category<TAB>prompt`` or plain lines (blank and # lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt suite {str(p)!r} does not exist")
    prompts = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            prompts.append(line.split("\t", 1)[1].strip() if "\t" in line else line)
    if not prompts:
        raise ValueError(f"prompt suite {str(p)!r} holds no prompts")
    return prompts

"""Reward preprocessing written once, in pure torch, so differentiable rewards pass gradients to pixels.

Image resize policies (all take B,3,H,W float in [0,1] and return B,3,S,S or the policy's size):
- ``shortest_edge_crop``: resize the shortest edge to ``size`` and centre-crop (CLIP, PickScore);
- ``longest_side_pad``: resize the longest side to ``size`` and pad to a square (HPSv2);
- ``pixel_budget``: resize to at most ``max_pixels`` keeping aspect, sides multiples of ``multiple`` (Qwen-VL).
Then ``normalize(mean, std)``. Audio: band-limited resampling without torchaudio.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Interpolation = Literal["bicubic", "bilinear", "nearest", "area"]


def _resize(images: Tensor, size: tuple[int, int], interpolation: Interpolation, antialias: bool = True) -> Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    kwargs = {"align_corners": False} if interpolation in ("bicubic", "bilinear") else {}
    aa = antialias and interpolation in ("bicubic", "bilinear")
    return F.interpolate(images, size=size, mode=interpolation, antialias=aa, **kwargs)


def resize_cover_crop(images: Tensor, size: tuple[int, int], interpolation: Interpolation = "bicubic") -> Tensor:
    """...,H,W -> ...,height,width: scaled (aspect kept) until it covers ``size``, then centre-cropped."""
    height, width = size
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    batched = images.dim() == 4
    out = _resize(images if batched else images[None], (nh, nw), interpolation)
    out = out if batched else out[0]
    top, left = (nh - height) // 2, (nw - width) // 2
    return out[..., top : top + height, left : left + width]


def resize_shortest_edge_crop(images: Tensor, size: int, interpolation: Interpolation = "bicubic") -> Tensor:
    """B,3,H,W -> B,3,size,size: shortest edge to ``size`` (aspect kept), then a centre crop."""
    return resize_cover_crop(images, (size, size), interpolation)


def resize_longest_side_pad(images: Tensor, size: int, interpolation: Interpolation = "bicubic", fill: float = 0.0) -> Tensor:
    """B,3,H,W -> B,3,size,size: longest side to ``size`` (aspect kept), then pad (centred) with ``fill``."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = _resize(images, (nh, nw), interpolation)
    ph, pw = size - nh, size - nw
    return F.pad(out, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def pixel_budget_size(h: int, w: int, max_pixels: int, min_pixels: int = 0, multiple: int = 28) -> tuple[int, int]:
    """(H', W'): aspect kept, H'*W' within [min_pixels, max_pixels], sides multiples of ``multiple``."""
    scale = 1.0
    if h * w > max_pixels:
        scale = math.sqrt(max_pixels / (h * w))
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (h * w))
    nh = max(multiple, int(round(h * scale / multiple)) * multiple)
    nw = max(multiple, int(round(w * scale / multiple)) * multiple)
    while nh * nw > max_pixels and max(nh, nw) > multiple:  # rounding up may overshoot the budget
        if nh >= nw:
            nh -= multiple
        else:
            nw -= multiple
    return nh, nw


def resize_pixel_budget(images: Tensor, max_pixels: int, min_pixels: int = 0, multiple: int = 28,
                        interpolation: Interpolation = "bicubic") -> Tensor:
    """B,3,H,W -> B,3,H',W' with :func:`pixel_budget_size`."""
    return _resize(images, pixel_budget_size(*images.shape[-2:], max_pixels, min_pixels, multiple), interpolation)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel, for B,3,H,W (or ...,3,H,W)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ImagePreprocess:
    """A resize policy plus normalisation, as one callable (B,3,H,W in [0,1] -> model input)."""

    policy: Literal["shortest_edge_crop", "longest_side_pad", "pixel_budget", "none"] = "shortest_edge_crop"
    size: int = 224
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_pixels: int = 224 * 224
    multiple: int = 28
    pad_fill: float = 0.0

    def resize(self, images: Tensor) -> Tensor:
        if self.policy == "shortest_edge_crop":
            return resize_shortest_edge_crop(images, self.size, self.interpolation)
        if self.policy == "longest_side_pad":
            return resize_longest_side_pad(images, self.size, self.interpolation, self.pad_fill)
        if self.policy == "pixel_budget":
            return resize_pixel_budget(images, self.max_pixels, 0, self.multiple, self.interpolation)
        if self.policy == "none":
            return images
        raise ValueError(f"unknown resize policy {self.policy!r}")

    def __call__(self, images: Tensor) -> Tensor:
        return normalize(self.resize(images.float()), self.mean, self.std)

    def to_dict(self) -> dict:
        return asdict(self)


def warn_if_truncated(tokenizer, texts: Sequence[str], max_length: int, what: str = "prompt") -> None:
    """Warn (never silently cut) when a text is longer than the model's token limit."""
    long = []
    for i, t in enumerate(texts):
        n = len(tokenizer(t, truncation=False)["input_ids"])
        if n > max_length:
            long.append((i, n))
    if long:
        warnings.warn(
            f"{len(long)} {what}(s) exceed the model's {max_length}-token limit and are truncated "
            f"(item {long[0][0]}: {long[0][1]} tokens)",
            stacklevel=3,
        )


def resample_audio(wave: Tensor, orig_rate: int, new_rate: int, lowpass: float = 0.99, width: int = 16) -> Tensor:
    """Band-limited resampling of ``...,N`` audio from ``orig_rate`` to ``new_rate`` Hz (no torchaudio).

    Windowed-sinc interpolation (Kaiser window, beta 8.6) evaluated at the output instants, with the cut-off
    at ``lowpass`` times the lower Nyquist frequency (Smith, "Digital Audio Resampling"). Differentiable.
    """
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return wave
    g = math.gcd(int(orig_rate), int(new_rate))
    up, down = int(new_rate) // g, int(orig_rate) // g
    cutoff = lowpass * min(1.0, up / down)  # relative to the input Nyquist
    n_in = wave.shape[-1]
    n_out = math.ceil(n_in * up / down)
    # phase p of output sample j: position j*down/up in input samples = base + p/up
    phases = torch.arange(up, dtype=torch.float64) / up
    taps = torch.arange(-width, width + 1, dtype=torch.float64)
    x = taps[None, :] - phases[:, None]  # up, 2w+1: distance from each input tap to the output instant
    beta = 8.6
    window = torch.special.i0(beta * torch.sqrt(torch.clamp(1 - (x / (width + 1)) ** 2, min=0))) / torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    kernel = (cutoff * torch.sinc(cutoff * x) * window).to(wave.dtype).to(wave.device)  # up, 2w+1
    flat = wave.reshape(-1, 1, n_in)
    padded = F.pad(flat, (width, width + down + 1))
    j = torch.arange(n_out, device=wave.device)
    base = (j * down) // up
    phase = (j * down) % up
    # gather windows of 2w+1 input samples around each output instant
    idx = base[:, None] + torch.arange(2 * width + 1, device=wave.device)[None, :]  # n_out, 2w+1
    windows = padded[:, 0, idx]  # R, n_out, 2w+1
    out = (windows * kernel[phase][None]).sum(-1)
    return out.reshape(*wave.shape[:-1], n_out)

"""Writing canonical media to disk: image grids (PNG), videos (animated GIF + frame-strip PNG), audio (WAV).

No torchaudio: WAV is written with the standard library (16-bit PCM).
"""
from __future__ import annotations

import math
import os
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def _to_uint8(images: Tensor) -> np.ndarray:
    """N,3,H,W in [0,1] -> N,H,W,3 uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images N,3,H,W, got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: Tensor, ncols: int | None = None, pad: int = 2) -> Tensor:
    """N,3,H,W -> 3,H',W' grid (white padding), ``ncols`` defaulting to about sqrt(N)."""
    n, _, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = torch.ones(3, nrows * (h + pad) + pad, ncols * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i].detach().float().cpu()
    return grid


def save_image(image: Tensor, path: str | os.PathLike, upscale: int = 1) -> Path:
    """3,H,W in [0,1] -> PNG, optionally upscaled by an integer factor (nearest) for tiny images."""
    from PIL import Image

    arr = _to_uint8(image[None])[0]
    img = Image.fromarray(arr)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_video_gif(video: Tensor, path: str | os.PathLike, fps: float = 8.0, upscale: int = 1) -> Path:
    """T,3,H,W in [0,1] -> animated GIF."""
    from PIL import Image

    frames = [Image.fromarray(a) for a in _to_uint8(video)]
    if upscale > 1:
        frames = [f.resize((f.width * upscale, f.height * upscale), Image.NEAREST) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / max(fps, 1e-3)), loop=0)
    return path


def save_wav(audio: Tensor, path: str | os.PathLike, sample_rate: int) -> Path:
    """C,N in [-1,1] -> 16-bit PCM WAV."""
    if audio.ndim != 2:
        raise ValueError(f"expected audio C,N, got {tuple(audio.shape)}")
    if not torch.isfinite(audio).all():
        raise ValueError("audio contains NaN or inf")
    pcm = (audio.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).T.contiguous().cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(audio.shape[0])
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return path


def read_wav(path: str | os.PathLike) -> tuple[Tensor, int]:
    """16-bit PCM WAV -> (C,N float32 in [-1,1], sample_rate)."""
    try:
        with wave.open(str(path), "rb") as f:
            if f.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit PCM WAV is supported, got {8 * f.getsampwidth()}-bit")
            ch, sr, n = f.getnchannels(), f.getframerate(), f.getnframes()
            data = np.frombuffer(f.readframes(n), dtype=np.int16)
    except (wave.Error, EOFError) as err:
        raise ValueError(f"{path}: corrupt or unsupported WAV file ({err})") from None
    return torch.from_numpy(data.reshape(-1, ch).T.astype(np.float32) / 32767.0), sr


def save_media(samples: Tensor, modality: str, out_dir: str | os.PathLike, *, prefix: str = "sample",
               sample_rate: int | None = None, fps: float | None = None, upscale: int = 1) -> list[Path]:
    """Write each sample of a batch (canonical layout for ``modality``) to ``out_dir``."""
    out_dir = Path(out_dir)
    paths = []
    for i, s in enumerate(samples):
        if modality == "image":
            paths.append(save_image(s, out_dir / f"{prefix}_{i:03d}.png", upscale))
        elif modality == "video":
            paths.append(save_video_gif(s, out_dir / f"{prefix}_{i:03d}.gif", fps or 8.0, upscale))
        elif modality == "audio":
            if sample_rate is None:
                raise ValueError("saving audio needs its sample_rate")
            paths.append(save_wav(s, out_dir / f"{prefix}_{i:03d}.wav", sample_rate))
        else:
            raise ValueError(f"unknown modality {modality!r}")
    return paths

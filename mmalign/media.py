"""Writing canonical media to disk: image grids (PNG), videos (animated GIF, H.264 MP4 via PyAV), audio (WAV).

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


_GIF_FRAME_TAG = "mmalign frame_ms="


def save_video_gif(video: Tensor, path: str | os.PathLike, fps: float = 8.0, upscale: int = 1) -> Path:
    """T,3,H,W in [0,1] -> animated GIF.

    GIF writers merge identical consecutive frames into one longer frame (a still clip becomes one
    frame); the file's comment records the frame duration so :func:`read_video` restores all T frames."""
    from PIL import Image

    frames = [Image.fromarray(a) for a in _to_uint8(video)]
    if upscale > 1:
        frames = [f.resize((f.width * upscale, f.height * upscale), Image.NEAREST) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ms = max(1, int(1000 / max(fps, 1e-3)))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0, comment=f"{_GIF_FRAME_TAG}{ms}")
    return path


def save_video_mp4(video: Tensor, path: str | os.PathLike, fps: float = 8.0, upscale: int = 1, crf: int = 18) -> Path:
    """T,3,H,W in [0,1] -> H.264 MP4 (yuv420p, playable everywhere) with PyAV (``pip install av``).

    Frames are upscaled by an integer factor (nearest) and padded by one black row / column when a
    side is odd (yuv420p needs even sides)."""
    try:
        import av
    except ImportError as err:  # pragma: no cover - av is a declared dependency
        raise ImportError("writing MP4 needs PyAV: pip install av") from err
    from fractions import Fraction

    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"expected a video T,3,H,W, got {tuple(video.shape)}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = _to_uint8(video)
    if upscale > 1:
        frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf))}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: str | os.PathLike) -> Tensor:
    """A GIF or MP4 / other container (PyAV) -> T,3,H,W float32 in [0,1]."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        return _read_gif_frames(path)
    import av

    try:
        with av.open(str(path)) as container:
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24").copy()) for f in container.decode(video=0)]
    except av.FFmpegError as err:
        raise ValueError(f"{path}: unreadable video ({err})") from None
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255.0


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
        elif modality == "video":  # a GIF (returned) and an MP4 beside it
            paths.append(save_video_gif(s, out_dir / f"{prefix}_{i:03d}.gif", fps or 8.0, upscale))
            save_video_mp4(s, out_dir / f"{prefix}_{i:03d}.mp4", fps or 8.0, upscale)
        elif modality == "audio":
            if sample_rate is None:
                raise ValueError("saving audio needs its sample_rate")
            paths.append(save_wav(s, out_dir / f"{prefix}_{i:03d}.wav", sample_rate))
        else:
            raise ValueError(f"unknown modality {modality!r}")
    return paths


# ----------------------------------------------------------------------------- reading inputs for rewards
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _pil_to_tensor(img) -> Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _array_to_image(a: np.ndarray) -> Tensor:
    """H,W,3 or 3,H,W numpy (uint8 0-255 or float 0-1) -> 3,H,W float32."""
    if a.ndim != 3 or 3 not in (a.shape[0], a.shape[-1]):
        raise ValueError(f"expected an image array H,W,3 or 3,H,W, got shape {a.shape}")
    t = torch.from_numpy(np.ascontiguousarray(a))
    if a.shape[-1] == 3 and a.shape[0] != 3:
        t = t.permute(2, 0, 1)
    return t.float() / 255.0 if a.dtype == np.uint8 else t.float()


def _read_gif_frames(path: Path) -> Tensor:
    """Frames of a GIF; one written by :func:`save_video_gif` gets its merged identical frames back (each
    frame repeated duration / frame duration times)."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        comment = im.info.get("comment", b"")
        comment = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
        frame_ms = int(comment[len(_GIF_FRAME_TAG):]) if comment.startswith(_GIF_FRAME_TAG) and comment[len(_GIF_FRAME_TAG):].isdigit() else None
        frames = []
        for f in ImageSequence.Iterator(im):
            repeat = max(1, round(f.info.get("duration", frame_ms) / frame_ms)) if frame_ms else 1
            frames += [_pil_to_tensor(f)] * repeat
        return torch.stack(frames)


def _image_problem(t: Tensor) -> str | None:
    # one aminmax pass: NaN propagates into min/max, and inf shows as an out-of-range value
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "non-finite (NaN/inf) pixel values"
    if lo < -1e-3 or hi > 1 + 1e-3:
        return f"pixel values outside [0, 1] (min {lo:.3g}, max {hi:.3g}); images must be float in [0, 1]"
    return None


def _audio_problem(t: Tensor) -> str | None:
    t = t.detach()
    if not torch.isfinite(t).all():
        return "non-finite (NaN/inf) audio samples"
    peak = float(t.abs().max()) if t.numel() else 0.0
    if peak > 1 + 1e-3:
        return f"audio samples outside [-1, 1] (peak {peak:.3g})"
    if t.shape[-1] == 0:
        return "empty audio clip"
    return None


def _batch_problems(t: Tensor, modality: str) -> list[str | None]:
    """Per-row validity of a batched tensor in one pass (aminmax per row; NaN propagates into it)."""
    if t.shape[0] == 0:
        return []
    lo, hi = torch.aminmax(t.detach().reshape(t.shape[0], -1), dim=1)
    reasons: list[str | None] = []
    for a, b in zip(lo.tolist(), hi.tolist()):
        if not (math.isfinite(a) and math.isfinite(b)):
            reasons.append(f"non-finite (NaN/inf) {'audio samples' if modality == 'audio' else 'pixel values'}")
        elif modality == "audio" and max(-a, b) > 1 + 1e-3:
            reasons.append(f"audio samples outside [-1, 1] (peak {max(-a, b):.3g})")
        elif modality != "audio" and (a < -1e-3 or b > 1 + 1e-3):
            reasons.append(f"pixel values outside [0, 1] (min {a:.3g}, max {b:.3g}); images must be float in [0, 1]")
        elif modality == "audio" and t.shape[-1] == 0:
            reasons.append("empty audio clip")
        else:
            reasons.append(None)
    return reasons


def load_media(samples, modality: str, *, sample_rate: int | None = None) -> tuple[Tensor | list[Tensor], list[str | None]]:
    """Bring reward inputs to canonical float32 tensors, one per item, with a reason for each item that
    cannot be scored (None where fine). Batch-level mistakes (a wrong tensor layout) raise ValueError.

    image: tensor B,3,H,W (float in [0,1] or uint8) or 3,H,W; or a list of PIL images, numpy arrays,
           tensors or file paths -> items 3,H,W.
    video: tensor B,T,3,H,W; or a list of T,3,H,W tensors / arrays or GIF paths -> items T,3,H,W.
    audio: tensor B,C,N or B,N; or a list of C,N / N tensors, arrays or WAV paths -> items C,N.
           WAV files at another rate than ``sample_rate`` are resampled.
    Gradients are kept for tensor inputs (differentiable rewards). A batched tensor input comes back as
    one float32 tensor (rows are items); other inputs as a list of item tensors.
    """
    expected = {"image": 4, "video": 5, "audio": 3}
    if modality not in expected:
        raise ValueError(f"unknown modality {modality!r}")
    if isinstance(samples, Tensor):
        t = samples
        if modality == "image" and t.ndim == 3:
            t = t[None]
        if modality == "audio" and t.ndim == 2:
            t = t[:, None]
        if t.ndim != expected[modality] or (modality in ("image", "video") and t.shape[-3] != 3):
            layout = {"image": "B,3,H,W", "video": "B,T,3,H,W", "audio": "B,C,N"}[modality]
            raise ValueError(f"{modality} samples must be a tensor {layout}, got shape {tuple(samples.shape)}")
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        return t, _batch_problems(t, modality)  # stays one tensor: no per-item split and re-stack
    if isinstance(samples, (list, tuple)):
        items = list(samples)
    else:
        items = [samples]
    out: list[Tensor] = []
    reasons: list[str | None] = []
    for item in items:
        try:
            tensor = _load_item(item, modality, sample_rate)
        except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL raises several kinds on corrupt files
            out.append(torch.zeros(0))
            reasons.append(f"unreadable {modality}: {err}")
            continue
        out.append(tensor)
        reasons.append(_audio_problem(tensor) if modality == "audio" else _image_problem(tensor))
    return out, reasons


def _load_item(item, modality: str, sample_rate: int | None) -> Tensor:
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise OSError(f"file {str(path)!r} does not exist")
        if modality == "image":
            with Image.open(path) as im:
                im.load()
                return _pil_to_tensor(im)
        if modality == "video":
            return read_video(path)
        wav, sr = read_wav(path)
        if sample_rate is not None and sr != sample_rate:
            from .rewards.preprocess import resample_audio

            wav = resample_audio(wav, sr, sample_rate)
        return wav
    if isinstance(item, Image.Image):
        if modality != "image":
            raise ValueError(f"a PIL image is not a {modality} sample")
        return _pil_to_tensor(item)
    if isinstance(item, np.ndarray):
        if modality == "image":
            return _array_to_image(item)
        if modality == "video":
            return torch.stack([_array_to_image(f) for f in item])
        a = torch.from_numpy(np.ascontiguousarray(item)).float()
        return a[None] if a.ndim == 1 else a
    if isinstance(item, Tensor):
        t = item.float() / 255.0 if item.dtype == torch.uint8 else item.float()
        want = {"image": 3, "video": 4, "audio": 2}[modality]
        if modality == "audio" and t.ndim == 1:
            t = t[None]
        if t.ndim != want:
            raise ValueError(f"a {modality} item must have {want} dims, got shape {tuple(item.shape)}")
        return t
    raise ValueError(f"cannot read a {modality} sample from {type(item).__name__}")

"""Small shared helpers for loading published weights: the offline switch and dtype names."""
from __future__ import annotations

import os

import torch

#: dtype names accepted wherever a config or option takes a dtype
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def env_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``MMALIGN_OFFLINE`` is set (1/true/yes): load local files only."""
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "MMALIGN_OFFLINE"))


def resolve_offline(offline: bool | None) -> bool:
    """An explicit ``offline`` flag, or the environment's when None."""
    return env_offline() if offline is None else bool(offline)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a name (``"bfloat16"``, ``"bf16"``...), a dtype, or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})") from None

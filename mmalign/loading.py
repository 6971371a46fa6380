"""Load a model adapter from a family name, a local pipeline directory, an HF id, or ``tiny:<family>``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .models import MODELS  # importing the package registers the families
from .hub import DTYPES, resolve_dtype  # noqa: F401  (re-exported)
from .registry import RegistryError



def family_of_pipeline_class(class_name: str) -> str:
    """The mmalign family whose adapter wraps diffusers pipeline class ``class_name``."""
    for name in MODELS.names():
        if MODELS.get(name).pipeline_class == class_name:
            return name
    raise RegistryError(f"no mmalign model adapter for diffusers pipeline {class_name!r} (families: {', '.join(MODELS.names())})")




def load_model(
    model: str,
    *,
    family: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    offline: bool | None = None,
    cache_dir: str | None = None,
    adapter_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
):
    """Build a :class:`~mmalign.models.ModelAdapter`.

    ``model`` is ``tiny:<family>`` (a tiny random pipeline built in code, seeded by ``seed``), a local
    directory saved with ``save_pretrained`` (its family read from ``model_index.json`` unless given),
    or an HF hub id (``family`` required unless it is the family's default id).
    """
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string (tiny:<family>, a directory, or an HF id)")
    dtype = resolve_dtype(torch_dtype)
    if model.startswith("tiny:"):
        from .testing import tiny_adapter

        adapter = tiny_adapter(model.split(":", 1)[1], seed=seed, adapter_kwargs=adapter_kwargs)
        adapter.pipeline.to(device=device, dtype=dtype) if dtype is not None else adapter.pipeline.to(device)
        return adapter
    path = Path(model)
    if family is None:
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                raise OSError(f"{model!r} is a directory without model_index.json: not a diffusers pipeline")
            try:
                family = family_of_pipeline_class(json.loads(index.read_text())["_class_name"])
            except (json.JSONDecodeError, KeyError) as err:
                raise OSError(f"{index} is corrupt or has no _class_name: {err}") from None
        else:
            matches = [n for n in MODELS.names() if MODELS.get(n).default_model_id == model]
            if not matches:
                raise ValueError(f"cannot tell the model family of {model!r}: pass family= (one of {', '.join(MODELS.names())})")
            family = matches[0]
    adapter_cls = MODELS.get(family)
    return adapter_cls.from_pretrained(
        model, torch_dtype=dtype, device=device, offline=offline, cache_dir=cache_dir, adapter_kwargs=adapter_kwargs
    )

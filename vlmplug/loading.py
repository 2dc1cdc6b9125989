"""`vlmplug.load`: the embedded world model by name, or any supported checkpoint by id or path."""
from __future__ import annotations

from typing import Any


def load(name_or_path: str = "world", device: Any = "cpu", dtype: Any = None, **kwargs):
    """Return `(model, processor)`.

    "world" is the tiny LLaVA the project trains and ships (offline). Anything else goes to
    `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained` (a hub id you have
    cached, or a local folder); extra kwargs (e.g. `quantization_config`) are passed to the model.
    """
    import torch

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if name_or_path == "world":
        from .world import load_world

        return load_world(device=device, dtype=dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .compat import load_kwargs

    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype or "auto", **load_kwargs(**kwargs))
    if "device_map" not in kwargs and "quantization_config" not in kwargs:
        model.to(device)
    processor = AutoProcessor.from_pretrained(name_or_path)
    return model.eval(), processor

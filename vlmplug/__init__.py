"""vlmplug: inference-time, training-free attention plugins for Hugging Face VLMs.

    h = vlmplug.apply(model, "record")
    model.generate(**inputs)
    maps = h.image_attention()
    h.remove()
"""
from .api import Handle, apply, available_methods, supported_models
from .errors import (
    AlreadyAppliedError,
    LayoutError,
    MethodConfigError,
    TransformersMismatchError,
    UnsupportedModelError,
    VlmplugError,
)

__version__ = "0.1.0"

__all__ = [
    "apply",
    "Handle",
    "available_methods",
    "supported_models",
    "UnsupportedModelError",
    "MethodConfigError",
    "AlreadyAppliedError",
    "LayoutError",
    "TransformersMismatchError",
    "VlmplugError",
    "load",
    "generate",
    "Record",
]


def __getattr__(name):
    # Lazy public names: keep `import vlmplug` free of heavy imports.
    if name == "Record":
        from .methods.record import Record

        return Record
    if name == "load":
        from .loading import load

        return load
    if name == "generate":
        from .pipeline import generate

        return generate
    raise AttributeError(f"module 'vlmplug' has no attribute {name!r}")

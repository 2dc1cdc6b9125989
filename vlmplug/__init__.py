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

# every registered method's config class, by its public name (lazily imported)
_CONFIGS = {
    "Record": "vlmplug.methods.record",
    "FastV": "vlmplug.methods.pruning.fastv",
    "PLPHP": "vlmplug.methods.pruning.plphp",
    "VisionZip": "vlmplug.methods.pruning.visionzip",
    "HiPrune": "vlmplug.methods.pruning.hiprune",
    "FlowCut": "vlmplug.methods.pruning.flowcut",
    "Cluster": "vlmplug.methods.pruning.cluster",
    "RandomDrop": "vlmplug.methods.pruning.random_drop",
    "Pool": "vlmplug.methods.pruning.pool",
    "PAI": "vlmplug.methods.attention.pai",
    "VAR": "vlmplug.methods.attention.var",
    "ACT": "vlmplug.methods.attention.act",
    "ModPAI": "vlmplug.methods.attention.modpai",
    "VHR": "vlmplug.methods.attention.vhr",
}

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
    "ground",
    "Grounding",
    "ViCrop",
    "CARVE",
    "MethodConfig",
    "Method",
    "AttentionMaps",
    "PassMix",
    "cfg_mix",
    *_CONFIGS,
]

_LAZY = {
    **_CONFIGS,
    "MethodConfig": "vlmplug.methods.base",
    "Method": "vlmplug.methods.base",
    "AttentionMaps": "vlmplug.results",
    "PassMix": "vlmplug.guidance",
    "cfg_mix": "vlmplug.guidance",
    "load": "vlmplug.loading",
    "generate": "vlmplug.pipeline",
    "ground": "vlmplug.grounding",
    "Grounding": "vlmplug.grounding",
    "ViCrop": "vlmplug.grounding.vicrop",
    "CARVE": "vlmplug.grounding.carve",
}


def __getattr__(name):
    # Lazy public names: keep `import vlmplug` free of heavy imports.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlmplug' has no attribute {name!r}")

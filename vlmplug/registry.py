"""Name registries: method name -> config class, model_type -> adapter class.

Filled by decorators on the classes themselves, so `apply()` never grows an if-chain.
"""
from __future__ import annotations

import importlib

METHODS: dict[str, type] = {}
ADAPTERS: dict[str, type] = {}

# Modules that register methods / adapters; imported lazily on first lookup so `import vlmplug` stays light.
_METHOD_MODULES = (
    "vlmplug.methods.record",
    "vlmplug.methods.pruning.fastv",
    "vlmplug.methods.pruning.plphp",
    "vlmplug.methods.pruning.cluster",
    "vlmplug.methods.pruning.hiprune",
    "vlmplug.methods.pruning.visionzip",
    "vlmplug.methods.pruning.flowcut",
    "vlmplug.methods.pruning.random_drop",
    "vlmplug.methods.pruning.pool",
    "vlmplug.methods.attention.pai",
    "vlmplug.methods.attention.var",
    "vlmplug.methods.attention.act",
    "vlmplug.methods.attention.modpai",
    "vlmplug.methods.attention.vhr",
)
_ADAPTER_MODULES = (
    "vlmplug.adapters.llava",
    "vlmplug.adapters.llava_next",
    "vlmplug.adapters.llava_onevision",
    "vlmplug.adapters.qwen_vl",
    "vlmplug.adapters.idefics3",
    "vlmplug.adapters.gemma3",
    "vlmplug.adapters.internvl",
)
_loaded = {"methods": False, "adapters": False}


def register_method(name: str):
    """Class decorator: register a method config under a lowercase name (a name already taken is refused)."""

    def deco(cls):
        if name != name.lower():
            raise ValueError(f"method names are lowercase, got {name!r}")
        old = METHODS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"method name {name!r} is taken by {old.__module__}.{old.__qualname__}; choose another")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def register_adapter(*model_types: str):
    """Class decorator: register an adapter for one or more `config.model_type` strings."""

    def deco(cls):
        cls.model_types = tuple(model_types)
        for mt in model_types:
            ADAPTERS[mt] = cls
        return cls

    return deco


def _load(kind: str) -> None:
    if not _loaded[kind]:
        for mod in _METHOD_MODULES if kind == "methods" else _ADAPTER_MODULES:
            importlib.import_module(mod)
        _loaded[kind] = True


def method_registry() -> dict[str, type]:
    _load("methods")
    return METHODS


def adapter_registry() -> dict[str, type]:
    _load("adapters")
    return ADAPTERS

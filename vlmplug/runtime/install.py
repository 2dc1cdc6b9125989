"""Patch and undo: attention implementations, attributes, hooks, wrapped methods. `undo()` restores all of it."""
from __future__ import annotations

from typing import Any

from torch import nn


def all_configs(model: nn.Module) -> list[Any]:
    """Every config (and sub-config) of the model that carries an attention implementation."""
    seen, out, stack = set(), [], [model.config]
    stack += [getattr(m, "config", None) for m in model.modules()]
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen or not hasattr(c, "_attn_implementation_internal"):
            continue
        seen.add(id(c))
        out.append(c)
        for key in getattr(c, "sub_configs", {}) or {}:
            stack.append(getattr(c, key, None))
    return out


class Installer:
    def __init__(self, model: nn.Module):
        self.model = model
        self._hooks: list = []
        self._attrs: list[tuple[Any, str, bool, Any]] = []  # (object, name, had an instance attribute, its value)
        self._attn_snapshot: list[tuple[Any, Any]] = []

    def set_attention(self, keys: dict) -> None:
        """Switch sub-configs' attention implementations (`{config_key: impl}`), remembering every config's."""
        if not self._attn_snapshot:
            self._attn_snapshot = [(c, c._attn_implementation_internal) for c in all_configs(self.model)]
        self.model.set_attn_implementation(keys)

    def set_attr(self, obj, name: str, value) -> None:
        """Set an instance attribute that `undo` deletes (a wrapped method included: the class's comes back), or puts
        back where the object already had one (e.g. a user's own wrapper of the method)."""
        had = name in obj.__dict__
        self._attrs.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def hook(self, handle) -> None:
        self._hooks.append(handle)

    def undo(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for obj, name, had, old in reversed(self._attrs):
            if had:
                obj.__dict__[name] = old
            elif name in obj.__dict__:
                delattr(obj, name)
        self._attrs = []
        for cfg, value in self._attn_snapshot:
            cfg._attn_implementation_internal = value
        self._attn_snapshot = []

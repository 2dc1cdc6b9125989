"""`apply()` and `Handle`: the one verb and the object that undoes it."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .adapters.base import get_adapter
from .errors import AlreadyAppliedError, MethodConfigError
from .methods.base import Method
from .registry import adapter_registry, method_registry


def available_methods() -> list[str]:
    """Names accepted by `apply()`."""
    return sorted(method_registry())


def supported_models() -> list[str]:
    """`config.model_type` strings that have an adapter."""
    return sorted(adapter_registry())


def _resolve(methods, params: dict[str, Any]) -> list[Method]:
    reg = method_registry()
    items = list(methods) if isinstance(methods, (list, tuple)) else [methods]
    if not items:
        raise MethodConfigError(f"no method given; available: {sorted(reg)}")
    if params and not (len(items) == 1 and isinstance(items[0], str)):
        raise MethodConfigError("keyword parameters go with a single method name; pass configured objects to compose")
    out = []
    for it in items:
        if isinstance(it, str):
            if it not in reg:
                raise MethodConfigError(f"unknown method {it!r}; available: {sorted(reg)}")
            out.append(reg[it].from_params(**params))
        elif isinstance(it, Method):
            out.append(it)
        else:
            raise MethodConfigError(f"a method is a name or a config object, got {type(it).__name__}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise MethodConfigError(f"the same method appears twice in {names}")
    return out


class Handle:
    """What `apply()` returns: `.remove()` restores the model exactly; usable as a context manager."""

    def __init__(self, model: nn.Module, session):
        self.model = model
        self.session = session
        self.methods = session.methods
        self.active = True

    def remove(self) -> None:
        """Undo every patch: attention implementations, hooks, attributes. Idempotent."""
        if not self.active:
            return
        self.session.uninstall()
        if self.model.__dict__.get("_vlmplug_handle") is self:
            del self.model.__dict__["_vlmplug_handle"]
        self.active = False

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"method {name!r} is not applied; applied: {[m.name for m in self.methods]}")

    @property
    def layout(self):
        """Layout (image positions, grids, boxes) of the latest prompt, or None."""
        return self.session.layout

    def set_image_sizes(self, sizes: Sequence[Sequence[tuple[int, int]]]) -> None:
        """Original (width, height) per sample per image of the next prompt, so boxes map to the original images."""
        self.session.set_image_sizes(sizes)

    def image_attention(self, view: str = "main"):
        """Shortcut to the `record` method's maps (see `Record.image_attention`)."""
        return self.method("record").image_attention(view)

    @property
    def stats(self) -> dict[str, Any]:
        lay = self.session.layout
        out: dict[str, Any] = {
            "forward_index": self.session.forward_index,
            "phase": self.session.phase,
            "images_per_sample": [len(s.images) for s in lay.samples] if lay is not None else None,
        }
        for m in self.methods:
            out[m.name] = m.stats()
        return out

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Handle({[m.name for m in self.methods]}, {type(self.model).__name__}, {state})"


def apply(model: nn.Module, methods, *, replace: bool = False, processor: Any = None, **params) -> Handle:
    """Patch `model` with one method (by name, with `**params`) or several config objects.

    Raises UnsupportedModelError / MethodConfigError / AlreadyAppliedError before touching the model.
    `replace=True` removes an existing handle first. `processor` (optional) lets adapters read the
    image processor's crop/pad settings for token→pixel boxes.
    """
    from .session import Session

    adapter = get_adapter(model, processor)
    resolved = _resolve(methods, params)
    for m in resolved:
        m.check(adapter)
    old = model.__dict__.get("_vlmplug_handle")
    if old is not None and old.active:
        if not replace:
            raise AlreadyAppliedError(
                f"this model already has {old!r}; call .remove() on it or pass replace=True (methods are not stacked silently)"
            )
        old.remove()
    session = Session(model, adapter, resolved)
    try:
        session.install()
    except Exception:
        session.uninstall()
        raise
    handle = Handle(model, session)
    model.__dict__["_vlmplug_handle"] = handle
    return handle

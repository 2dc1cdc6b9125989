"""`apply()` and `Handle`: the one verb and the object that undoes it."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .adapters.base import get_adapter
from .errors import AlreadyAppliedError, MethodConfigError
from .methods.base import Method, MethodConfig
from .registry import adapter_registry, method_registry


def available_methods() -> list[str]:
    """Names accepted by `apply()`."""
    return sorted(method_registry())


def supported_models() -> list[str]:
    """`config.model_type` strings that have an adapter."""
    return sorted(adapter_registry())


def _resolve(methods, params: dict[str, Any]) -> list[Method]:
    """Names and configs -> fresh runners (one per model); a runner given directly is used as it is."""
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
                if it in ("vicrop", "carve"):
                    raise MethodConfigError(f"{it} runs around generation (map, refine the image, ask again), not inside "
                                            f"attention: use vlmplug.generate(model, processor, image, question, "
                                            f"methods={it!r})")
                raise MethodConfigError(f"unknown method {it!r}; available: {sorted(reg)}")
            out.append(reg[it].from_params(**params).build())
        elif isinstance(it, MethodConfig):
            out.append(it.build())
        elif isinstance(it, Method):
            if it.session is not None:
                raise MethodConfigError(f"the {it.name} runner is attached to another model; apply its config instead")
            out.append(it)
        else:
            raise MethodConfigError(f"a method is a name or a config object, got {type(it).__name__}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise MethodConfigError(f"the same method appears twice in {names}")
    return out


def _assign_passes(runners: list[Method], passes: dict[str, Sequence[str]] | None) -> None:
    """`passes={"fastv": ["cfg"]}`: that method acts only in forwards of those passes (default: every pass)."""
    names = {m.name for m in runners}
    for m in runners:
        m.passes = None
    for name, labels in (passes or {}).items():
        if name not in names:
            raise MethodConfigError(f"passes names {name!r}, which is not applied; applied: {sorted(names)}")
        labels = [labels] if isinstance(labels, str) else list(labels)
        if not labels or not all(isinstance(x, str) and x for x in labels):
            raise MethodConfigError(f"passes[{name!r}] must be one or more pass labels (strings), got {labels!r}")
        for m in runners:
            if m.name == name:
                m.passes = frozenset(labels)


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
        """The runner of an applied method (its runtime state on this model)."""
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"method {name!r} is not applied; applied: {[m.name for m in self.methods]}")

    @property
    def configs(self) -> list[MethodConfig | None]:
        """The configs the runners were built from (None for a runner given directly)."""
        return [m.config for m in self.methods]

    def result(self, name: str, **kwargs):
        """The typed result of an applied method for the latest forward (e.g. `AttentionMaps` for "record")."""
        return self.method(name).result(**kwargs)

    def pass_(self, label: str):
        """Context manager: forwards inside run as pass `label`, beside the default pass "main" (their own prompt,
        layout, kept tokens and caches)."""
        return self.session.pass_(label)

    def guidance(self, inputs: dict):
        """Logits processors the applied methods need beside `model.generate(**inputs)` (e.g. PAI's text-only
        CFG branch): `model.generate(**inputs, logits_processor=handle.guidance(inputs))`."""
        from transformers import LogitsProcessorList

        procs = [p for m in self.methods if (p := m.guidance(inputs)) is not None]
        return LogitsProcessorList(procs)

    @property
    def layout(self):
        """Layout (image positions, grids, boxes) of the latest prompt, or None."""
        return self.session.layout

    def set_image_sizes(self, sizes: Sequence[Sequence[tuple[int, int]]]) -> None:
        """Original (width, height) per sample per image of the next prompt, so boxes map to the original images."""
        self.session.set_image_sizes(sizes)

    def image_attention(self, view: str = "main"):
        """Shortcut to `result("record").images(view)`: per sample, per image, [layers, heads, rows, cols]."""
        maps = self.result("record")
        return [] if maps is None else maps.images(view)

    @property
    def stats(self) -> dict[str, Any]:
        """Per method, what it did in the latest prefill of the main pass; same keys for every method family."""
        lay = self.session.layout
        st = self.session.state
        out: dict[str, Any] = {
            "forward_index": st.forward_index,
            "phase": st.phase,
            "images_per_sample": [len(s.images) for s in lay.samples] if lay is not None else None,
        }
        for m in self.methods:
            out[m.name] = m.stats()
        return out

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Handle({[m.name for m in self.methods]}, {type(self.model).__name__}, {state})"


def apply(model: nn.Module, methods, *, replace: bool = False, processor: Any = None,
          passes: dict[str, Sequence[str]] | None = None, **params) -> Handle:
    """Patch `model` with one method (by name, with `**params`) or several configs.

    A config is data: the same config may be applied to several models; each gets its own runner.
    Raises UnsupportedModelError / MethodConfigError / AlreadyAppliedError before touching the model.
    `replace=True` removes an existing handle first. `processor` (optional) lets adapters read the
    image processor's crop/pad settings for token->pixel boxes. `passes` limits methods to forwards of the
    named passes (see `Handle.pass_`).
    """
    from .session import Session

    adapter = get_adapter(model, processor)
    runners = _resolve(methods, params)
    _assign_passes(runners, passes)
    old = model.__dict__.get("_vlmplug_handle")
    if old is not None and old.active and not replace:
        raise AlreadyAppliedError(
            f"this model already has {old!r}; call .remove() on it or pass replace=True (methods are not stacked silently)"
        )
    for m in runners:  # (a setup that runs the model, e.g. a calibration, pauses the old handle: Session.paused)
        m.setup(adapter)
    if old is not None and old.active:
        old.remove()
    session = Session(model, adapter, runners)
    try:
        session.install()
    except Exception:
        session.uninstall()
        raise
    handle = Handle(model, session)
    model.__dict__["_vlmplug_handle"] = handle
    return handle

"""The method protocol: a config (what the user sets) and a runner (what runs on one model).

A `MethodConfig` is a frozen dataclass: data the user can print, save (`to_dict`), load (`from_dict`) and
apply to any number of models. `apply()` builds one `Method` runner per model from it (`config.build()`);
everything a method learns during a forward lives on its runner. Read `vlmplug/methods/README.md` for the
protocol a runner implements.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..errors import MethodConfigError

#: while `param_specs` builds a config: a list the checks below append (parameter, bounds / choices) to
_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("vlmplug_param_recorder", default=None)


def check_range(method: str, name: str, value, lo=None, hi=None, kind=(int, float)) -> None:
    """Raise MethodConfigError naming the parameter, the value and the allowed range."""
    rec = _RECORDER.get()
    if rec is not None:
        rec.append(("range", name, (lo, hi, kind)))
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise MethodConfigError(f"{method}: {name}={value!r} must be a finite number in [{lo}, {hi}]")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise MethodConfigError(f"{method}: {name}={value!r} is out of range; allowed [{lo}, {hi}]")


def check_choice(method: str, name: str, value, choices) -> None:
    rec = _RECORDER.get()
    if rec is not None:
        rec.append(("choice", name, tuple(choices)))
    if value not in choices:
        raise MethodConfigError(f"{method}: {name}={value!r} is not allowed; choose one of {list(choices)}")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method config, as a form shows it (see `param_specs`).

    kind: "float" / "int" (bounds `lo` / `hi`, None where open), "bool", "choice" (`choices`), "text" (a free string)
    or "literal" (anything else: a Python literal, e.g. a layer selection "2:" or a list). default: the field's
    declared default; value: what a default-built config holds (a default filled in by __post_init__, e.g. FastV's
    keep_ratio 0.5). optional: None is accepted. exclusive: the parameters given instead of this one.
    """

    name: str
    kind: str
    default: Any = None
    value: Any = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    optional: bool = False
    exclusive: tuple[str, ...] = ()
    annotation: str = ""

    @property
    def closed(self) -> bool:
        """Both bounds known (a slider fits)."""
        return self.lo is not None and self.hi is not None


def _type_names(annotation) -> set[str]:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    out = {"None"} if "Optional[" in text else set()
    for part in text.replace("Optional[", "").replace("]", "").split("|"):
        part = part.strip()
        out.add(part.split("[")[0] if part else part)
    return out


def _probe_values(types: set[str]) -> list:
    """Values to build a config with so that checks run only for a given value (Optional fields) are reached."""
    out = []
    if "float" in types:
        out += [0.5, 1.0]
    if "int" in types:
        out += [1, 2]
    return out


def _record(cls, **params) -> tuple[Any, list]:
    """Build cls(**params) while recording the checks it runs: (the config or None where it refused, records)."""
    rec: list = []
    token = _RECORDER.set(rec)
    try:
        try:
            obj = cls(**params)
        except (MethodConfigError, TypeError, ValueError):
            obj = None
    finally:
        _RECORDER.reset(token)
    return obj, rec


def param_specs(cls) -> list[ParamSpec]:
    """Every init field of a config dataclass (a `MethodConfig` or ViCrop / CARVE) with its kind, default and
    allowed values, found by building the config and recording the bounds `check_range` / `check_choice` are
    called with: with the defaults, then for each Optional field not yet seen, with a probe value (a check that
    refuses the probe has still recorded its bounds). Forms build their widgets from these, so a new method
    needs no form code. Fields no check bounds get "int" / "float" / "bool" / "text" from their annotation, else
    "literal"."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"param_specs takes a config dataclass, got {cls!r}")
    init = [f for f in fields(cls) if f.init]
    ranges: dict[str, tuple] = {}
    choices: dict[str, tuple] = {}

    def note(records):
        for what, name, info in records:
            (ranges if what == "range" else choices).setdefault(name, info)

    base, rec = _record(cls)
    note(rec)
    for f in init:
        types = _type_names(f.type)
        if f.name in ranges or f.name in choices or "None" not in types:
            continue
        for probe in _probe_values(types):
            _, rec = _record(cls, **{f.name: probe})
            note(rec)
            if f.name in ranges or f.name in choices:
                break
    groups = [g for g in getattr(cls, "exclusive", ()) if all(n in {f.name for f in init} for n in g)]
    out = []
    for f in init:
        types = _type_names(f.type)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        value = getattr(base, f.name) if base is not None else default
        spec = dict(name=f.name, default=default, value=value, optional="None" in types,
                    exclusive=tuple(n for g in groups if f.name in g for n in g if n != f.name),
                    annotation=f.type if isinstance(f.type, str) else str(f.type))
        if f.name in choices:
            spec.update(kind="choice", choices=choices[f.name])
        elif f.name in ranges:
            lo, hi, kind = ranges[f.name]
            kinds = kind if isinstance(kind, tuple) else (kind,)
            is_int = float not in kinds or not (types & {"float"})
            spec.update(kind="int" if is_int else "float", lo=lo, hi=hi)
        elif types - {"None"} == {"bool"}:
            spec.update(kind="bool")
        elif types - {"None"} == {"int"}:
            spec.update(kind="int")
        elif types - {"None"} <= {"float", "int"} and types - {"None"}:
            spec.update(kind="float")
        elif types - {"None"} == {"str"}:
            spec.update(kind="text")
        else:
            spec.update(kind="literal")
        out.append(ParamSpec(**spec))
    return out


def _plain(value):
    """JSON-friendly copy of a config value (tuples and ranges become lists)."""
    if isinstance(value, (tuple, list, range)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class MethodConfig:
    """What the user sets for one method: validated at construction, immutable, serialisable."""

    name: ClassVar[str] = ""
    #: parameters that exclude each other (give one): `replace` clears the partner that is not being set
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = (("keep_ratio", "keep_tokens"),)

    def build(self) -> "Method":
        """A fresh runner for one model."""
        raise TypeError(f"{type(self).__name__} does not say which runner runs it (define build())")

    def _normalise(self, name: str, value) -> None:
        """Set a default that depends on other fields, in __post_init__ (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """{"method": name, **parameters}, JSON-serialisable."""
        return {"method": self.name, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        """Inverse of `to_dict`; `MethodConfig.from_dict` picks the class by the "method" key."""
        from ..registry import method_registry

        data = dict(data)
        name = data.pop("method", None) or cls.name
        reg = method_registry()
        if name not in reg:
            raise MethodConfigError(f"unknown method {name!r}; available: {sorted(reg)}")
        target = reg[name]
        if cls is not MethodConfig and target is not cls:
            raise MethodConfigError(f"{cls.__name__}.from_dict got a {name!r} config; use MethodConfig.from_dict")
        return target.from_params(**data)

    @classmethod
    def from_params(cls, **params) -> "MethodConfig":
        allowed = [f.name for f in fields(cls) if f.init]
        unknown = [k for k in params if k not in allowed]
        if unknown:
            raise MethodConfigError(f"{cls.name}: unknown parameter(s) {unknown}; allowed: {allowed}")
        params = {k: tuple(v) if isinstance(v, list) and _is_tuple_field(cls, k) else v for k, v in params.items()}
        return cls(**params)

    def replace(self, **changes) -> "MethodConfig":
        """A copy with some parameters changed (validated again). Setting one of a group of exclusive parameters
        (keep_ratio / keep_tokens) clears the others."""
        names = {f.name for f in fields(self)}
        for group in self.exclusive:
            given = [g for g in group if g in changes]
            if given and all(g in names for g in group):
                changes.update({g: None for g in group if g not in given})
        return dataclasses.replace(self, **changes)


def _is_tuple_field(cls, name: str) -> bool:
    f = {f.name: f for f in fields(cls)}[name]
    return "tuple" in str(f.type)


class Method:
    """The runner: one method's runtime on one patched model.

    Built by `config.build()` inside `apply()`; config fields read as attributes (`self.keep_ratio` is
    `self.config.keep_ratio`). Every hook the session may call is declared here with a no-op default; the
    session reads the declared capabilities (class attributes below), never probes for attributes.
    A runner written without a config (a dataclass subclass with its own fields, as tests do) works too.
    """

    name: ClassVar[str] = ""
    config: MethodConfig | None = None
    session = None
    #: the method edits or reads attention inside the vision tower (the vision config is switched too)
    needs_vision_attention: ClassVar[bool] = False
    #: the method reads / edits each image's projected features (`feature_plan`)
    wants_image_features: ClassVar[bool] = False
    #: the method edits the projector's input (`projector_input`)
    wants_projector_input: ClassVar[bool] = False
    #: the method reads each decoder layer's input hidden states at prefill (`layer_input`)
    wants_layer_input: ClassVar[bool] = False
    #: token dropping: the selection is made at layer 0 and layers before `drop_layer` hide the dropped tokens
    hide_before: ClassVar[bool] = False
    #: set by `setup` when the method drops tokens before this decoder layer (prefill)
    drop_layer: int | None = None
    #: set by `setup` when the method prunes the KV cache of these decoder layers after prefill
    kv_prune_layers: tuple[int, ...] = ()
    #: pass labels the method acts in (None: every pass); set by apply(passes=...)
    passes: frozenset | None = None
    #: passes the method runs itself (e.g. VHR's text-only branch): it acts there whatever `passes` says
    own_passes: ClassVar[frozenset] = frozenset()

    def __init__(self, config: MethodConfig | None = None):
        self.config = config
        if config is not None:
            self.name = config.name

    def __getattr__(self, item):
        # only reached when normal lookup fails: config fields read through
        if item.startswith("__") or item == "config":
            raise AttributeError(item)
        cfg = self.__dict__.get("config")
        if cfg is not None and item in {f.name for f in fields(cfg)}:
            return getattr(cfg, item)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {item!r} (nor its config; if {item!r} is a "
                             "property, an AttributeError raised inside it lands here)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})" if self.config is not None else super().__repr__()

    # ------------------------------------------------------------ lifecycle
    def setup(self, adapter) -> None:
        """Validate against the model and precompute (layer indices in range, ingredients present), before anything
        is patched. Raise MethodConfigError."""

    def attach(self, session) -> None:
        self.session = session

    def detach(self) -> None:
        self.session = None

    def begin_forward(self, session) -> None:
        """Start of every forward of the patched model (prefill and each decode step, every pass).
        `session.state` is the forward state of the pass running now (`state.label`, `state.phase`)."""

    def begin_vision(self) -> None:
        """Start of every image-feature call (the vision tower is about to run on a batch of images)."""

    # -------------------------------------------------------------- edits
    def layer_plan(self, ctx):
        """Each decoder attention call: a `LayerPlan` (edits, probes) or None. See backend/plan.py."""
        return None

    def vision_plan(self, ctx):
        """Each vision-tower attention call (when `needs_vision_attention`): a `LayerPlan` or None."""
        return None

    def layer_input(self, layer_idx: int, hidden, positions, session) -> None:
        """At prefill, before decoder layer `layer_idx` (when `wants_layer_input`): its input hidden states [B, L', D]
        (read only) and the logical positions of their rows [B, L'] (after any token dropping)."""

    def tokens_to_keep(self, ctx):
        """At prefill, before decoder layer `drop_layer`: long [B, L'] sorted logical positions to keep, or a
        list of per-sample 1-D tensors (ragged budgets)."""
        return None

    def kv_keep(self, ctx):
        """After prefill attention of a layer in `kv_prune_layers`: long [B, Hkv, S'] cache rows to keep, or a
        list of per-sample [Hkv, S'_b]."""
        return None

    def feature_plan(self, rows, images, session):
        """Projected image features, before the LLM sees them (when `wants_image_features`). rows[i]: [n_i, D]
        features of images[i] = (sample index, ImageLayout). Returns a `FeaturePlan` (rows to keep per image,
        rows to overwrite) or None; the session carries it out."""
        return None

    def projector_input(self, features):
        """The projector's input ([crops, patches, D], when `wants_projector_input`): a replacement or None."""
        return None

    def edit_layers(self) -> dict[str, set[int] | None]:
        """After `setup`: the decoder layers (None: every layer) this method asks each exclusive edit for, e.g.
        {"redistribute": {2, 3}}; apply() refuses two methods that would redistribute in the same layer."""
        return {}

    def guidance(self, inputs: dict):
        """A logits processor the method needs beside generate() for these inputs (a second pass), or None."""
        return None

    # ------------------------------------------------------------ results
    def stats(self) -> dict[str, Any]:
        """What the method did in the latest prefill (tokens kept, KV bytes, ...): plain data."""
        return {}

    def result(self, label: str = "main"):
        """The method's typed result of the latest forward of pass `label` (e.g. `AttentionMaps`), or None."""
        return None

    def verify(self, session) -> str | None:
        """After an image-bearing prefill: None if the method did what it states, else what it expected and did
        not see (the session raises with it). Dropping methods must have chosen tokens and removed them; KV-pruning
        methods must have pruned each of their layers' caches (or run without a cache)."""
        fx = session.state.effects
        if self.drop_layer is not None:
            if ("keep", self.name) not in fx:
                return (f"{self.name} chose no tokens to keep before decoder layer {self.drop_layer} in this prefill "
                        "(the hook there did not run, or the scores it needs were never computed)")
            if "drop" not in fx:
                return f"{self.name} expected image tokens removed before decoder layer {session.state.drop_layer}; none were"
        if self.kv_prune_layers:
            n = session.adapter.num_layers
            missed = [li % n for li in self.kv_prune_layers
                      if ("kv", li % n) not in fx and ("kv-no-cache", li % n) not in fx]
            if missed:
                return f"{self.name} expected the KV cache of decoder layers {missed} pruned; it was not"
        return None

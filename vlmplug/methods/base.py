"""Method base class: a dataclass config that answers the backend's questions.

A method never touches model tensors. The session calls, per forward, `begin_forward`; per attention
call, `layer_plan` (text) or `vision_plan` (vision tower) which return a `LayerPlan` or None; when the
method drops tokens, `tokens_to_keep` at its `drop_layer`; when it prunes the KV cache, `kv_keep`. After
an image-bearing prefill, `verify` says whether the method did what it states; a miss raises.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..errors import MethodConfigError


def check_range(method: str, name: str, value, lo=None, hi=None, kind=(int, float)) -> None:
    """Raise MethodConfigError naming the parameter, the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise MethodConfigError(f"{method}: {name}={value!r} must be a number in [{lo}, {hi}]")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise MethodConfigError(f"{method}: {name}={value!r} is out of range; allowed [{lo}, {hi}]")


def check_choice(method: str, name: str, value, choices) -> None:
    if value not in choices:
        raise MethodConfigError(f"{method}: {name}={value!r} is not allowed; choose one of {list(choices)}")


@dataclass
class Method:
    name: ClassVar[str] = ""
    #: the method edits or reads attention inside the vision tower
    needs_vision_attention: ClassVar[bool] = False
    #: the method only acts on samples that contain an image
    needs_image: ClassVar[bool] = True

    # ------------------------------------------------------------ lifecycle
    def check(self, adapter) -> None:
        """Validate against the model (layer indices in range, ingredients present). Raise MethodConfigError."""

    def attach(self, session) -> None:
        self.session = session

    def detach(self) -> None:
        self.session = None

    def begin_forward(self, session) -> None:
        """Called at the start of every forward of the patched model (prefill and each decode step)."""

    # -------------------------------------------------------------- edits
    def layer_plan(self, ctx):
        return None

    def vision_plan(self, ctx):
        return None

    drop_layer: ClassVar[int | None] = None
    kv_prune_layers: ClassVar[tuple[int, ...]] = ()

    def tokens_to_keep(self, ctx):
        """At prefill, before decoder layer `drop_layer`: long [B, L'] sorted logical positions to keep."""
        return None

    def kv_keep(self, ctx):
        """After prefill attention of a layer in `kv_prune_layers`: long [B, Hkv, S'] cache rows to keep."""
        return None

    def stats(self) -> dict[str, Any]:
        return {}

    def verify(self, session) -> str | None:
        """After an image-bearing prefill: None if the method did what it states, else what it expected and did
        not see (the session raises with it). Dropping methods must have chosen tokens and removed them; KV-pruning
        methods must have pruned each of their layers' caches (or run without a cache)."""
        fx = session.effects
        if self.drop_layer is not None:
            if ("keep", self.name) not in fx:
                return (f"{self.name} chose no tokens to keep before decoder layer {self.drop_layer} in this prefill "
                        "(the hook there did not run, or the scores it needs were never computed)")
            if "drop" not in fx:
                return f"{self.name} expected image tokens removed before decoder layer {session.drop_layer}; none were"
        if self.kv_prune_layers:
            n = session.adapter.num_layers
            missed = [li % n for li in self.kv_prune_layers
                      if ("kv", li % n) not in fx and ("kv-no-cache", li % n) not in fx]
            if missed:
                return f"{self.name} expected the KV cache of decoder layers {missed} pruned; it was not"
        return None

    # ------------------------------------------------------------ helpers
    @classmethod
    def from_params(cls, **params) -> "Method":
        allowed = [f.name for f in fields(cls) if f.init]
        unknown = [k for k in params if k not in allowed]
        if unknown:
            raise MethodConfigError(f"{cls.name}: unknown parameter(s) {unknown}; allowed: {allowed}")
        return cls(**params)

    def _layers_in_range(self, layers, adapter, param="layers") -> None:
        n = adapter.num_layers
        for li in layers or ():
            if isinstance(li, bool) or not isinstance(li, int) or not -n <= li < n:
                raise MethodConfigError(f"{self.name}: {param} contains {li!r}; this model has decoder layers 0..{n - 1}")

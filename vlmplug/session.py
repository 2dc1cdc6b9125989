"""Runtime of one patched model: installs the patch, keeps per-pass forward state, checks every forward.

Data flow per forward:
  base-model pre-hook ─ which pass, prefill or decode? (reads the cache through compat); a prefill resets that
                        pass's state (runtime/state.py)
  get_image_features ─ (wrapped, runtime/features.py) what the layout needs; feature plans of the methods
  attention call ─ the backend asks `plan_for`; runtime/planner.py builds a LayerContext and merges the plans
  decoder-layer pre-hooks ─ token dropping (backend/drop.py, only when a method drops tokens)
  attention forward hooks ─ KV-cache pruning after prefill (backend/kvprune.py, only when a method prunes)
  base-model hook ─ `verify_forward`: every layer went through the backend; every method did what it states
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch
from torch import nn

from . import compat
from .adapters.base import Adapter
from .backend.attention import IMPL_NAME, register_backend
from .backend.kernels import fast_kernel
from .backend.plan import LayerPlan
from .errors import LayoutError, MethodConfigError, TransformersMismatchError
from .layout import Layout
from .runtime.features import FeatureInterceptor
from .runtime.install import Installer
from .runtime.planner import LayerContext, Planner
from .runtime.state import ForwardState

__all__ = ["Session", "LayerContext", "ForwardState"]


def _disjoint_passes(methods) -> bool:
    """No pass has two of these methods active."""
    if any(m.passes is None for m in methods):
        return False
    return all(not (a.passes & b.passes) for i, a in enumerate(methods) for b in methods[i + 1:])


class Session:
    def __init__(self, model: nn.Module, adapter: Adapter, methods: list):
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.kernel = fast_kernel  # tests swap in an eager reference
        self.installer = Installer(model)
        self.features = FeatureInterceptor(self)
        self.planner = Planner(self)
        self._local = threading.local()  # the pass running now, per thread (a method may run a branch in step)
        self.pending_sizes = None  # original image sizes for the next prompt (set_image_sizes)
        self.drop_layer: int | None = None  # the token-drop layer the hooks were installed for
        self._states: dict[str, ForwardState] = {}

    @property
    def _label(self) -> str:
        return getattr(self._local, "label", "main")

    @_label.setter
    def _label(self, value: str) -> None:
        self._local.label = value

    @property
    def in_forward(self) -> bool:
        """A forward of the patched model is running in this thread."""
        return getattr(self._local, "in_forward", False)

    @in_forward.setter
    def in_forward(self, value: bool) -> None:
        self._local.in_forward = value

    # ------------------------------------------------------------- install
    def _check_exclusive_edits(self) -> None:
        """Edits that do not compose (redistribution) must not meet in one layer of one pass: refused before patching."""
        seen: dict[str, list] = {}
        n = self.adapter.num_layers
        for m in self.methods:
            for edit, layers in m.edit_layers().items():
                layers = None if layers is None else {li % n for li in layers}  # -1 and n-1 are one layer
                edit = "redistribute or amplify" if edit in ("redistribute", "amplify") else edit  # same rows
                for other, theirs, passes in seen.get(edit, []):
                    same_layer = layers is None or theirs is None or bool(set(layers) & set(theirs))
                    same_pass = m.passes is None or passes is None or bool(m.passes & passes)
                    if same_layer and same_pass:
                        where = "every layer" if layers is None or theirs is None else sorted(set(layers) & set(theirs))
                        raise MethodConfigError(
                            f"{other} and {m.name} both {edit} attention in {where}; these edits do not compose. "
                            "Give them different layers or passes, or apply one of them"
                        )
                seen.setdefault(edit, []).append((m.name, layers, m.passes))

    def install(self) -> None:
        self._check_exclusive_edits()
        register_backend()
        ad, ins = self.adapter, self.installer
        keys = {ad.text_config_key: IMPL_NAME}
        need_vision = any(m.needs_vision_attention for m in self.methods)
        if need_vision:
            keys[ad.vision_config_key] = IMPL_NAME
        ins.set_attention(keys)
        for m in ad.text_attention_modules():
            ins.set_attr(m, "_vlmplug_session", self)
        if need_vision:
            for i, m in enumerate(ad.vision_attention_modules()):
                ins.set_attr(m, "_vlmplug_session", self)
                ins.set_attr(m, "_vlmplug_vision_idx", i)
        base = ad.base_model
        ins.hook(base.register_forward_pre_hook(self._on_base_forward, with_kwargs=True))
        ins.hook(base.register_forward_hook(self._after_base_forward, always_call=True))
        self.features.install(ins, base)
        droppers = [m for m in self.methods if m.drop_layer is not None]
        drop_layers = {m.drop_layer for m in droppers}
        if len(drop_layers) > 1:
            raise MethodConfigError(f"methods drop tokens after different layers {sorted(drop_layers)}; use one")
        if len(droppers) > 1 and not _disjoint_passes(droppers):
            raise MethodConfigError(
                f"{[m.name for m in droppers]} each choose which tokens to drop; one prompt has one selection: "
                "apply one of them (or limit them to different passes with passes=)"
            )
        if len({m.hide_before for m in droppers}) > 1:  # the selection layer is one for every pass
            raise MethodConfigError(
                f"{[m.name for m in droppers]}: a pre-LLM selection and an in-LLM one cannot share a model, even in "
                "different passes; apply one of them"
            )
        if drop_layers:
            from .backend.drop import install_drop_hooks

            pre = any(m.hide_before for m in self.methods)
            for h in install_drop_hooks(self, drop_layers.pop(), start=0 if pre else None):
                ins.hook(h)
        kv_layers = [li for m in self.methods for li in m.kv_prune_layers]
        if kv_layers and self.drop_layer is not None and max(kv_layers) >= self.drop_layer:
            raise MethodConfigError(
                f"{[m.name for m in self.methods]}: KV pruning in layers at or after the token-drop layer "
                f"{self.drop_layer} is not supported; prune the KV cache only before it or use one method"
            )
        if kv_layers:
            from .backend.kvprune import install_kv_hooks

            for h in install_kv_hooks(self):
                ins.hook(h)
        if any(m.wants_layer_input for m in self.methods):  # after the drop hooks: the rows the layer really gets
            for li, layer in enumerate(ad.decoder_layers()):
                ins.hook(layer.register_forward_pre_hook(self._layer_input_hook(li), with_kwargs=True))
        for m in self.methods:
            m.attach(self)

    def uninstall(self) -> None:
        for m in reversed(self.methods):
            try:
                m.detach()
            except Exception:  # pragma: no cover - detaching must not stop the rest of the undo
                pass
        self.installer.undo()

    # -------------------------------------------------------------- passes
    @property
    def state(self) -> ForwardState:
        """Forward state of the pass running now."""
        st = self._states.get(self._label)
        if st is None:
            st = self._states[self._label] = ForwardState(self._label, drop_layer=self.drop_layer,
                                                          cache_cut=self.drop_layer)
        return st

    def state_of(self, label: str) -> ForwardState | None:
        return self._states.get(label)

    @contextlib.contextmanager
    def pass_(self, label: str):
        """Forwards inside run as pass `label`, with their own state (a second prompt beside generate()'s)."""
        if not isinstance(label, str) or not label:
            raise MethodConfigError(f"a pass label is a non-empty string, got {label!r}")
        prev, self._label = self._label, label
        try:
            yield self.state
        finally:
            self._label = prev

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside run as if unpatched (no method acts; a pass of their own, so no other pass's state is
        touched): for calibration passes a method's setup runs on a model that is already patched."""
        prev = getattr(self._local, "paused", False)
        self._local.paused = True
        try:
            with self.pass_("vlmplug-paused"):
                yield
        finally:
            self._local.paused = prev

    @property
    def active(self) -> list:
        """The runners that act in the pass running now (`passes=` of apply())."""
        if getattr(self._local, "paused", False):
            return []
        label = self._label
        return [m for m in self.methods
                if getattr(m, "passes", None) is None or label in m.passes or label in m.own_passes]

    # ------------------------------------------------------------ forward
    def _on_base_forward(self, module, args, kwargs):
        ids = compat.read(kwargs, "input_ids")
        if ids is None and args:
            ids = args[0]
        pkv = compat.find_cache(kwargs, f"{type(module).__name__}.forward")
        past = int(pkv.get_seq_length()) if pkv is not None and hasattr(pkv, "get_seq_length") else 0
        q_len = None
        if ids is not None:
            q_len = ids.shape[1]
        elif compat.read(kwargs, "inputs_embeds") is not None:
            q_len = compat.read(kwargs, "inputs_embeds").shape[1]
        st = self.state
        st.forward_index += 1
        st.has_cache = pkv is not None
        st.effects, st.text_calls = set(), set()
        st.static_cache = bool(getattr(pkv, "is_compileable", False))
        if st.static_cache and any(m.drop_layer is not None or m.kv_prune_layers for m in self.active):
            names = [m.name for m in self.methods]
            raise MethodConfigError(
                f"{names}: token dropping and KV pruning need a dynamic KV cache; this forward got "
                f"{type(pkv).__name__} (e.g. generate(cache_implementation='static')): use the default cache"
            )
        if past == 0:
            sizes, self.pending_sizes = self.pending_sizes, None  # sizes apply to this prompt only
            if compat.read(kwargs, "pixel_values") is not None:
                self.features.pending_meta = None  # this forward encodes its own images
            am = compat.read(kwargs, "attention_mask")
            if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] > 1 and bool((am[:, 1:] < am[:, :-1]).any()):
                from .errors import InputError

                raise InputError(  # the methods read each prompt's end at the last position, as generate() does
                    f"{[m.name for m in self.methods]}: this batch is right-padded (a sample's attention_mask ends in "
                    "0s); vlmplug reads each prompt's last token at the last position, as generate() does: pad on the "
                    "left (processor.tokenizer.padding_side = 'left')")
            st.begin_prompt(ids, am if isinstance(am, torch.Tensor) and am.dim() == 2 else None, q_len or 0, sizes,
                            self.drop_layer)
        else:
            st.begin_decode(past, q_len or 0)
        # a prefill on encoder outputs planned before (generate(use_cache=False) steps): no image-feature call comes
        st.reuses_encoder = (st.phase == "prefill" and compat.read(kwargs, "mm_encoder_outputs") is not None
                             and not self.features.pending)
        for m in self.active:
            m.begin_forward(self)
        self.in_forward = True
        if st.phase == "prefill":
            self.features.at_prefill(st.reuses_encoder)
        return None

    def _layer_input_hook(self, li: int):
        """Pre-hook of decoder layer `li` (installed after the token-drop hooks, so it sees what the layer gets):
        at prefill, hand the layer's input hidden states and their logical positions to the methods that read them."""

        def hook(module, args, kwargs):
            st = self.state
            if st.phase != "prefill":
                return None
            hidden = compat.read(kwargs, "hidden_states")
            if hidden is None and args:
                hidden = args[0]
            if hidden is None:
                raise TransformersMismatchError(
                    f"vlmplug: decoder layer {li} got no hidden states vlmplug could read; {compat.version_note()}")
            B, L = hidden.shape[:2]
            if st.keep is not None and st.drop_layer is not None and li >= st.drop_layer:
                pos = st.keep.to(hidden.device)
            else:
                pos = torch.arange(L, device=hidden.device).expand(B, L)
            for m in self.active:
                if m.wants_layer_input:
                    m.layer_input(li, hidden, pos, self)
            return None

        return hook

    def _after_base_forward(self, module, args, output):
        self.in_forward = False  # also when the forward raised (always_call): the next call starts clean
        if output is not None:
            self.verify_forward()
        return None

    def verify_forward(self) -> None:
        """Fail loudly when a hook missed: every decoder layer's attention must have reached the backend, and after
        an image-bearing prefill every active method must have done what it states (`Method.verify`). A miss means
        the running transformers called or named something differently from the releases vlmplug was tested on."""
        st, n = self.state, self.adapter.num_layers
        if len(st.text_calls) < n:
            missed = sorted(set(range(n)) - st.text_calls)
            raise TransformersMismatchError(
                f"vlmplug: the attention of decoder layers {missed} did not run through vlmplug's attention function "
                f"(the model's text config no longer dispatches to {IMPL_NAME!r}), so {[m.name for m in self.methods]} "
                f"did not act; {compat.version_note()}. Do not change the attention implementation of a patched model; "
                f"remove the handle first."
            )
        if st.phase != "prefill":
            return
        lay = self.layout
        if lay is None or not any(s.images for s in lay.samples):
            return
        problems = [msg for m in self.active if (msg := m.verify(self))]
        if problems:
            raise TransformersMismatchError(
                "vlmplug: " + "; ".join(problems) + f". The model's answer would lack the method's effect; "
                f"{compat.version_note()}."
            )

    @property
    def layout(self) -> Layout | None:
        """Layout of the current pass's prompt, computed on first use after the image features are known."""
        st = self.state
        if not st.layout_done and st.input_ids is not None:
            st.layout_done = True
            try:
                st.layout = self.adapter.locate(st.input_ids, st.attention_mask, self.features.pending_meta, st.sizes)
            except LayoutError as e:
                warnings.warn(f"vlmplug: could not locate image tokens ({e}); image methods are skipped for this input")
                st.layout = None
        return st.layout

    def logical_mask(self, batch: int, q_len: int, device) -> torch.Tensor:
        """Decode-time bool mask [B, 1, q, S_logical] from the prompt's padding, causal among the q new
        tokens. Used where a model sized its mask by a pruned or sliding cache instead of the logical length."""
        st = self.state
        S = st.logical_len
        pad = st.attention_mask
        pad = pad.bool() if pad is not None else torch.ones(batch, st.prompt_len, dtype=torch.bool)
        full = torch.cat([pad.to(device), torch.ones(batch, S - pad.shape[1], dtype=torch.bool, device=device)], 1)
        m = full[:, None, None, :].expand(batch, 1, q_len, S)
        if q_len > 1:
            qpos = torch.arange(S - q_len, S, device=device)
            m = m & (torch.arange(S, device=device)[None, :] <= qpos[:, None])[None, None]
        return m

    def set_image_sizes(self, sizes) -> None:
        self.pending_sizes = sizes
        self.state.layout_done = False

    # -------------------------------------------------------------- plans
    def plan_for(self, module, query, key, attention_mask, scaling, kwargs, value=None) -> LayerPlan:
        return self.planner.plan_for(module, query, key, attention_mask, scaling, kwargs, value)

    def drop_context(self, hidden_states) -> LayerContext:
        return self.planner.drop_context(hidden_states)

    def kv_context(self, li: int) -> LayerContext:
        return self.planner.kv_context(li)

"""Runtime state of one patched model: hooks, the current forward's layout, and plan assembly.

Data flow per forward:
  base-model pre-hook ─ prefill? remember input_ids / attention_mask, reset per-forward state
  get_image_features ─ (wrapped) remember what the layout needs (image_sizes, image_grid_thw, ...)
  attention call ─ backend asks `plan_for(module, ...)`; the session builds a LayerContext (logical
                   query/key positions, layout) and merges each method's LayerPlan
  decoder-layer pre-hooks ─ token dropping (only when a method drops tokens)
  attention forward hooks ─ KV-cache pruning after prefill (only when a method prunes)
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import compat
from .adapters.base import Adapter, ImageMeta
from .backend.attention import IMPL_NAME, register_backend
from .backend.kernels import fast_kernel
from .backend.plan import LayerPlan
from .errors import LayoutError, MethodConfigError, TransformersMismatchError
from .layout import Layout


@dataclass
class LayerContext:
    """What a method may look at when planning one attention call."""

    session: "Session"
    layer_idx: int  # decoder layer index, or vision-attention index when `vision` is True
    vision: bool
    phase: str  # "prefill" or "decode"
    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    q_pos: torch.Tensor | None  # long [B, Lq] logical sequence positions of the queries (text only)
    k_pos: torch.Tensor | None  # long [B, S] or [B, Hkv, S] logical positions of the keys (text only)
    device: torch.device = torch.device("cpu")

    @property
    def layout(self) -> Layout | None:
        return self.session.layout


def _all_configs(model: nn.Module) -> list[Any]:
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


class Session:
    def __init__(self, model: nn.Module, adapter: Adapter, methods: list):
        self.model = model
        self.adapter = adapter
        self.methods = methods
        self.kernel = fast_kernel  # tests swap in an eager reference
        self._hooks: list = []
        self._attrs: list[tuple[Any, str]] = []
        self._attn_snapshot: list[tuple[Any, Any]] = []
        self._wrapped_base = None
        # per-forward state
        self.phase = "prefill"
        self.forward_index = -1
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.prompt_len = 0
        self.logical_len = 0  # logical sequence length after this forward
        self.pending_meta: ImageMeta | None = None
        self._feature_out = None  # image-feature output waiting for the prefill (generate path)
        self._in_forward = False
        self.pending_sizes = None
        self.sizes = None
        self.static_cache = False
        self.has_cache = False  # the base model's forward received a KV cache
        self.effects: set = set()  # what the backend and hooks did in this forward (see `verify_forward`)
        self._text_calls: set[int] = set()  # decoder layers whose attention reached the backend this forward
        self._layout: Layout | None = None
        self._layout_done = False
        self.keep: torch.Tensor | None = None  # [B, L'] logical positions kept after `drop_layer`
        self.dead: torch.Tensor | None = None  # [B, L'] True at padding slots of ragged keeps
        self.hidden: torch.Tensor | None = None  # [B, L] dropped positions (pre-LLM selection masks them early)
        self.select_layer: int | None = None
        self.drop_layer: int | None = None  # first layer computing kept tokens only (this prefill)
        self.cache_cut: int | None = None  # first layer whose KV cache holds kept tokens only
        self.kv_index: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, S'] logical positions kept in the cache
        self.kv_dead: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, S'] padding slots of ragged KV keeps

    # ------------------------------------------------------------- install
    def install(self) -> None:
        register_backend()
        ad = self.adapter
        self._attn_snapshot = [(c, c._attn_implementation_internal) for c in _all_configs(self.model)]
        keys = {ad.text_config_key: IMPL_NAME}
        need_vision = any(getattr(m, "needs_vision_attention", False) for m in self.methods)
        if need_vision:
            keys[ad.vision_config_key] = IMPL_NAME
        self.model.set_attn_implementation(keys)
        for m in ad.text_attention_modules():
            self._set_attr(m, "_vlmplug_session", self)
        if need_vision:
            for i, m in enumerate(ad.vision_attention_modules()):
                self._set_attr(m, "_vlmplug_session", self)
                self._set_attr(m, "_vlmplug_vision_idx", i)
        base = ad.base_model
        self._hooks.append(base.register_forward_pre_hook(self._on_base_forward, with_kwargs=True))
        self._hooks.append(base.register_forward_hook(self._after_base_forward))
        self._wrap_image_features(base)
        drop_layers = {m.drop_layer for m in self.methods if getattr(m, "drop_layer", None) is not None}
        if len(drop_layers) > 1:
            raise MethodConfigError(f"methods drop tokens after different layers {sorted(drop_layers)}; use one")
        if drop_layers:
            from .backend.drop import install_drop_hooks

            pre = any(getattr(m, "hide_before", False) for m in self.methods)
            self._hooks += install_drop_hooks(self, drop_layers.pop(), start=0 if pre else None)
        kv_layers = [li for m in self.methods for li in (getattr(m, "kv_prune_layers", None) or ())]
        if kv_layers and self.drop_layer is not None and max(kv_layers) >= self.drop_layer:
            raise MethodConfigError(
                f"{[m.name for m in self.methods]}: KV pruning in layers at or after the token-drop layer "
                f"{self.drop_layer} is not supported; prune the KV cache only before it or use one method"
            )
        if kv_layers:
            from .backend.kvprune import install_kv_hooks

            self._hooks += install_kv_hooks(self)
        for m in self.methods:
            m.attach(self)

    def add_hook(self, handle) -> None:
        """Track a hook a method registered, so `remove()` takes it away."""
        self._hooks.append(handle)

    def _set_attr(self, obj, name, value) -> None:
        setattr(obj, name, value)
        self._attrs.append((obj, name))

    def _wrap_image_features(self, base: nn.Module) -> None:
        orig = getattr(base, "get_image_features", None)
        if orig is None:
            return
        try:
            sig = inspect.signature(orig)
        except (TypeError, ValueError):  # pragma: no cover - builtins only
            sig = None
        session = self

        @functools.wraps(orig)  # generate() reads this signature to pick the encoder's kwargs
        def get_image_features(*args, **kwargs):
            bound = dict(kwargs)
            if sig is not None:
                try:
                    bound = dict(sig.bind_partial(*args, **kwargs).arguments)
                    bound.update(bound.pop("kwargs", {}) or {})
                except TypeError:
                    pass
            session.pending_meta = session.adapter.capture_meta(bound)
            # inside a forward every row brought its own images; before it, generate() encodes them once and
            # may repeat rows afterwards (beams), which then share their images
            session.pending_meta.values["encoded_in_forward"] = session._in_forward
            session._layout_done = False
            for m in session.methods:
                if hasattr(m, "begin_vision"):
                    m.begin_vision()
            out = orig(*args, **kwargs)
            return session._on_image_features(out)

        get_image_features.__vlmplug_wrapper__ = True
        base.get_image_features = get_image_features
        self._wrapped_base = base

    def _on_image_features(self, out):
        """Let methods read or edit the projected image features before the LLM sees them. Inside a
        forward the layout is known at once; generate() encodes images before the prefill forward, so
        there the edit waits for the prefill pre-hook (the same tensors are scattered later)."""
        if not any(hasattr(m, "on_image_features") for m in self.methods):
            return out
        self._feature_out = out
        if self._in_forward:
            self._apply_feature_methods()
        return out

    def _apply_feature_methods(self) -> None:
        out, self._feature_out = self._feature_out, None
        feats = getattr(out, "pooler_output", None) if out is not None else None
        lay = self.layout
        if feats is None or lay is None:
            return
        images = [(b, im) for b, s in enumerate(lay.samples) for im in s.images]
        sizes = [int(im.positions.numel()) for _, im in images]
        if isinstance(feats, torch.Tensor):
            flat = feats.reshape(-1, feats.shape[-1])
            if flat.data_ptr() != feats.data_ptr() or flat.shape[0] != sum(sizes):
                warnings.warn("vlmplug: image features do not match the image tokens; feature methods skipped")
                return
            rows = list(flat.split(sizes))
        else:  # one block per image, or per sample holding several images (Idefics3): views per image
            rows, queue = [], [x.reshape(-1, x.shape[-1]) for x in feats if x.numel()]
            for n in sizes:
                while queue and queue[0].shape[0] == 0:
                    queue.pop(0)
                if not queue or queue[0].shape[0] < n:
                    warnings.warn("vlmplug: image features do not match the image tokens; feature methods skipped")
                    return
                rows.append(queue[0][:n])
                queue[0] = queue[0][n:]
        for m in self.methods:
            if hasattr(m, "on_image_features"):
                m.on_image_features(rows, images, self)

    def uninstall(self) -> None:
        for m in reversed(self.methods):
            try:
                m.detach()
            except Exception:  # pragma: no cover - detaching must not stop the rest of the undo
                pass
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for obj, name in reversed(self._attrs):
            if name in obj.__dict__:
                delattr(obj, name)
        self._attrs = []
        if self._wrapped_base is not None and getattr(self._wrapped_base.__dict__.get("get_image_features"), "__vlmplug_wrapper__", False):
            del self._wrapped_base.__dict__["get_image_features"]
        self._wrapped_base = None
        for cfg, value in self._attn_snapshot:
            cfg._attn_implementation_internal = value
        self._attn_snapshot = []

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
        self.forward_index += 1
        self.has_cache = pkv is not None
        self.effects, self._text_calls = set(), set()
        self.static_cache = bool(getattr(pkv, "is_compileable", False))
        if self.static_cache and any(getattr(m, "drop_layer", None) is not None or getattr(m, "kv_prune_layers", None)
                                     for m in self.methods):
            names = [m.name for m in self.methods]
            raise MethodConfigError(
                f"{names}: token dropping and KV pruning need a dynamic KV cache; this forward got "
                f"{type(pkv).__name__} (e.g. generate(cache_implementation='static')): use the default cache"
            )
        if past == 0:
            self.phase = "prefill"
            self.sizes, self.pending_sizes = self.pending_sizes, None  # sizes apply to this prompt only
            if compat.read(kwargs, "pixel_values") is not None:
                self.pending_meta = None  # this forward encodes its own images
            self.input_ids = ids
            am = compat.read(kwargs, "attention_mask")
            self.attention_mask = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
            self._layout, self._layout_done = None, False
            self.keep, self.dead, self.hidden, self.kv_index, self.kv_dead = None, None, None, {}, {}
            self.prompt_len = q_len or 0
            self.logical_len = self.prompt_len
        else:
            self.phase = "decode"
            self.logical_len = past + (q_len or 0)
        for m in self.methods:
            m.begin_forward(self)
        self._in_forward = True
        if self.phase == "prefill" and self._feature_out is not None:
            self._apply_feature_methods()
        return None

    def _after_base_forward(self, module, args, output):
        self._in_forward = False
        self.verify_forward()
        return None

    def verify_forward(self) -> None:
        """Fail loudly when a hook missed: every decoder layer's attention must have reached the backend, and after
        an image-bearing prefill every method must have done what it states (`Method.verify`). A miss means the
        running transformers called or named something differently from the releases vlmplug was tested on."""
        n = self.adapter.num_layers
        if len(self._text_calls) < n:
            missed = sorted(set(range(n)) - self._text_calls)
            raise TransformersMismatchError(
                f"vlmplug: the attention of decoder layers {missed} did not run through vlmplug's attention function "
                f"(the model's text config no longer dispatches to {IMPL_NAME!r}), so {[m.name for m in self.methods]} "
                f"did not act; {compat.version_note()}. Do not change the attention implementation of a patched model; "
                f"remove the handle first."
            )
        if self.phase != "prefill":
            return
        lay = self.layout
        if lay is None or not any(s.images for s in lay.samples):
            return
        problems = [msg for m in self.methods if (msg := m.verify(self))]
        if problems:
            raise TransformersMismatchError(
                "vlmplug: " + "; ".join(problems) + f". The model's answer would lack the method's effect; "
                f"{compat.version_note()}."
            )

    @property
    def layout(self) -> Layout | None:
        """Layout of the current prompt, computed on first use after the image features are known."""
        if not self._layout_done and self.input_ids is not None:
            self._layout_done = True
            try:
                self._layout = self.adapter.locate(self.input_ids, self.attention_mask, self.pending_meta, self.sizes)
            except LayoutError as e:
                warnings.warn(f"vlmplug: could not locate image tokens ({e}); image methods are skipped for this input")
                self._layout = None
        return self._layout

    def logical_mask(self, batch: int, q_len: int, device) -> torch.Tensor:
        """Decode-time bool mask [B, 1, q, S_logical] from the prompt's padding, causal among the q new
        tokens. Used where a model sized its mask by a pruned or sliding cache instead of the logical length."""
        S = self.logical_len
        pad = self.attention_mask
        pad = pad.bool() if pad is not None else torch.ones(batch, self.prompt_len, dtype=torch.bool)
        full = torch.cat([pad.to(device), torch.ones(batch, S - pad.shape[1], dtype=torch.bool, device=device)], 1)
        m = full[:, None, None, :].expand(batch, 1, q_len, S)
        if q_len > 1:
            qpos = torch.arange(S - q_len, S, device=device)
            m = m & (torch.arange(S, device=device)[None, :] <= qpos[:, None])[None, None]
        return m

    def set_image_sizes(self, sizes) -> None:
        self.pending_sizes = sizes
        self._layout_done = False

    # -------------------------------------------------------------- plans
    def _positions(self, module, B, Lq, key) -> tuple[torch.Tensor, torch.Tensor]:
        dev = key.device
        li = module.layer_idx
        S = key.shape[2]
        if self.phase == "prefill":
            if self.keep is not None and self.drop_layer is not None and li >= self.drop_layer:
                q_pos = self.keep.to(dev)
                k_pos = q_pos
            else:
                q_pos = torch.arange(Lq, device=dev).expand(B, Lq)
                k_pos = torch.arange(S, device=dev).expand(B, S)
            return q_pos, k_pos
        q_pos = torch.arange(self.logical_len - Lq, self.logical_len, device=dev).expand(B, Lq)
        tail = torch.arange(self.prompt_len, self.logical_len, device=dev)
        if li in self.kv_index:
            idx = self.kv_index[li].to(dev)
            k_pos = torch.cat([idx, tail.expand(*idx.shape[:2], -1)], dim=-1)
        elif self.keep is not None and self.cache_cut is not None and li >= self.cache_cut:
            k_pos = torch.cat([self.keep.to(dev), tail.expand(B, -1)], dim=-1)
        elif self.static_cache:  # preallocated: slot i holds position i (slots past the length are masked)
            k_pos = torch.arange(S, device=dev).expand(B, S)
        else:  # a sliding-window cache holds only the most recent S positions
            k_pos = torch.arange(self.logical_len - S, self.logical_len, device=dev).expand(B, S)
        return q_pos, k_pos

    def drop_context(self, hidden_states) -> LayerContext:
        """Context for `tokens_to_keep` at the drop layer (prefill, full-length logical positions)."""
        B, L = hidden_states.shape[:2]
        pos = torch.arange(L, device=hidden_states.device).expand(B, L)
        cfg = self.adapter.text_config
        return LayerContext(self, int(self.drop_layer), False, "prefill", B, L, L, int(cfg.num_attention_heads),
                            int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)), pos, pos, hidden_states.device)

    def kv_context(self, li: int) -> LayerContext:
        """Context for `kv_keep` after the prefill attention of layer `li`."""
        B, L = self.input_ids.shape if self.input_ids is not None else (0, self.prompt_len)
        pos = torch.arange(L).expand(B, L)
        cfg = self.adapter.text_config
        return LayerContext(self, li, False, "prefill", B, L, L, int(cfg.num_attention_heads),
                            int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)), pos, pos)

    def plan_for(self, module, query, key, attention_mask, kwargs) -> LayerPlan | None:
        vision = getattr(module, "layer_idx", None) is None
        B, Hq, Lq, _ = query.shape
        if vision:
            ctx = LayerContext(self, int(getattr(module, "_vlmplug_vision_idx", 0)), True, self.phase, B, Lq,
                               key.shape[2], Hq, key.shape[1], None, None, query.device)
        else:
            li = int(module.layer_idx)
            self._text_calls.add(li)
            if self.phase == "prefill" and not self.static_cache and key.shape[2] != Lq:
                raise TransformersMismatchError(
                    f"vlmplug read this forward as a prefill (no filled KV cache among its arguments), but decoder "
                    f"layer {li} attends to {key.shape[2] - Lq} cached tokens: the cache reached the model under a "
                    f"name vlmplug did not read, and every method would act on the wrong tokens; "
                    f"{compat.version_note()}"
                )
            q_pos, k_pos = self._positions(module, B, Lq, key)
            ctx = LayerContext(self, int(module.layer_idx), False, self.phase, B, Lq, key.shape[2], Hq, key.shape[1],
                               q_pos, k_pos, query.device)
        plan = LayerPlan()
        for m in self.methods:
            p = m.vision_plan(ctx) if vision else m.layer_plan(ctx)
            if p is not None:
                plan.merge(p)
        return plan

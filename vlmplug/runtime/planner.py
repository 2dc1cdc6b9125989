"""One attention call's plan: the context a method plans from, and the merge of every active method's plan."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .. import compat
from ..backend.plan import LayerPlan, Probe
from ..errors import TransformersMismatchError
from .state import ForwardState


@dataclass
class LayerContext:
    """What a method may look at when planning one attention call.

    Masks a method needs are computed once per call and shared (`image_keys`, `text_queries`); `attention(select)`
    gives this very call's softmax rows for chosen queries (O(rows x S)), so a method can pick sinks or heads
    from the attention it is about to edit (two-phase planning).
    """

    session: Any
    state: ForwardState
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
    _call: dict = field(default_factory=dict, repr=False)  # module, query, key, mask, scaling of this call

    @property
    def label(self) -> str:
        """The pass this forward belongs to."""
        return self.state.label

    @property
    def layout(self):
        return self.session.layout

    def keys_at(self, marked: torch.Tensor) -> torch.Tensor:
        """bool [B, S] (or [B, Hq, S] on a per-head pruned cache): this call's keys whose logical position is marked
        in `marked` (bool [B, N], logical positions; positions past N count as unmarked)."""
        kp = self.k_pos.to(self.device)
        n = max(int(kp.max()) + 1, marked.shape[1])
        m = torch.zeros(marked.shape[0], n, dtype=torch.bool, device=self.device)
        m[:, : marked.shape[1]] = marked.to(self.device)
        if kp.dim() == 2:
            return torch.gather(m, 1, kp)
        per_kv = torch.gather(m[:, None, :].expand(-1, kp.shape[1], -1), 2, kp)
        return per_kv.repeat_interleave(self.num_heads // kp.shape[1], dim=1)

    @cached_property
    def image_keys(self) -> torch.Tensor | None:
        """bool [B, S]: True at keys that are image tokens; [B, Hq, S] (per query head, ready for `Redistribute`)
        where keys differ per KV head (a pruned cache). None without a layout."""
        lay = self.layout
        if lay is None or self.k_pos is None:
            return None
        return self.keys_at(lay.image_mask(max(self.state.logical_len, int(self.k_pos.max()) + 1), device=self.device))

    @cached_property
    def text_queries(self) -> torch.Tensor | None:
        """bool [B, Lq]: queries that are real (not padding) text tokens (None without a layout)."""
        lay = self.layout
        if lay is None or self.q_pos is None:
            return None
        qp = self.q_pos.to(self.device)
        img = lay.image_mask(max(self.state.logical_len, int(qp.max()) + 1), device=self.device)
        out = ~torch.gather(img, 1, qp)
        first = torch.tensor([s.first_real for s in lay.samples], device=self.device)
        return out & (qp >= first[:, None])

    @cached_property
    def real_queries(self) -> torch.Tensor | None:
        """bool [B, Lq]: queries that are real tokens (text or image; not left padding). None without a layout."""
        lay = self.layout
        if lay is None or self.q_pos is None:
            return None
        first = torch.tensor([s.first_real for s in lay.samples], device=self.device)
        return self.q_pos.to(self.device) >= first[:, None]

    def seen_by(self, select: torch.Tensor) -> torch.Tensor:
        """long [B, S]: how many of the selected query rows (bool [B, Lq]) can see each key of this call, from the
        mask the call got (sliding windows and padding included) or, without one, the causal rule."""
        c = self._call
        m, sel = c.get("mask"), select.to(self.device)
        if m is None:
            from ..backend.kernels import causal_flag

            if not causal_flag(c["module"], c["query"], None, c["kwargs"]):
                return sel.sum(-1, keepdim=True).expand(-1, self.kv_len)
            # SDPA's is_causal: query row i sees keys 0..i
            idx = torch.searchsorted(torch.arange(self.q_len, device=self.device), torch.arange(self.kv_len, device=self.device))
            return (sel.flip(-1).cumsum(-1).flip(-1).gather(1, idx.clamp(max=self.q_len - 1).expand(sel.shape[0], -1))
                    * (idx < self.q_len))
        vis = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        vis = vis[:, 0] if vis.shape[1] == 1 else vis.any(1)  # [B|1, Lq|1, S]
        vis = vis.expand(sel.shape[0], self.q_len, self.kv_len)
        from ..backend.kernels import PROBE_CHUNK

        out = torch.zeros(sel.shape[0], self.kv_len, dtype=torch.long, device=self.device)
        for i in range(0, self.q_len, PROBE_CHUNK):  # chunks of rows: never a new Lq x S tensor
            out += (vis[:, i : i + PROBE_CHUNK] & sel[:, i : i + PROBE_CHUNK, None]).sum(1)
        return out

    def head_outputs(self, select: torch.Tensor) -> torch.Tensor:
        """Each head's attention output (its slice of the o_proj input), averaged over the selected query rows
        (bool [B, Lq]): float32 [B, Hq, Dv]. Before this call's edits; O(rows x S)."""
        from ..backend.kernels import expand_kv

        p = self.attention(select)  # [B, Hq, S]
        v = self._value
        v = expand_kv(v, p.shape[1] // v.shape[1]).float()
        return (p[:, :, None, :] @ v)[:, :, 0]

    def attention(self, select: torch.Tensor) -> torch.Tensor:
        """This call's softmax attention, averaged over the selected query rows (bool [B, Lq]): float32 [B, Hq, S],
        with the model's mask, scaling and GQA grouping. Before this call's edits are applied."""
        from ..backend.kernels import run_probe

        c = self._call
        if not c:
            raise RuntimeError("attention() is only available while planning an attention call")
        got = {}
        causal_module = bool(c["kwargs"].get("is_causal", getattr(c["module"], "is_causal", True)))
        scale = c["scaling"] if c["scaling"] is not None else c["query"].shape[-1] ** -0.5
        run_probe(c["module"], Probe(select, lambda p, n: got.setdefault("p", p)), c["query"], c["key"], c["mask"],
                  scale, causal_module)
        return got["p"]

    @property
    def _value(self) -> torch.Tensor:
        if "value" not in self._call:
            raise RuntimeError("head_outputs() is only available while planning an attention call")
        return self._call["value"]


class Planner:
    def __init__(self, session):
        self.session = session

    def positions(self, st: ForwardState, li: int, B: int, Lq: int, key) -> tuple[torch.Tensor, torch.Tensor]:
        dev = key.device
        S = key.shape[2]
        if st.phase == "prefill":
            if st.keep is not None and st.drop_layer is not None and li >= st.drop_layer:
                q_pos = st.keep.to(dev)
                k_pos = q_pos
            else:
                q_pos = torch.arange(Lq, device=dev).expand(B, Lq)
                k_pos = torch.arange(S, device=dev).expand(B, S)
            return q_pos, k_pos
        q_pos = torch.arange(st.logical_len - Lq, st.logical_len, device=dev).expand(B, Lq)
        tail = torch.arange(st.prompt_len, st.logical_len, device=dev)
        if li in st.kv_index:
            idx = st.kv_index[li].to(dev)
            k_pos = torch.cat([idx, tail.expand(*idx.shape[:2], -1)], dim=-1)
        elif st.keep is not None and st.cache_cut is not None and li >= st.cache_cut:
            k_pos = torch.cat([st.keep.to(dev), tail.expand(B, -1)], dim=-1)
        elif st.static_cache:  # preallocated: slot i holds position i (slots past the length are masked)
            k_pos = torch.arange(S, device=dev).expand(B, S)
        else:  # a sliding-window cache holds only the most recent S positions
            k_pos = torch.arange(st.logical_len - S, st.logical_len, device=dev).expand(B, S)
        return q_pos, k_pos

    def plan_for(self, module, query, key, attention_mask, scaling, kwargs, value=None) -> LayerPlan:
        session, st = self.session, self.session.state
        vision = getattr(module, "layer_idx", None) is None
        B, Hq, Lq, _ = query.shape
        call = dict(module=module, query=query, key=key, mask=attention_mask, scaling=scaling, kwargs=kwargs)
        if value is not None:
            call["value"] = value
        if vision:
            ctx = LayerContext(session, st, int(getattr(module, "_vlmplug_vision_idx", 0)), True, st.phase, B, Lq,
                               key.shape[2], Hq, key.shape[1], None, None, query.device, call)
        else:
            li = int(module.layer_idx)
            st.text_calls.add(li)
            if st.phase == "prefill" and not st.static_cache and key.shape[2] != Lq:
                raise TransformersMismatchError(
                    f"vlmplug read this forward as a prefill (no filled KV cache among its arguments), but decoder "
                    f"layer {li} attends to {key.shape[2] - Lq} cached tokens: the cache reached the model under a "
                    f"name vlmplug did not read, and every method would act on the wrong tokens; "
                    f"{compat.version_note()}"
                )
            q_pos, k_pos = self.positions(st, li, B, Lq, key)
            ctx = LayerContext(session, st, li, False, st.phase, B, Lq, key.shape[2], Hq, key.shape[1], q_pos, k_pos,
                               query.device, call)
        plan = LayerPlan()
        for m in session.active:
            p = m.vision_plan(ctx) if vision else m.layer_plan(ctx)
            if p is not None:
                plan.merge(p)
        ctx._call.clear()
        return plan

    def drop_context(self, hidden_states) -> LayerContext:
        """Context for `tokens_to_keep` at the drop layer (prefill, full-length logical positions)."""
        st = self.session.state
        B, L = hidden_states.shape[:2]
        pos = torch.arange(L, device=hidden_states.device).expand(B, L)
        cfg = self.session.adapter.text_config
        return LayerContext(self.session, st, int(st.drop_layer), False, "prefill", B, L, L,
                            int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)),
                            pos, pos, hidden_states.device)

    def kv_context(self, li: int) -> LayerContext:
        """Context for `kv_keep` after the prefill attention of layer `li`."""
        st = self.session.state
        B, L = st.input_ids.shape if st.input_ids is not None else (0, st.prompt_len)
        pos = torch.arange(L).expand(B, L)
        cfg = self.session.adapter.text_config
        return LayerContext(self.session, st, li, False, "prefill", B, L, L, int(cfg.num_attention_heads),
                            int(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)), pos, pos)

"""`record`: the softmax attention that chosen query tokens give each image's tokens, per layer and
head, placed on the image's token grid. Outputs are unchanged (a probe reads q·Kᵀ rows only)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backend.plan import LayerPlan, Probe
from ..errors import MethodConfigError
from ..registry import register_method
from ..selection import check_selection, freeze, resolve
from .base import Method, MethodConfig

QUERY_MODES = ("last", "after_image")


@register_method("record")
@dataclass(frozen=True)
class Record(MethodConfig):
    """Record image attention at every forward (the latest forward is kept, per pass).

    layers: decoder layers to record, a layer selection (vlmplug/selection.py: None = all, an index, a list, or
        a slice like "2:"; 0-based, negative from the end).
    queries: "last" (the last real token: the prompt's last token at prefill, the new token while
        decoding), "after_image" (mean over every text token after the sample's last image token), or a
        list of explicit logical positions (negative = from the end of the prompt); a forward without
        any selected query leaves the previous maps in place.
    """

    layers: tuple[int, ...] | str | int | None = None
    queries: str | tuple[int, ...] = "last"

    def __post_init__(self):
        if isinstance(self.queries, str):
            if self.queries not in QUERY_MODES:
                raise MethodConfigError(f"record: queries={self.queries!r}; allowed {list(QUERY_MODES)} or a list of positions")
        elif not (isinstance(self.queries, (list, tuple)) and self.queries and all(isinstance(q, int) for q in self.queries)):
            raise MethodConfigError(f"record: queries={self.queries!r}; allowed {list(QUERY_MODES)} or a non-empty list of ints")
        else:
            self._normalise("queries", tuple(self.queries))
        check_selection("record", "layers", self.layers)
        self._normalise("layers", freeze(self.layers) if not isinstance(self.layers, range) else tuple(self.layers))

    def build(self) -> "RecordRunner":
        return RecordRunner(self)


def logical_rows(probs: torch.Tensor, k_pos: torch.Tensor, L: int) -> torch.Tensor:
    """Probe rows [B, H, S] over this call's keys -> float32 [B, H, L] on the CPU, indexed by logical position
    (keys removed by pruning read 0)."""
    H = probs.shape[1]
    kp = k_pos.cpu()
    width = max(L, int(kp.max()) + 1) if kp.numel() else L  # a static cache has unused slots past L
    dense = torch.zeros(probs.shape[0], H, width, dtype=torch.float32)
    pr = probs.float().cpu()
    if kp.dim() == 2:
        dense.scatter_(2, kp[:, None, :].expand(-1, H, -1), pr)
    else:  # per-KV-head key positions (pruned cache): each query head uses its group's rows
        dense.scatter_(2, kp.repeat_interleave(H // kp.shape[1], dim=1), pr)
    return dense[..., :L]


class _PassMaps:
    """record's state in one pass: rows of the running forward, maps of the latest forward that selected queries."""

    def __init__(self):
        self.pending: dict = {}
        self.layout = None
        self.planned: set[int] = set()
        self.maps = None  # AttentionMaps


class RecordRunner(Method):
    def __init__(self, config: Record):
        super().__init__(config)
        self._passes: dict[str, _PassMaps] = {}

    def setup(self, adapter):
        self._layer_list = resolve("record", "layers", self.layers, adapter.num_layers)

    def _mine(self, label: str | None = None) -> _PassMaps:
        if label is None:
            label = self.session.state.label if self.session is not None else "main"
        return self._passes.setdefault(label, _PassMaps())

    def begin_forward(self, session):
        p = self._mine()
        self._commit(p)  # the previous forward's rows become the latest maps
        p.planned = set()

    # ------------------------------------------------------------------
    def _select(self, ctx) -> torch.Tensor | None:
        lay = ctx.layout
        B, Lq = ctx.batch, ctx.q_len
        sel = torch.zeros(B, Lq, dtype=torch.bool, device=ctx.device)
        for b in range(B):
            s = lay.samples[b]
            if not s.images:
                continue
            qp = ctx.q_pos[b]
            if self.queries == "last":
                want = qp == (s.last_real if ctx.phase == "prefill" else qp[-1])
            elif self.queries == "after_image":
                last_img = int(s.image_positions.max())
                want = (qp > last_img) & (qp <= (s.last_real if ctx.phase == "prefill" else qp[-1]))
            else:
                pos = torch.tensor([q if q >= 0 else s.last_real + 1 + q for q in self.queries], device=ctx.device)
                want = torch.isin(qp, pos)
            sel[b] = want
        return sel if sel.any() else None

    def layer_plan(self, ctx):
        if ctx.layer_idx not in self._layer_list or ctx.layout is None:
            return None
        sel = self._select(ctx)
        if sel is None:
            return None
        li, k_pos, L = ctx.layer_idx, ctx.k_pos, ctx.state.logical_len
        p = self._mine(ctx.state.label)
        p.layout = ctx.layout
        p.planned.add(li)

        def store(probs, counts):
            p.pending[li] = (logical_rows(probs, k_pos, L), counts.cpu())

        return LayerPlan(probes=[Probe(sel, store)])

    # ------------------------------------------------------------------
    @staticmethod
    def _commit(p: _PassMaps) -> None:
        if p.pending:
            from ..results import AttentionMaps

            layers = dict(sorted(p.pending.items()))
            p.maps = AttentionMaps(layout=p.layout, rows={li: r for li, (r, _) in layers.items()},
                                   counts={li: c for li, (_, c) in layers.items()})
            p.pending = {}

    def result(self, label: str = "main"):
        """`AttentionMaps` of the latest forward (of pass `label`) that selected queries, or None."""
        p = self._passes.get(label)
        if p is None:
            return None
        self._commit(p)
        return p.maps

    def image_attention(self, view: str = "main", label: str = "main"):
        """Per sample, a list per image of float tensors [num_layers, num_heads, rows, cols] (see
        `AttentionMaps.images`); [] before any forward selected queries."""
        maps = self.result(label)
        return [] if maps is None else maps.images(view)

    @property
    def recorded_layers(self) -> list[int]:
        maps = self.result()
        return [] if maps is None else maps.layers

    def stats(self):
        return {"recorded_layers": self.recorded_layers}

    def verify(self, session):
        p = self._mine(session.state.label)
        missed = sorted(p.planned - set(p.pending))
        if self.queries == "last":  # every sample with an image has a last token: every layer must record
            missed = sorted(set(missed) | (set(self._layer_list) - set(p.pending)))
        if missed:
            return f"record expected attention maps of decoder layers {missed}; none were recorded"
        return None

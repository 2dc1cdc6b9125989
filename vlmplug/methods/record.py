"""`record`: the softmax attention that chosen query tokens give each image's tokens, per layer and
head, placed on the image's token grid. Outputs are unchanged (a probe reads q·Kᵀ rows only)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backend.plan import LayerPlan, Probe
from ..errors import MethodConfigError
from ..registry import register_method
from .base import Method

QUERY_MODES = ("last", "after_image")


@register_method("record")
@dataclass
class Record(Method):
    """Record image attention at every forward (the latest forward is kept).

    layers: decoder layers to record (None = all; negative indices count from the end).
    queries: "last" (the last real token: the prompt's last token at prefill, the new token while
        decoding), "after_image" (mean over every text token after the sample's last image token), or a
        list of explicit logical positions (negative = from the end of the prompt); a forward without
        any selected query leaves the previous maps in place.
    """

    layers: list[int] | None = None
    queries: str | list[int] = "last"
    _maps: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.queries, str):
            if self.queries not in QUERY_MODES:
                raise MethodConfigError(f"record: queries={self.queries!r}; allowed {list(QUERY_MODES)} or a list of positions")
        elif not (isinstance(self.queries, (list, tuple)) and self.queries and all(isinstance(q, int) for q in self.queries)):
            raise MethodConfigError(f"record: queries={self.queries!r}; allowed {list(QUERY_MODES)} or a non-empty list of ints")
        if self.layers is not None and not isinstance(self.layers, (list, tuple, range)):
            raise MethodConfigError(f"record: layers={self.layers!r} must be a list of layer indices or None")

    def check(self, adapter):
        self._layers_in_range(self.layers, adapter)
        n = adapter.num_layers
        self._layer_list = sorted({li % n for li in self.layers}) if self.layers is not None else list(range(n))

    def attach(self, session):
        super().attach(session)
        self._pending = {}
        self._pending_layout = None
        self._planned = set()

    def begin_forward(self, session):
        self.end_of_forward()  # the previous forward's rows become the latest maps
        self._planned = set()

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
        li, k_pos, L = ctx.layer_idx, ctx.k_pos, ctx.session.logical_len
        self._pending_layout = ctx.layout
        self._planned.add(li)

        def store(probs, counts):
            H = probs.shape[1]
            kp = k_pos.cpu()
            width = max(L, int(kp.max()) + 1) if kp.numel() else L  # a static cache has unused slots past L
            dense = torch.zeros(probs.shape[0], H, width, dtype=torch.float32)
            p = probs.cpu()
            if kp.dim() == 2:
                dense.scatter_(2, kp[:, None, :].expand(-1, H, -1), p)
            else:  # per-KV-head key positions (pruned cache): each query head uses its group's rows
                G = H // kp.shape[1]
                dense.scatter_(2, kp.repeat_interleave(G, dim=1), p)
            self._pending[li] = (dense[..., :L], counts.cpu())

        return LayerPlan(probes=[Probe(sel, store)])

    # ------------------------------------------------------------------
    def end_of_forward(self):
        if getattr(self, "_pending", None):
            self._maps = {"layout": self._pending_layout, "layers": dict(sorted(self._pending.items()))}
            self._pending = {}

    def image_attention(self, view: str = "main"):
        """Per sample, a list per image of float tensors [num_layers, num_heads, rows, cols] from the
        latest forward that selected queries. view: "main", a view name (e.g. "base"), or "all" (dict)."""
        self.end_of_forward()
        if not self._maps:
            return []
        layout, layers = self._maps["layout"], self._maps["layers"]
        order = list(layers)
        out = []
        for b, s in enumerate(layout.samples):
            per_image = []
            for im in s.images:
                def grid(v):
                    rows = torch.stack([layers[li][0][b][:, v.positions] for li in order])
                    return rows.view(len(order), rows.shape[1], v.rows, v.cols)

                if view == "all":
                    per_image.append({v.name: grid(v) for v in im.views})
                else:
                    per_image.append(grid(im.main_view if view == "main" else im.view(view)))
            out.append(per_image)
        return out

    @property
    def recorded_layers(self) -> list[int]:
        self.end_of_forward()
        return list(self._maps.get("layers", {}))

    def stats(self):
        return {"recorded_layers": self.recorded_layers}

    def verify(self, session):
        missed = sorted(self._planned - set(self._pending))
        if self.queries == "last":  # every sample with an image has a last token: every layer must record
            missed = sorted(set(missed) | (set(self._layer_list) - set(self._pending)))
        if missed:
            return f"record expected attention maps of decoder layers {missed}; none were recorded"
        return None

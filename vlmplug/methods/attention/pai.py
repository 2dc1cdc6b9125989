"""PAI (Liu, Zheng, Chen, ECCV 2024, "Paying More Attention to Image"), the attention intervention.

In the chosen decoder layers, for the query row that produces the next token (the prompt's last token at prefill,
the new token while decoding), every head's pre-softmax logits on the image's tokens become s + alpha * |s|
(positive logits grow by (1 + alpha), negative ones move toward 0), then softmax. Defaults from the official code
(LALBJ/PAI): layers 2 to the last (its start_layer=2 .. end_layer=32 on a 32-layer model), alpha 0.2, all heads.
`alpha=0` is the identity. The logit-level CFG step against a text-only branch (the paper's part (b)) is not in
this method yet; `vlmplug.PassMix` with `cfg_mix` runs such a branch.

SDPA cost: the amplification depends on the score, so the chosen rows (one per sample and step) are recomputed
exactly from q.K^T (O(S) per head), the rest of the call stays one SDPA call; no L x L tensor.
Samples without an image are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...backend.plan import Amplify, LayerPlan
from ...registry import register_method
from ...selection import check_selection, freeze, resolve
from ..base import Method, MethodConfig, check_range


@register_method("pai")
@dataclass(frozen=True)
class PAI(MethodConfig):
    """Amplify the last query row's attention logits on image tokens (PAI)."""

    alpha: float = 0.2
    layers: tuple[int, ...] | str | int | None = "2:"

    def __post_init__(self):
        check_range("pai", "alpha", self.alpha, 0.0, None)
        check_selection("pai", "layers", self.layers)
        self._normalise("layers", freeze(self.layers))

    def build(self) -> "PAIRunner":
        return PAIRunner(self)


class PAIRunner(Method):
    def setup(self, adapter):
        self._layers = set(resolve("pai", "layers", self.layers, adapter.num_layers))

    def edit_layers(self):
        return {"amplify": set(self._layers)} if self.alpha > 0 else {}

    def layer_plan(self, ctx):
        if self.alpha == 0 or ctx.layer_idx not in self._layers or ctx.layout is None:
            return None
        rows = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool, device=ctx.device)
        for b, s in enumerate(ctx.layout.samples):
            if not s.images:
                continue
            if ctx.phase == "prefill":
                rows[b] = ctx.q_pos[b].to(ctx.device) == s.last_real
            else:
                rows[b, -1] = True  # the token being generated
        if not bool(rows.any()):
            return None
        return LayerPlan(amplify=Amplify(keys=ctx.image_keys, alpha=torch.tensor(float(self.alpha)), rows=rows))

    def verify(self, session):
        if self.alpha == 0:
            return None
        fx = session.state.effects
        missed = sorted(li for li in self._layers if ("amplify", li) not in fx)
        if missed:
            return f"pai expected amplified attention in decoder layers {missed}; none was applied"
        return None

    def stats(self):
        return {"layers": sorted(self._layers), "alpha": self.alpha}

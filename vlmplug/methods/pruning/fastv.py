"""FastV (Chen et al., ECCV 2024): after layer K-1, rank image tokens by the attention they receive
and drop the rest from layer K on (hidden states, KV cache and all later layers).

Score (official code): mean over heads of the last token's attention row at layer K-1.
`scores="all"` uses the paper's description instead: the mean over all query rows.
Defaults follow the paper's headline setting: K=2, keep 50% of the image tokens.
Image tokens of a sample (several images included) are ranked together, as in the official code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...backend.plan import LayerPlan, Probe
from ...registry import register_method
from ..base import Method, MethodConfig, check_choice, check_range
from .common import budget, check_budget, token_drop_stats, topk_sorted


@register_method("fastv")
@dataclass(frozen=True)
class FastV(MethodConfig):
    """Drop low-attention image tokens after layer K-1 (FastV)."""

    layer: int = 2
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    scores: str = "last"

    def __post_init__(self):
        check_range("fastv", "layer", self.layer, 1, None, kind=int)
        check_choice("fastv", "scores", self.scores, ("last", "all"))
        check_budget("fastv", self.keep_ratio, self.keep_tokens)
        if self.keep_ratio is None and self.keep_tokens is None:
            self._normalise("keep_ratio", 0.5)

    def build(self) -> "FastVRunner":
        return FastVRunner(self)


class FastVRunner(Method):
    def __init__(self, config: FastV):
        super().__init__(config)
        self._scores: dict = {}

    def setup(self, adapter):
        from ...errors import MethodConfigError

        self.drop_layer = self.layer

        if not adapter.min_drop_layer <= self.layer < adapter.num_layers:
            raise MethodConfigError(
                f"fastv: layer={self.layer}; this model allows {adapter.min_drop_layer}..{adapter.num_layers - 1}"
                + (" (Qwen3-VL adds DeepStack features in its first layers)" if adapter.min_drop_layer > 1 else "")
            )

    def layer_plan(self, ctx):
        if ctx.phase != "prefill" or ctx.layer_idx != self.layer - 1 or ctx.layout is None:
            return None
        B, Lq = ctx.batch, ctx.q_len
        if self.scores == "last":
            sel = torch.zeros(B, Lq, dtype=torch.bool)
            for b, s in enumerate(ctx.layout.samples):
                sel[b, s.last_real] = True
        else:
            sel = torch.zeros(B, Lq, dtype=torch.bool)
            for b, s in enumerate(ctx.layout.samples):
                sel[b, s.first_real : s.last_real + 1] = True

        def store(probs, counts):
            self._scores = {"probs": probs.mean(1).cpu()}  # [B, S] head-averaged

        return LayerPlan(probes=[Probe(sel, store)])

    def tokens_to_keep(self, ctx):
        lay = ctx.layout
        if lay is None or "probs" not in self._scores:
            return None
        probs = self._scores.pop("probs")
        keeps = []
        for b, s in enumerate(lay.samples):
            pos = torch.arange(ctx.q_len)
            img = s.image_positions
            if img.numel() == 0:
                keeps.append(pos)
                continue
            k = budget(img.numel(), self.keep_ratio, self.keep_tokens)
            chosen = img[topk_sorted(probs[b, img], k)]
            keeps.append(torch.cat([pos[~torch.isin(pos, img)], chosen]).sort().values)
        return keeps

    def stats(self):
        return token_drop_stats(self.session, self.layer)

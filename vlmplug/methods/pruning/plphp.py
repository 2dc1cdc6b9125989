"""PLPHP (Meng et al., arXiv 2502.14504): per-layer, per-head pruning of image tokens in the KV cache
after prefill. Cuts decode time and KV memory; prefill is unchanged.

- Layer level: the share of the last prompt token's attention (mean over heads) that goes to image
  tokens classifies a layer as vision-attentive (>= alpha, keeps keep_ratio + delta), vision-indifferent
  (<= beta, keeps keep_ratio - delta) or balanced (keeps keep_ratio). A budget given as keep_tokens is the
  balanced layers' share of each image (keep_tokens / its tokens), moved by delta the same way.
- Head level: each KV head keeps its own top-k image tokens by the last token's attention (averaged over
  the query heads that share the KV head under GQA); text tokens are always kept.
The official code is unpublished; alpha, beta, delta and start_layer defaults are ours (documented).
Sliding-window layers (Gemma 3) are not pruned: their caches already hold only the window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...backend.plan import LayerPlan, Probe
from ...errors import MethodConfigError
from ...registry import register_method
from ..base import Method, MethodConfig, check_range
from .common import budget, check_budget, drop_stats


@register_method("plphp")
@dataclass(frozen=True)
class PLPHP(MethodConfig):
    """Per-layer, per-head KV-cache pruning of image tokens after prefill (PLPHP)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    delta: float = 0.1
    alpha: float = 0.2
    beta: float = 0.05
    start_layer: int = 2

    def __post_init__(self):
        check_budget("plphp", self.keep_ratio, self.keep_tokens)
        if self.keep_ratio is None and self.keep_tokens is None:
            self._normalise("keep_ratio", 0.4)
        for name in ("delta", "alpha", "beta"):
            check_range("plphp", name, getattr(self, name), 0.0, 1.0)
        if self.beta > self.alpha:
            raise MethodConfigError(f"plphp: beta={self.beta} must not exceed alpha={self.alpha}")
        check_range("plphp", "start_layer", self.start_layer, 1, None, kind=int)

    def build(self) -> "PLPHPRunner":
        return PLPHPRunner(self)


class PLPHPRunner(Method):
    def __init__(self, config: PLPHP):
        super().__init__(config)
        self._rows: dict = {}
        self._kept: dict = {}

    def setup(self, adapter):
        n = adapter.num_layers
        if self.start_layer >= n:
            raise MethodConfigError(f"plphp: start_layer={self.start_layer}; this model has layers 1..{n - 1} to prune")
        # sliding-window layers keep only their last W keys after prefill: their caches are left alone
        types = getattr(adapter.text_config, "layer_types", None) or ["full_attention"] * n
        self.kv_prune_layers = tuple(li for li in range(self.start_layer, n) if types[li] != "sliding_attention")

    def layer_plan(self, ctx):
        if ctx.phase != "prefill" or ctx.layer_idx < self.start_layer or ctx.layout is None:
            return None
        sel = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool)
        for b, s in enumerate(ctx.layout.samples):
            sel[b, s.last_real] = True
        li = ctx.layer_idx

        def store(probs, counts):
            self._rows[li] = probs.cpu()  # [B, Hq, S]

        return LayerPlan(probes=[Probe(sel, store)])

    def rate(self, vision_share: float, base: float | None = None) -> float:
        """The share of an image's tokens a layer keeps: `base` (keep_ratio, or keep_tokens over the image's
        tokens) moved up by delta in vision-attentive layers and down in vision-indifferent ones."""
        r = self.keep_ratio if base is None else base
        if vision_share >= self.alpha:
            return min(1.0, r + self.delta)
        if vision_share <= self.beta:
            return max(0.0, r - self.delta)
        return r

    def kv_keep(self, ctx):
        li = ctx.layer_idx
        probs = self._rows.pop(li, None)
        lay = ctx.layout
        if probs is None or lay is None:
            return None
        Hkv = ctx.num_kv_heads
        G = probs.shape[1] // Hkv
        keeps, kept = [], []
        for b, s in enumerate(lay.samples):
            pos = torch.arange(ctx.q_len)
            img = s.image_positions
            if img.numel() == 0:
                keeps.append(pos.expand(Hkv, -1))
                kept.append(0)
                continue
            share = float(probs[b, :, img].sum(-1).mean())
            base = self.keep_ratio if self.keep_tokens is None else min(1.0, self.keep_tokens / img.numel())
            k = budget(img.numel(), self.rate(share, base), None)
            head = probs[b].view(Hkv, G, -1).mean(1)[:, img]  # [Hkv, n_img]
            order = torch.argsort(head.double(), dim=-1, descending=True, stable=True)[:, :k]
            text = pos[~torch.isin(pos, img)]
            rows = [torch.cat([text, img[order[h]]]).sort().values for h in range(Hkv)]
            keeps.append(torch.stack(rows))
            kept.append(k)
        self._kept.setdefault(ctx.label, {})[li] = kept
        return keeps

    def stats(self):
        s = self.session
        if s is None or s.state.input_ids is None:
            return {}
        n = s.adapter.num_layers
        L = s.state.prompt_len
        lens = [L] * n
        for li, idx in s.state.kv_index.items():
            lens[li] = int(idx.shape[-1])
        out = drop_stats(s, lens)
        out["flops_saved"] = 0.0  # prefill is unchanged; the saving is in decode attention and KV memory
        out["image_tokens_kept_per_layer"] = {li: v for li, v in sorted(self._kept.get(s.state.label, {}).items())}
        return out

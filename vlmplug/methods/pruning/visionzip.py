"""VisionZip (Yang et al., CVPR 2025). On LLaVA-style CLIP towers (LLaVA-1.5; LLaVA-NeXT per crop, as the official
code does, over the patches that survive unpadding, with the image budget split over crops by their tokens) it works
where the paper does, on the feature-layer hidden states before the projector. Other mapped towers (SigLIP, Qwen
ViT, InternViT, pooled or merged tokens) get the same rules on LLM tokens after the projector (`_select_post`).

At the feature layer (LLaVA: -2):
- dominant tokens: the top patches by CLS attention (summed over heads);
- contextual tokens: the remaining patches' keys (mean over heads, L2-normalised) are compared with
  `contextual` targets picked at a uniform stride; every other remaining patch joins its most similar
  target, and the contextual token is target + mean(assigned), computed on the feature-layer hidden
  states before the projector (as the official code does).
Budget split as in the paper's settings (54+10 of 64, 108+20 of 128, 162+30 of 192): dominant =
round(N' * 5.4 / 6.4). LLaVA-hf drops the CLS embedding from the LLM input, so there is no slot for
the CLS token VisionZip adds: all N' kept tokens are patches (deviation, documented).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import MethodConfigError
from ...registry import register_method
from ..base import MethodConfig, check_range
from .common import split_budget, topk_sorted
from .vision_common import PreLLMSelection, init_budget
from .vision_scores import VisionScores


def visionzip_select(cls_attn: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, k: int, dominant_share: float,
                     allowed: torch.Tensor | None = None):
    """Returns (kept indices, hidden with contextual rows merged). cls_attn [n], keys [n, d], hidden [n, D].
    `allowed` (bool [n]): the patches that have an LLM token (LLaVA-NeXT unpads); the others take no part."""
    n = cls_attn.numel()
    ok = torch.ones(n, dtype=torch.bool) if allowed is None else allowed.cpu()
    cand = torch.nonzero(ok).flatten()
    if k >= cand.numel():
        return cand, hidden
    n_dom = min(k, int(round(k * dominant_share)))
    n_ctx = k - n_dom
    dom = cand[topk_sorted(cls_attn[cand], n_dom)]
    rest = ok.clone()
    rest[dom] = False
    rest_idx = torch.nonzero(rest).flatten()
    if n_ctx == 0 or rest_idx.numel() == 0:
        return dom, hidden
    step = max(1, rest_idx.numel() // n_ctx)
    tgt_local = torch.arange(0, rest_idx.numel(), step)[:n_ctx]
    is_tgt = torch.zeros(rest_idx.numel(), dtype=torch.bool)
    is_tgt[tgt_local] = True
    metric = torch.nn.functional.normalize(keys[rest_idx].double(), dim=-1)
    sim = metric[~is_tgt] @ metric[is_tgt].T
    assign = torch.argmax(sim, dim=1)
    others = rest_idx[~is_tgt]
    targets = rest_idx[is_tgt]
    h = hidden.clone()
    for j, t in enumerate(targets.tolist()):
        members = others[assign == j]
        if members.numel():
            h[t] = (hidden[t].double() + hidden[members].double().mean(0)).to(hidden.dtype)
    return torch.cat([dom, targets]).sort().values, h


@register_method("visionzip")
@dataclass(frozen=True)
class VisionZip(MethodConfig):
    """Dominant (CLS- or most-attended) plus merged contextual tokens at the vision feature layer (VisionZip)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    dominant_share: float = 5.4 / 6.4

    def __post_init__(self):
        init_budget(self)
        check_range("visionzip", "dominant_share", self.dominant_share, 0.0, 1.0)

    def build(self) -> "VisionZipRunner":
        return VisionZipRunner(self)


class VisionZipRunner(VisionScores, PreLLMSelection):
    def setup(self, adapter):
        PreLLMSelection.setup(self, adapter)
        grid = adapter.vision_grid()
        layer = grid.feature_layer if grid is not None else -1
        self._setup_vision(adapter, {layer: "cls"})  # raises, naming the supported families, where not mapped
        self._layer = self._grid.feature_layer
        proj = getattr(adapter.base_model, "multi_modal_projector", None)
        # The official place: CLS towers whose projector takes one feature-layer hidden state per token.
        self._pre = bool(self._grid.cls and self._grid.pool == 1 and not self._grid.merge and proj is not None)
        self.wants_projector_input = self._pre

    def begin_vision(self):
        super().begin_vision()
        self._keys = []

    def vision_plan(self, ctx):
        plan = super().vision_plan(ctx)
        if plan is not None:  # keys of the feature layer (mean over heads, [crops, S, d]), from the call itself
            plan.taps.append(lambda q, k, v, mask, scale: self._keys.append(k.mean(1).detach().float().cpu()))
        return plan

    def projector_input(self, feats):
        """feats [crops, n_patches, D]: feature-layer hidden states (CLS already dropped) -> contextual rows merged."""
        cls_attn = torch.stack(self.token_scores(self._layer))
        keys = torch.cat(self._keys, 0)[:, 1:]
        new = feats.clone()
        self._crop_keep = []
        plans = self.packed_plans() if self._grid.packed else None
        for c in range(feats.shape[0]):
            k, allowed = plans[c] if plans is not None else (self.image_budget(feats.shape[1]), None)
            keep, h = visionzip_select(cls_attn[c], keys[c], feats[c], k, self.dominant_share, allowed)
            new[c] = h
            self._crop_keep.append(keep)
        return new

    def feature_plan(self, rows, images, session):
        self._crop = 0
        if not self._pre:
            self._scores = self.token_scores(self._layer)
            if self._grid.windowed:
                self._tok_keys = self.unwindow(torch.cat([k for call in self._keys for k in call]))
            else:
                self._tok_keys = [self.pool_patches(k) for call in self._keys for k in call]
            self._scores_len = [int(t.numel()) for t in self._scores]
        return super().feature_plan(rows, images, session)

    def select(self, x, image, index, session):
        if not self._pre:
            return self._select_post(x, image)
        if self._grid.packed:  # token rows of the kept patches of every crop of the image
            ids, crop, patch = self.packed_crops(image)
            if self.image_budget(len(crop)) >= len(crop):
                return torch.arange(len(crop)), None  # the whole budget: newline tokens stay too
            kept = torch.zeros(len(crop), dtype=torch.bool)
            for c, gi in enumerate(ids):
                mine = crop == c
                kept[mine] = torch.isin(patch[mine], self._crop_keep[gi])
            return torch.nonzero(kept).flatten(), None
        keep = self._crop_keep[self._crop]
        self._crop += 1
        return keep, None

    def _select_post(self, x, image) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Towers without a CLS token or with several patches per LLM token: the same rules on LLM tokens (scores
        and keys averaged over each token's patches; CLS attention, or without CLS the mean attention a token
        receives, as EffiVLM-Bench's port does), merging the projected features of the image."""
        n = x.shape[0]
        k_total = self.image_budget(n)
        if self._grid.packed:
            ids, crop, patch = self.packed_crops(image)
            if k_total >= n:
                return torch.arange(n), None
            parts = [(gi, torch.nonzero(crop == c).flatten(), patch[crop == c]) for c, gi in enumerate(ids)]
            budgets = split_budget(k_total, [len(r) for _, r, _ in parts])
        else:
            crops = self.crops_of(n, image)
            parts, off = [], 0
            for i, _ in crops:
                m = self._scores_len[i]
                parts.append((i, torch.arange(off, off + m), torch.arange(m)))
                off += m
            budgets = [k_total // len(crops) + (1 if c < k_total % len(crops) else 0) for c in range(len(crops))]
        kept, new = [], x.clone()
        for (gi, rows, tok), k in zip(parts, budgets):
            keep, h = visionzip_select(self._scores[gi][tok], self._tok_keys[gi][tok], x[rows], k, self.dominant_share)
            new[rows] = h.to(x.dtype)  # these rows are what the model scatters into the prompt
            kept.append(rows[keep])
        return (torch.cat(kept).sort().values if kept else torch.zeros(0, dtype=torch.long)), new

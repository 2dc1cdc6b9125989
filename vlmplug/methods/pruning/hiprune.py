"""HiPrune (arXiv 2508.00553): training-free, in the vision encoder's attention.

Per crop, with a budget of N' tokens:
- anchors: the top round(N' * alpha / 5) tokens by the mean attention they receive at an
  object-centric middle layer (`object_layer`, 0-based like every layer index in vlmplug; negative counts from the
  end). Default (None): the official code's layer where it has one for the tower, scaled to the tower's depth
  elsewhere: the 9th of CLIP-L's 24 layers (index 8) for LLaVA, i.e. round(9/24 * depth) - 1 on any tower (index 1
  on the embedded world model's 5 layers, 9 on Gemma 3's 27-layer SigLIP); for Qwen2.5-VL the official 16th of 32
  (index 15), i.e. round(depth / 2) - 1;
- buffers: each anchor's 4 neighbours (+-1, +-W in the flattened grid, clamped; as in the official
  code the +-1 step may cross a row edge);
- registers: the rest of the budget from the highest mean attention at the deep (feature) layer,
  excluding tokens already chosen.
A multi-crop image (tiles) splits its budget evenly over its crops.
Deviation: on Qwen2.5-VL a layer that attends in windows is scored within its windows (the attention the layer
computes), where the official code recomputes one softmax across the whole image; the default object layer (index
15) and the deep layer (the last) are full-attention layers there, where the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import MethodConfigError
from ...registry import register_method
from ...selection import resolve
from ..base import MethodConfig, check_range
from .common import split_budget, topk_sorted
from .vision_common import PreLLMSelection, init_budget
from .vision_scores import VisionScores


def hiprune_select(obj: torch.Tensor, deep: torch.Tensor, width: int, k: int, alpha: float,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Kept patch indices of one crop. `allowed` (bool [n]): the patches that have an LLM token (LLaVA-NeXT
    unpads); the others are never anchors, buffers or registers."""
    n = obj.numel()
    ok = torch.ones(n, dtype=torch.bool) if allowed is None else allowed.cpu()
    if k >= int(ok.sum()):
        return torch.nonzero(ok).flatten()
    n_anchor = int(round(k * alpha / 5))
    o = obj.double().masked_fill(~ok, float("-inf"))
    anchors = torch.argsort(o, descending=True, stable=True)[:n_anchor]
    chosen: list[int] = []
    for a in anchors.tolist():
        for j in (a, a - 1, a + 1, a - width, a + width):
            j = min(max(j, 0), n - 1)
            if ok[j] and j not in chosen:
                chosen.append(j)
    chosen = chosen[:k]
    rest = deep.double().clone()
    rest = rest - rest.min() + 1.0  # positive, so that chosen (-1 below) and excluded (-inf) sort last
    rest[chosen] = -1.0
    rest[~ok] = float("-inf")
    regs = torch.argsort(rest, descending=True, stable=True)[: k - len(chosen)]
    return torch.cat([torch.tensor(chosen, dtype=torch.long), regs]).sort().values


#: the object layer of the official code, 1-based, of the tower depth it was set for (Danielement321/HiPrune@6e83a12:
#: HIPRUNE_OBJECT_LAYER 9 for LLaVA's CLIP-L, 16 in Qwen2_5_VL/qwen2_5_vl_HiPrune.py)
OFFICIAL_OBJECT_LAYER = {"qwen2_5_vl": (16, 32)}
PAPER_OBJECT_LAYER = (9, 24)


def default_object_layer(model_type: str, depth: int) -> int:
    """0-based object layer for a vision tower of `depth` layers: the official layer for the family, scaled to the
    depth at hand (equal to it on the real tower), else the paper's 9th of 24."""
    layer, of = OFFICIAL_OBJECT_LAYER.get(model_type, PAPER_OBJECT_LAYER)
    return min(depth - 1, max(0, round(layer * depth / of) - 1))


@register_method("hiprune")
@dataclass(frozen=True)
class HiPrune(MethodConfig):
    """Anchor, buffer and register tokens from vision-encoder attention (HiPrune)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    object_layer: int | None = None
    alpha: float = 0.1

    def __post_init__(self):
        init_budget(self)
        if self.object_layer is not None and (isinstance(self.object_layer, bool)
                                              or not isinstance(self.object_layer, int)):
            raise MethodConfigError(f"hiprune: object_layer={self.object_layer!r} must be one vision layer index (0-based)")
        check_range("hiprune", "alpha", self.alpha, 0.0, 1.0)

    def build(self) -> "HiPruneRunner":
        return HiPruneRunner(self)


class HiPruneRunner(VisionScores, PreLLMSelection):
    def setup(self, adapter):
        PreLLMSelection.setup(self, adapter)
        grid = adapter.vision_grid()
        layer = self.object_layer
        if layer is None and grid is not None:
            layer = default_object_layer(getattr(adapter.config, "model_type", ""), grid.num_layers)
        obj = resolve("hiprune", "object_layer", layer, grid.num_layers, "vision layers")[0] if grid else 0
        deep = grid.feature_layer if grid is not None else -1
        self._obj = obj
        self._setup_vision(adapter, {obj: "mean", deep: "mean"})
        self._deep = deep % self._grid.num_layers

    def feature_plan(self, rows, images, session):
        self._obj_scores = self.token_scores(self._obj)
        self._deep_scores = self.token_scores(self._deep)
        self._scores_len = [int(t.numel()) for t in self._obj_scores]
        self._crop = 0
        return super().feature_plan(rows, images, session)

    def select(self, x, image, index, session):
        n = x.shape[0]
        k_total = self.image_budget(n)
        if self._grid.packed:
            return self._select_packed(image, k_total), None
        crops = self.crops_of(n, image)
        out, off = [], 0
        for c, (i, width) in enumerate(crops):
            k = k_total // len(crops) + (1 if c < k_total % len(crops) else 0)
            out.append(hiprune_select(self._obj_scores[i], self._deep_scores[i], width, k, self.alpha) + off)
            off += self._scores_len[i]
        return torch.cat(out), None

    def _select_packed(self, image, k_total: int) -> torch.Tensor:
        """LLaVA-NeXT / OneVision: per crop (base view, high-res crops), over the patches that have a token; the
        budget is split over crops in proportion to their tokens; newline tokens are dropped."""
        ids, crop, patch = self.packed_crops(image)
        if k_total >= len(crop):
            return torch.arange(len(crop))  # the whole budget: newline tokens stay too
        counts = [int((crop == c).sum()) for c in range(len(ids))]
        rows = []
        for c, (gi, k) in enumerate(zip(ids, split_budget(k_total, counts))):
            obj, deep = self._obj_scores[gi], self._deep_scores[gi]
            mine = torch.nonzero(crop == c).flatten()
            allowed = torch.zeros(obj.numel(), dtype=torch.bool)
            allowed[patch[mine]] = True
            width = int(round(obj.numel() ** 0.5))
            keep = hiprune_select(obj, deep, width, k, self.alpha, allowed)
            row_of = torch.full((obj.numel(),), -1, dtype=torch.long)
            row_of[patch[mine]] = mine
            rows.append(row_of[keep])
        return torch.cat(rows).sort().values if rows else torch.zeros(0, dtype=torch.long)

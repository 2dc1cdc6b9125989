"""FlowCut (Tong et al., NeurIPS 2025): progressive pruning inside the vision tower, by information flow.

At every vision layer up to the feature layer F, from that layer's own q/k/v (one query row, never a map):
- relation  a_i = mean_h softmax_j(q_g . k_j * s)_i, with g the CLS token (CLIP) or, without one (SigLIP,
  Qwen ViT), a global token whose query / value is the mean over the surviving patches;
- semantics e_i = mean_h softmax_j(v_g . v_j * s)_i (s = head_dim^-1/2, the layer's attention scale);
- score_i = (a_i / sum a + e_i / sum e) * |mean_h v_i|_1 over surviving patches, accumulated as
  S <- decay * S + (1 - decay) * score (decay 0.5 in the paper).
Pruning happens at the layers where rpl = F - layer - 1 is even: with N survivors and a target T,
r = floor((N - T) / sqrt(rpl) * (1 - H^2)) of the lowest-S tokens go (H: entropy of the normalised relation
over the survivors, divided by log N), and at rpl = 0 the rest down to T. Pruned tokens leave every later
layer's keys (a key mask in the same SDPA call), which gives the survivors exactly what a tower that removed
them computes. Families whose LLM token is several patches (Qwen 2x2 merge, Idefics3 pixel shuffle, Gemma 3
pooling) score and prune whole groups (scores summed over the group), so the merger sees complete groups.

Budget per crop = the budget rule on that crop's LLM tokens; a multi-crop image is trimmed afterwards to its own
budget by the final cumulative score. Deviations, documented: the second, text-aware stage the official code
runs in the LLM for LLaVA-NeXT / Qwen2-VL is not done (all pruning is in the vision tower), and Qwen keeps
`T` merged tokens rather than 4T patches then T in the LLM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...backend.kernels import expand_kv
from ...backend.plan import LayerPlan
from ...errors import MethodConfigError
from ...registry import register_method
from ..base import MethodConfig, check_range
from .common import budget
from .vision_common import PreLLMSelection, init_budget
from .vision_scores import VisionScores


def patch_groups(n_patches: int, grid) -> tuple[torch.Tensor, int]:
    """LLM-token group of each patch of one crop (token order) and the number of groups."""
    if grid.merge:
        return torch.arange(n_patches) // grid.merge, n_patches // grid.merge
    side = int(round(n_patches**0.5))
    p = grid.pool
    if p <= 1:
        return torch.arange(n_patches), n_patches
    r, c = torch.arange(n_patches) // side, torch.arange(n_patches) % side
    return (r // p) * (side // p) + (c // p), (side // p) ** 2


class _Call:
    """State of one vision attention call (a batch of crops of the same size) across layers.

    plans: for packed grids (LLaVA-NeXT / OneVision), per crop (target, bool [G] patches that have an LLM token);
    patches without a token (unpadded away) carry a cumulative score of -inf, so they are the first to go."""

    def __init__(self, B: int, S: int, grid, keep_ratio, keep_tokens, device, plans=None):
        self.off = 1 if grid.cls else 0
        gid, G = patch_groups(S - self.off, grid)
        self.gid = gid.to(device)
        self.G = G
        self.alive = torch.ones(B, G, dtype=torch.bool, device=device)
        self.cum = torch.zeros(B, G, dtype=torch.float64, device=device)
        if plans is None:
            self.targets = [max(1, budget(G, keep_ratio, keep_tokens))] * B
        else:
            self.targets = [max(1, t) for t, _ in plans]
            for b, (_, allowed) in enumerate(plans):
                self.cum[b, ~allowed.to(device)] = float("-inf")

    def key_mask(self) -> torch.Tensor | None:
        if bool(self.alive.all()):
            return None
        patches = self.alive[:, self.gid]
        if self.off:
            patches = torch.cat([torch.ones_like(patches[:, :1]), patches], 1)
        return patches


@register_method("flowcut")
@dataclass(frozen=True)
class FlowCut(MethodConfig):
    """Progressive in-ViT pruning by cumulative CLS / global-token information flow (FlowCut); not Qwen2.5-VL."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    decay: float = 0.5

    def __post_init__(self):
        init_budget(self)
        check_range("flowcut", "decay", self.decay, 0.0, 1.0)

    def build(self) -> "FlowCutRunner":
        return FlowCutRunner(self)


class FlowCutRunner(VisionScores, PreLLMSelection):
    def setup(self, adapter):
        PreLLMSelection.setup(self, adapter)
        self._setup_vision(adapter, {})
        if self._grid.windowed:
            raise MethodConfigError(
                f"flowcut: {adapter.config.model_type!r} attends within windows in most vision layers, where no "
                "CLS or image-wide global token exists to score the flow; not supported"
            )
        self._F = self._grid.feature_layer % self._grid.num_layers

        self._calls_seen: dict[int, int] = {}
        self._state: list[_Call] = []

    @property
    def _keeps_all(self) -> bool:
        return self.keep_tokens is None and self.keep_ratio >= 1.0

    def begin_vision(self) -> None:
        super().begin_vision()
        self._calls_seen = {}
        self._state = []
        self._vision_tokens: dict[int, int] = {}
        self._plans = None

    def vision_plan(self, ctx):
        li = ctx.layer_idx
        if li > self._F or self._keeps_all:
            return None
        c = self._calls_seen.get(li, 0)
        self._calls_seen[li] = c + 1
        if c == len(self._state):
            plans = None
            if self._grid.packed:
                if self._plans is None:
                    self._plans = self.packed_plans()
                plans, self._plans = self._plans[: ctx.batch], self._plans[ctx.batch :]
            self._state.append(_Call(ctx.batch, ctx.q_len, self._grid, self.keep_ratio, self.keep_tokens, ctx.device, plans))
        st = self._state[c]
        self._vision_tokens[li] = self._vision_tokens.get(li, 0) + int(st.alive.sum())
        taps = [lambda q, k, v, mask, scale, li=li, st=st: self._score(st, li, q, k, v, scale)] if li < self._F else []
        return LayerPlan(key_mask=st.key_mask(), taps=taps)

    # ----------------------------------------------------------------- scores and pruning
    def _score(self, st: _Call, li: int, q, k, v, scale) -> None:
        B, H = q.shape[:2]
        k, v = expand_kv(k, H // k.shape[1]), expand_kv(v, H // v.shape[1])
        # the O(S) reductions over q/k/v run in float32 (no float64 copy of the call's tensors: that copy was most
        # of FlowCut's cost in the tower); the per-token results go on in float64
        q, k, v = q.float(), k.float(), v.float()
        off = st.off
        alive_p = st.alive[:, st.gid]  # [B, n] surviving patches
        alive = torch.cat([torch.ones_like(alive_p[:, :1]), alive_p], 1) if off else alive_p
        if off:
            gq, gv = q[:, :, 0], v[:, :, 0]
        else:
            w = alive.float() / alive.sum(1, keepdim=True)
            gq = torch.einsum("bhsd,bs->bhd", q, w)
            gv = torch.einsum("bhsd,bs->bhd", v, w)
        hide = ~alive[:, None, :]
        rel_logits = torch.einsum("bhd,bhsd->bhs", gq, k).double() * scale
        sem_logits = torch.einsum("bhd,bhsd->bhs", gv, v).double() * scale
        rel = torch.softmax(rel_logits.masked_fill(hide, float("-inf")), -1).mean(1)
        sem = torch.softmax(sem_logits.masked_fill(hide, float("-inf")), -1).mean(1)
        vnorm = v.mean(1).abs().sum(-1).double()
        rel, sem, vnorm = rel[:, off:], sem[:, off:], vnorm[:, off:]
        score = (rel / rel.sum(1, keepdim=True) + sem / sem.sum(1, keepdim=True)) * vnorm
        score = score * alive_p
        g_score = torch.zeros(B, st.G, dtype=torch.float64, device=score.device).index_add_(1, st.gid, score)
        g_rel = torch.zeros_like(g_score).index_add_(1, st.gid, rel * alive_p)
        st.cum = self.decay * st.cum + (1 - self.decay) * g_score
        rpl = self._F - li - 1
        if rpl < 0 or rpl % 2:
            return
        for b in range(B):
            n, target = int(st.alive[b].sum()), st.targets[b]
            if n <= target:
                continue
            if rpl == 0:
                r = n - target
            else:
                p = g_rel[b][st.alive[b]]
                p = p / p.sum()
                ent = float(-(p[p > 0] * p[p > 0].log()).sum()) / math.log(n) if n > 1 else 0.0
                r = int(math.floor((n - target) / math.sqrt(rpl) * (1.0 - ent * ent)))
                r = min(max(r, 0), n - target)
            if r == 0:
                continue
            cand = torch.nonzero(st.alive[b]).flatten()
            order = torch.argsort(st.cum[b][cand].cpu(), stable=True)  # lowest first, ties by position
            st.alive[b, cand[order[:r].to(cand.device)]] = False

    # ----------------------------------------------------------------- selection per image
    def feature_plan(self, rows, images, session):
        if self._keeps_all:
            self._crop_alive = None
        else:
            self._crop_alive = [a.cpu() for st in self._state for a in st.alive]
            self._crop_cum = [c.cpu() for st in self._state for c in st.cum]
            self._scores_len = [int(a.numel()) for a in self._crop_alive]
        self._crop = 0
        return super().feature_plan(rows, images, session)

    def select(self, x, image, index, session):
        n = x.shape[0]
        if self._crop_alive is None:
            return torch.arange(n), None
        if self._grid.packed:  # token rows of the surviving patches (newline tokens are dropped)
            ids, crop, patch = self.packed_crops(image)
            if self.image_budget(n) >= n:
                return torch.arange(n), None  # the whole budget: newline tokens stay too
            has = crop >= 0
            alive, cum = torch.zeros(n, dtype=torch.bool), torch.full((n,), float("-inf"), dtype=torch.float64)
            alive[has] = torch.stack([self._crop_alive[i] for i in ids])[crop[has], patch[has]]
            cum[has] = torch.stack([self._crop_cum[i] for i in ids])[crop[has], patch[has]]
        else:
            crops = self.crops_of(n, image)
            alive = torch.cat([self._crop_alive[i] for i, _ in crops])
            cum = torch.cat([self._crop_cum[i] for i, _ in crops])
        k = self.image_budget(n)
        idx = torch.nonzero(alive).flatten()
        if idx.numel() > k:  # several crops: trim to the image's budget by the final cumulative score
            order = torch.argsort(cum[idx], descending=True, stable=True)
            idx = idx[order[:k]]
        return idx.sort().values, None

    def stats(self):
        out = super().stats()
        if out and getattr(self, "_vision_tokens", None):
            out["vision_tokens_per_layer"] = [self._vision_tokens[i] for i in sorted(self._vision_tokens)]
        return out

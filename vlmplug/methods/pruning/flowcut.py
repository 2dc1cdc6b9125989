"""FlowCut (Tong et al., NeurIPS 2025): progressive pruning inside the vision tower, by information flow.

Default (`variant="code"`): the rules of the official code, TungChintao/FlowCut at a2ecd24, which produced the
published numbers. Towers with a CLS token (CLIP, InternViT) follow its LLaVA code, towers without one (SigLIP, the
Qwen ViT) its Qwen2-VL code, the official code's only CLS-free path. Line numbers below: clip =
flowcut/modeling_clip_flowcut.py, cutils = flowcut/utils_flowcut.py, qwen = FlowCut_Qwen/modeling_qwen2_vl_flowcut.py,
qutils = FlowCut_Qwen/utils_flowcut.py. At every vision layer that scores, from that layer's own q/k/v (one query
row, never a map), over the surviving tokens:
- CLS towers: relation a_i = mean_h softmax_j(q_cls . k_j * s)_i, s the layer's attention scale (clip:25,37,67,140);
  semantics e_i = mean_h softmax_j(v_cls . v_j)_i, *unscaled* (clip:39-40,69);
  score_i = (a_i / sum a + e_i / sum e) * |mean_h v_i|_1 (cutils:20-27, clip:29,97).
- CLS-free towers: a global token whose query is the mean of the surviving patches' queries;
  a_i = mean_h softmax_j(q_g . k_j * s)_i and score_i = a_i * |mean_h v_i|_1, no semantic term (qwen:111-118,
  qutils:12-16; the Qwen code computes a global value but never uses it).
- Cumulative score: S = score at the first scoring layer, then S <- decay * S + (1 - decay) * score (clip:143-146,
  qwen:161-164; decay 0.5 there). Nothing is scored once a crop is down to its target (clip:138, qwen:159).
- Schedule, F the feature layer: CLS towers prune after layer l when rpl = F - l - 1 is even and >= 0, so F itself
  runs on the pruned tokens and is not scored (clip:203,148; select_layer = F, clip:299); CLS-free towers score
  every layer up to F and prune after layer l when rpl = F - l is even, the last time after F itself
  (qwen:160,166: remain = total_layer - idx - 1, the last block feeding the merger).
- Count: with N survivors and target T, r = round((N - T) / sqrt(rpl) * (1 - H^2)) of the lowest-S tokens go
  (cutils:30-42, qutils:19-30; H: entropy of the normalised relation over the survivors / log N, with
  log(a + 1e-7) on the CLS-free path as the Qwen code has it), and at rpl = 0 the rest down to T (clip:150-151,
  qwen:167-168).
`variant="paper"`: vlmplug's earlier reading of the paper's equations, kept for comparison with results obtained
with it: the semantic softmax scaled by s, S starting from 0 (S_1 = (1 - decay) * score), floor for r, a semantic
term on CLS-free towers too (value of the global token = mean of the surviving values), the CLS schedule
(rpl = F - l - 1, F not scored) on every tower, and scores accumulated even after a crop reached its target.

Pruned tokens leave every later layer's keys (a key mask in the same SDPA call), which gives the survivors exactly
what a tower that removed them computes (the official code gathers the hidden states).

Deviations from the official code, on purpose (both variants):
- No second, text-aware stage in the LLM (official: LLaVA-NeXT and Qwen2-VL prune again at LLM layer 1 with the
  last instruction token's query). All pruning is in the vision tower, which keeps the image's budget there:
  Qwen keeps T merged tokens (4T patches) where the official Qwen ViT keeps 8T patches (2T merged tokens,
  FlowCut_Qwen/main.py:20, qwen:151) and its LLM stage then keeps T; LLaVA-NeXT splits the
  image budget over its crops in proportion to their tokens (official: T/2 per crop, flowcut/main.py:37, then T in
  the LLM), patches that unpadding removes go first and newline tokens are dropped.
- Families whose LLM token is several patches (Qwen 2x2 merge, Idefics3 / InternVL pixel shuffle, Gemma 3 pooling)
  score and prune whole groups (scores and relation summed over the group, N and T counted in groups), so the
  merger sees complete groups; the official Qwen code prunes single patches and its merger then merges any four
  consecutive survivors.
- Everything is per crop: the official CLIP code takes one prune count for the whole batch of crops (the max,
  cutils:40), and the Qwen code pools every image of a forward into one sequence (one global token, one softmax,
  one target, qwen:111-116,159); vlmplug keeps each sample's result independent of the batch it runs in.
- Budget per crop = the budget rule on that crop's LLM tokens; a multi-crop image (Idefics3, InternVL tiles) is
  trimmed afterwards to its own budget by the final cumulative score. The official code has no tiled family.
- Ties among equal cumulative scores go to the lower position first (torch.topk leaves them unspecified); scores
  are computed in float32 / float64 where the Qwen code rounds the relation to the model's dtype (qwen:116).
- Towers the official code does not cover take the path of their kind: InternViT the CLS (LLaVA) rules; SigLIP
  (Gemma 3, Idefics3 / SmolVLM, OneVision) and Qwen3-VL the CLS-free (Qwen2-VL) rules. `decay` is exposed (the
  official code fixes 0.5, the default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...backend.kernels import expand_kv
from ...backend.plan import LayerPlan
from ...errors import MethodConfigError
from ...registry import register_method
from ..base import MethodConfig, check_choice, check_range
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
    patches without a token (unpadded away) carry a cumulative score of -inf, so they are the first to go.
    started: per crop, whether the cumulative score holds a layer's score yet (the official code starts it at the
    first scoring layer's score; `variant="paper"` starts it at 0, i.e. already started)."""

    def __init__(self, B: int, S: int, grid, keep_ratio, keep_tokens, device, plans=None, started=False):
        self.off = 1 if grid.cls else 0
        gid, G = patch_groups(S - self.off, grid)
        self.gid = gid.to(device)
        self.G = G
        self.alive = torch.ones(B, G, dtype=torch.bool, device=device)
        self.cum = torch.zeros(B, G, dtype=torch.float64, device=device)
        self.allowed = None
        self.started = torch.full((B,), bool(started), dtype=torch.bool, device=device)
        if plans is None:
            self.targets = [max(1, budget(G, keep_ratio, keep_tokens))] * B
        else:
            self.targets = [max(1, t) for t, _ in plans]
            self.allowed = torch.stack([a.to(device=device, dtype=torch.bool) for _, a in plans])
            self.cum[~self.allowed] = float("-inf")

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
    """Progressive in-ViT pruning by cumulative CLS / global-token information flow (FlowCut); not Qwen2.5-VL.
    variant: "code" (default, the official code's rules) or "paper" (vlmplug's earlier reading; module docstring)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    decay: float = 0.5
    variant: str = "code"  # "code": the official code's rules (a2ecd24); "paper": vlmplug's earlier reading

    def __post_init__(self):
        init_budget(self)
        check_range("flowcut", "decay", self.decay, 0.0, 1.0)
        check_choice("flowcut", "variant", self.variant, ("code", "paper"))

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
        self._set_rules()

        self._calls_seen: dict[int, int] = {}
        self._state: list[_Call] = []

    def _set_rules(self) -> None:
        """The scoring / schedule rules for this tower (see the module docstring)."""
        code, cls = self.variant == "code", bool(self._grid.cls)
        self._semantic = cls or not code  # the official Qwen (CLS-free) score has no semantic term
        self._sem_scale = not code  # the official semantic softmax is unscaled (clip:40)
        self._after = code and not cls  # CLS-free, official: score F too and prune after it (qwen:160,166)
        self._round = code  # official: int(r.round()) (cutils:42, qutils:30)
        self._gate = code  # official: nothing is scored once the target is reached (clip:138, qwen:159)
        self._ent_eps = 1e-7 if code and not cls else 0.0  # qutils:23
        self._last = self._F if self._after else self._F - 1  # last scoring layer

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
            self._state.append(_Call(ctx.batch, ctx.q_len, self._grid, self.keep_ratio, self.keep_tokens, ctx.device,
                                     plans, started=self.variant == "paper"))
        st = self._state[c]
        self._vision_tokens[li] = self._vision_tokens.get(li, 0) + int(st.alive.sum())
        taps = []
        if li <= self._last:
            taps = [lambda q, k, v, mask, scale, li=li, st=st: self._score(st, li, q, k, v, scale)]
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
        if off:  # the CLS token's query / value (clip:39,140)
            gq, gv = q[:, :, 0], v[:, :, 0]
        else:  # the global token: mean over the surviving patches (qwen:111-112)
            w = alive.float() / alive.sum(1, keepdim=True)
            gq = torch.einsum("bhsd,bs->bhd", q, w)
            gv = torch.einsum("bhsd,bs->bhd", v, w) if self._semantic else None
        hide = ~alive[:, None, :]
        rel_logits = torch.einsum("bhd,bhsd->bhs", gq, k).double() * scale
        rel = torch.softmax(rel_logits.masked_fill(hide, float("-inf")), -1).mean(1)[:, off:]
        vnorm = v.mean(1).abs().sum(-1).double()[:, off:]
        if self._semantic:
            sem_logits = torch.einsum("bhd,bhsd->bhs", gv, v).double()
            if self._sem_scale:
                sem_logits = sem_logits * scale
            sem = torch.softmax(sem_logits.masked_fill(hide, float("-inf")), -1).mean(1)[:, off:]
            score = (rel / rel.sum(1, keepdim=True) + sem / sem.sum(1, keepdim=True)) * vnorm
        else:  # relation * |v|_1 (qutils:14)
            score = rel * vnorm
        score = score * alive_p
        g_score = torch.zeros(B, st.G, dtype=torch.float64, device=score.device).index_add_(1, st.gid, score)
        g_rel = torch.zeros_like(g_score).index_add_(1, st.gid, rel * alive_p)
        n_alive = st.alive.sum(1)
        targets = torch.tensor(st.targets, device=n_alive.device)
        upd = n_alive > targets if self._gate else torch.ones_like(st.started)
        new = torch.where(st.started[:, None], self.decay * st.cum + (1 - self.decay) * g_score, g_score)
        st.cum = torch.where(upd[:, None], new, st.cum)
        if st.allowed is not None:
            st.cum = st.cum.masked_fill(~st.allowed, float("-inf"))
        st.started = st.started | upd
        rpl = self._F - li - (0 if self._after else 1)
        if rpl < 0 or rpl % 2:
            return
        for b in range(B):
            n, target = int(n_alive[b]), st.targets[b]
            if n <= target:
                continue
            if rpl == 0:
                r = n - target
            else:
                p = g_rel[b][st.alive[b]]
                p = p / p.sum()
                if self._ent_eps:
                    h = float(-(p * (p + self._ent_eps).log()).sum())
                else:
                    h = float(-(p[p > 0] * p[p > 0].log()).sum())
                ent = h / math.log(n) if n > 1 else 0.0
                x = (n - target) / math.sqrt(rpl) * (1.0 - ent * ent)
                r = int(round(x)) if self._round else int(math.floor(x))
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

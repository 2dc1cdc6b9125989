"""ACT (Yu, Wang, Fu, Shi, Shaikh, Lin, ICML 2024, "Unveiling and Harnessing Hidden Attention Sinks"), the attention
calibration technique, as the official code runs it (GATECH-EIC/ACT, models/llama_modelling_aug.py).

In each calibrated head of the chosen layers, at prefill: a key's sink score is its column mean, the attention it
gets summed over the query rows divided by the number of rows that can see it; keys scoring above `threshold` are
hidden sinks, except the first of them in position order (the code drops `indices[0]`, normally the initial token,
which keeps its attention). The rows that can see a key are counted from the layer's mask, so sliding-window layers
(Gemma 3) and left padding count right; a row whose visible keys are all sinks is left unchanged (the official code
would divide by zero there). Every row's attention on the hidden sinks is scaled by `beta` and the removed mass
(1 - beta) goes to the row's other keys in proportion to their attention. While decoding, the new token's row is
calibrated the same way against the sinks found at prefill (the official code scores prefill-only tasks).

Heads: ACT searches them per task on a calibration set (each head alone, kept when it helps; the released lists are
for Llama-2-chat). `heads` takes such a set ({layer: [heads]} or [(layer, head), ...]; `calibrate_heads` runs the
search on your data); without one every head of `layers` is calibrated (default layers 2 to the second to last, the
official search range 2..30 of 32). Defaults beta 0.4, threshold 0.1 (scripts/calibration.sh). `beta=1` is the
identity.

SDPA cost: the column means need every row's attention in the chosen layers, computed in chunks of rows (O(chunk x
S) memory, never L x L) at prefill; the redistribution runs on the same kind of chunked rows (backend/kernels.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...backend.plan import LayerPlan, Redistribute
from ...errors import MethodConfigError
from ...registry import register_method
from ...selection import check_selection, freeze, resolve
from ..base import Method, MethodConfig, check_range


def _norm_heads(spec):
    """{layer: [heads]} or [(layer, head), ...] -> sorted tuple of (layer, head) pairs."""
    pairs = []
    if isinstance(spec, dict):
        for li, hs in spec.items():
            hs = [hs] if isinstance(hs, int) else hs
            pairs += [(li, h) for h in hs]
    elif isinstance(spec, (list, tuple)):
        for x in spec:
            if not (isinstance(x, (list, tuple)) and len(x) == 2):
                raise MethodConfigError(f"act: heads={spec!r}; give {{layer: [heads]}} or [(layer, head), ...]")
            pairs.append(tuple(x))
    else:
        raise MethodConfigError(f"act: heads={spec!r}; give None (every head), {{layer: [heads]}} or "
                                "[(layer, head), ...]")
    for li, h in pairs:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (li, h)) or h < 0:
            raise MethodConfigError(f"act: heads names ({li!r}, {h!r}); layers and heads are integer indices, "
                                    "heads >= 0")
    if not pairs:
        raise MethodConfigError("act: heads is empty; give None for every head of `layers`")
    return tuple(sorted(set((int(li), int(h)) for li, h in pairs)))


@register_method("act")
@dataclass(frozen=True)
class ACT(MethodConfig):
    """Scale hidden attention sinks by beta and give the mass back to the other keys, in calibrated heads (ACT)."""

    beta: float = 0.4
    threshold: float = 0.1
    layers: tuple[int, ...] | str | int | None = "2:-1"
    heads: tuple | None = None  # (layer, head) pairs; None: every head of `layers`

    def __post_init__(self):
        check_range("act", "beta", self.beta, 0.0, 1.0)
        check_range("act", "threshold", self.threshold, 0.0, 1.0)
        check_selection("act", "layers", self.layers)
        self._normalise("layers", freeze(self.layers))
        if self.heads is not None:
            self._normalise("heads", _norm_heads(self.heads))

    def build(self) -> "ACTRunner":
        return ACTRunner(self)


class ACTRunner(Method):
    def setup(self, adapter):
        n, H = adapter.num_layers, adapter.num_heads
        if self.heads is None:
            self._heads = {li: torch.ones(H, dtype=torch.bool) for li in resolve("act", "layers", self.layers, n)}
        else:
            bad = [(li, h) for li, h in self.heads if not -n <= li < n or h >= H]
            if bad:
                raise MethodConfigError(f"act: heads {bad} out of range; this model has decoder layers 0..{n - 1} "
                                        f"and heads 0..{H - 1}")
            self._heads = {}
            for li, h in self.heads:
                self._heads.setdefault(li % n, torch.zeros(H, dtype=torch.bool))[h] = True
        self._sinks: dict[str, dict[int, torch.Tensor]] = {}  # pass -> layer -> bool [B, Hq, prompt_len]
        self._counts: dict[int, float] = {}

    def edit_layers(self):
        return {"redistribute": set(self._heads)} if self.beta < 1 else {}

    def _prefill_sinks(self, ctx, heads: torch.Tensor) -> torch.Tensor:
        """bool [B, Hq, S]: the hidden sinks of this call's keys, per head (first sink per head excluded)."""
        rows = ctx.real_queries
        p = ctx.attention(rows)  # mean over the real rows
        n_rows = rows.sum(-1).float()
        col = p * n_rows[:, None, None]  # column sums over the real rows
        kp = ctx.k_pos.to(ctx.device)
        seeing = ctx.seen_by(rows)  # the official code's arange(N, 0, -1) under a causal mask; windows counted
        score = col / seeing.clamp(min=1)[:, None, :]
        first = torch.tensor([s.first_real for s in ctx.layout.samples], device=ctx.device)
        sinks = (score > self.threshold) & (kp >= first[:, None])[:, None, :] & (seeing > 0)[:, None, :]
        sinks = sinks & (sinks.cumsum(-1) > 1)  # the first sink of each head keeps its attention
        return sinks & heads.to(ctx.device)[None, :, None]

    def layer_plan(self, ctx):
        heads = self._heads.get(ctx.layer_idx)
        if heads is None or self.beta == 1 or ctx.layout is None:
            return None
        store = self._sinks.setdefault(ctx.label, {})
        if ctx.phase == "prefill":
            sinks = self._prefill_sinks(ctx, heads)
            marked = torch.zeros(*sinks.shape[:2], max(ctx.state.prompt_len, int(ctx.k_pos.max()) + 1),
                                 dtype=torch.bool, device=ctx.device)
            marked.scatter_(2, ctx.k_pos.to(ctx.device)[:, None, :].expand_as(sinks), sinks)
            store[ctx.layer_idx] = marked
            if ctx.label == "main":
                self._counts[ctx.layer_idx] = float(sinks.sum(-1).float().sum(-1).mean()) / max(1, int(heads.sum()))
            rows = ctx.real_queries
        else:
            marked = store.get(ctx.layer_idx)
            if marked is None:
                return None
            kp = ctx.k_pos.to(ctx.device)
            n = max(int(kp.max()) + 1, marked.shape[2])
            full = torch.zeros(*marked.shape[:2], n, dtype=torch.bool, device=ctx.device)
            full[..., : marked.shape[2]] = marked
            if kp.dim() == 2:
                kp = kp[:, None, :].expand(-1, marked.shape[1], -1)
            else:  # a pruned cache: keys per KV head
                kp = kp.repeat_interleave(ctx.num_heads // kp.shape[1], dim=1)
            sinks = torch.gather(full, 2, kp)
            rows = None
        frac = heads.to(ctx.device).float() * (1.0 - self.beta)
        return LayerPlan(redistribute=Redistribute(sinks=sinks, targets=~sinks, fraction=frac, rows=rows))

    def verify(self, session):
        if self.beta == 1:
            return None
        missed = sorted(li for li in self._heads if ("redistribute", li) not in session.state.effects)
        if missed:
            return f"act expected calibrated attention in decoder layers {missed}; none was applied"
        return None

    def stats(self):
        return {
            "beta": self.beta, "threshold": self.threshold, "layers": sorted(self._heads),
            "heads": [int(self._heads[li].sum()) for li in sorted(self._heads)],
            # mean number of hidden sinks per calibrated head, per layer (latest prefill)
            "sinks_per_head": [self._counts.get(li) for li in sorted(self._heads)],
        }


def calibrate_heads(model, score: Callable[[object], float], candidates=None, *, beta: float = 0.4,
                    threshold: float = 0.1, layers="2:-1", processor=None, progress: bool = True) -> tuple:
    """ACT's head search: calibrate each candidate (layer, head) alone and keep the ones that raise `score`.

    score(model) -> float, higher is better, evaluated on your calibration set (e.g. the mean log-probability of the
    right answers); it is called once unpatched and once per candidate with ACT on that head. candidates: (layer,
    head) pairs; default every head of `layers`. Returns the kept pairs, ready for `ACT(heads=...)`.
    """
    from tqdm.auto import tqdm

    from ... import api
    from ...adapters.base import get_adapter

    ad = get_adapter(model, processor)
    if candidates is None:
        candidates = [(li, h) for li in resolve("act", "layers", layers, ad.num_layers) for h in range(ad.num_heads)]
    base = float(score(model))
    kept = []
    for li, h in tqdm(list(candidates), desc="act heads", disable=not progress, mininterval=1.0):
        with api.apply(model, ACT(beta=beta, threshold=threshold, layers=[li], heads=((li, h),)), processor=processor):
            if float(score(model)) > base:
                kept.append((li, h))
    return tuple(kept)

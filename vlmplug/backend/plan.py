"""What the active methods ask of one attention call: the backend's vocabulary of edits.

Methods never touch model tensors; for each attention call the session collects their requests
into a `LayerPlan` and the kernel carries it out.

Order of the edits inside one call (the kernel and the eager reference both follow it):
  1. key_mask       removed keys leave the call (as if the tokens were gone)
  2. taps           read q / k / v (and the mask) as the call received them
  3. bias           an additive logit term per head and key
     amplify        s <- s + alpha |s| at chosen keys of chosen query rows (PAI; exact: those rows are recomputed)
  4. probes         softmax rows of selected queries: with the bias and amplification, before redistribution and
                    head scaling
  5. softmax
  6. redistribute   move a fraction of the mass on sink keys to target keys, per head and query row (optionally
                    gated per head and row by the row's own attention: VAR's image-centric heads)
  7. head_scale     multiply each head's output (per row where given), before o_proj
Merging two methods' plans (`LayerPlan.merge`): probes and taps accumulate, key masks intersect, biases add,
head scales multiply (per row), and a second redistribution or amplification in the same call, or both
together, is refused (`PlanConflict`): they rewrite the same softmax rows and do not commute. Methods declare the layers they redistribute in (`Method.edit_layers`) so
`apply()` refuses such a combination before patching.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import VlmplugError


@dataclass
class Probe:
    """Softmax attention rows of selected queries, averaged over the selected rows per sample.

    select: bool [B, Lq], the query rows (of this call's query block) to read.
    callback(probs, counts): probs float32 [B, Hq, S] (mean row over the selected queries, every
        key of this call), counts long [B] (number of rows averaged; 0 gives a zero row).
    """

    select: torch.Tensor
    callback: Callable[[torch.Tensor, torch.Tensor], None]


class PlanConflict(VlmplugError, RuntimeError):
    """Two plans ask for edits that cannot be combined in one attention call."""


@dataclass
class Gate:
    """Limit a redistribution to the (head, query row) pairs whose attention passes a test, decided from the very
    rows the redistribution edits (no extra pass, no L x L): the `pool` keys get at least `min_mass` of the row's attention and
    the redistribution's targets hold at least `min_share` of the pool's mass (VAR's image-centric heads: pool =
    image tokens, targets = its non-sink tokens). A row whose pool gets no attention is never edited.

    pool: bool [B, S] or [B, Hq, S]; on_select(selected bool [B, Hq, Lq]) is called with the pairs edited.
    """

    pool: torch.Tensor
    min_mass: float = 0.0
    min_share: float = 0.0
    on_select: Callable[[torch.Tensor], None] | None = None


@dataclass
class Redistribute:
    """Move `fraction` of the attention mass on `sinks` keys to `targets` keys, in proportion to the
    attention the targets already get (post-softmax, per head and query row).

    sinks, targets: bool [B, S] (every head) or [B, Hq, S] (per query head).
    fraction: float [Hq], [B, Hq] or [B, Hq, Lq] (per head, or per head and query row: 0 leaves a row alone).
    rows: bool [B, Lq] or None (all rows).
    gate: a `Gate` deciding per head and row from the row's own attention, or None.
    A row whose targets get no attention is left unchanged.
    """

    sinks: torch.Tensor
    targets: torch.Tensor
    fraction: torch.Tensor
    rows: torch.Tensor | None = None
    gate: Gate | None = None


#: tap(query, key, value, mask, scale): sees the call's RoPE-applied tensors ([B, H, L, D]; the mask as SDPA gets
#: it, key masks folded in; the softmax scale) before attention runs; for O(L) statistics such as one query's
#: attention row. Must not edit them.
Tap = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], None]


@dataclass
class Amplify:
    """PAI's logit amplification on chosen query rows: s <- s + alpha * |s| at `keys` (the scaled logits, after the
    bias, before the mask), then softmax. The change depends on the score itself, so it is no additive mask: the
    chosen rows are recomputed exactly from q.K^T (O(rows x S)) and SDPA keeps every other row.

    keys: bool [B, S] or per query head [B, Hq, S]; alpha: a 0-d tensor, float [Hq] (per head) or [B, Hq|1, S]
    (per key: several strengths in one edit, e.g. modPAI's informative and outlier tokens); rows: bool [B, Lq].
    """

    keys: torch.Tensor
    alpha: torch.Tensor
    rows: torch.Tensor


def head_scale_tensor(scale: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A head scale limited to query rows: scale [Hq] or [B, Hq], rows bool [B, Lq] -> float [B, Hq, Lq] (1 elsewhere)."""
    if rows is None:
        return scale
    s = scale.float()
    B, Lq = rows.shape
    s = s.view(1, -1, 1) if s.dim() == 1 else s.view(s.shape[0], -1, 1)
    return torch.where(rows.to(s.device)[:, None, :], s.expand(B, -1, Lq), torch.ones((), device=s.device))


def _as_rows(scale: torch.Tensor, B: int, Lq: int) -> torch.Tensor:
    """Head scale in any accepted shape -> [B, Hq, Lq]."""
    s = scale.float()
    if s.dim() == 1:
        s = s.view(1, -1, 1)
    elif s.dim() == 2:
        s = s.view(s.shape[0], -1, 1)
    return s.expand(B, s.shape[1], Lq)


@dataclass
class LayerPlan:
    probes: list[Probe] = field(default_factory=list)
    bias: torch.Tensor | None = None  # float [B, Hq, S] additive logit bias, per head and key
    redistribute: Redistribute | None = None
    # float [Hq], [B, Hq] or [B, Hq, Lq] (per query row; `head_scale_tensor` builds it from rows), multiplies each
    # head's output
    head_scale: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None  # bool [B, S]: keys every query may see (False = removed token)
    taps: list[Tap] = field(default_factory=list)
    amplify: Amplify | None = None

    @property
    def read_only(self) -> bool:
        """Only probes and taps: the call's output is the model's own attention, unchanged."""
        return (self.bias is None and self.redistribute is None and self.head_scale is None and self.key_mask is None
                and self.amplify is None)

    @property
    def empty(self) -> bool:
        return not self.probes and not self.taps and self.read_only

    def merge(self, other: "LayerPlan") -> None:
        """Compose another method's requests: probes and taps accumulate, biases add, head scales multiply,
        key masks intersect."""
        self.probes += other.probes
        self.taps += other.taps
        if other.key_mask is not None:
            self.key_mask = other.key_mask if self.key_mask is None else self.key_mask & other.key_mask
        if other.bias is not None:
            self.bias = other.bias if self.bias is None else self.bias + other.bias
        if other.head_scale is not None:
            if self.head_scale is None:
                self.head_scale = other.head_scale
            elif self.head_scale.dim() == 3 or other.head_scale.dim() == 3:  # per row: bring both to [B, Hq, Lq]
                a, b = self.head_scale, other.head_scale
                B = max(x.shape[0] if x.dim() > 1 else 1 for x in (a, b))
                Lq = max(x.shape[2] if x.dim() == 3 else 1 for x in (a, b))
                self.head_scale = _as_rows(a, B, Lq) * _as_rows(b, B, Lq)
            else:
                self.head_scale = self.head_scale * other.head_scale
        rewrites = [x for x in (self.redistribute, self.amplify, other.redistribute, other.amplify) if x is not None]
        if len(rewrites) > 1:
            raise PlanConflict("two methods redistribute or amplify attention in the same layer; apply them to "
                               "different layers")
        if other.redistribute is not None:
            self.redistribute = other.redistribute
        if other.amplify is not None:
            self.amplify = other.amplify


@dataclass
class FeaturePlan:
    """What a method asks of the projected image features of one image-feature call, before the LLM sees them.

    keep: (sample index, id(ImageLayout)) -> long, sorted rows of that image's features to keep (the rest are
        dropped before the LLM by the token-dropping edit).
    overwrite: (image index into the call's images, new rows [n_i, D]) replacing that image's features, e.g.
        merged tokens; applied in order, before the next method's plan is asked for.
    """

    keep: dict = field(default_factory=dict)
    overwrite: list = field(default_factory=list)


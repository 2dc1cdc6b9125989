"""What the active methods ask of one attention call: the backend's vocabulary of edits.

Methods never touch model tensors; for each attention call the session collects their requests
into a `LayerPlan` and the kernel carries it out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Probe:
    """Softmax attention rows of selected queries, averaged over the selected rows per sample.

    select: bool [B, Lq], the query rows (of this call's query block) to read.
    callback(probs, counts): probs float32 [B, Hq, S] (mean row over the selected queries, every
        key of this call), counts long [B] (number of rows averaged; 0 gives a zero row).
    """

    select: torch.Tensor
    callback: Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class Redistribute:
    """Move `fraction` of the attention mass on `sinks` keys to `targets` keys, in proportion to the
    attention the targets already get (post-softmax, per head and query row).

    sinks, targets: bool [B, S]; fraction: float [Hq] or [B, Hq]; rows: bool [B, Lq] or None (all rows).
    """

    sinks: torch.Tensor
    targets: torch.Tensor
    fraction: torch.Tensor
    rows: torch.Tensor | None = None


#: tap(query, key, value, mask, scale): sees the call's RoPE-applied tensors ([B, H, L, D]; the mask as SDPA gets
#: it, key masks folded in; the softmax scale) before attention runs; for O(L) statistics such as one query's
#: attention row. Must not edit them.
Tap = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], None]


@dataclass
class LayerPlan:
    probes: list[Probe] = field(default_factory=list)
    bias: torch.Tensor | None = None  # float [B, Hq, S] additive logit bias, per head and key
    redistribute: Redistribute | None = None
    head_scale: torch.Tensor | None = None  # float [Hq] or [B, Hq], multiplies each head's output
    key_mask: torch.Tensor | None = None  # bool [B, S]: keys every query may see (False = removed token)
    taps: list[Tap] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return (not self.probes and self.bias is None and self.redistribute is None and self.head_scale is None
                and self.key_mask is None and not self.taps)

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
            self.head_scale = other.head_scale if self.head_scale is None else self.head_scale * other.head_scale
        if other.redistribute is not None:
            if self.redistribute is not None:
                raise RuntimeError("two methods redistribute attention in the same layer; apply them to different layers")
            self.redistribute = other.redistribute


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


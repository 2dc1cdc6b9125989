"""Cluster-level aggregation of visual tokens (Omri et al., "Token Sequence Compression for Efficient
Multimodal Computing", 2025): k clusters of each image's projected features, one merged token per
cluster (the mean of its members), placed at the member closest to the cluster centre (ties, e.g.
in two-member clusters: the earliest position).

Clustering: cosine k-means with a deterministic farthest-point initialisation (first centre: row 0;
then the row least similar to every chosen centre) and `iters` Lloyd steps. The paper publishes no
code; the initialisation and iteration count are ours.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register_method
from ..base import check_range
from .vision_common import PreLLMSelection


def cosine_kmeans(x: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster rows of x ([n, D]) into k groups; returns (assignment [n], centres [k, D] unit-norm).
    Runs in float64 so the result does not depend on the model's dtype."""
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    chosen = [0]
    best = xn @ xn[0]
    for _ in range(1, k):
        i = int(torch.argmin(best))
        chosen.append(i)
        best = torch.maximum(best, xn @ xn[i])
    c = xn[chosen].clone()
    assign = torch.argmax(xn @ c.T, dim=1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, assign, xn)
        counts = torch.bincount(assign, minlength=k)
        nonempty = counts > 0
        c[nonempty] = torch.nn.functional.normalize(sums[nonempty], dim=-1)
        new = torch.argmax(xn @ c.T, dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign, c


@register_method("cluster")
@dataclass
class Cluster(PreLLMSelection):
    """Merge each image's visual tokens into k cluster tokens (cluster-level aggregation)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    iters: int = 10

    def __post_init__(self):
        self._init_budget("cluster")
        check_range("cluster", "iters", self.iters, 0, 1000, kind=int)

    def select(self, x, image, index, session):
        n = x.shape[0]
        k = self.image_budget(n)
        if k >= n:
            return torch.arange(n)
        if k == 0:
            return torch.zeros(0, dtype=torch.long)
        assign, c = cosine_kmeans(x, k, self.iters)
        xn = torch.nn.functional.normalize(x.double(), dim=-1)
        sim = (xn * c[assign]).sum(-1)
        merged = x.clone()
        reps = []
        for j in range(k):
            members = torch.nonzero(assign == j).flatten()
            if members.numel() == 0:
                continue
            s_m = sim[members]
            rep = members[torch.nonzero(s_m >= s_m.max() - 1e-9).flatten()[0]]  # ties: lowest position
            merged[rep] = x[members].double().mean(0).to(x.dtype)
            reps.append(rep)
        reps = torch.stack(reps)
        x[reps] = merged[reps]  # in place: these rows are what the model scatters into the prompt
        return reps

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
        xd = x.double()
        sim = (torch.nn.functional.normalize(xd, dim=-1) * c[assign]).sum(-1)
        counts = torch.bincount(assign, minlength=k)
        used = torch.nonzero(counts).flatten()
        # representative: the member closest to its centre, ties (two-member clusters) to the earliest position
        best = torch.full((k,), float("-inf"), dtype=sim.dtype, device=sim.device).scatter_reduce(0, assign, sim, "amax")
        pos = torch.arange(x.shape[0], device=x.device)
        cand = torch.where(sim >= best[assign] - 1e-9, pos, torch.full_like(pos, x.shape[0]))
        reps = torch.full((k,), x.shape[0], dtype=pos.dtype, device=x.device).scatter_reduce(0, assign, cand, "amin")[used]
        means = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, assign, xd)
        means = means[used] / counts[used, None]
        x[reps] = means.to(x.dtype)  # in place: these rows are what the model scatters into the prompt
        return reps

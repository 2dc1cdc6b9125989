"""Cluster-level aggregation of visual tokens (Omri et al., "Token Sequence Compression for Efficient
Multimodal Computing", 2025): k clusters of each image's projected features, one merged token per
cluster (the mean of its members), placed at the member closest to the cluster centre (ties, e.g.
in two-member clusters: the earliest position).

Clustering: cosine k-means with a deterministic farthest-point initialisation (first centre: row 0;
then the row least similar to every chosen centre) and `iters` Lloyd steps. The paper publishes no
code; the initialisation and iteration count are ours, and so is the rule for an empty cluster (identical tokens,
or a Lloyd step emptying one): it takes the token least similar to its centre among the clusters with more than one
member, as a cluster of its own, so an image always keeps exactly k tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register_method
from ..base import MethodConfig, check_range
from .vision_common import PreLLMSelection, init_budget


def cosine_kmeans(x: torch.Tensor, k: int, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster rows of x ([n, D]) into k groups; returns (assignment [n], each row's cosine similarity to its
    cluster's centre [n]). Runs in float64 so the result does not depend on the model's dtype.

    Everything after one Gram matrix G = X X^T (X: unit rows) is done in the n x n space: a centre is a weighted
    sum of rows, X^T w_j, so its similarity to row i is (G w_j)_i / sqrt(w_j^T G w_j). One n^2 D product
    instead of one n k D product per step, which makes the cost independent of k and of the iteration count.
    """
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    n = xn.shape[0]
    G = xn @ xn.T
    chosen = [0]
    best = G[0].clone()
    for _ in range(1, k):
        i = int(torch.argmin(best))
        chosen.append(i)
        best = torch.maximum(best, G[i])
    W = torch.zeros(n, k, dtype=G.dtype, device=G.device)  # centre j = normalize(X^T W[:, j])
    W[chosen, torch.arange(k)] = 1.0

    def similarities(W):
        GW = G @ W
        norms = (W * GW).sum(0).clamp_min(0).sqrt()
        return GW / norms.clamp_min(1e-300)

    sim = similarities(W)
    assign = torch.argmax(sim, dim=1)
    for _ in range(iters):
        A = torch.nn.functional.one_hot(assign, k).to(G.dtype)
        nonempty = A.sum(0) > 0
        W = torch.where(nonempty[None, :], A, W)  # an empty cluster keeps its centre
        sim = similarities(W)
        new = torch.argmax(sim, dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign, sim.gather(1, assign[:, None]).squeeze(1)


def fill_empty(assign: torch.Tensor, sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every empty cluster (ids 0..k-1 with no member) one token: the least similar to its centre among the
    tokens of clusters with more than one member (ties: the earliest position). Needs at least k tokens."""
    assign, sim = assign.clone(), sim.clone()
    for c in range(k):
        counts = torch.bincount(assign, minlength=k)
        if counts[c] > 0:
            continue
        movable = counts[assign] > 1
        i = int(torch.argmin(torch.where(movable, sim, torch.full_like(sim, float("inf")))))
        assign[i], sim[i] = c, 1.0  # alone in its cluster: it is its centre
    return assign, sim


@register_method("cluster")
@dataclass(frozen=True)
class Cluster(MethodConfig):
    """Merge each image's visual tokens into k cluster tokens (cluster-level aggregation)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    iters: int = 10

    def __post_init__(self):
        init_budget(self)
        check_range("cluster", "iters", self.iters, 0, 1000, kind=int)

    def build(self) -> "ClusterRunner":
        return ClusterRunner(self)


class ClusterRunner(PreLLMSelection):
    def select(self, x, image, index, session):
        n = x.shape[0]
        k = self.image_budget(n)
        if k >= n:
            return torch.arange(n), None
        if k == 0:
            return torch.zeros(0, dtype=torch.long), None
        assign, sim = fill_empty(*cosine_kmeans(x, k, self.iters), k)
        xd = x.double()
        counts = torch.bincount(assign, minlength=k)
        used = torch.nonzero(counts).flatten()
        # representative: the member closest to its centre, ties (two-member clusters) to the earliest position
        best = torch.full((k,), float("-inf"), dtype=sim.dtype, device=sim.device).scatter_reduce(0, assign, sim, "amax")
        pos = torch.arange(x.shape[0], device=x.device)
        cand = torch.where(sim >= best[assign] - 1e-9, pos, torch.full_like(pos, x.shape[0]))
        reps = torch.full((k,), x.shape[0], dtype=pos.dtype, device=x.device).scatter_reduce(0, assign, cand, "amin")[used]
        means = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, assign, xd)
        means = means[used] / counts[used, None]
        new = x.clone()
        new[reps] = means.to(x.dtype)  # these rows are what the model scatters into the prompt
        return reps, new

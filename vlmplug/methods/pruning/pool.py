"""Average pooling of each image's token grid: the "downsample the image" baseline (issue 14; VTC-Bench found that
plain image downsampling beats many published compression methods).

Before the LLM, each view of an image (`image_views`: LLaVA-NeXT / OneVision's base and high-res grids, each tile
and the global / thumbnail view of Idefics3, SmolVLM and InternVL, the one grid elsewhere) is average-pooled to a
smaller grid, in the space of the projected features (what the LLM reads):

- budget: the image's `keep_ratio` / `keep_tokens` (the rule of the other pre-LLM methods, per image) is split over
  its views in proportion to their tokens (largest remainder, ties to the earlier view);
- pooled grid of an R x C view with budget k < R*C: with s = sqrt(k / (R*C)) (the one scale factor that would give
  exactly k cells), rows is floor(R*s) or ceil(R*s), cols floor(C*s) or ceil(C*s) (each clamped to 1..R, 1..C):
  of these four grids, those with rows*cols <= k, the largest rows*cols, ties to the aspect ratio closest to R/C
  (the smaller max(q, 1/q), q = (rows/cols) / (R/C), compared exactly), then to fewer rows. Each side is within
  one cell of the exactly scaled grid, so the aspect ratio is kept as well as whole cells allow, and the count is
  at most the budget (it may fall below it: 24x24 -> 64: 8x8, 128: 11x11, 192: 13x14). Only where a scaled side is
  below one cell (a very elongated view and a small budget) that side is 1 and the other takes min(its length, k);
- cells: pooled row i covers the view's rows floor(i*R/rows) .. floor((i+1)*R/rows) - 1, likewise for columns
  (a partition: every token belongs to exactly one cell; where R is a multiple of rows this is avg_pool2d with
  kernel R/rows, otherwise bands differ by one row, unlike adaptive_avg_pool2d's overlapping windows);
- each cell's token is the mean of the projected features of the tokens it covers (float64, then the model's
  dtype), placed at the cell's centre token: row top + (height - 1) // 2, column left + (width - 1) // 2 (the upper
  left of the central four in an even cell), which keeps its original (RoPE / M-RoPE) position; the other tokens of
  the cell are dropped, as `cluster` merges a cluster into its representative;
- tokens outside every view (LLaVA-NeXT / OneVision's row-newline tokens) are dropped, unless the budget keeps the
  whole image (keep_ratio=1: the unpatched model); a view whose share covers it stays unpooled; a view with no
  share is dropped.

How this relates to downsampling the image: pooling the token grid averages what the vision tower and projector
computed at full resolution, so it is feature-space average pooling, not a re-encoding of a smaller image (which
would also save vision-tower compute and change what the tower sees). It is the cheapest honest stand-in: no scores,
no attention, no tuning; the same budget and the same token positions as every other pre-LLM method, so it can sit
in every pruning comparison. (Models do this themselves: Gemma 3 average-pools its vision tokens, LLaVA-OneVision
interpolates large grids down.) On Qwen3-VL the DeepStack features a kept token receives are its own, not pooled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from ...registry import register_method
from ..base import MethodConfig
from .common import split_budget
from .random_drop import image_views
from .vision_common import PreLLMSelection, init_budget


def pooled_grid(R: int, C: int, k: int) -> tuple[int, int]:
    """(rows, cols) of the pooled grid of an R x C view for a budget of k tokens (the rule in the module docstring).
    k >= R*C keeps the grid; k <= 0 gives (0, 0)."""
    if k >= R * C:
        return R, C
    if k <= 0:
        return 0, 0
    s = math.sqrt(k / (R * C))
    if R * s < 1:
        return 1, min(C, k)
    if C * s < 1:
        return min(R, k), 1
    rs = {min(max(f(R * s), 1), R) for f in (math.floor, math.ceil)}
    cs = {min(max(f(C * s), 1), C) for f in (math.floor, math.ceil)}
    cand = [(r, c) for r in rs for c in cs if r * c <= k]
    if not cand:  # only where rounding put floor(R*s) * floor(C*s) a hair above k
        r = min(max(math.floor(R * s), 1), R)
        return r, max(1, min(C, k // r))

    def distortion(rc):  # (rows/cols) / (R/C) or its inverse, whichever is >= 1; exact, so ties are ties
        a, b = rc[0] * C, rc[1] * R
        return Fraction(max(a, b), min(a, b))

    return max(cand, key=lambda rc: (rc[0] * rc[1], -distortion(rc), -rc[0]))


def pool_cells(R: int, C: int, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells of an r x c pooling of an R x C grid (row-major): (cell of each token [R*C], centre token of each cell
    [r*c]), as indices into the view's row-major grid."""
    def bands(n, m):
        edges = [(i * n) // m for i in range(m + 1)]
        band = torch.empty(n, dtype=torch.long)
        centre = []
        for i in range(m):
            band[edges[i]:edges[i + 1]] = i
            centre.append(edges[i] + (edges[i + 1] - edges[i] - 1) // 2)
        return band, torch.tensor(centre, dtype=torch.long)

    rb, rc_ = bands(R, r)
    cb, cc_ = bands(C, c)
    cell = (rb[:, None] * c + cb[None, :]).reshape(-1)
    centre = (rc_[:, None] * C + cc_[None, :]).reshape(-1)
    return cell, centre


@register_method("pool")
@dataclass(frozen=True)
class Pool(MethodConfig):
    """Average-pool each view's token grid down to the image's budget before the LLM (downsampling baseline)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None

    def __post_init__(self):
        init_budget(self)

    def build(self) -> "PoolRunner":
        return PoolRunner(self)


class PoolRunner(PreLLMSelection):
    def select(self, x, image, index, session):
        n = x.shape[0]
        k = self.image_budget(n)
        if k >= n:
            return torch.arange(n), None
        views, _ = image_views(image)  # tokens outside every view are dropped
        parts = split_budget(k, [int(rows.numel()) for _, rows in views])
        new, kept, xd = None, [], x.double()
        for (view, rows), kv in zip(views, parts):
            if kv >= rows.numel():
                kept.append(rows)
                continue
            r, c = pooled_grid(view.rows, view.cols, kv)
            if r * c == 0:
                continue
            cell, centre = pool_cells(view.rows, view.cols, r, c)
            cell = cell.to(x.device)
            sums = torch.zeros(r * c, x.shape[1], dtype=torch.float64, device=x.device)
            sums.index_add_(0, cell, xd[rows.to(x.device)])
            counts = torch.bincount(cell, minlength=r * c).to(sums.dtype)
            reps = rows[centre]
            if new is None:
                new = x.clone()
            # these rows are what the model scatters into the prompt
            new[reps.to(x.device)] = (sums / counts[:, None]).to(x.dtype)
            kept.append(reps)
        return (torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)), new

"""Random image-token dropping: the baseline every pruning comparison needs (issue 14; VTC-Bench found that such
plain baselines beat many published compression methods).

Before the LLM, each image keeps `keep_ratio` / `keep_tokens` of its tokens (the budget rule of the other pre-LLM
methods, per image), drawn uniformly at random without replacement:

- the image's budget is split over its views (`image_views`: LLaVA-NeXT / OneVision's base and high-res grids,
  each tile and the global / thumbnail view of Idefics3, SmolVLM and InternVL, one grid elsewhere) in proportion to
  their tokens (`split_budget`: largest remainder, ties to the earlier view), and each view keeps a uniformly random
  subset of that size (`torch.randperm`);
- tokens outside every view (LLaVA-NeXT / OneVision's row-newline tokens) are drawn from only for what the views
  cannot hold (a budget above the views' tokens), so the image keeps exactly its budget;
- the whole budget (keep_ratio=1) keeps every token and draws nothing: the unpatched model.

Reproducible and independent of the global RNG: image j of a prompt (0-based, in prompt order) draws from its own
`torch.Generator` seeded with a hash of (`seed`, j), views in order. The selection depends on the seed, the image's
place in its prompt and its grid shapes, never on the rest of the batch (a left-padded batch keeps what each sample
keeps alone) or on `torch.manual_seed`. The kept tokens keep their projected features and original positions.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ...errors import LayoutError
from ...registry import register_method
from ..base import MethodConfig, check_range
from .common import split_budget
from .vision_common import PreLLMSelection, init_budget


def image_views(image) -> tuple[list[tuple[object, torch.Tensor]], torch.Tensor]:
    """The views of one image that partition its tokens, and the rows in none of them.

    Returns ([(View, rows of the image's features in the view's row-major grid order)], rows outside every view).
    Views come in the adapter's order; a view that shares tokens with an earlier one (Idefics3 / SmolVLM's "tiles"
    canvas, which repeats the tiles) is skipped. Row k of an image's features is the token at `image.positions[k]`."""
    pos = image.positions
    order = torch.argsort(pos)
    sorted_pos = pos[order]
    taken = torch.zeros(pos.numel(), dtype=torch.bool)
    out = []
    for v in image.views:
        vp = v.positions.to(pos.device)
        at = torch.searchsorted(sorted_pos, vp).clamp(max=max(pos.numel() - 1, 0))
        if vp.numel() and (pos.numel() == 0 or not torch.equal(sorted_pos[at], vp)):
            raise LayoutError(f"view {v.name!r} has positions outside its image's tokens")
        rows = order[at] if vp.numel() else torch.zeros(0, dtype=torch.long)
        if bool(taken[rows].any()):
            continue
        taken[rows] = True
        out.append((v, rows))
    return out, torch.nonzero(~taken).flatten()


def image_seed(seed: int, place: int) -> int:
    """The generator seed of the image at `place` (0-based, in its prompt): a 63-bit hash of (seed, place)."""
    digest = hashlib.blake2b(f"vlmplug.random:{seed}:{place}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_select(views: list[torch.Tensor], extra: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k rows: a uniform random subset of each view's rows (the budget split in proportion to their sizes), then of
    `extra` for what the views cannot hold. Unsorted."""
    parts = split_budget(k, [int(r.numel()) for r in views])
    kept = [rows[torch.randperm(rows.numel(), generator=generator)[:kv]] for rows, kv in zip(views, parts)]
    left = k - sum(parts)
    if left > 0:
        kept.append(extra[torch.randperm(extra.numel(), generator=generator)[:left]])
    return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)


@register_method("random")
@dataclass(frozen=True)
class RandomDrop(MethodConfig):
    """Keep a seeded, uniformly random subset of each image's tokens before the LLM (baseline)."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None
    seed: int = 0

    def __post_init__(self):
        init_budget(self)
        check_range("random", "seed", self.seed, 0, 2**63 - 1, kind=int)

    def build(self) -> "RandomDropRunner":
        return RandomDropRunner(self)


class RandomDropRunner(PreLLMSelection):
    def feature_plan(self, rows, images, session):
        self._place, nth = {}, {}
        for b, im in images:  # each image's place in its own prompt: the same in a batch and alone
            nth[b] = nth.get(b, -1) + 1
            self._place[id(im)] = nth[b]
        return super().feature_plan(rows, images, session)

    def select(self, x, image, index, session):
        n = x.shape[0]
        k = self.image_budget(n)
        if k >= n:
            return torch.arange(n), None
        views, extra = image_views(image)
        g = torch.Generator().manual_seed(image_seed(self.seed, self._place[id(image)]))
        return random_select([r for _, r in views], extra, k, g), None

"""Shared plumbing of the methods that select image tokens before the LLM (vision side).

They see each image's projected features (rows in the order of that image's token positions, views
they may edit in place, e.g. to write merged tokens) and record which rows survive. The LLM then never
computes the dropped rows: they leave before layer 0 (whose KV cache is padded back to the prompt's length
with hidden slots, since generate() reads the length there). Where a layer must see them first (DeepStack,
a sliding-window layer 0) the layers before the cut hide them through the mask.
Budgets (`keep_tokens` / `keep_ratio`) are per image.
"""
from __future__ import annotations

import torch

from ...backend.plan import FeaturePlan
from ... import compat
from ...errors import MethodConfigError, TransformersMismatchError
from ..base import Method, MethodConfig
from .common import budget, check_budget, token_drop_stats


def init_budget(cfg: MethodConfig) -> None:
    """Validate keep_ratio / keep_tokens of a vision-side config; neither given means 64 tokens per image."""
    check_budget(cfg.name, cfg.keep_ratio, cfg.keep_tokens)
    if cfg.keep_ratio is None and cfg.keep_tokens is None:
        cfg._normalise("keep_tokens", 64)


class PreLLMSelection(Method):
    """Runner base of the vision-side methods: a feature plan per image-feature call, then token dropping."""

    hide_before = True
    wants_image_features = True

    def setup(self, adapter):
        if adapter.num_layers <= adapter.pre_llm_drop_layer:
            raise MethodConfigError(f"{self.name}: the model has too few decoder layers to drop tokens")
        self.drop_layer = adapter.pre_llm_drop_layer

    def image_budget(self, n: int) -> int:
        return budget(n, self.keep_ratio, self.keep_tokens)

    def feature_plan(self, rows, images, session):
        """rows[i]: [n_i, D] features of images[i] = (sample index, ImageLayout): each image's kept rows, and its
        new features where the method merges tokens."""
        plan, done, nth = FeaturePlan(), {}, {}
        for i, (x, (b, im)) in enumerate(zip(rows, images)):
            j = nth[b] = nth.get(b, -1) + 1  # the image's place in its sample
            first = done.get(im.index) if im.index is not None else None
            if first is not None:  # a row generate() repeated (beams): the same image, the same selection
                kept, new = first
            else:
                kept, new = self.select(x, im, i, session)
                kept = kept.cpu().sort().values
                if im.index is not None:
                    done[im.index] = (kept, new)
            plan.keep[(b, j)] = kept
            if new is not None:
                plan.overwrite.append((i, new))
        return plan

    def select(self, x: torch.Tensor, image, index: int, session) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows of `x` (one image's features) to keep, the image's new features [n, D] where rows are merged, or
        None). `x` is read only."""
        raise TypeError(f"{type(self).__name__} must define select()")

    def tokens_to_keep(self, ctx):
        sel = ctx.state.feature_keep.pop(self.name, None)  # one selection serves one prompt
        lay = ctx.layout
        if sel is None or lay is None:
            return None
        keeps = []
        for b, s in enumerate(lay.samples):
            pos = torch.arange(ctx.q_len)
            parts = [pos[~torch.isin(pos, s.image_positions)]]
            for j, im in enumerate(s.images):
                rows = sel.get((b, j))
                if rows is None:
                    raise TransformersMismatchError(
                        f"{self.name}: no selection for image {j} of sample {b}: its features were not seen by "
                        f"the image-feature call of this prompt; {compat.version_note()}")
                parts.append(im.positions[rows])
            keeps.append(torch.cat(parts).sort().values)
        return keeps

    def stats(self):
        return token_drop_stats(self.session, getattr(self, "drop_layer", None))

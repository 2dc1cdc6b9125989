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

from ...errors import MethodConfigError
from ..base import Method
from .common import budget, check_budget, token_drop_stats


class PreLLMSelection(Method):
    hide_before = True

    def _init_budget(self, name: str):
        check_budget(name, self.keep_ratio, self.keep_tokens)
        if self.keep_ratio is None and self.keep_tokens is None:
            self.keep_tokens = 64
        self._selection = None

    def check(self, adapter):
        if adapter.num_layers <= adapter.pre_llm_drop_layer:
            raise MethodConfigError(f"{self.name}: the model has too few decoder layers to drop tokens")
        self.drop_layer = adapter.pre_llm_drop_layer

    def image_budget(self, n: int) -> int:
        return budget(n, self.keep_ratio, self.keep_tokens)

    def on_image_features(self, rows, images, session):
        """rows[i]: [n_i, D] features of images[i] = (sample index, ImageLayout). Sets the selection."""
        keep, done = {}, {}
        for i, (x, (b, im)) in enumerate(zip(rows, images)):
            first = done.get(im.index) if im.index is not None else None
            if first is not None:  # a row generate() repeated (beams): the same image, the same selection
                x0, kept = first
                if x.data_ptr() != x0.data_ptr():
                    x.copy_(x0)  # merged rows included
                keep[(b, id(im))] = kept
                continue
            kept = self.select(x, im, i, session).cpu().sort().values
            keep[(b, id(im))] = kept
            if im.index is not None:
                done[im.index] = (x, kept)
        self._selection = keep

    def select(self, x: torch.Tensor, image, index: int, session) -> torch.Tensor:
        """Rows of `x` (one image's features) to keep; may rewrite rows in place (merged tokens)."""
        raise TypeError(f"{type(self).__name__} must define select()")

    def tokens_to_keep(self, ctx):
        sel, self._selection = self._selection, None  # one selection serves one prompt
        lay = ctx.layout
        if sel is None or lay is None:
            return None
        keeps = []
        for b, s in enumerate(lay.samples):
            pos = torch.arange(ctx.q_len)
            parts = [pos[~torch.isin(pos, s.image_positions)]]
            for im in s.images:
                rows = sel.get((b, id(im)))
                parts.append(im.positions if rows is None else im.positions[rows])
            keeps.append(torch.cat(parts).sort().values)
        return keeps

    def stats(self):
        return token_drop_stats(self.session, getattr(self, "drop_layer", None))

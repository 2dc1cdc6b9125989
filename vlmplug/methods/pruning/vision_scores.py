"""Patch scores from vision-tower attention, mapped onto LLM image tokens.

Vision probes read, at chosen vision layers, either the CLS query's attention row or the mean
attention each patch receives (mean over all queries): never a full attention map. Scores are
averaged over heads, the CLS column is removed, and `pool` x `pool` patch blocks are averaged into
one score per LLM token (Gemma 3 pooling, Idefics3 pixel shuffle). Crops come in token order.
"""
from __future__ import annotations

import torch

from ...backend.plan import LayerPlan, Probe
from ...errors import MethodConfigError


class VisionScores:
    """Runner mixin: collect per-crop token scores at `self._vision_layers` (dict layer -> "cls" | "mean")."""

    needs_vision_attention = True

    def _setup_vision(self, adapter, layers: dict[int, str]) -> None:
        grid = adapter.vision_grid()
        if grid is None:
            from ...adapters.base import Adapter
            from ...registry import adapter_registry

            ok = sorted(
                mt for mt, cls in adapter_registry().items()
                if cls.vision_grid is not Adapter.vision_grid and mt not in getattr(cls, "no_vision_grid", ())
            )
            raise MethodConfigError(
                f"{self.name}: scoring vision-tower patches is not implemented for {adapter.config.model_type!r} yet; "
                f"supported: {ok}"
            )
        if grid.feature_layer < 0:
            raise MethodConfigError(
                f"{self.name}: the projector reads the vision embeddings (vision_feature_layer points before the "
                f"tower's first attention layer), so no vision attention exists to score patches by"
            )
        self._grid = grid
        resolved = {}
        for li, mode in layers.items():
            idx = li % grid.num_layers if li < 0 else li
            if not 0 <= idx < grid.num_layers:
                raise MethodConfigError(f"{self.name}: vision layer {li} out of range 0..{grid.num_layers - 1}")
            if mode == "cls" and not grid.cls:
                mode = "mean"  # no CLS token (SigLIP): the mean attention a patch receives
            resolved[idx] = mode
        self._vision_layers = resolved
        self._vis: dict[int, list[torch.Tensor]] = {}

    def begin_vision(self) -> None:
        self._vis = {}
        self._vision_meta = self.session.features.pending_meta if self.session is not None else None

    def unwindow(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Windowed towers (Qwen2.5-VL): rows [patches, d] of all of a layer's calls, in the tower's window order ->
        per image, [tokens, d] in token order (each token the mean of its merge group)."""
        m = self._grid.merge
        win = rows.double().view(-1, m, rows.shape[-1]).mean(1)
        order = self.session.adapter.window_order(self._vision_meta)
        if order.numel() != win.shape[0]:
            raise MethodConfigError(f"{self.name}: {win.shape[0]} merge groups for a window order of {order.numel()}")
        out = torch.empty_like(win)
        out[order] = win
        thw = torch.as_tensor(self._vision_meta.get("image_grid_thw"))
        return list(out.split([int(t * h * w) // m for t, h, w in thw.tolist()]))

    def vision_plan(self, ctx):
        mode = self._vision_layers.get(ctx.layer_idx)
        if mode is None:
            return None
        sel = torch.zeros(ctx.batch, ctx.q_len, dtype=torch.bool)
        if mode == "cls":
            sel[:, 0] = True
        else:
            sel[:] = True
        store = self._vis.setdefault(ctx.layer_idx, [])
        return LayerPlan(probes=[Probe(sel, lambda p, c: store.append(p.mean(1).cpu()))])  # [crops, S]

    def token_scores(self, layer: int) -> list[torch.Tensor]:
        """Per crop of the last image batch, in token order: a 1-D tensor of scores per LLM token."""
        if self._grid.windowed:
            return [t[:, 0] for t in self.unwindow(torch.cat([b.reshape(-1) for b in self._vis[layer]])[:, None])]
        out = []
        for block in self._vis[layer]:  # one probe call: [crops in the call, S]
            for s in block.double():
                if self._grid.cls:
                    s = s[1:]
                if self._grid.merge:
                    out.append(s.view(-1, self._grid.merge).mean(1))
                    continue
                if self._grid.packed:  # per patch; the adapter's crop map places patches on tokens
                    out.append(s)
                    continue
                n = s.numel()
                side = int(round(n**0.5))
                if side * side != n:
                    raise MethodConfigError(f"{self.name}: {n} patches do not form a square grid")
                p = self._grid.pool
                if p > 1:
                    s = torch.nn.functional.avg_pool2d(s.view(1, 1, side, side), p).flatten()
                out.append(s)
        return out

    def pool_patches(self, x: torch.Tensor) -> torch.Tensor:
        """One crop's per-patch rows [S, d] (CLS first where the tower has one) -> per LLM token [n, d], averaged over
        each token's patches (packed grids: per patch, CLS removed)."""
        x = x.double()
        if self._grid.cls:
            x = x[1:]
        if self._grid.merge:
            return x.view(-1, self._grid.merge, x.shape[-1]).mean(1)
        p = self._grid.pool
        if self._grid.packed or p <= 1:
            return x
        side = int(round(x.shape[0] ** 0.5))
        return torch.nn.functional.avg_pool2d(x.T.reshape(1, -1, side, side), p).reshape(x.shape[-1], -1).T

    def packed_crops(self, image) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Packed grids (LLaVA-NeXT / OneVision): consume this image's crops; (their indices, crop [n] local to the
        image, patch [n]) per token, -1 for newline tokens."""
        n_crops, crop, patch = self.session.adapter.crop_token_map(image)
        ids = list(range(self._crop, self._crop + n_crops))
        self._crop += n_crops
        return ids, crop, patch

    def packed_plans(self) -> list[tuple[int, torch.Tensor]]:
        """Packed grids, during an image-feature call: per crop in order, (its share of its image's budget, bool
        [patches] that have a token). An image's budget is split over its crops in proportion to their tokens."""
        from .common import budget, split_budget

        v = self.session.adapter.config.vision_config
        P = (int(v.image_size) // int(v.patch_size)) ** 2
        plans = []
        for n_crops, crop, patch in self.session.adapter.crop_maps(self._vision_meta):
            k_image = budget(len(crop), self.keep_ratio, self.keep_tokens)
            if k_image >= len(crop):  # everything: nothing to prune
                plans += [(P, torch.ones(P, dtype=torch.bool))] * n_crops
                continue
            counts = [int((crop == c).sum()) for c in range(n_crops)]
            for c, k in enumerate(split_budget(k_image, counts)):
                allowed = torch.zeros(P, dtype=torch.bool)
                allowed[patch[crop == c]] = True
                plans.append((k, allowed))
        return plans

    def crops_of(self, n_rows: int, image) -> list[tuple[int, int]]:
        """Consume this image's crops: [(crop index, grid width)] covering its n_rows feature rows."""
        got, rows = [], 0
        views = [v for v in image.views if v.name not in ("tiles", "highres")]
        while rows < n_rows:
            i = self._crop
            n = self._scores_len[i]
            width = views[len(got)].cols if self._grid.merge and len(got) < len(views) else int(round(n**0.5))
            got.append((i, width))
            rows += n
            self._crop += 1
        if rows != n_rows:
            raise MethodConfigError(f"{self.name}: crops of {rows} tokens for an image of {n_rows}")
        return got

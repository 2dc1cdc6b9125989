"""Typed results of recording methods.

`AttentionMaps` holds what `record` saw in one forward: per decoder layer, the mean softmax row of the
selected query tokens of each sample, indexed by logical key position. With the forward's `Layout` it
places those rows on each image's token grids (`image`, `images`), reduces them over layers and heads
(`reduce`) and projects them onto the image's pixels (`to_pixels`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .layout import ImageLayout, Layout, View

REDUCTIONS = ("mean", "sum", "max")


@dataclass
class AttentionMaps:
    """Attention that chosen query tokens gave each image's tokens, per decoder layer and head (one forward).

    layout: where each image's tokens sit in the sequence, and which pixels each token shows.
    rows: decoder layer -> float32 [B, H, L], the mean softmax row over the selected queries of each
        sample, indexed by logical key position.
    counts: decoder layer -> long [B], how many query rows were averaged (0: nothing was selected for
        that sample, and its rows are zero).
    """

    layout: Layout
    rows: dict[int, torch.Tensor]
    counts: dict[int, torch.Tensor]

    # ------------------------------------------------------------------ shape
    @property
    def layers(self) -> list[int]:
        """The recorded decoder layers, ascending."""
        return sorted(self.rows)

    @property
    def num_heads(self) -> int:
        return int(self.rows[self.layers[0]].shape[1]) if self.rows else 0

    def __repr__(self) -> str:
        per_sample = [len(s.images) for s in self.layout.samples]
        return (f"AttentionMaps(layers={self.layers}, heads={self.num_heads}, batch={len(self.layout)}, "
                f"images_per_sample={per_sample})")

    # ------------------------------------------------------------------ token grids
    def _image_layout(self, sample: int, image: int) -> ImageLayout:
        return self.layout.samples[sample].images[image]

    def _grid(self, sample: int, v: View) -> torch.Tensor:
        """[n_layers, H, rows, cols]: the rows of every recorded layer at the view's positions."""
        layers = self.layers
        if not layers:
            raise ValueError("no decoder layer was recorded")
        g = torch.stack([self.rows[li][sample][:, v.positions.to(self.rows[li].device)] for li in layers])
        return g.view(len(layers), g.shape[1], v.rows, v.cols)

    @staticmethod
    def _pick_view(im: ImageLayout, view: str) -> View:
        return im.main_view if view == "main" else im.view(view)

    def image(self, sample: int, image: int, view: str = "main") -> torch.Tensor:
        """float [n_layers, H, rows, cols]: attention on one view of image `image` of sample `sample`.

        view: "main" (the image's main view) or a view name (e.g. "base"); layers are in `self.layers` order.
        """
        return self._grid(sample, self._pick_view(self._image_layout(sample, image), view))

    def images(self, view: str = "main") -> list[list]:
        """Per sample, per image, `image(sample, image, view)`; view="all" gives a dict name -> grid per image."""
        out = []
        for b, s in enumerate(self.layout.samples):
            if view == "all":
                out.append([{v.name: self._grid(b, v) for v in im.views} for im in s.images])
            else:
                out.append([self._grid(b, self._pick_view(im, view)) for im in s.images])
        return out

    # ------------------------------------------------------------------ reductions
    def _layer_indices(self, layers) -> list[int]:
        """Indices into `self.layers` of the chosen decoder layers."""
        recorded = self.layers
        if layers is None:
            return list(range(len(recorded)))
        chosen = [layers] if isinstance(layers, int) else list(layers)
        if not chosen:
            raise ValueError("layers: empty selection; give None (all) or decoder-layer numbers")
        out = []
        for li in chosen:
            if isinstance(li, bool) or not isinstance(li, int):
                raise ValueError(f"layers: {li!r} is not an int")
            if li < 0:
                if -li > len(recorded):
                    raise ValueError(f"layers: {li} counts past the {len(recorded)} recorded layers {recorded}")
                i = len(recorded) + li
            elif li in recorded:
                i = recorded.index(li)
            else:
                raise ValueError(f"layers: decoder layer {li} was not recorded; recorded layers are {recorded}")
            if i in out:
                raise ValueError(f"layers: decoder layer {recorded[i]} chosen twice")
            out.append(i)
        return out

    def _head_indices(self, heads) -> list[int]:
        H = self.num_heads
        if heads is None:
            return list(range(H))
        chosen = [heads] if isinstance(heads, int) else list(heads)
        if not chosen:
            raise ValueError("heads: empty selection; give None (all) or head indices")
        out = []
        for h in chosen:
            if isinstance(h, bool) or not isinstance(h, int):
                raise ValueError(f"heads: {h!r} is not an int")
            if not -H <= h < H:
                raise ValueError(f"heads: head {h} is out of range for {H} heads")
            if h % H in out:
                raise ValueError(f"heads: head {h % H} chosen twice")
            out.append(h % H)
        return out

    @staticmethod
    def _combine(grid: torch.Tensor, how: str) -> torch.Tensor:
        flat = grid.flatten(0, 1)  # [n_layers * n_heads, rows, cols]
        if how == "mean":
            return flat.mean(0)
        if how == "sum":
            return flat.sum(0)
        return flat.amax(0)

    def _reduce_view(self, sample: int, v: View, layers, heads, how: str) -> torch.Tensor:
        if how not in REDUCTIONS:
            raise ValueError(f"how: {how!r}; allowed {list(REDUCTIONS)}")
        li, hi = self._layer_indices(layers), self._head_indices(heads)
        grid = self._grid(sample, v)
        return self._combine(grid[li][:, hi], how)

    def reduce(self, sample: int, image: int, view: str = "main", layers: int | Sequence[int] | None = None,
               heads: int | Sequence[int] | None = None, how: str = "mean") -> torch.Tensor:
        """float [rows, cols]: one view's attention combined over the chosen layers and heads.

        layers: None (all recorded) or decoder-layer numbers; a negative number counts from the end of
            `self.layers` (-1 = the last recorded layer). A layer that was not recorded is a ValueError.
        heads: None (all) or head indices, negative from the end; out of range is a ValueError.
        how: "mean", "sum" or "max", taken over every chosen (layer, head) pair at once.
        """
        im = self._image_layout(sample, image)
        return self._reduce_view(sample, self._pick_view(im, view), layers, heads, how)

    # ------------------------------------------------------------------ pixels
    def _weighted_view(self, sample: int, v: View, weights: torch.Tensor) -> torch.Tensor:
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (len(self.layers), self.num_heads):
            raise ValueError(f"weights: shape {tuple(w.shape)}; give one weight per recorded layer and head "
                             f"({len(self.layers)}, {self.num_heads})")
        return (self._grid(sample, v) * w[:, :, None, None]).sum((0, 1))

    def to_pixels(self, sample: int, image: int, layers: int | Sequence[int] | None = None,
                  heads: int | Sequence[int] | None = None, how: str = "mean",
                  size: tuple[int, int] | None = None, views: Sequence[str] | None = None,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [height, width]: the image's attention as a density over its pixels, all views merged.

        Rule: every view of `covering_views` (or the views named in `views`) is reduced as
        `reduce(..., layers, heads, how)`, or, with `weights` (float [len(self.layers), num_heads]), as the
        weighted sum of its (layer, head) grids (e.g. TAG's top-k pairs); `pixel_density` places the values.
        See `pixel_density` for the frame and the size.
        """
        im = self._image_layout(sample, image)
        if weights is not None:
            if (layers, heads, how) != (None, None, "mean"):
                raise ValueError("weights replaces layers / heads / how; give one or the other")
            return pixel_density(im, lambda v: self._weighted_view(sample, v, weights), views=views, size=size,
                                 where=f"sample {sample}, image {image}")
        return pixel_density(im, lambda v: self._reduce_view(sample, v, layers, heads, how), views=views, size=size,
                             where=f"sample {sample}, image {image}")


def boxed_views(im: ImageLayout, names: Sequence[str] | None = None) -> list[View]:
    """The image's views that have boxes, or the named ones (each must exist and have boxes)."""
    if names is None:
        return [v for v in im.views if v.boxes is not None]
    out = []
    for n in names:
        v = im.view(n)
        if v.boxes is None:
            raise ValueError(f"view {n!r} has no boxes: its tokens cannot be placed on pixels")
        out.append(v)
    return out


def covering_views(im: ImageLayout) -> list[str]:
    """Names of the boxed views that together hold every placed token once: a view whose tokens all belong to
    views already taken is skipped (Idefics3's 'tiles' canvas repeats its tile views)."""
    seen: set[int] = set()
    out = []
    for v in boxed_views(im):
        pos = set(v.positions.tolist())
        if pos <= seen:
            continue
        seen |= pos
        out.append(v.name)
    return out


def pixel_frame(im: ImageLayout, views: Sequence[View], where: str = "image") -> tuple[float, float]:
    """(width, height) of the frame the views' boxes are in: the original image when every view is in the original
    frame and its size is known, else the processed frame."""
    frames = {v.frame for v in views}
    if frames == {"original"} and im.size is not None:
        return float(im.size[0]), float(im.size[1])
    if "original" in frames:
        why = "its original size is unknown" if im.size is None else "other views are in the processed frame"
        raise ValueError(f"{where}: views {sorted(v.name for v in views if v.frame == 'original')} "
                         f"have boxes in the original frame but {why}")
    if im.processed_size is None:
        raise ValueError(f"{where}: processed_size is unknown, so its processed frame has no size")
    return float(im.processed_size[0]), float(im.processed_size[1])


def pixel_density(im: ImageLayout, values, views: Sequence[str] | None = None, size: tuple[int, int] | None = None,
                  where: str = "image") -> torch.Tensor:
    """float32 [height, width]: token values placed on the image's pixels as a density, all chosen views summed.

    values: float [seq_len] indexed by sequence position, or a callable view -> float [rows, cols].
    views: names of the views to place (default: `covering_views`, the boxed views that hold every placed token
        once: Idefics3's assembled 'tiles' grid, which repeats its tile views, is left out).

    Each token's value is spread uniformly over its box (value / box area) and the densities of all views are
    summed. A pixel receives each box's density times the part of the pixel that box covers. Boxes are first
    clipped to the frame, and the area divided by is the clipped one, so the map's total equals the sum of the
    values of every token whose box overlaps the frame (a box wholly outside it, or of zero area, contributes
    nothing).

    Frame: if every placed view is in the "original" frame and the image's original size is known, the map is
    in original pixels (width, height = `size` of the image layout); otherwise it is in the processed frame
    (`processed_size`, each side rounded up to an int). A view in the original frame cannot be placed in the
    processed one: that mix, like an unknown frame size, is a ValueError, as is an image none of whose views has
    boxes.

    size: optional (width, height) of the output; the same density is integrated over a width x height grid laid
        over the frame (each output pixel covers frame_w / width by frame_h / height frame pixels), so the total
        is unchanged.
    """
    chosen = boxed_views(im, covering_views(im) if views is None else views)
    if not chosen:
        raise ValueError(f"{where}: no view has boxes ({[v.name for v in im.views]}); "
                         "its tokens cannot be placed on pixels")
    fw, fh = pixel_frame(im, chosen, where)
    if size is None:
        width, height = math.ceil(fw), math.ceil(fh)
        sx = sy = 1.0
    else:
        width, height = int(size[0]), int(size[1])
        if width < 1 or height < 1 or (width, height) != tuple(size):
            raise ValueError(f"size: {size!r}; give (width, height) as positive ints")
        sx, sy = width / fw, height / fh
    out = torch.zeros(height, width, dtype=torch.float64)
    for v in chosen:
        vals = values(v) if callable(values) else values[v.positions.to(values.device)]
        out += _rasterise(v, vals.double().cpu(), fw, fh, sx, sy, width, height)
    return out.float()


def _rasterise(v: View, values: torch.Tensor, fw: float, fh: float, sx: float, sy: float,
               width: int, height: int) -> torch.Tensor:
    """float64 [height, width]: sum over the view's tokens of value / box area x the box's overlap with
    each output pixel. Boxes are clipped to the frame (fw x fh) and scaled by (sx, sy) into output pixels.
    A box's overlap with the pixel grid is the outer product of its per-axis overlaps; when the boxes form
    a grid (shared x extents per column, y extents per row) the whole view is one [H, rows] @ [rows, cols]
    @ [cols, W] product instead of one outer product per token."""
    b = v.boxes.double().cpu()
    x0, x1 = b[:, 0].clamp(0, fw) * sx, b[:, 2].clamp(0, fw) * sx
    y0, y1 = b[:, 1].clamp(0, fh) * sy, b[:, 3].clamp(0, fh) * sy
    values = values.reshape(-1)

    def density(vals, area):
        return torch.where(area > 0, vals / area.clamp(min=1e-300), torch.zeros_like(vals))

    X0, X1, Y0, Y1 = (t.view(v.rows, v.cols) for t in (x0, x1, y0, y1))
    if all((t == t[:1]).all() for t in (X0, X1)) and all((t == t[:, :1]).all() for t in (Y0, Y1)):
        cx0, cx1, ry0, ry1 = X0[0], X1[0], Y0[:, 0], Y1[:, 0]
        area = (ry1 - ry0).clamp(min=0)[:, None] * (cx1 - cx0).clamp(min=0)[None, :]
        d = density(values.view(v.rows, v.cols), area)
        return _overlap(ry0, ry1, height).T @ d @ _overlap(cx0, cx1, width)
    area = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    d = density(values, area)
    return (_overlap(y0, y1, height) * d[:, None]).T @ _overlap(x0, x1, width)


def _overlap(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """[K, n]: length of the overlap of each interval [a_k, b_k] with each unit cell [j, j + 1]."""
    j = torch.arange(n, dtype=torch.float64)
    return (torch.minimum(b[:, None], j + 1) - torch.maximum(a[:, None], j)).clamp(min=0)

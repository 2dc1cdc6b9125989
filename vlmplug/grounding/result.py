"""`Grounding`: where a model looked for a query, on the user's image: a heatmap, its peak, a box, point prompts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as e:  # pragma: no cover - scipy ships with the "ground" extra
        raise ImportError("grounding boxes and points need scipy: pip install 'vlmplug[ground]'") from e
    return ndimage


#: 8-connectivity (TAG's BFS over the 8 neighbours)
EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class Region:
    """One connected region of the thresholded heatmap: its box (x0, y0, x1, y1) in pixels (x1, y1 exclusive), its
    confidence (the heatmap's maximum inside it) and its area in pixels."""

    box: tuple[int, int, int, int]
    confidence: float
    area: int


@dataclass
class Grounding:
    """Where the model looked for `query` in one image.

    heatmap: float32 [height, width] of the original image, 0..1 (the attention density divided by its maximum;
        all zeros if the model gave the image no attention at all).
    method: "tag", "relative", "rollout" or "raw"; tokens: the query tokens whose attention made the map (decoded);
    info: what the method chose (layers, the (layer, head) pairs TAG kept, ...).
    threshold: fraction of the maximum a pixel needs to belong to a region (TAG: 0.5).
    """

    heatmap: np.ndarray
    query: str
    method: str
    image: Any = None  # the PIL image the map is on (for overlay)
    tokens: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    threshold: float = 0.5

    def __repr__(self) -> str:
        h, w = self.heatmap.shape
        return f"Grounding({self.method!r}, query={self.query!r}, {w}x{h}, point={self.point})"

    # ------------------------------------------------------------------ point
    @property
    def point(self) -> tuple[float, float]:
        """(x, y) of the heatmap's peak in the original image's pixels: the centre of the run of maximal pixels
        through the first maximal pixel, along its row and its column (a peak token spreads one value over its whole
        box, so its box centre, not its top-left pixel)."""
        hm = self.heatmap
        y0, x0 = np.unravel_index(int(np.argmax(hm)), hm.shape)
        top = hm[y0, x0]
        flat = hm >= top - 1e-6 * max(float(top), 1e-30)

        def run(line, i):
            lo = hi = i
            while lo > 0 and line[lo - 1]:
                lo -= 1
            while hi + 1 < len(line) and line[hi + 1]:
                hi += 1
            return (lo + hi + 1) / 2.0

        return float(run(flat[y0, :], x0)), float(run(flat[:, x0], y0))

    # ------------------------------------------------------------------ regions
    @property
    def regions(self) -> list[Region]:
        """Connected regions (8-connectivity) of the pixels at or above `threshold` of the maximum, most confident
        first, then largest (TAG's order)."""
        hm = self.heatmap
        if float(hm.max()) <= 0:
            return []
        nd = _ndimage()
        lab, n = nd.label(hm >= self.threshold * float(hm.max()), structure=EIGHT)
        out = []
        for k, sl in enumerate(nd.find_objects(lab), start=1):
            inside = lab[sl] == k
            out.append(Region(box=(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop),
                              confidence=float(hm[sl][inside].max()), area=int(inside.sum())))
        out.sort(key=lambda r: (-r.confidence, -r.area))
        return out

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) in pixels (x1, y1 exclusive): the bounding box of the most confident region, ties to the
        largest (TAG); None for an all-zero map."""
        r = self.regions
        return r[0].box if r else None

    @property
    def points(self) -> list[tuple[float, float, int]]:
        """Point prompts for a segmenter, VL-SAM style: [(x, y, 1), (x, y, 0)]. The largest region above the
        threshold is the positive area: its peak is the positive point; everything else is negative: its
        least-attended pixel among those the model saw (a nonzero density somewhere on the map's frame) is the
        negative point. [] for an all-zero map; only the positive point when nothing lies outside the region."""
        hm = self.heatmap
        if float(hm.max()) <= 0:
            return []
        nd = _ndimage()
        lab, n = nd.label(hm >= self.threshold * float(hm.max()), structure=EIGHT)
        sizes = np.bincount(lab.ravel())[1:]
        pos = lab == int(np.argmax(sizes)) + 1
        py, px = np.unravel_index(int(np.argmax(np.where(pos, hm, -1.0))), hm.shape)
        out = [(float(px + 0.5), float(py + 0.5), 1)]
        seen = self.info.get("seen")
        outside = ~pos if seen is None else (~pos & seen)
        if outside.any():
            ny, nx = np.unravel_index(int(np.argmin(np.where(outside, hm, np.inf))), hm.shape)
            out.append((float(nx + 0.5), float(ny + 0.5), 0))
        return out

    # ------------------------------------------------------------------ pictures
    def overlay(self, alpha: float = 0.5, cmap: str = "jet"):
        """A PIL image: the heatmap, coloured with a matplotlib colormap, blended over the picture."""
        from PIL import Image

        try:
            from matplotlib import colormaps
        except ImportError as e:  # pragma: no cover
            raise ImportError("overlay() needs matplotlib: pip install 'vlmplug[ground]'") from e
        colour = (colormaps[cmap](self.heatmap)[..., :3] * 255).astype(np.uint8)
        heat = Image.fromarray(colour)
        if self.image is None:
            return heat
        base = self.image.convert("RGB")
        if base.size != heat.size:
            raise ValueError(f"the image is {base.size}, the heatmap {heat.size}")
        return Image.blend(base, heat, alpha)

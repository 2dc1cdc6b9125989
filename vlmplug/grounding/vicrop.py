"""ViCrop (Zhang et al., "MLLMs Know Where to Look", ICLR 2025): crop where the model looks, then ask again with
the original image and the crop.

1. rel-att map: the last prompt position's head-mean attention over the image in one middle layer, for the question,
   divided by the same for "Write a general description of the image." (`ground(..., method="relative")`).
2. box (mllms_know `bbox_from_att_image_adaptive`): square windows of side bbox_size * r, r in 1.0 .. 2.0, slid with a
   stride of one map cell over the map (cells of the model's main token grid laid on the original image); per r the
   window with the largest attention sum, scored by its sharpness (that sum minus the mean sum of the 4 windows one
   cell away, per cell of the window); the sharpest r wins; the box is centred on that window and kept inside the
   image.
3. re-query with two images, [original, crop] (the crop's answer is the answer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import MethodConfigError
from .core import GENERIC_PROMPT

RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)


@dataclass(frozen=True)
class ViCrop:
    """map: the grounding method whose map places the crop ("relative": the paper's rel-att; "raw", "tag",
    "rollout": vlmplug's maps of the prompt's last token, for models where a generic prompt means nothing).
    layers: decoder layers of the map (default: the method's; rel-att: ViCrop's 14 of 32, scaled to the depth).
    bbox_size: the crop's base side in original pixels (default: the vision encoder's input side; mllms_know uses
    336 for LLaVA-1.5). ratios: the window scales tried. requery: "both" ([original, crop], the paper) or "crop"."""

    name: ClassVar[str] = "vicrop"
    map: str = "relative"
    layers: tuple[int, ...] | None = None
    bbox_size: int | None = None
    ratios: tuple[float, ...] = RATIOS
    generic_prompt: str = GENERIC_PROMPT
    requery: str = "both"

    def __post_init__(self):
        from .core import METHODS

        if self.map not in METHODS:
            raise MethodConfigError(f"vicrop: map={self.map!r}; choose one of {list(METHODS)}")
        if self.requery not in ("both", "crop"):
            raise MethodConfigError(f"vicrop: requery={self.requery!r}; choose 'both' or 'crop'")
        if self.bbox_size is not None and (isinstance(self.bbox_size, bool) or not isinstance(self.bbox_size, int)
                                           or self.bbox_size < 1):
            raise MethodConfigError(f"vicrop: bbox_size={self.bbox_size!r} must be a positive int (pixels)")
        if not self.ratios or any(not isinstance(r, (int, float)) or r <= 0 for r in self.ratios):
            raise MethodConfigError(f"vicrop: ratios={self.ratios!r} must be positive numbers")


#: mllms_know's bbox_size for the Qwen2.5-VL family (its vision config has no fixed input side)
QWEN_BBOX = 224


def encoder_side(model) -> int:
    """The default crop side: the vision encoder's input side in pixels (mllms_know: 336 for LLaVA-1.5, 224 for
    BLIP and Qwen2.5-VL), 336 when the config has none."""
    if str(getattr(model.config, "model_type", "")).startswith("qwen"):
        return QWEN_BBOX
    vc = getattr(model.config, "vision_config", None)
    s = getattr(vc, "image_size", None)
    if isinstance(s, (list, tuple)):
        s = s[0]
    return int(s) if isinstance(s, int) and s > 0 else 336


def cell_map(heatmap: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The pixel heatmap summed into rows x cols cells laid evenly over the image (each pixel to the cell holding
    its centre; works for images smaller than the grid)."""
    H, W = heatmap.shape
    rows, cols = grid
    ri = np.minimum(((np.arange(H) + 0.5) * rows / H).astype(int), rows - 1)
    ci = np.minimum(((np.arange(W) + 0.5) * cols / W).astype(int), cols - 1)
    out = np.zeros((rows, cols))
    np.add.at(out, (ri[:, None], ci[None, :]), heatmap.astype(np.float64))
    return out


def _window_sums(m: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Sum of every kh x kw window of m (stride 1): [rows - kh + 1, cols - kw + 1], from an integral image."""
    c = np.pad(m, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return c[kh:, kw:] - c[:-kh, kw:] - c[kh:, :-kw] + c[:-kh, :-kw]


def select_box(heatmap: np.ndarray, grid: tuple[int, int], bbox_size: int,
               ratios=RATIOS) -> tuple[int, int, int, int]:
    """ViCrop's adaptive box (mllms_know `bbox_from_att_image_adaptive`, its arithmetic kept) on a pixel heatmap
    [H, W] of the original image; grid: (rows, cols) of the map's cells (the model's main token grid).

    Per ratio r: a window of int(bbox_size * r / cell side) cells per axis (at most the map), slid with stride 1; the
    window with the largest sum (first in column-major order on ties, as the official loops); its sharpness = (that
    sum - the mean sum of the windows one cell left, right, up and down that exist) / cells in the window. A window
    covering the whole map is no crop: at the first ratio the whole image is the box, at later ones the ratio is
    skipped. The box: side bbox_size * r around the sharpest window's centre (integer pixels), shifted inside the
    image, clipped where the image is smaller."""
    H, W = heatmap.shape
    rows, cols = grid
    cells = cell_map(heatmap, grid)
    bw, bh = W / cols, H / rows
    found = []
    for r in ratios:
        kw, kh = min(int(bbox_size * r / bw), cols), min(int(bbox_size * r / bh), rows)
        if cols - kw < 1 and rows - kh < 1:
            if r == ratios[0]:
                return 0, 0, W, H
            continue
        kw, kh = max(kw, 1), max(kh, 1)
        sums = _window_sums(cells, kh, kw)
        j, i = np.unravel_index(int(np.argmax(sums.T)), sums.T.shape)  # column-major first maximum
        nb = [sums[a, b] for a, b in ((i, j - 1), (i, j + 1), (i - 1, j), (i + 1, j))
              if 0 <= a < sums.shape[0] and 0 <= b < sums.shape[1]]
        found.append(((sums[i, j] - np.mean(nb)) / (kh * kw), bbox_size * r, j, i, kw, kh))
    _, side, j, i, kw, kh = found[int(np.argmax([f[0] for f in found]))]
    half = side // 2
    cx, cy = int(j * bw + bw * kw / 2), int(i * bh + bh * kh / 2)
    cx, cy = max(cx, half), max(cy, half)
    cx, cy = min(cx, W - half), min(cy, H - half)
    return int(max(0, cx - half)), int(max(0, cy - half)), int(min(W, cx + half)), int(min(H, cy + half))


def run(model, processor, images, question: str, cfg: ViCrop) -> dict:
    """The map, the box and the crop for one image: dict(box, crop (PIL), grounding, images (to ask with))."""
    from .core import ground

    if len(images) != 1:
        raise MethodConfigError(f"vicrop works on one image per question; got {len(images)}")
    image = images[0]
    g = ground(model, processor, image, question, method=cfg.map, layers=cfg.layers, tokens="last",
               generic_prompt=cfg.generic_prompt)
    grid = g.info.get("grid")
    box = select_box(g.heatmap, grid, cfg.bbox_size or encoder_side(model), cfg.ratios)
    crop = image.crop(box)
    return {"box": box, "crop": crop, "grounding": g, "images": [image, crop] if cfg.requery == "both" else [crop]}

"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: per image a (h/m) x (w/m) merged grid, row-major, from `image_grid_thw`.

No crop or pad: the processor resizes (aspect kept, rounded to multiples of patch*merge), so the
processed frame is (w*patch, h*patch) pixels and maps to the original by scaling.
"""
from __future__ import annotations

import torch

from ..errors import LayoutError
from ..layout import ImageLayout, View, grid_boxes
from ..registry import register_adapter
from .base import Adapter


@register_adapter("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
class QwenVLAdapter(Adapter):
    meta_keys = ("image_grid_thw",)
    no_vision_grid = ()

    def __init__(self, model, processor=None):
        super().__init__(model, processor)
        # Qwen3-VL adds DeepStack features to the hidden states of its first decoder layers.
        ds = getattr(self.config.vision_config, "deepstack_visual_indexes", None)
        self.feature_layers = len(ds) if ds else 0
        self.min_drop_layer = max(1, self.feature_layers)

    def encoded_images(self, meta):
        thw = meta.get("image_grid_thw") if meta is not None else None
        return None if thw is None else len(thw)

    def locate_sample(self, ids, pos, meta, counter):
        thw = meta.get("image_grid_thw") if meta is not None else None
        if thw is None:
            raise LayoutError("image_grid_thw of this forward is unknown (no image-feature call was seen)")
        m = int(self.config.vision_config.spatial_merge_size)
        p = int(self.config.vision_config.patch_size)
        images, cursor = [], 0
        while cursor < pos.numel():
            i = counter.next()
            if i >= len(thw):
                raise LayoutError(f"more image tokens than the {len(thw)} images in image_grid_thw")
            t, h, w = (int(x) for x in thw[i])
            rows, cols = h // m, w // m
            n = t * rows * cols
            chunk = pos[cursor : cursor + n]
            if chunk.numel() != n:
                raise LayoutError(f"image {i}: expected {n} tokens, found {chunk.numel()}")
            cursor += n
            views = [
                View("image" if t == 1 else f"frame_{k}", rows, cols, chunk[k * rows * cols : (k + 1) * rows * cols],
                     grid_boxes(rows, cols, 0, 0, w * p, h * p))
                for k in range(t)
            ]
            im = ImageLayout(positions=chunk, views=views)
            im.processed_size = (w * p, h * p)
            images.append(im)
        return images

    def vision_grid(self):
        from .base import VisionGrid

        v = self.config.vision_config
        n = int(v.depth)
        windowed = self.config.model_type == "qwen2_5_vl"
        return VisionGrid(cls=False, pool=1, feature_layer=n - 1, num_layers=n, merge=int(v.spatial_merge_size) ** 2,
                          windowed=windowed)

    def window_order(self, meta):
        from transformers.vision_utils import get_vision_window_index

        thw = meta.get("image_grid_thw") if meta is not None else None
        if thw is None:
            raise LayoutError("image_grid_thw of this forward is unknown (no image-feature call was seen)")
        v = self.config.vision_config
        index, _ = get_vision_window_index(torch.as_tensor(thw), spatial_merge_size=int(v.spatial_merge_size),
                                           window_size=int(v.window_size), patch_size=int(v.patch_size))
        return index.long().cpu()

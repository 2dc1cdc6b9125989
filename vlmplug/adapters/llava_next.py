"""LLaVA-NeXT (anyres): base grid, then the unpadded high-res grid with a newline token after each row.

The grid arithmetic calls transformers' own helpers (`get_anyres_image_grid_shape`, `unpad_image`) so
the layout follows the model's packing exactly; `image_sizes` is captured from the image-feature call.
"""
from __future__ import annotations

import math

import torch

from ..errors import LayoutError
from ..layout import ImageLayout, View, grid_boxes
from ..registry import register_adapter
from .base import Adapter


def anyres_hr_shape(config, image_size_hw, max_patches: int | None = None) -> tuple[int, int]:
    """(rows, cols) of the high-res grid after unpadding (and OneVision's anyres_max_N pooling)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    v = config.vision_config
    side = int(v.image_size) // int(v.patch_size)
    nph, npw = get_anyres_image_grid_shape(image_size_hw, config.image_grid_pinpoints, v.image_size)
    dummy = torch.zeros(1, int(nph) * side, int(npw) * side)
    h, w = unpad_image(dummy, torch.as_tensor(image_size_hw)).shape[1:]
    if max_patches is not None:
        ratio = math.sqrt(h * w / (max_patches * side**2))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
    return int(h), int(w)


class AnyresAdapter(Adapter):
    meta_keys = ("image_sizes", "batch_num_images", "vision_aspect_ratio")

    def _max_patches(self):
        return None

    def _patched(self, meta, index: int) -> bool:
        return True

    def locate_sample(self, ids, pos, meta, counter):
        sizes = meta.get("image_sizes") if meta is not None else None
        if sizes is None:
            raise LayoutError("image_sizes of this forward are unknown (no image-feature call was seen)")
        side = int(self.config.vision_config.image_size) // int(self.config.vision_config.patch_size)
        S = float(self.config.vision_config.image_size)
        images, cursor = [], 0
        while cursor < pos.numel():
            i = counter.next()
            if i >= len(sizes):
                raise LayoutError(f"more image-token blocks than the {len(sizes)} images encoded")
            H, W = (int(x) for x in sizes[i])
            base_n = side * side
            if self._patched(meta, i):
                r, c = anyres_hr_shape(self.config, [H, W], self._max_patches())
                n = base_n + r * (c + 1)
            else:
                r = c = 0
                n = base_n + 1
            chunk = pos[cursor : cursor + n]
            if chunk.numel() != n:
                raise LayoutError(f"image {i}: expected {n} tokens, found {chunk.numel()}")
            cursor += n
            base = View("base", side, side, chunk[:base_n], grid_boxes(side, side, 0, 0, W, H), "original")
            views = [base]
            if r:
                hr = chunk[base_n:].view(r, c + 1)[:, :c].reshape(-1)  # drop the newline column
                views.append(View("highres", r, c, hr, grid_boxes(r, c, 0, 0, W, H), "original"))
            im = ImageLayout(positions=chunk, views=views, main=len(views) - 1, size=(W, H))
            images.append(im)
        return images

    def to_original(self, image, size):
        image.size = tuple(size)  # boxes are already in the original frame (image_sizes)


@register_adapter("llava_next")
class LlavaNextAdapter(AnyresAdapter):
    pass

"""Gemma 3: `mm_tokens_per_image` soft tokens per image (SigLIP grid average-pooled to a square),
between BOI/EOI; the processor squashes the image to the vision tower's square input."""
from __future__ import annotations

from ..errors import LayoutError
from ..layout import ImageLayout
from ..registry import register_adapter
from .base import Adapter


@register_adapter("gemma3")
class Gemma3Adapter(Adapter):
    pixel_values_per_image = True

    def locate_sample(self, ids, pos, meta, counter):
        n = int(self.config.mm_tokens_per_image)
        if pos.numel() % n:
            raise LayoutError(f"{pos.numel()} image tokens is not a multiple of mm_tokens_per_image={n}")
        S = float(self.config.vision_config.image_size)
        images = []
        for chunk in pos.split(n):
            counter.next()
            im = ImageLayout(positions=chunk, views=[self.square_view("image", chunk, S)])
            im.processed_size = (S, S)
            images.append(im)
        return images

    def vision_grid(self):
        from .base import VisionGrid

        v = self.config.vision_config
        side = int(v.image_size) // int(v.patch_size)
        tok = int(round(int(self.config.mm_tokens_per_image) ** 0.5))
        n = int(v.num_hidden_layers)
        return VisionGrid(cls=False, pool=side // tok, feature_layer=n - 1, num_layers=n)

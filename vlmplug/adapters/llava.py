"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one square grid per image, contiguous, row-major."""
from __future__ import annotations

import torch

from ..errors import LayoutError
from ..layout import ImageLayout
from ..registry import register_adapter
from .base import Adapter


def tokens_per_image(config) -> tuple[int, int]:
    """(grid side, number of tokens) of one image: CLS dropped by the "default" strategy, kept by "full"."""
    v = config.vision_config
    side = int(v.image_size) // int(v.patch_size)
    extra = 0 if getattr(config, "vision_feature_select_strategy", "default") == "default" else 1
    return side, side * side + extra


@register_adapter("llava")
class LlavaAdapter(Adapter):
    """The image processor resizes the shortest edge and centre-crops (llava-hf) or pads to a square
    (LLaVA's `image_aspect_ratio="pad"`, `do_pad=True`); `to_original` undoes whichever is in use."""

    pixel_values_per_image = True

    def locate_sample(self, ids, pos, meta, counter):
        side, n = tokens_per_image(self.config)
        if pos.numel() % n:
            raise LayoutError(f"{pos.numel()} image tokens is not a multiple of {n} tokens per image")
        S = float(self.config.vision_config.image_size)
        images = []
        for chunk in pos.split(n):
            counter.next()
            grid = chunk[n - side * side:]  # skip CLS with the "full" strategy
            im = ImageLayout(positions=chunk, views=[self.square_view("image", grid, S)])
            im.processed_size = (S, S)
            images.append(im)
        return images

    def vision_grid(self):
        from .base import VisionGrid

        if getattr(self.config, "vision_feature_select_strategy", "default") != "default":
            return None
        vfl = self.config.vision_feature_layer
        if not isinstance(vfl, int):
            return None
        n = int(self.config.vision_config.num_hidden_layers)
        return VisionGrid(cls=True, pool=1, feature_layer=vfl % (n + 1) - 1, num_layers=n)

    def _mode(self) -> str:
        ip = getattr(self.processor, "image_processor", self.processor)
        if ip is None:
            return "crop"  # llava-hf checkpoints ship CLIPImageProcessor: shortest-edge resize + centre crop
        if getattr(ip, "do_pad", False):
            return "pad"
        return "crop" if getattr(ip, "do_center_crop", False) else "squash"

    def to_original(self, image, size):
        W, H = size
        image.size = (W, H)
        S = float(self.config.vision_config.image_size)
        mode = self._mode()
        for v in image.views:
            if v.boxes is None or v.frame == "original":
                continue
            b = v.boxes.double()
            if mode == "crop":
                s = S / min(W, H)
                off = torch.tensor([(W * s - S) / 2, (H * s - S) / 2] * 2, dtype=torch.float64)
                b = (b + off) / s
            elif mode == "pad":
                side = max(W, H)
                s = S / side
                off = torch.tensor([(side - W) / 2, (side - H) / 2] * 2, dtype=torch.float64)
                b = b / s - off
            else:
                b = b * torch.tensor([W / S, H / S] * 2, dtype=torch.float64)
            v.boxes = b.float()
            v.frame = "original"

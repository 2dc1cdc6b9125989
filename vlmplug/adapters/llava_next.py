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

    def encoded_images(self, meta):
        sizes = meta.get("image_sizes") if meta is not None else None
        return None if sizes is None else len(sizes)

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

    # ------------------------------------------------------------------ vision-side methods
    def vision_grid(self):
        from .base import VisionGrid

        strategy = getattr(self.config, "vision_feature_select_strategy", "default")
        vfl = self.config.vision_feature_layer
        if not isinstance(vfl, int) or strategy not in ("default", "full"):
            return None
        n = int(self.config.vision_config.num_hidden_layers)
        has_cls = hasattr(self.config.vision_config, "projection_dim") and strategy == "default"  # CLIP drops CLS
        return VisionGrid(cls=has_cls, pool=1, feature_layer=vfl % (n + 1) - 1, num_layers=n, packed=True)

    def crop_token_map(self, image):
        W, H = image.size
        n_crops, crop, patch = self.crop_map((H, W), any(view.name == "highres" for view in image.views))
        if crop.numel() != image.positions.numel():
            raise LayoutError(f"packed map of {crop.numel()} tokens for an image of {image.positions.numel()}")
        return n_crops, crop, patch

    def crop_maps(self, meta) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """`crop_map` of every image of an image-feature call, from its captured arguments."""
        sizes = meta.get("image_sizes") if meta is not None else None
        if sizes is None:
            raise LayoutError("image_sizes of this forward are unknown (no image-feature call was seen)")
        return [self.crop_map((int(h), int(w)), self._patched(meta, i)) for i, (h, w) in enumerate(sizes.tolist())]

    def crop_map(self, size_hw, patched: bool):
        """(crops, crop [n], patch [n]) of an image of size (H, W): crop 0 is the base view, then the high-res
        crops row-major. Pushes patch coordinates through the model's own `pack_image_features` (unpadding,
        OneVision's bilinear anyres_max pooling, newline tokens), so the map follows the model exactly; a pooled
        token maps to the patch nearest to where it samples."""
        import inspect

        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        v = self.config.vision_config
        side = int(v.image_size) // int(v.patch_size)
        P = side * side
        H, W = size_hw
        nph, npw = get_anyres_image_grid_shape([H, W], self.config.image_grid_pinpoints, v.image_size) if patched else (0, 0)
        n_crops = 1 + int(nph) * int(npw)
        r, c = torch.arange(P) // side, torch.arange(P) % side
        feats = torch.zeros(n_crops, P, 3, dtype=torch.float64)
        feats[0, :, 0], feats[0, :, 1] = r, c
        for k in range(1, n_crops):
            gr, gc = divmod(k - 1, int(npw))
            feats[k, :, 0], feats[k, :, 1], feats[k, :, 2] = gr * side + r, gc * side + c, 1.0
        pack = self.base_model.pack_image_features
        kw = dict(image_newline=torch.full((3,), -1.0, dtype=torch.float64))
        params = inspect.signature(pack).parameters
        if "vision_feature_select_strategy" in params:
            kw["vision_feature_select_strategy"] = getattr(self.config, "vision_feature_select_strategy", "default")
        if "vision_aspect_ratio" in params:
            kw["vision_aspect_ratio"] = getattr(self.config, "vision_aspect_ratio", None) or "anyres_max_9"
        out = pack([feats], torch.tensor([[H, W]]), **kw)[0][0]  # [n, 3]
        rows, cols = out[:, 0].round().long(), out[:, 1].round().long()
        newline = out[:, 2] < -0.5
        hr = out[:, 2] > 0.5
        crop = torch.where(hr, 1 + (rows // side) * int(npw) + cols // side, torch.zeros_like(rows))
        patch = (rows % side) * side + cols % side
        crop[newline], patch[newline] = -1, -1
        return n_crops, crop, patch


@register_adapter("llava_next")
class LlavaNextAdapter(AnyresAdapter):
    pass

"""Idefics3 / SmolVLM: an image is split into rows x cols tiles (each its own run of image tokens,
preceded by `<fake_token_around_image><row_r_col_c>`, a newline after each row of tiles) and
followed by a global view of the whole image. Only token structure is used:
- the token right before the sample's last run is the global-image marker: a run preceded by it
  ends an image;
- within an image, a tile run followed by anything but `<fake_token_around_image>` ends a row of tiles.
The tiles are also assembled into one "tiles" grid, the main view when present."""
from __future__ import annotations

import torch

from ..errors import LayoutError
from ..layout import ImageLayout, View, grid_boxes
from ..registry import register_adapter
from .base import Adapter, runs


@register_adapter("idefics3", "smolvlm")
class Idefics3Adapter(Adapter):
    def _tile_tokens(self) -> tuple[int, int]:
        v = self.config.vision_config
        side = (int(v.image_size) // int(v.patch_size)) // int(self.config.scale_factor)
        return side, side * side

    def matches_encoded(self, meta, layout, n_images, rows):
        # pixel_values are [rows, images per row (padded), C, H, W] over the distinct rows
        shape = meta.get("pixel_shape") if meta is not None else None
        return None if not shape or len(shape) != 5 else int(shape[0]) == rows

    def locate_sample(self, ids, pos, meta, counter):
        side, n = self._tile_tokens()
        T = float(self.config.vision_config.image_size)
        rs = []
        for start, length in runs(pos):  # adjacent tiles never touch, but split defensively
            if length % n:
                raise LayoutError(f"an image-token run of {length} is not a multiple of {n} tokens per tile")
            rs += [(start + k * n, n) for k in range(length // n)]
        if not rs:
            return []
        global_marker = int(ids[rs[-1][0] - 1]) if rs[-1][0] > 0 else None
        images, tiles = [], []
        for start, length in rs:
            if start > 0 and int(ids[start - 1]) == global_marker:
                counter.next()
                images.append(self._image(ids, tiles, (start, length), side, T))
                tiles = []
            else:
                tiles.append((start, length))
        if tiles:
            raise LayoutError("tile runs after the last global image view")
        return images

    def _image(self, ids, tiles, glob, side, T) -> ImageLayout:
        gpos = torch.arange(glob[0], glob[0] + glob[1])
        views: list[View] = []
        if not tiles:
            views.append(View("global", side, side, gpos, grid_boxes(side, side, 0, 0, T, T)))
            im = ImageLayout(positions=gpos, views=views)
            im.processed_size = (T, T)
            return im
        # within a row of tiles a run is followed by <fake_token_around_image> (the token two before every
        # tile run); a row ends with anything else (the processor's newline)
        fake = int(ids[tiles[0][0] - 2]) if tiles[0][0] >= 2 else None
        ends = [k for k, (s, ln) in enumerate(tiles) if s + ln >= ids.numel() or int(ids[s + ln]) != fake]
        cols = ends[0] + 1 if ends else len(tiles)
        if len(tiles) % cols:
            raise LayoutError(f"{len(tiles)} tiles do not form rows of {cols}")
        rows = len(tiles) // cols
        W, H = cols * T, rows * T
        canvas = torch.zeros(rows * side, cols * side, dtype=torch.long)
        for k, (s, ln) in enumerate(tiles):
            r, c = divmod(k, cols)
            p = torch.arange(s, s + ln)
            canvas[r * side : (r + 1) * side, c * side : (c + 1) * side] = p.view(side, side)
            views.append(View(f"tile_{r}_{c}", side, side, p, grid_boxes(side, side, c * T, r * T, (c + 1) * T, (r + 1) * T)))
        views.append(View("global", side, side, gpos, grid_boxes(side, side, 0, 0, W, H)))
        views.append(View("tiles", rows * side, cols * side, canvas.reshape(-1), grid_boxes(rows * side, cols * side, 0, 0, W, H)))
        allpos = torch.cat([torch.arange(s, s + ln) for s, ln in tiles] + [gpos])
        im = ImageLayout(positions=allpos, views=views, main=len(views) - 1)
        im.processed_size = (W, H)
        return im

    def vision_grid(self):
        from .base import VisionGrid

        n = int(self.config.vision_config.num_hidden_layers)
        return VisionGrid(cls=False, pool=int(self.config.scale_factor), feature_layer=n - 1, num_layers=n)

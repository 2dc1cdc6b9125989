"""InternVL (HF-native): `<img>` + image_seq_length tokens per 448-px tile + `</img>`; several tiles are
followed by a thumbnail of the whole image, which is the main view. Tile placement needs the image's
original size (the processor resizes it to cols x rows tiles, cols x rows chosen by aspect ratio), which
the model never sees: tile views get boxes once the size is known (`set_image_sizes`), none before."""
from __future__ import annotations

from ..errors import LayoutError
from ..layout import ImageLayout, View, grid_boxes
from ..registry import register_adapter
from .base import Adapter, runs


@register_adapter("internvl")
class InternVLAdapter(Adapter):
    def matches_encoded(self, meta, layout, n_images, rows):
        # pixel_values hold one 448-px tile per image_seq_length tokens, over the distinct images
        shape = meta.get("pixel_shape") if meta is not None else None
        if not shape:
            return None
        n, seen, tiles = int(self.config.image_seq_length), set(), 0
        for s in layout.samples:
            for im in s.images:
                if im.index not in seen:
                    seen.add(im.index)
                    tiles += int(im.positions.numel()) // n
        return tiles == int(shape[0])

    def locate_sample(self, ids, pos, meta, counter):
        n = int(self.config.image_seq_length)
        S = self.config.vision_config.image_size
        S = float(S[0] if isinstance(S, (list, tuple)) else S)
        images = []
        for start, length in runs(pos):
            if length % n:
                raise LayoutError(f"an image block of {length} tokens is not a multiple of image_seq_length={n}")
            counter.next()
            chunk = pos[(pos >= start) & (pos < start + length)]
            tiles = list(chunk.split(n))
            if len(tiles) == 1:
                views, main = [self.square_view("image", tiles[0], S)], 0
            else:
                views = [self.square_view(f"tile_{k}", t, S) for k, t in enumerate(tiles[:-1])]
                for v in views:
                    v.boxes = None
                views.append(self.square_view("thumbnail", tiles[-1], S))
                main = len(views) - 1
            im = ImageLayout(positions=chunk, views=views, main=main)
            im.processed_size = (S, S)
            images.append(im)
        return images

    def to_original(self, image: ImageLayout, size: tuple[int, int]) -> None:
        tiles = [v for v in image.views if v.name.startswith("tile_")]
        super().to_original(image, size)  # the thumbnail (or the single tile) covers the whole image
        if not tiles:
            return
        W, H = size
        cols, rows = tile_grid(len(tiles), W, H)
        for k, v in enumerate(tiles):  # the processor crops the resized image row-major into tiles
            r, c = divmod(k, cols)
            v.boxes = grid_boxes(v.rows, v.cols, c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows)
            v.frame = "original"

    def vision_grid(self):
        from .base import VisionGrid

        if getattr(self.config, "vision_feature_select_strategy", "default") != "default":
            return None
        vfl = getattr(self.config, "vision_feature_layer", -1)
        if not isinstance(vfl, int):
            return None
        n = int(self.config.vision_config.num_hidden_layers)
        # pixel shuffle (downsample_ratio 0.5) packs each 2x2 block of patches, row-major, into one LLM token
        pool = int(round(1.0 / float(self.config.downsample_ratio)))
        return VisionGrid(cls=True, pool=pool, feature_layer=vfl % (n + 1) - 1, num_layers=n)


def tile_grid(n_tiles: int, width: float, height: float) -> tuple[int, int]:
    """(cols, rows) of the tiling of an image into `n_tiles` tiles: of every cols x rows = n_tiles, the one whose
    aspect ratio cols / rows is closest to the image's. The processor (`get_optimal_tiled_canvas`) picks the
    closest ratio over every tile count it allows; the count it picked is known from the tokens, and among the
    arrangements with that count its pick is the closest one, so this recovers it."""
    ratio = width / height
    pairs = [(c, n_tiles // c) for c in range(1, n_tiles + 1) if n_tiles % c == 0]
    return min(pairs, key=lambda cr: abs(ratio - cr[0] / cr[1]))

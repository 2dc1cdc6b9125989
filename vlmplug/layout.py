"""Where each image's tokens sit in a sequence and which part of the picture each one shows.

An adapter turns one forward's inputs into a `Layout`: per sample, per image, one or more *views*
(a 2-D token grid: the single grid of LLaVA-1.5, the base and high-res grids of LLaVA-NeXT, the
tiles and global image of Idefics3, ...). Positions are indices into the (padded) input sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class View:
    """One 2-D token grid of an image.

    positions: sequence positions of the grid cells, row-major, shape [rows*cols].
    boxes: pixel box (x0, y0, x1, y1) each cell covers, shape [rows*cols, 4], in the frame
        `frame` names: "original" (the user's image) or "processed" (the model's input pixels);
        None when the placement is unknown (e.g. a tile whose position in the image is unknown).
    """

    name: str
    rows: int
    cols: int
    positions: torch.Tensor
    boxes: torch.Tensor | None = None
    frame: str = "processed"

    def __post_init__(self) -> None:
        if self.positions.numel() != self.rows * self.cols:
            raise ValueError(f"view {self.name!r}: {self.positions.numel()} positions for a {self.rows}x{self.cols} grid")


@dataclass
class ImageLayout:
    """All tokens of one image: every position it occupies (newline slots included) and its views.

    `main` is the index of the view that covers the whole image at the finest resolution the model
    has a single grid for; `image_attention()` and grounding methods report on it.
    """

    positions: torch.Tensor
    views: list[View]
    main: int = 0
    size: tuple[int, int] | None = None  # original (width, height) when known
    processed_size: tuple[float, float] | None = None  # (width, height) of the frame of "processed" boxes
    # the image's place among the images the image-feature call encoded; rows that generate() repeated for
    # beams / num_return_sequences after encoding the images once share it
    index: int | None = None

    @property
    def main_view(self) -> View:
        return self.views[self.main]

    def view(self, name: str) -> View:
        for v in self.views:
            if v.name == name:
                return v
        raise KeyError(f"no view {name!r}; this image has {[v.name for v in self.views]}")


@dataclass
class SampleLayout:
    images: list[ImageLayout] = field(default_factory=list)
    seq_len: int = 0
    first_real: int = 0  # first non-padding position
    last_real: int = 0  # last non-padding position

    @property
    def image_positions(self) -> torch.Tensor:
        if not self.images:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([im.positions for im in self.images])


@dataclass
class Layout:
    samples: list[SampleLayout]

    def __len__(self) -> int:
        return len(self.samples)

    def image_mask(self, seq_len: int, device=None) -> torch.Tensor:
        """Bool [batch, seq_len], True at every image-token position."""
        m = torch.zeros(len(self.samples), seq_len, dtype=torch.bool, device=device)
        for b, s in enumerate(self.samples):
            if s.images:
                m[b, s.image_positions.to(m.device)] = True
        return m


def grid_boxes(rows: int, cols: int, x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
    """Boxes of a rows x cols grid that evenly tiles the rectangle (x0, y0)-(x1, y1), row-major."""
    xs = torch.linspace(x0, x1, cols + 1, dtype=torch.float64)
    ys = torch.linspace(y0, y1, rows + 1, dtype=torch.float64)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    return torch.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], dim=-1).float()

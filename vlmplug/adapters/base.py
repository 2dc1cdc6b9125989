"""Adapter base class: structure of a VLM (text layers, vision layers) and image-token location.

An adapter is built for one loaded model. It never changes the model; the session asks it
where things are. Family files override `locate_sample` (and `capture_meta` when the model's
image-feature call carries what the layout needs, e.g. LLaVA-NeXT's `image_sizes`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LayoutError, UnsupportedModelError
from ..layout import ImageLayout, Layout, SampleLayout, View, grid_boxes
from ..registry import adapter_registry


@dataclass
class VisionGrid:
    """The vision tower sees crops (images or tiles) in the order their tokens appear; each square
    crop's patches (after an optional CLS token) pool `pool` x `pool` into one LLM token.
    `feature_layer`: index of the vision attention whose output feeds the projector."""

    cls: bool
    pool: int
    feature_layer: int
    num_layers: int
    #: >0: crops are whole images of any shape, and each LLM token is this many consecutive patches
    #: (Qwen's merge windows are stored contiguously); the grid width then comes from the layout
    merge: int = 0
    #: True: an image's tokens are not its crops one after another (LLaVA-NeXT / OneVision unpad, pool and add
    #: newline tokens); `Adapter.crop_token_map(image)` then says which crop patch each token shows
    packed: bool = False
    #: True: the tower reorders merge groups into attention windows (Qwen2.5-VL) and runs windowed layers one call
    #: per window; `Adapter.window_order(meta)` gives, per window-order group, its group in token order
    windowed: bool = False


@dataclass
class ImageMeta:
    """What the image-feature call of one forward told us, per image in batch order."""

    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.values.get(key, default)


def runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """Split sorted positions into maximal runs of consecutive integers: [(start, length), ...]."""
    if positions.numel() == 0:
        return []
    p = positions.tolist()
    out, start, prev = [], p[0], p[0]
    for x in p[1:]:
        if x != prev + 1:
            out.append((start, prev - start + 1))
            start = x
        prev = x
    out.append((start, prev - start + 1))
    return out


class Adapter(ABC):
    """Base adapter. Subclasses set `model_types` through `@register_adapter` and implement `locate_sample`."""

    model_types: tuple[str, ...] = ()
    text_config_key = "text_config"
    vision_config_key = "vision_config"
    #: image-feature kwargs copied (to CPU) into ImageMeta when the model encodes images
    meta_keys: tuple[str, ...] = ()
    #: first decoder layer whose input may be shortened by token dropping (Qwen3-VL's DeepStack adds later)
    min_drop_layer = 1
    #: leading decoder layers that receive image features besides the embeddings (Qwen3-VL's DeepStack)
    feature_layers = 0
    #: pixel_values' first dimension counts images (one tensor per image, as LLaVA-1.5 and Gemma 3 feed it)
    pixel_values_per_image = False

    def __init__(self, model: nn.Module, processor: Any = None):
        self.model = model
        self.config = model.config
        self.processor = processor
        self.text_config = getattr(self.config, self.text_config_key, None) or self.config.get_text_config(decoder=True)
        tid = getattr(self.config, "image_token_id", None)
        if tid is None:
            tid = getattr(self.config, "image_token_index", None)
        if tid is None:
            raise UnsupportedModelError(f"{type(model).__name__}: config has no image_token_id / image_token_index")
        self.image_token_id = int(tid)
        self._text_attn = None
        self._layers = None

    @property
    def pre_llm_drop_layer(self) -> int:
        """First decoder layer whose input may lack the image tokens a method chose before the LLM: 0, so the LLM
        never computes them, unless layers receive image features later (DeepStack) or layer 0 is a sliding-window
        layer (its cache could not be restored to the prompt's length, which generate() reads from layer 0)."""
        if self.feature_layers:
            return max(1, self.feature_layers)
        types = getattr(self.text_config, "layer_types", None)
        return 0 if not types or types[0] == "full_attention" else 1

    # ---------------------------------------------------------------- structure
    @property
    def base_model(self) -> nn.Module:
        """The module whose `get_image_features` both forward() and generate() call."""
        return self.model.base_model if hasattr(self.model, "base_model") else self.model

    def text_attention_modules(self) -> list[nn.Module]:
        """The decoder's self-attention modules, indexed by their `layer_idx`."""
        if self._text_attn is None:
            found = {}
            for m in self.model.modules():
                li = getattr(m, "layer_idx", None)
                if li is not None and getattr(m, "config", None) is self.text_config and hasattr(m, "q_proj"):
                    found[int(li)] = m
            if not found:
                raise UnsupportedModelError(f"{type(self.model).__name__}: no text attention modules with layer_idx found")
            self._text_attn = [found[i] for i in sorted(found)]
        return self._text_attn

    def decoder_layers(self) -> list[nn.Module]:
        """The decoder layers (parents of the text attention modules), in order."""
        if self._layers is None:
            attn = set(map(id, self.text_attention_modules()))
            layers = {}
            for m in self.model.modules():
                sa = getattr(m, "self_attn", None)
                if sa is not None and id(sa) in attn:
                    layers[int(sa.layer_idx)] = m
            self._layers = [layers[i] for i in sorted(layers)]
        return self._layers

    @property
    def num_layers(self) -> int:
        return len(self.text_attention_modules())

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    def vision_attention_modules(self) -> list[nn.Module]:
        """Self-attention modules of the vision tower, in forward order."""
        vcfg = getattr(self.config, self.vision_config_key, None)
        out = []
        for m in self.model.modules():
            if m is not self and getattr(m, "config", None) is vcfg and hasattr(m, "is_causal") and getattr(m, "layer_idx", None) is None:
                if any(hasattr(m, a) for a in ("q_proj", "qkv", "k_proj")):
                    out.append(m)
        return out

    def vision_grid(self) -> "VisionGrid | None":
        """How vision-tower patches become LLM image tokens, for methods that score patches in the
        vision tower; None where that mapping is not implemented for the family."""
        return None

    def crop_token_map(self, image) -> "tuple[int, torch.Tensor, torch.Tensor]":
        """For a `packed` grid: (number of crops of the image, crop index [n], patch index [n]) for the image's n
        tokens in order; -1 for tokens that show no patch (newline tokens)."""
        raise NotImplementedError(f"{type(self).__name__} has no packed vision grid")

    def window_order(self, meta) -> "torch.Tensor":
        """For a `windowed` grid: long [groups] of an image-feature call, the token-order group held at each
        window-order position (the tower's own permutation)."""
        raise NotImplementedError(f"{type(self).__name__} has no windowed vision grid")

    def crop_maps(self, meta) -> "list[tuple[int, torch.Tensor, torch.Tensor]]":
        """`crop_token_map` of every image of an image-feature call, from its captured arguments (`ImageMeta`)."""
        raise NotImplementedError(f"{type(self).__name__} has no packed vision grid")

    # ------------------------------------------------------------------ images
    def capture_meta(self, bound: dict[str, Any]) -> ImageMeta:
        """Copy what the layout needs from the image-feature call's arguments."""
        vals = {}
        for k in self.meta_keys:
            v = bound.get(k)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu()
            vals[k] = v
        pv = bound.get("pixel_values")
        if isinstance(pv, torch.Tensor):
            vals["pixel_shape"] = tuple(pv.shape)
        return ImageMeta(vals)

    def locate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        meta: ImageMeta | None,
        sizes: list[list[tuple[int, int]]] | None = None,
    ) -> Layout:
        """Layout of a batch. `sizes` gives the original (width, height) per sample per image if known."""
        ids = input_ids.detach().cpu()
        am = attention_mask.detach().cpu() if attention_mask is not None and attention_mask.dim() == 2 else None
        B = ids.shape[0]
        # generate() repeats each row k times for beams / num_return_sequences, either after encoding the images
        # once, before the first forward (recent transformers: the k copies share the row's images), or together
        # with them, encoded inside the forward (5.17: every row has its own). Where the call ran tells them
        # apart; for the first case, the factor k is the one whose layout matches what the call encoded.
        same = [b > 0 and torch.equal(ids[b], ids[b - 1]) and (am is None or torch.equal(am[b], am[b - 1]))
                for b in range(B)]
        if not any(same) or (meta is not None and meta.get("encoded_in_forward")):
            return self._locate(ids, am, meta, sizes, [False] * B)[0]
        factors = [k for k in range(B, 0, -1)
                   if B % k == 0 and all(same[b] for b in range(B) if b % k)]  # largest first; 1 always fits
        error = None
        for k in factors:
            try:
                layout, n = self._locate(ids, am, meta, sizes, [b % k != 0 for b in range(B)])
            except LayoutError as e:
                error = error or e
                continue
            ok = self.matches_encoded(meta, layout, n, B // k)
            if ok is None or ok:
                return layout
            error = error or LayoutError("no repeat of the batch's rows matches the images the image-feature call encoded")
        raise error

    def _locate(self, ids, am, meta, sizes, reuse: list[bool]) -> tuple[Layout, int]:
        """Layout and the number of distinct images; rows flagged in `reuse` take the previous row's images."""
        B, L = ids.shape
        counter = _ImageCounter()
        samples = []
        row_start = 0
        for b in range(B):
            if reuse[b]:
                counter.i = row_start
            row_start = counter.i
            real = torch.nonzero(am[b]).flatten() if am is not None else torch.arange(L)
            first, last = (int(real[0]), int(real[-1])) if real.numel() else (0, L - 1)
            pos = torch.nonzero(ids[b] == self.image_token_id).flatten()
            images = self.locate_sample(ids[b], pos, meta, counter) if pos.numel() else []
            if counter.i - row_start == len(images):  # one counter step per image (every adapter here)
                for j, im in enumerate(images):
                    im.index = row_start + j
            if sizes is not None and b < len(sizes):
                for im, sz in zip(images, sizes[b]):
                    self.to_original(im, tuple(int(x) for x in sz))
            samples.append(SampleLayout(images=images, seq_len=L, first_real=first, last_real=last))
        return Layout(samples), counter.i

    def matches_encoded(self, meta: ImageMeta | None, layout: Layout, n_images: int, rows: int) -> bool | None:
        """Whether a layout of `n_images` distinct images over `rows` distinct rows is what the image-feature call
        encoded (None: its arguments do not tell)."""
        encoded = self.encoded_images(meta)
        return None if encoded is None else n_images == encoded

    def encoded_images(self, meta: ImageMeta | None) -> int | None:
        """How many images the image-feature call encoded, where its arguments tell (None: unknown)."""
        shape = meta.get("pixel_shape") if meta is not None else None
        return int(shape[0]) if self.pixel_values_per_image and shape else None

    @abstractmethod
    def locate_sample(self, ids: torch.Tensor, pos: torch.Tensor, meta: ImageMeta | None, counter: "_ImageCounter") -> list[ImageLayout]:
        """The images of one sample: `pos` are its image-token positions (sorted)."""

    def to_original(self, image: ImageLayout, size: tuple[int, int]) -> None:
        """Rescale boxes from the processed frame to the original (width, height). Default: the model
        input is the whole image resized (no crop, no pad); families with crops or pads override."""
        W, H = size
        image.size = (W, H)
        for v in image.views:
            if v.boxes is None or v.frame == "original":
                continue
            pw, ph = self.processed_size(image, v)
            scale = torch.tensor([W / pw, H / ph, W / pw, H / ph])
            v.boxes = v.boxes * scale
            v.frame = "original"

    def processed_size(self, image: ImageLayout, view: View) -> tuple[float, float]:
        """(width, height) of the processed frame the view's boxes are in."""
        return image.processed_size

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def square_view(name: str, positions: torch.Tensor, side_px: float, frame_w: float | None = None, frame_h: float | None = None) -> View:
        n = positions.numel()
        side = int(round(n**0.5))
        if side * side != n:
            raise LayoutError(f"{n} image tokens do not form a square grid")
        fw = side_px if frame_w is None else frame_w
        fh = side_px if frame_h is None else frame_h
        return View(name, side, side, positions, grid_boxes(side, side, 0, 0, fw, fh))


class _ImageCounter:
    """Running index of images across a batch (image-feature args are flat over the batch)."""

    def __init__(self) -> None:
        self.i = 0

    def next(self) -> int:
        i = self.i
        self.i += 1
        return i


def get_adapter(model: nn.Module, processor: Any = None) -> Adapter:
    """The adapter for `model`, or UnsupportedModelError naming the supported model types."""
    reg = adapter_registry()
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in reg:
        raise UnsupportedModelError(
            f"vlmplug has no adapter for model_type {mt!r} ({type(model).__name__}). "
            f"Supported: {sorted(reg)}. Nothing was patched."
        )
    return reg[mt](model, processor)

"""Tiny random-weight models of real Hugging Face VLM architectures, for tests.

Everything here runs offline on CPU in well under a second per family:

* :func:`tiny_config` / :func:`build_tiny_model` build a ~40-130k parameter model of a real
  transformers architecture (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
  Idefics3, SmolVLM, Gemma 3, InternVL) with a GQA text decoder (4 query heads, 2 KV heads,
  head_dim 8) whose attention is sharpened so that it is clearly non-uniform.
* :func:`make_batch` builds a left-padded batch the way each family's processor would lay it out
  (image placeholders expanded, wrapper tokens, per-family pixel tensors and extra inputs), plus a
  ground truth of where each image's tokens sit and how they map to 2-D grids ("views").
* :func:`split_batch` extracts one sample of such a batch, unpadded, with only its own pixel tensors.

The ground truth is derived independently of any image-token-locating library: for most families the
layout is constructed here token by token; for LLaVA-NeXT / LLaVA-OneVision (whose token count depends
on anyres packing) it is read off the model itself by running ``get_image_features`` with the
projector output replaced by a coordinate encoding and ``image_newline`` replaced by a sentinel.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = [
    "FAMILIES",
    "ImageTruth",
    "TinyBatch",
    "ViewTruth",
    "build_tiny_model",
    "make_batch",
    "split_batch",
    "tiny_config",
    "IDS",
    "SPECIAL_IDS",
    "text_decoder_layers",
]

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "internvl",
)

# --------------------------------------------------------------------------------------------------
# Token ids (vocab of 128). Random text is drawn from [TEXT_LOW, TEXT_HIGH), which contains none of
# the special ids below.
# --------------------------------------------------------------------------------------------------
VOCAB = 128
PAD, BOS, EOS = 1, 2, 3
TEXT_LOW, TEXT_HIGH = 4, 90
IDS: dict[str, int] = {
    "pad": PAD,
    "bos": BOS,
    "eos": EOS,
    "vision_start": 90,  # qwen <|vision_start|>
    "vision_end": 91,  # qwen <|vision_end|>
    "boi": 98,  # gemma3 <start_of_image>
    "eoi": 99,  # gemma3 <end_of_image>
    "image": 100,  # the image (placeholder / soft) token of every family
    "video": 101,  # qwen / onevision video token
    "img_start": 102,  # internvl <img>
    "img_end": 103,  # internvl </img>
    "double_newline": 108,  # gemma3 "\n\n"
    "newline": 109,  # idefics3 / smolvlm "\n"
    "fake_image": 110,  # idefics3 / smolvlm <fake_token_around_image>
    "global_image": 111,  # idefics3 / smolvlm <global-img>
    "row_col_base": 112,  # idefics3 / smolvlm <row_{r+1}_col_{c+1}> = 112 + 4*r + c  (r, c < 4)
}
MAX_TILE_SIDE = 4  # idefics3 / smolvlm row/col tokens exist for up to 4x4 tiles
SPECIAL_IDS: tuple[int, ...] = tuple(
    sorted({v for k, v in IDS.items() if k not in ("pad", "bos", "eos", "row_col_base")}
           | set(range(IDS["row_col_base"], IDS["row_col_base"] + MAX_TILE_SIDE**2)))
)
assert all(not (TEXT_LOW <= s < TEXT_HIGH) for s in SPECIAL_IDS)

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)

# LLaVA-NeXT / OneVision crop geometry: each crop is _ANY_IMG x _ANY_IMG pixels, _ANY_PATCH patches.
_ANY_IMG, _ANY_PATCH = 8, 2
_PINPOINTS = [[8, 16], [16, 8], [16, 16]]  # (height, width), multiples of the crop size


# ==================================================================================================
# Configs and models
# ==================================================================================================
def _text(model_type: str, **extra) -> dict:
    d = dict(_TEXT, model_type=model_type)
    d.update(extra)
    return d


def tiny_config(family: str):
    """The ``PreTrainedConfig`` of the tiny model of ``family`` (one of :data:`FAMILIES`)."""
    import transformers as tf

    img = IDS["image"]
    if family == "llava":
        return tf.LlavaConfig(
            text_config=_text("llama"),
            vision_config=dict(model_type="clip_vision_model", image_size=8, patch_size=2, hidden_size=32,
                               projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
            image_token_index=img,
            image_seq_length=16,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
    if family == "llava_next":
        return tf.LlavaNextConfig(
            text_config=_text("llama"),
            vision_config=dict(model_type="clip_vision_model", image_size=_ANY_IMG, patch_size=_ANY_PATCH,
                               hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37),
            image_token_index=img,
            image_grid_pinpoints=[list(p) for p in _PINPOINTS],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            text_config=_text("qwen2"),
            vision_config=dict(model_type="siglip_vision_model", image_size=_ANY_IMG, patch_size=_ANY_PATCH,
                               hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
            image_token_index=img,
            video_token_index=IDS["video"],
            image_grid_pinpoints=[list(p) for p in _PINPOINTS],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        ids = dict(image_token_id=img, video_token_id=IDS["video"], vision_start_token_id=IDS["vision_start"],
                   vision_end_token_id=IDS["vision_end"])
        if family == "qwen2_vl":
            return tf.Qwen2VLConfig(
                text_config=_text("qwen2_vl_text", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                        mrope_section=[2, 1, 1])),
                vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                                   spatial_merge_size=2, temporal_patch_size=2),
                **ids,
            )
        if family == "qwen2_5_vl":
            return tf.Qwen2_5_VLConfig(
                text_config=_text("qwen2_5_vl_text", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                          mrope_section=[2, 1, 1])),
                vision_config=dict(depth=2, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
                                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                   fullatt_block_indexes=[1]),
                **ids,
            )
        return tf.Qwen3VLConfig(
            text_config=_text("qwen3_vl_text", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                    mrope_section=[2, 1, 1], mrope_interleaved=True)),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=37, num_heads=4, out_hidden_size=32,
                               patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                               deepstack_visual_indexes=[0]),
            **ids,
        )
    if family in ("idefics3", "smolvlm"):
        vis = dict(image_size=16, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=32)
        cls = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
        return cls(text_config=_text("llama"), vision_config=vis, scale_factor=2, image_token_id=img,
                   pad_token_id=PAD)
    if family == "gemma3":
        return tf.Gemma3Config(
            text_config=_text("gemma3_text", sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                              query_pre_attn_scalar=8),
            vision_config=dict(model_type="siglip_vision_model", image_size=20, patch_size=5, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
            mm_tokens_per_image=4,
            image_token_index=img,
            boi_token_index=IDS["boi"],
            eoi_token_index=IDS["eoi"],
        )
    if family == "internvl":
        return tf.InternVLConfig(
            text_config=_text("qwen2"),
            vision_config=dict(image_size=[16, 16], patch_size=[4, 4], hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=37),
            image_token_id=img,
            image_seq_length=4,
            downsample_ratio=0.5,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _model_class(family: str):
    import transformers as tf

    return {
        "llava": tf.LlavaForConditionalGeneration,
        "llava_next": tf.LlavaNextForConditionalGeneration,
        "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "idefics3": tf.Idefics3ForConditionalGeneration,
        "smolvlm": tf.SmolVLMForConditionalGeneration,
        "gemma3": tf.Gemma3ForConditionalGeneration,
        "internvl": tf.InternVLForConditionalGeneration,
    }[family]


def text_decoder_layers(model) -> list:
    """The decoder layers of the text model (all families here)."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model.text_model
    return list(lm.layers)


def build_tiny_model(family: str, *, dtype=torch.float32, seed: int = 0, sharpen: float = 8.0,
                     vision_layers: int | None = None):
    """Build the tiny random-weight model of ``family`` in eval mode with SDPA attention everywhere.

    The text decoder's ``q_proj``/``k_proj`` weights are multiplied by ``sharpen`` (random init gives
    near-uniform attention otherwise). Gemma 3's zero-initialised multimodal projection is randomised.
    ``vision_layers`` deepens the vision tower (default 2 layers), for methods with per-layer schedules.
    Weights depend only on ``(family, seed, vision_layers)``; the global torch RNG state is left untouched.
    """
    config = tiny_config(family)
    if vision_layers is not None:
        vc = config.vision_config
        setattr(vc, "depth" if hasattr(vc, "depth") else "num_hidden_layers", int(vision_layers))
    cls = _model_class(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        with torch.no_grad():
            for layer in text_decoder_layers(model):
                attn = layer.self_attn
                attn.q_proj.weight.mul_(sharpen)
                attn.k_proj.weight.mul_(sharpen)
            if family == "gemma3":
                model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    model.to(dtype)
    model.eval()
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = PAD, BOS, EOS
    # Never generate multimodal special tokens: a generated image token would look like an image.
    gc.suppress_tokens = list(SPECIAL_IDS)
    return model


# ==================================================================================================
# Ground truth data structures
# ==================================================================================================
@dataclass
class ViewTruth:
    """One 2-D grid of an image: ``positions[r * cols + c]`` is the sequence position of cell (r, c)."""

    name: str  # "image", "base", "highres", "tile_<r>_<c>", "global", "thumbnail"
    rows: int
    cols: int
    positions: list[int]


@dataclass
class ImageTruth:
    positions: list[int]  # all positions holding this image's tokens (image-token id, incl. newline slots)
    views: list[ViewTruth]


@dataclass
class TinyBatch:
    inputs: dict
    truth: list[list[ImageTruth]]
    image_sizes: list[list[tuple[int, int]]]  # (width, height) per sample, per image
    family: str
    # Extra field (not part of the fixed API): per-sample (dtype, unpadded recipe), used by split_batch.
    samples: list = field(default_factory=list, repr=False)


@dataclass
class _Image:
    size: tuple[int, int]  # (width, height)
    pixels: torch.Tensor  # family-specific per-image pixel tensor (crops / patches / tiles)
    extra: dict = field(default_factory=dict)  # grid_thw, hf (h, w) size, tile layout...


@dataclass
class _Sample:
    ids: list[int]
    mm: list[int]  # 1 on image-token positions
    images: list[_Image]
    truth: list[ImageTruth]  # positions relative to the unpadded sample


# ==================================================================================================
# Default image sizes (width, height) per family; cycled over the images of a batch.
# ==================================================================================================
def _default_sizes(family: str) -> list[tuple[int, int]]:
    if family in ("llava_next", "llava_onevision"):
        # -> pinpoints (8,16) / (16,16) / (16,8): hi-res grids 4x8, 8x6 (unpadded), 8x4
        return [(20, 10), (12, 16), (10, 20)]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return [(84, 56), (56, 84), (112, 56)]  # grids (h, w) = (4,6), (6,4), (4,8)
    if family == "qwen3_vl":
        return [(96, 64), (64, 96), (128, 64)]
    if family in ("idefics3", "smolvlm"):
        return [(32, 32), (16, 16), (48, 16)]  # 2x2 tiles, untiled, 1x3 tiles
    if family == "internvl":
        return [(16, 16), (32, 16), (32, 32)]  # 1 tile, 2 tiles + thumbnail, 4 tiles + thumbnail
    return [(40, 30), (30, 40), (32, 32)]


# ==================================================================================================
# Per-family image blocks
# ==================================================================================================
def _rand(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _grid_view(name: str, rows: int, cols: int, start: int) -> ViewTruth:
    return ViewTruth(name, rows, cols, list(range(start, start + rows * cols)))


def _image_block(family: str, model, sizes: list[tuple[int, int]], gen: torch.Generator):
    """For the images of ONE sample: list of (_Image, token block ids, mm flags, views relative to block start)."""
    cfg = model.config
    img = IDS["image"]
    out = []
    if family == "llava":
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        n = cfg.image_seq_length
        assert n == side * side
        for s in sizes:
            im = _Image(s, _rand(gen, 3, cfg.vision_config.image_size, cfg.vision_config.image_size))
            out.append((im, [img] * n, [1] * n, [_grid_view("image", side, side, 0)]))
        return out
    if family in ("llava_next", "llava_onevision"):
        return _anyres_blocks(family, model, sizes, gen)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        vc = cfg.vision_config
        p, m, t = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        for w, h in sizes:
            gh = m * max(1, round(h / (p * m)))
            gw = m * max(1, round(w / (p * m)))
            im = _Image((w, h), _rand(gen, gh * gw, vc.in_channels * t * p * p), {"grid_thw": [1, gh, gw]})
            rows, cols = gh // m, gw // m
            n = rows * cols
            ids = [IDS["vision_start"]] + [img] * n + [IDS["vision_end"]]
            mm = [0] + [1] * n + [0]
            out.append((im, ids, mm, [_grid_view("image", rows, cols, 1)]))
        return out
    if family in ("idefics3", "smolvlm"):
        vc = cfg.vision_config
        tile = vc.image_size
        seq = int((vc.image_size // vc.patch_size) ** 2 / cfg.scale_factor**2)
        side = math.isqrt(seq)
        assert side * side == seq
        for w, h in sizes:
            tr, tc = max(1, math.ceil(h / tile)), max(1, math.ceil(w / tile))
            if tr > MAX_TILE_SIDE or tc > MAX_TILE_SIDE:
                raise ValueError(f"image {w}x{h} needs {tr}x{tc} tiles; at most {MAX_TILE_SIDE} per side")
            tiled = tr * tc > 1
            n_tiles = tr * tc + 1 if tiled else 1
            im = _Image((w, h), _rand(gen, n_tiles, 3, tile, tile), {"tiles": (tr, tc) if tiled else (0, 0)})
            ids, views = [], []
            if tiled:  # Idefics3Processor/_prompt_split_image: <fake><row_r_col_c><image>*seq ... "\n" per row
                for r in range(tr):
                    for c in range(tc):
                        ids += [IDS["fake_image"], IDS["row_col_base"] + MAX_TILE_SIDE * r + c]
                        views.append(_grid_view(f"tile_{r}_{c}", side, side, len(ids)))
                        ids += [img] * seq
                    ids.append(IDS["newline"])
                ids.append(IDS["newline"])
            ids += [IDS["fake_image"], IDS["global_image"]]
            views.append(_grid_view("global", side, side, len(ids)))
            ids += [img] * seq + [IDS["fake_image"]]
            out.append((im, ids, [int(i == img) for i in ids], views))
        return out
    if family == "gemma3":
        n = cfg.mm_tokens_per_image
        side = math.isqrt(n)
        vs = cfg.vision_config.image_size
        for s in sizes:
            im = _Image(s, _rand(gen, 3, vs, vs))
            ids = [IDS["double_newline"], cfg.boi_token_id] + [img] * n + [cfg.eoi_token_id, IDS["double_newline"]]
            out.append((im, ids, [int(i == img) for i in ids], [_grid_view("image", side, side, 2)]))
        return out
    if family == "internvl":
        vs = cfg.vision_config.image_size
        tile = vs[0] if isinstance(vs, (list, tuple)) else vs
        n = cfg.image_seq_length
        side = math.isqrt(n)
        for w, h in sizes:
            tr, tc = max(1, math.ceil(h / tile)), max(1, math.ceil(w / tile))
            n_tiles = tr * tc + 1 if tr * tc > 1 else 1
            im = _Image((w, h), _rand(gen, n_tiles, 3, tile, tile), {"tiles": (tr, tc)})
            ids = [IDS["img_start"]]
            views = []
            if n_tiles == 1:
                views.append(_grid_view("image", side, side, 1))
            else:
                for r in range(tr):
                    for c in range(tc):
                        views.append(_grid_view(f"tile_{r}_{c}", side, side, 1 + n * (r * tc + c)))
                views.append(_grid_view("thumbnail", side, side, 1 + n * tr * tc))
            ids += [img] * (n * n_tiles) + [IDS["img_end"]]
            out.append((im, ids, [int(i == img) for i in ids], views))
        return out
    raise ValueError(f"unknown family {family!r}")


def _select_best(size_hw: tuple[int, int]) -> tuple[int, int]:
    """Pixel size (h, w) of the resized image a processor would produce; only used to make crops."""
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution(list(size_hw), [list(p) for p in _PINPOINTS]))


def _anyres_blocks(family: str, model, sizes, gen):
    """LLaVA-NeXT / OneVision: make crops, then read the packed layout off the model itself."""
    cfg = model.config
    crop = cfg.vision_config.image_size
    multi = family == "llava_onevision" and len(sizes) > 1  # OV: multi-image samples are not patched
    images = []
    for w, h in sizes:
        if multi:
            n_crops = 1
        else:
            bh, bw = _select_best((h, w))
            n_crops = 1 + (bh // crop) * (bw // crop)
        images.append(_Image((w, h), _rand(gen, n_crops, 3, crop, crop), {"hf_size": (h, w)}))
    layouts = _probe_anyres_layout(family, model, images)
    out = []
    img = IDS["image"]
    for im, lay in zip(images, layouts):
        n = len(lay["kinds"])
        out.append((im, [img] * n, [1] * n, lay["views"]))
    return out


@contextlib.contextmanager
def _projector_encoding(model, sentinel: float):
    """Replace projector outputs by (crop+1, patch row, patch col) in channels 0..2, image_newline by ``sentinel``."""
    proj = model.model.multi_modal_projector
    newline = model.model.image_newline

    def hook(module, args, output):
        n_crops, n_patch, hid = output.shape
        side = math.isqrt(n_patch)
        assert side * side == n_patch, "expected a square patch grid per crop"
        enc = torch.zeros_like(output)
        k = torch.arange(n_patch, device=output.device)
        enc[:, :, 0] = (torch.arange(n_crops, device=output.device) + 1).to(enc.dtype)[:, None]
        enc[:, :, 1] = (k // side).to(enc.dtype)[None]
        enc[:, :, 2] = (k % side).to(enc.dtype)[None]
        return enc

    handle = proj.register_forward_hook(hook)
    saved = newline.detach().clone()
    try:
        with torch.no_grad():
            newline.fill_(sentinel)
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            newline.copy_(saved)


def _probe_anyres_layout(family: str, model, images: list[_Image]) -> list[dict]:
    """Run ``get_image_features`` with encoded projector outputs; return per image the packed layout.

    Each packed row is classified as ("base", r, c), ("hi", crop, r, c) or ("newline",).
    The base view is the first crop's grid; the high-res view is the unpadded grid with one newline
    slot after each row (slots excluded from the view, included in the image's positions).
    """
    sentinel = -7.0
    dtype = model.dtype
    maxc = max(im.pixels.shape[0] for im in images)
    pv = torch.zeros(len(images), maxc, *images[0].pixels.shape[1:])
    for i, im in enumerate(images):
        pv[i, : im.pixels.shape[0]] = im.pixels
    dev = model.device
    sizes = torch.tensor([im.extra["hf_size"] for im in images], dtype=torch.long, device=dev)
    kw = dict(pixel_values=pv.to(device=dev, dtype=dtype), image_sizes=sizes)
    if family == "llava_onevision":
        kw["batch_num_images"] = torch.tensor([len(images)], device=dev)
    with _projector_encoding(model, sentinel), torch.no_grad():
        res = model.model.get_image_features(**kw, return_dict=True)
    feats = res.pooler_output if hasattr(res, "pooler_output") else res[0]
    layouts = []
    for im, f in zip(images, feats):
        f = f.float().cpu()
        is_nl = (f == sentinel).all(-1)
        first_crop = int(f[~is_nl][0, 0].item())
        kinds = []
        for row, nl in zip(f, is_nl):
            if nl:
                kinds.append(("newline",))
                continue
            crop, r, c = (int(round(x)) for x in row[:3].tolist())
            kinds.append(("base", r, c) if crop == first_crop else ("hi", crop - first_crop, r, c))
        layouts.append(_layout_views(kinds, im.pixels.shape[0]))
    return layouts


def _layout_views(kinds: list[tuple], n_crops: int) -> dict:
    base = [(i, k) for i, k in enumerate(kinds) if k[0] == "base"]
    side = math.isqrt(len(base))
    if side * side != len(base) or [k[1:] for _, k in base] != [(r, c) for r in range(side) for c in range(side)]:
        raise AssertionError("base crop is not a row-major square grid")
    if [i for i, _ in base] != list(range(len(base))):
        raise AssertionError("base grid is not first / contiguous")
    views = [ViewTruth("base", side, side, [i for i, _ in base])]
    rest = kinds[len(base):]
    hi_rows: list[list[int]] = []
    cur: list[int] = []
    for j, k in enumerate(rest):
        pos = len(base) + j
        if k[0] == "newline":
            hi_rows.append(cur)
            cur = []
        elif k[0] == "hi":
            cur.append(pos)
        else:
            raise AssertionError("base cell after the base grid")
    if cur:
        raise AssertionError("high-res cells after the last newline")
    hi_rows = [r for r in hi_rows if r]  # the multi-image OV case: base grid + one newline, no high-res grid
    if hi_rows:
        cols = len(hi_rows[0])
        if any(len(r) != cols for r in hi_rows):
            raise AssertionError("ragged high-res grid")
        # Check the cells form a spatially consistent row-major grid: crops tile the hi-res image with
        # crops_w crops per row; global (row, col) must be constant / +1 along packed rows and columns.
        n_hi_crops = n_crops - 1
        crops_w = None
        for cw in range(1, n_hi_crops + 1):
            if n_hi_crops % cw == 0:
                ok = True
                coords = []
                for rr in hi_rows:
                    rc = []
                    for pos in rr:
                        _, crop, r, c = kinds[pos]
                        rc.append(((crop - 1) // cw * side + r, (crop - 1) % cw * side + c))
                    coords.append(rc)
                for a, rc in enumerate(coords):
                    if len({g for g, _ in rc}) != 1 or [c for _, c in rc] != list(range(rc[0][1], rc[0][1] + cols)):
                        ok = False
                    if a and (rc[0][0] != coords[a - 1][0][0] + 1 or rc[0][1] != coords[0][0][1]):
                        ok = False
                if ok:
                    crops_w = cw
                    break
        if crops_w is None:
            raise AssertionError("high-res cells do not form a consistent grid")
        views.append(ViewTruth("highres", len(hi_rows), cols, [p for r in hi_rows for p in r]))
    return {"kinds": kinds, "views": views}


# ==================================================================================================
# Batches
# ==================================================================================================
def _split_text(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def make_batch(
    family: str,
    model,
    images_per_sample: Sequence[int] = (1,),
    *,
    seed: int = 0,
    image_sizes: Sequence[Sequence[tuple[int, int]]] | None = None,
    text_lens: Sequence[int] | None = None,
) -> TinyBatch:
    """A left-padded batch for ``model`` (built by :func:`build_tiny_model` for ``family``) + ground truth.

    ``images_per_sample[i]`` images go into sample i. ``image_sizes[i][j]`` is the (width, height) of
    image j of sample i (defaults cycle through family-specific sizes giving different grids);
    ``text_lens[i]`` the number of random text tokens of sample i (default ``6 + 4 * i``), split
    before / between / after the images. Each sample starts with BOS.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    n_samples = len(images_per_sample)
    if text_lens is None:
        text_lens = [6 + 4 * i for i in range(n_samples)]
    if len(text_lens) != n_samples:
        raise ValueError("text_lens must have one entry per sample")
    defaults = _default_sizes(family)
    if image_sizes is None:
        k = 0
        image_sizes = []
        for n in images_per_sample:
            image_sizes.append([defaults[(k + j) % len(defaults)] for j in range(n)])
            k += n
    image_sizes = [[tuple(int(v) for v in s) for s in row] for row in image_sizes]
    if [len(r) for r in image_sizes] != list(images_per_sample):
        raise ValueError("image_sizes must match images_per_sample")

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i, n_img in enumerate(images_per_sample):
        blocks = _image_block(family, model, image_sizes[i], gen) if n_img else []
        chunks = _split_text(int(text_lens[i]), n_img + 1)
        ids, mm, images, truth = [BOS], [0], [], []
        for j in range(n_img + 1):
            t = torch.randint(TEXT_LOW, TEXT_HIGH, (chunks[j],), generator=gen).tolist()
            ids += t
            mm += [0] * len(t)
            if j < n_img:
                im, bids, bmm, views = blocks[j]
                start = len(ids)
                ids += bids
                mm += bmm
                images.append(im)
                pos = [start + k for k, v in enumerate(bmm) if v]
                truth.append(ImageTruth(pos, [ViewTruth(v.name, v.rows, v.cols, [start + p for p in v.positions])
                                              for v in views]))
        samples.append(_Sample(ids, mm, images, truth))
    return _collate(family, model.dtype, samples, image_sizes)


def _shift(t: ImageTruth, d: int) -> ImageTruth:
    return ImageTruth([p + d for p in t.positions],
                      [ViewTruth(v.name, v.rows, v.cols, [p + d for p in v.positions]) for v in t.views])


def _collate(family: str, dtype: torch.dtype, samples: list[_Sample], image_sizes) -> TinyBatch:
    L = max(len(s.ids) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, L), PAD, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mm = torch.zeros((B, L), dtype=torch.long)
    truth = []
    for b, s in enumerate(samples):
        d = L - len(s.ids)
        input_ids[b, d:] = torch.tensor(s.ids)
        attn[b, d:] = 1
        mm[b, d:] = torch.tensor(s.mm)
        truth.append([_shift(t, d) for t in s.truth])
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attn}
    images = [im for s in samples for im in s.images]
    if images:
        if family in ("llava", "gemma3"):
            inputs["pixel_values"] = torch.stack([im.pixels for im in images]).to(dtype)
        elif family in ("llava_next", "llava_onevision"):
            maxc = max(im.pixels.shape[0] for im in images)
            pv = torch.zeros(len(images), maxc, *images[0].pixels.shape[1:])
            for i, im in enumerate(images):
                pv[i, : im.pixels.shape[0]] = im.pixels
            inputs["pixel_values"] = pv.to(dtype)
            inputs["image_sizes"] = torch.tensor([im.extra["hf_size"] for im in images], dtype=torch.long)
            if family == "llava_onevision":
                inputs["batch_num_images"] = torch.tensor([len(s.images) for s in samples], dtype=torch.long)
        elif family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            inputs["pixel_values"] = torch.cat([im.pixels for im in images]).to(dtype)
            inputs["image_grid_thw"] = torch.tensor([im.extra["grid_thw"] for im in images], dtype=torch.long)
        elif family in ("idefics3", "smolvlm"):
            per = [torch.cat([im.pixels for im in s.images]) if s.images else None for s in samples]
            maxt = max(p.shape[0] for p in per if p is not None)
            shape = next(p for p in per if p is not None).shape[1:]
            pv = torch.zeros(B, maxt, *shape)
            pam = torch.zeros(B, maxt, *shape[1:], dtype=torch.long)
            for b, p in enumerate(per):
                if p is not None:
                    pv[b, : p.shape[0]] = p
                    pam[b, : p.shape[0]] = 1
            inputs["pixel_values"] = pv.to(dtype)
            inputs["pixel_attention_mask"] = pam
        elif family == "internvl":
            inputs["pixel_values"] = torch.cat([im.pixels for im in images]).to(dtype)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        inputs["mm_token_type_ids"] = mm
    if family == "gemma3":
        inputs["token_type_ids"] = mm
    return TinyBatch(inputs=inputs, truth=truth, image_sizes=[list(r) for r in image_sizes], family=family,
                     samples=[(dtype, s) for s in samples])


def split_batch(batch: TinyBatch, i: int) -> TinyBatch:
    """Sample ``i`` of ``batch`` alone: padding removed, truth shifted, only its own pixel tensors."""
    dtype, s = batch.samples[i]
    return _collate(batch.family, dtype, [s], [batch.image_sizes[i]])

"""The vision tower's geometry for the method references, independent of the code under test.

Nothing here reads vlmplug's `vision_grid()`, `vision_attention_modules()` or layouts: the geometry comes from each
family's config by the rules of its transformers modelling code (written out per family below), vision layers from
the attention modules' names, and the patch -> LLM token map from hand-built layouts. `test_geometry.py` checks
the result against the models themselves (perturbing a layer's output, counting tokens), so a wrong rule here
fails there rather than agreeing with a wrong adapter."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import torch

_VISION_ATTN = re.compile(r"(vision|visual).*\.(layers|layer|blocks)\.(\d+)\.(self_attn|attention|attn)$")
_VISION_LAYER = re.compile(r"(vision|visual).*\.(layers|layer|blocks)\.(\d+)$")


def tower(model) -> SimpleNamespace:
    """cls (a CLS token first in every crop's sequence), F (0-based index of the vision layer whose output the
    projector reads; alias feature_layer), L (layers; alias num_layers), pool (p x p patches per LLM token, row-major
    blocks), merge (runs of `merge` consecutive patches per LLM token, Qwen), packed (LLaVA-NeXT / OneVision: the
    image's tokens are not its crops one after another), windowed (Qwen2.5-VL's window-ordered tower)."""
    cfg = model.config
    vc = cfg.vision_config
    mt = cfg.model_type
    geo = None
    if mt in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):  # no CLS; the merger reads the last block; 2x2 runs
        L = int(vc.depth)
        geo = dict(cls=False, F=L - 1, L=L, pool=1, merge=int(vc.spatial_merge_size) ** 2, packed=False,
                   windowed=mt == "qwen2_5_vl")
    else:
        L = int(vc.num_hidden_layers)
        # LLaVA / InternVL: hidden_states[vision_feature_layer]; hidden_states[i] is the output of layer i - 1
        # (hidden_states[0]: the embeddings), so a negative index -j is layer L - j
        def hs():
            vfl = cfg.vision_feature_layer
            if not isinstance(vfl, int):
                raise AssertionError(f"reference geometry: one feature layer only, not {vfl!r}")
            return vfl % (L + 1) - 1

        # CLS: CLIP and InternViT put one first; the "default" strategy drops it from the features, "full" keeps it
        # as an LLM token (not covered here), and SigLIP has none, so its checkpoints use "full"
        has_cls = vc.model_type in ("clip_vision_model", "internvl_vision")
        if mt in ("llava", "llava_next", "llava_onevision", "internvl"):
            strategy = getattr(cfg, "vision_feature_select_strategy", "default")
            if strategy != ("default" if has_cls else "full"):
                raise AssertionError(f"reference geometry: {vc.model_type} with strategy {strategy!r} not covered")
        if mt in ("llava", "llava_next", "llava_onevision"):  # CLIP or SigLIP crops; NeXT / OneVision pack them
            geo = dict(cls=has_cls, F=hs(), L=L, pool=1, merge=0, packed=mt != "llava")
        elif mt in ("idefics3", "smolvlm"):  # SigLIP, last layer, pixel shuffle by scale_factor
            geo = dict(cls=False, F=L - 1, L=L, pool=int(cfg.scale_factor), merge=0, packed=False)
        elif mt == "gemma3":  # SigLIP, last layer, average pooling to mm_tokens_per_image
            side = int(vc.image_size) // int(vc.patch_size)
            geo = dict(cls=False, F=L - 1, L=L, pool=side // math.isqrt(int(cfg.mm_tokens_per_image)), merge=0,
                       packed=False)
        elif mt == "internvl":  # InternViT: CLS first; pixel shuffle by 1 / downsample_ratio
            geo = dict(cls=has_cls, F=hs(), L=L, pool=int(round(1 / float(cfg.downsample_ratio))), merge=0,
                       packed=False)
    if geo is None:
        raise AssertionError(f"no reference geometry for {mt}")
    geo.setdefault("windowed", False)
    return SimpleNamespace(**geo, feature_layer=geo["F"], num_layers=geo["L"])


def vision_layers(model) -> dict[int, int]:
    """id(attention module of the vision tower) -> its layer index, from the module names."""
    out = {}
    for name, mod in model.named_modules():
        m = _VISION_ATTN.search(name)
        if m:
            out[id(mod)] = int(m.group(3))
    return out


def vision_attention(model) -> list:
    """The vision tower's attention modules in layer order, from the module names."""
    by_id = {id(m): m for m in model.modules()}
    layers = vision_layers(model)
    order = sorted(layers, key=layers.get)
    assert [layers[i] for i in order] == list(range(len(order))), "vision layer names are not 0..L-1"
    return [by_id[i] for i in order]


def vision_blocks(model) -> list:
    """The vision tower's layers (blocks) in order, from the module names."""
    found = {}
    for name, mod in model.named_modules():
        m = _VISION_LAYER.search(name)
        if m:
            found[int(m.group(3))] = mod
    assert sorted(found) == list(range(len(found)))
    return [found[i] for i in range(len(found))]


def groups(n: int, geo) -> tuple[list[int], int]:
    """Hand-built layout: the LLM token of each of a crop's n patches (row-major p x p blocks, or runs of `merge`),
    and the crop's number of LLM tokens."""
    if geo.merge:
        return [i // geo.merge for i in range(n)], n // geo.merge
    if geo.pool <= 1:
        return list(range(n)), n
    side = math.isqrt(n)
    p = max(1, geo.pool)
    per_row = side // p
    return [((i // side) // p) * per_row + (i % side) // p for i in range(n)], per_row * per_row


def qwen_widths(model, inputs) -> list[int]:
    """Qwen families: LLM tokens per row of each image (grid width / spatial merge size), from image_grid_thw."""
    ms = int(model.config.vision_config.spatial_merge_size)
    return [int(w) // ms for _, _, w in inputs["image_grid_thw"].tolist()]


def window_order(model, inputs):
    """Qwen2.5-VL: the tower's group permutation (window order -> token-order group), from transformers' own
    function, and the groups per image."""
    from transformers.vision_utils import get_vision_window_index

    v = model.config.vision_config
    thw = inputs["image_grid_thw"]
    order, _ = get_vision_window_index(thw, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                       patch_size=v.patch_size)
    m = v.spatial_merge_size**2
    return order.long(), [int(t * h * w) // m for t, h, w in thw.tolist()]


_DEEPER: dict = {}


def deeper(family: str, layers: int = 3, feature_layer: int | None = -2):
    """A cached tiny model whose vision tower has `layers` layers and (LLaVA-style families) reads the features from
    `vision_feature_layer` = `feature_layer`, so F is neither the first nor the last layer: a reference that reads
    the wrong layer disagrees. Like conftest's `tiny`, a patch a failed test left behind is removed."""
    from vlmplug.testing.tiny import build_tiny_model

    key = (family, layers, feature_layer)
    if key not in _DEEPER:
        m = build_tiny_model(family, vision_layers=layers, seed=5)
        if feature_layer is not None and hasattr(m.config, "vision_feature_layer"):
            m.config.vision_feature_layer = feature_layer
        _DEEPER[key] = m
    m = _DEEPER[key]
    h = m.__dict__.get("_vlmplug_handle")
    if h is not None:
        h.remove()
    return m


def perturb_output(module, scale: float, seed: int):
    """A forward hook adding one seeded random vector (times `scale`, as wide as the output) to every token of
    `module`'s output (tuple or tensor)."""

    def hook(mod, args, out):
        o = out[0] if isinstance(out, tuple) else out
        delta = scale * torch.randn(o.shape[-1], generator=torch.Generator().manual_seed(seed))
        o = o + delta.to(o.dtype)
        return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o

    return module.register_forward_hook(hook)


def feature_capture(orig, feats: list):
    """A stand-in for the model's `get_image_features` (`orig`) that appends its projected features, flattened to
    [rows, D] in token order (per-image lists concatenated), to `feats`."""

    def capture(*a, **k):
        out = orig(*a, **k)
        p = out.pooler_output
        feats.append(torch.cat([t.reshape(-1, t.shape[-1]) for t in p]) if isinstance(p, (list, tuple))
                     else p.reshape(-1, p.shape[-1]))
        return out

    return capture


def checked_samples(layout, batch):
    """`layout.samples` (vlmplug's layout of `batch`), after checking that every image's token positions equal the
    batch's ground truth (built with the batch, not located by vlmplug): a reference that then reads positions or
    crop maps from these images reads the true ones."""
    assert len(layout.samples) == len(batch.truth)
    for s, truth in zip(layout.samples, batch.truth):
        assert [im.positions.tolist() for im in s.images] == [list(t.positions) for t in truth]
    return layout.samples

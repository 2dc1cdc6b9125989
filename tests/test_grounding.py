"""Grounding maps on a tiny model of every family against an eager reference: the unpatched model's full
`output_attentions`, each method's aggregation written from its paper, and a pixel map built by hand from each
family's geometry (LLaVA's centre crop, anyres base + high-res, tiles + global image / thumbnail, Qwen's merged
grid), rasterised by explicit loops over pixels."""
import math

import numpy as np
import pytest
import torch

from conftest import tiny
from reference import eager_attentions
from vlmplug.grounding import ground_inputs
from vlmplug.testing.tiny import FAMILIES, IDS, TEXT_HIGH, TEXT_LOW, make_batch

# images per sample: several images in one sample, and samples of different lengths (left padding)
IPS = {f: (2, 1) for f in FAMILIES}
IPS["llava_onevision"] = (1, 1)  # OneVision packs a multi-image sample without high-res crops
IPS["internvl"] = (1, 1, 1)  # 1 tile, 2 tiles + thumbnail, 4 tiles + thumbnail


# ------------------------------------------------------------------------------------------ hand geometry
def _rect(family, view, W, H):
    """The part of the original image (x0, y0, x1, y1) a view's grid covers, from the family's preprocessing."""
    name = view.name
    if family == "llava":  # llava-hf: shortest edge resized, centre crop (a square of side min(W, H))
        m = min(W, H)
        return ((W - m) / 2, (H - m) / 2, (W + m) / 2, (H + m) / 2)
    if name.startswith("tile_"):  # tiles of the whole image, row-major; the grid shape is the processor's
        r, c = map(int, name.split("_")[1:])
        rows, cols = TILES[family](W, H)
        return (c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows)
    return (0.0, 0.0, float(W), float(H))  # base, high-res (unpadded), global, thumbnail, Qwen / Gemma grids


TILES = {
    "idefics3": lambda W, H: (math.ceil(H / 16), math.ceil(W / 16)),  # 16-px tiles (tiny config)
    "smolvlm": lambda W, H: (math.ceil(H / 16), math.ceil(W / 16)),
    "internvl": lambda W, H: {(32, 16): (1, 2), (32, 32): (2, 2)}[(W, H)],  # InternVL's aspect-ratio pick
}


def _raster(W, H, cells):
    """Pixel map by explicit loops: each cell's value spread over its box (clipped to the image), each pixel
    receiving value / area times the area it shares with the box."""
    out = np.zeros((H, W))
    for x0, y0, x1, y1, val in cells:
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(W), x1), min(float(H), y1)
        area = (x1 - x0) * (y1 - y0)
        if area <= 0:
            continue
        for y in range(int(math.floor(y0)), int(math.ceil(y1))):
            oy = min(y1, y + 1) - max(y0, y)
            for x in range(int(math.floor(x0)), int(math.ceil(x1))):
                ox = min(x1, x + 1) - max(x0, x)
                if ox > 0 and oy > 0:
                    out[y, x] += val / area * ox * oy
    return out


def _hand_map(family, truth_image, size, values):
    """values: float [L] per sequence position -> the hand-built pixel map of one image (all its views)."""
    W, H = size
    cells = []
    for v in truth_image.views:
        x0, y0, x1, y1 = _rect(family, v, W, H)
        cw, ch = (x1 - x0) / v.cols, (y1 - y0) / v.rows
        for k, p in enumerate(v.positions):
            r, c = divmod(k, v.cols)
            cells.append((x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch, float(values[p])))
    return _raster(W, H, cells)


# ------------------------------------------------------------------------------------------ eager methods
def _targets(batch):
    """Two text tokens per sample: the last one and the third from the end (after the images)."""
    am = batch.inputs["attention_mask"]
    return [[int(torch.nonzero(am[b]).max()) - 2, int(torch.nonzero(am[b]).max())] for b in range(am.shape[0])]


def _ref_tag(att, b, targets, positions, k):
    """TAG (HeimingX/TAG, core_utils/tag.py): per query token, rank every (layer, head) by its attention sum over
    the image tokens, keep the top k, average their rows; then average over the tokens."""
    per_token = []
    for t in targets:
        pairs = [(l, h) for l in range(len(att)) for h in range(att[0].shape[1])]
        mass = [float(att[l][b, h, t, positions].sum()) for l, h in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -mass[i])[:k]
        per_token.append(torch.stack([att[pairs[i][0]][b, pairs[i][1], t] for i in order]).mean(0))
    return torch.stack(per_token).mean(0)


def _ref_raw(att, b, targets):
    return torch.stack([a[b][:, targets] for a in att]).mean((0, 1, 2))


def _ref_rollout(att, b, targets):
    """Abnar & Zuidema: R = (0.5 A_L + 0.5 I) ... (0.5 A_1 + 0.5 I), A the head mean; the targets' mean row of R."""
    L = att[0].shape[-1]
    eye = torch.eye(L, dtype=torch.float64)
    R = eye.clone()
    for a in att:
        R = (0.5 * a[b].double().mean(0) + 0.5 * eye) @ R
    return R[targets].mean(0)


def _generic(batch):
    """The same images with other text after them (the generic prompt of rel-att)."""
    inputs = dict(batch.inputs)
    ids = inputs["input_ids"].clone()
    gen = torch.Generator().manual_seed(7)
    text = (ids >= TEXT_LOW) & (ids < TEXT_HIGH)
    ids[text] = torch.randint(TEXT_LOW, TEXT_HIGH, (int(text.sum()),), generator=gen)
    inputs["input_ids"] = ids
    return inputs


@pytest.mark.parametrize("method", ["tag", "raw", "rollout", "relative"])
def test_maps_equal_eager_reference_on_the_hand_built_pixel_map(family, method):
    model = tiny(family)
    batch = make_batch(family, model, IPS[family])
    targets = _targets(batch)
    generic = _generic(batch) if method == "relative" else None
    got = ground_inputs(model, batch.inputs, method=method, targets=targets, top_k=3, image_sizes=batch.image_sizes,
                        generic_inputs=generic)
    att = eager_attentions(model, batch.inputs)
    gatt = eager_attentions(model, generic) if generic is not None else None
    n = len(att)
    checked = 0
    for b, truth in enumerate(batch.truth):
        last = targets[b][-1]
        assert len(got[b]) == len(truth)
        for i, ti in enumerate(truth):
            size = batch.image_sizes[b][i]
            if method == "tag":
                # TAG ranks pairs by their attention to the image tokens placed on the picture (every view's cells;
                # not LLaVA-NeXT's newline slots)
                placed = sorted({p for v in ti.views for p in v.positions})
                want = _hand_map(family, ti, size, _ref_tag(att, b, targets[b], placed, 3))
            elif method == "raw":
                want = _hand_map(family, ti, size, _ref_raw(att, b, targets[b]))
            elif method == "rollout":
                want = _hand_map(family, ti, size, _ref_rollout(att, b, targets[b]))
            else:  # ViCrop's layer 14 of 32 -> round(14 / 32 * n); last position; head mean; question / generic
                li = round(14 / 32 * n)
                q = _hand_map(family, ti, size, att[li][b, :, last].mean(0))
                g = _hand_map(family, ti, size, gatt[li][b, :, last].mean(0))
                want = np.where(g > 0, q / np.where(g > 0, g, 1), 0)
            heat = got[b][i]["heat"].double().numpy()
            assert heat.shape == (size[1], size[0])
            assert np.allclose(heat, want, rtol=1e-4, atol=1e-7 * max(1.0, float(np.abs(want).max()))), (b, i)
            assert want.max() > 0
            checked += 1
    assert checked == sum(len(t) for t in batch.truth)


def test_tag_keeps_the_top_pairs_per_token():
    """The (layer, head) pairs TAG reports are, per token, the k with the most image attention (eager)."""
    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    targets = _targets(batch)
    got = ground_inputs(model, batch.inputs, method="tag", targets=targets, top_k=3, image_sizes=batch.image_sizes)
    att = eager_attentions(model, batch.inputs)
    pos = batch.truth[0][0].positions
    for t, pairs in zip(targets[0], got[0][0]["info"]["pairs"]):
        mass = {(l, h): float(att[l][0, h, t, pos].sum()) for l in range(len(att)) for h in range(att[0].shape[1])}
        assert set(pairs) == set(sorted(mass, key=lambda p: -mass[p])[:3])


def test_grounding_leaves_the_model_unpatched():
    model = tiny("gemma3")
    batch = make_batch("gemma3", model, (1,))
    with torch.no_grad():
        ref = model(**batch.inputs).logits
    ground_inputs(model, batch.inputs, method="rollout", targets=_targets(batch), image_sizes=batch.image_sizes)
    assert "_vlmplug_handle" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, ref)


def test_image_token_ids_are_not_text():
    assert not (TEXT_LOW <= IDS["image"] < TEXT_HIGH)


def test_relative_default_layer_is_vicrops_scaled_and_an_explicit_layer_is_used():
    from vlmplug.grounding.core import default_layers

    assert default_layers("relative", 32) == [14]  # mllms_know: ATT_LAYER = 14 for LLaVA-1.5-7B (32 layers)
    assert default_layers("relative", 28) == [12] and default_layers("tag", 3) == [0, 1, 2]
    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    generic = _generic(batch)
    got = ground_inputs(model, batch.inputs, method="relative", layers=[0], image_sizes=batch.image_sizes,
                        generic_inputs=generic)[0][0]
    last = _targets(batch)[0][-1]
    ti, size = batch.truth[0][0], batch.image_sizes[0][0]
    q = _hand_map("llava", ti, size, eager_attentions(model, batch.inputs)[0][0, :, last].mean(0))
    g = _hand_map("llava", ti, size, eager_attentions(model, generic)[0][0, :, last].mean(0))
    want = np.where(g > 0, q / np.where(g > 0, g, 1), 0)
    assert got["info"]["layers"] == [0]
    assert np.allclose(got["heat"].double().numpy(), want, rtol=1e-4)

"""ViCrop and CARVE: the box and the mask against references written from the papers' official code, the per-step
attention of CARVE's cached generation against an eager pass over the whole answer, and the pipelines through
`vlmplug.generate` (alone and with pruning)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

import vlmplug
from reference import eager_attentions
from vlmplug.errors import MethodConfigError
from vlmplug.grounding import carve, vicrop
from vlmplug.pipeline import generate_info, prepare_inputs
from vlmplug.world.scenes import draw_scene


@pytest.fixture(scope="module")
def world():
    from vlmplug.world import load_world

    return load_world()


# ------------------------------------------------------------------------------------------ ViCrop's box
def _ref_box(att_map, image_size, bbox_size, ratios=vicrop.RATIOS):
    """mllms_know bbox_from_att_image_adaptive, restated with its loops and integer arithmetic: windows of
    int(bbox * r / block) cells per axis, scanned x-major (the first maximum wins), sharpness against the existing
    4-neighbours, centre int(...), halves bbox * r // 2, clamped low then high."""
    R, C = att_map.shape
    W, H = image_size
    bw, bh = W / C, H / R
    diffs, poses, nums = [], [], []
    for r in ratios:
        nx, ny = min(int(bbox_size * r / bw), C), min(int(bbox_size * r / bh), R)
        if C - nx < 1 and R - ny < 1:
            if r == 1:
                return (0, 0, W, H)
            continue
        sl = np.zeros((R - ny + 1, C - nx + 1))
        best, pos = -np.inf, (0, 0)
        for x in range(C - nx + 1):
            for y in range(R - ny + 1):
                sl[y, x] = att_map[y:y + ny, x:x + nx].sum()
                if sl[y, x] > best:
                    best, pos = sl[y, x], (x, y)
        x, y = pos
        adj = [sl[y, x - 1]] if x > 0 else []
        adj += [sl[y, x + 1]] if x < sl.shape[1] - 1 else []
        adj += [sl[y - 1, x]] if y > 0 else []
        adj += [sl[y + 1, x]] if y < sl.shape[0] - 1 else []
        diffs.append((best - np.mean(adj)) / (nx * ny))
        poses.append(pos)
        nums.append((nx, ny))
    k = int(np.argmax(diffs))
    (x, y), (nx, ny), size = poses[k], nums[k], bbox_size * [r for r in ratios if
                                                              not (C - min(int(bbox_size * r / bw), C) < 1 and
                                                                   R - min(int(bbox_size * r / bh), R) < 1)][k]
    xc, yc = int(x * bw + bw * nx / 2), int(y * bh + bh * ny / 2)
    xc = size // 2 if xc < size // 2 else xc
    yc = size // 2 if yc < size // 2 else yc
    xc = W - size // 2 if xc > W - size // 2 else xc
    yc = H - size // 2 if yc > H - size // 2 else yc
    return (max(0, xc - size // 2), max(0, yc - size // 2), min(W, xc + size // 2), min(H, yc + size // 2))


@pytest.mark.parametrize("seed", range(6))
def test_vicrop_box_equals_the_official_rule(seed):
    rng = np.random.default_rng(seed)
    R, C = (6, 8) if seed % 2 else (8, 8)
    W, H = C * 40, R * 40  # cells of 40 px
    cells = rng.random((R, C)) ** 4
    heat = np.kron(cells, np.ones((40, 40))) / 1600.0  # the pixel density of those cells
    bbox = [60, 90, 120][seed % 3]
    assert vicrop.select_box(heat, (R, C), bbox) == tuple(int(v) for v in _ref_box(cells, (W, H), bbox))


def test_vicrop_box_on_an_image_smaller_than_the_token_grid():
    heat = np.zeros((10, 10))
    heat[8, 1] = 1.0
    assert vicrop.cell_map(heat, (24, 24)).sum() == 1.0
    x0, y0, x1, y1 = vicrop.select_box(heat, (24, 24), 2)
    assert 0 <= x0 < x1 <= 10 and 0 <= y0 < y1 <= 10
    assert x0 - 1 <= 1 <= x1 and y0 - 1 <= 8 <= y1  # around the hot pixel (the official centre truncates to ints)


def test_vicrop_box_is_the_whole_image_when_the_crop_would_cover_the_map():
    heat = np.random.default_rng(0).random((64, 64))
    assert vicrop.select_box(heat, (8, 8), 64) == (0, 0, 64, 64)
    x0, y0, x1, y1 = vicrop.select_box(np.kron(np.eye(8)[::-1], np.ones((8, 8))), (8, 8), 16)
    assert (x1 - x0, y1 - y0) in {(16, 16), (19, 19), (22, 22), (26, 26), (29, 29), (32, 32)}


# ------------------------------------------------------------------------------------------ CARVE's mask
def test_carve_mask_keeps_the_top_share_in_the_best_components():
    S = np.zeros((10, 10))
    S[0:2, 0:2] = 5.0  # component sums: 20
    S[5, 5] = 9.0  # 9
    S[8:10, 8:10] = 1.0  # 4
    S[0, 9] = 2.0  # 2
    # top 20% of 100 pixels: the 20 highest values; with ties at 0 the threshold is 0 -> everything: use p=0.1
    m = carve.carve_mask(S, top_p=0.1, k=2)
    # pixels >= the 90th percentile (1.0): four components; keep max(2, int(4 * 0.1)) = 2 of largest sum
    assert m[0:2, 0:2].all() and m[5, 5] and not m[8:10, 8:10].any() and not m[0, 9]
    assert m.sum() == 5


def test_carve_refine_blacks_out_and_enlarges():
    img = Image.new("RGB", (40, 20), (200, 100, 50))
    mask = np.zeros((20, 40), bool)
    mask[5:10, 10:20] = True
    mask[5, 10] = False
    out, box = carve.refine(img, mask)
    assert box == (10, 5, 20, 10)
    assert out.size == (40, 20)  # max(40 / 10, 20 / 5) = 4
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((30, 15)) == (200, 100, 50)


def test_carve_default_layers_scale_20_to_25_of_32():
    assert carve.default_layers(32) == [20, 21, 22, 23, 24, 25]
    assert carve.default_layers(4) == [2, 3]


def test_carve_contrast_weights_steps_and_sums_layers(world):
    """S = sum_t (t + 1) sum_l place(A_Q / (A_G + lam)), placed by the pixel rule (checked on a one-view layout)."""
    from vlmplug.layout import ImageLayout, Layout, SampleLayout, View, grid_boxes

    pos = torch.arange(1, 5)
    v = View("image", 2, 2, pos, grid_boxes(2, 2, 0, 0, 4, 4), "original")
    lay = Layout([SampleLayout([ImageLayout(positions=pos, views=[v], size=(4, 4))])])
    g = torch.rand(3, 2, 6)  # steps x layers x positions
    q = torch.rand(3, 2, 6)
    S = carve.contrast_map(list(q), list(g), lay, lam=0.5).numpy()
    cell = sum((t + 1) * (q[t, l] / (g[t, l] + 0.5)) for t in range(3) for l in range(2))[1:5].view(2, 2).numpy()
    assert np.allclose(S, np.kron(cell, np.ones((2, 2))) / 4, rtol=1e-5)


def test_carve_step_rows_equal_eager_attention_over_the_answer(world):
    """Each cached decode step's probe row is the eager attention of that step's query over the whole sequence."""
    model, proc = world
    sc = draw_scene([("circle", "red", 0.3), ("square", "blue", 0.3)], size=64, rng=random.Random(2))
    prompt = "Write a general description of the image."
    steps, layout = carve.step_maps(model, proc, sc.image, prompt, [1, 2], max_new_tokens=5)
    inputs = prepare_inputs(model, proc, [sc.image], prompt)
    with torch.no_grad():
        seq = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    P = inputs["input_ids"].shape[1]
    assert len(steps) == min(5, seq.shape[1] - P)
    full = dict(inputs, input_ids=seq[:, :-1], attention_mask=torch.ones_like(seq[:, :-1]))
    att = eager_attentions(model, full)
    for t, rows in enumerate(steps):
        for k, li in enumerate([1, 2]):
            want = att[li][0, :, P - 1 + t, : P + t].mean(0)
            assert torch.allclose(rows[k], want, atol=1e-5), (t, li)


# ------------------------------------------------------------------------------------------ pipelines
def test_vicrop_and_carve_through_generate_report_what_they_used(world):
    model, proc = world
    sc = draw_scene([("circle", "red", 0.12), ("square", "blue", 0.12), ("triangle", "green", 0.1)], size=256,
                    rng=random.Random(4))
    q = "What color is the circle?"
    r = generate_info(model, proc, sc.image, q, methods="vicrop")
    box = r["results"]["vicrop"]["box"]
    assert box[2] - box[0] == 64 * 1 or box[2] - box[0] in {77, 90, 102, 115, 128}
    assert r["results"]["vicrop"]["crop"].size == (box[2] - box[0], box[3] - box[1])
    assert r["prompt_tokens"] > 2 * 64  # two images went in
    r = generate_info(model, proc, sc.image, q, methods=vlmplug.CARVE(max_new_tokens=4))
    res = r["results"]["carve"]
    assert res["mask"].shape == (256, 256) and res["mask"].any() and res["refined"].size[0] >= 256 - 1
    assert 1 <= res["steps"] <= 4


def test_vicrop_composes_with_pruning(world):
    model, proc = world
    sc = draw_scene([("circle", "red", 0.12)], size=256, rng=random.Random(5))
    r = generate_info(model, proc, sc.image, "What color is the circle?", methods=["vicrop", vlmplug.FastV(keep_ratio=0.5)])
    assert "vicrop" in r["results"] and "fastv" in r["results"]
    assert r["stats"]["images_per_sample"] == [2]  # the answer pass saw [original, crop] ...
    kept = r["stats"]["fastv"]["tokens_kept_per_image"][0]
    assert len(kept) == 2 and sum(kept) == 64  # ... and FastV kept half of its 2 x 64 image tokens


def test_pipeline_methods_refuse_apply_and_bad_settings(world):
    model, proc = world
    with pytest.raises(MethodConfigError, match="vlmplug.generate"):
        vlmplug.apply(model, "vicrop")
    with pytest.raises(MethodConfigError, match="requery"):
        vlmplug.ViCrop(requery="zoom")
    with pytest.raises(MethodConfigError, match="top_p"):
        vlmplug.CARVE(top_p=0)
    with pytest.raises(MethodConfigError, match="one refinement"):
        generate_info(model, proc, Image.new("RGB", (64, 64)), "q", methods=["vicrop", "carve"])
    with pytest.raises(MethodConfigError, match="carve"):
        generate_info(model, proc, Image.new("RGB", (64, 64)), "q", methods="carve", method_params={"bogus": 1})
    assert "_vlmplug_handle" not in model.__dict__


def test_vicrop_ties_go_to_the_first_window_in_the_official_scan_order():
    cells = np.zeros((8, 8))
    cells[0, 6] = cells[6, 0] = 1.0  # two equal peaks: the official loops scan x (columns) first
    heat = np.kron(cells, np.ones((10, 10))) / 100.0
    got = vicrop.select_box(heat, (8, 8), 10, ratios=(1.0,))
    assert got == tuple(int(v) for v in _ref_box(cells, (80, 80), 10, ratios=(1.0,)))
    assert got[0] < 10 and got[1] >= 55  # the peak at column 0, row 6

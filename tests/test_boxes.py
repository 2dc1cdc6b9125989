"""Token -> pixel boxes, against hand-computed values."""
import torch

import vlmplug
from conftest import tiny
from vlmplug.testing.tiny import make_batch


class _IP:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _layout(family, sizes, processor=None, ips=(1,)):
    model = tiny(family)
    batch = make_batch(family, model, ips)
    with vlmplug.apply(model, "record", layers=[0], processor=processor) as h, torch.no_grad():
        h.set_image_sizes(sizes)
        model(**batch.inputs)
        return h.layout


def test_llava_centre_crop_boxes():
    # vision input 8x8 px, 2-px patches -> 4x4 grid. A 200x100 image: shortest edge 100 -> 8, scale 0.08;
    # resized 16x8, crop offset x = (16-8)/2 = 4 px = 50 original px. Cell (0,0) covers x 50..75, y 0..25.
    lay = _layout("llava", [[(200, 100)]], processor=_IP(image_processor=_IP(do_center_crop=True, do_pad=False)))
    v = lay.samples[0].images[0].main_view
    assert v.frame == "original" and (v.rows, v.cols) == (4, 4)
    assert torch.allclose(v.boxes[0], torch.tensor([50.0, 0.0, 75.0, 25.0]))
    assert torch.allclose(v.boxes[-1], torch.tensor([125.0, 75.0, 150.0, 100.0]))


def test_llava_pad_and_squash_boxes():
    # pad: 200x100 padded to 200x200 (50 px above and below), 8 px side -> 25 original px per 2-px cell
    lay = _layout("llava", [[(200, 100)]], processor=_IP(image_processor=_IP(do_pad=True)))
    v = lay.samples[0].images[0].main_view
    assert torch.allclose(v.boxes[0], torch.tensor([0.0, -50.0, 50.0, 0.0]))
    assert torch.allclose(v.boxes[-1], torch.tensor([150.0, 100.0, 200.0, 150.0]))
    lay = _layout("llava", [[(200, 100)]], processor=_IP(image_processor=_IP(do_pad=False, do_center_crop=False)))
    v = lay.samples[0].images[0].main_view
    assert torch.allclose(v.boxes[5], torch.tensor([50.0, 25.0, 100.0, 50.0]))


def test_qwen_boxes_scale_from_merged_grid():
    model = tiny("qwen2_vl")
    batch = make_batch("qwen2_vl", model, (1,))
    thw = batch.inputs["image_grid_thw"][0].tolist()  # [1, h, w] patches of 14 px
    W, H = 300, 140
    with vlmplug.apply(model, "record", layers=[0]) as h, torch.no_grad():
        h.set_image_sizes([[(W, H)]])
        model(**batch.inputs)
        v = h.layout.samples[0].images[0].main_view
    rows, cols = thw[1] // 2, thw[2] // 2
    assert (v.rows, v.cols) == (rows, cols)
    cw, ch = W / cols, H / rows
    assert torch.allclose(v.boxes[cols + 1], torch.tensor([cw, ch, 2 * cw, 2 * ch]))
    # processed frame without original sizes: 28 px per merged cell
    with vlmplug.apply(model, "record", layers=[0]) as h, torch.no_grad():
        model(**batch.inputs)
        v = h.layout.samples[0].images[0].main_view
    assert v.frame == "processed" and torch.allclose(v.boxes[1], torch.tensor([28.0, 0.0, 56.0, 28.0]))


def test_llava_next_highres_covers_original_image():
    model = tiny("llava_next")
    batch = make_batch("llava_next", model, (1,))
    W, H = batch.image_sizes[0][0]
    with vlmplug.apply(model, "record", layers=[0]) as h, torch.no_grad():
        model(**batch.inputs)
        im = h.layout.samples[0].images[0]
    hr, base = im.view("highres"), im.view("base")
    assert im.size == (W, H) and hr.frame == "original"
    assert torch.allclose(hr.boxes[-1][2:], torch.tensor([float(W), float(H)]))
    assert torch.allclose(base.boxes[0], torch.tensor([0, 0, W / base.cols, H / base.rows]))


def test_idefics3_tiles_canvas():
    model = tiny("idefics3")
    batch = make_batch("idefics3", model, (1,))  # one image split into 2x2 tiles + global
    with vlmplug.apply(model, "record", layers=[0]) as h, torch.no_grad():
        model(**batch.inputs)
        im = h.layout.samples[0].images[0]
    tiles = im.view("tiles")
    assert im.main_view is tiles and (tiles.rows, tiles.cols) == (8, 8)
    # the canvas cell (5, 2) is row 1, col 2 of tile (1, 0)
    assert int(tiles.positions[5 * 8 + 2]) == int(im.view("tile_1_0").positions[1 * 4 + 2])
    T = float(model.config.vision_config.image_size)
    assert torch.allclose(im.view("tile_1_1").boxes[0], torch.tensor([T, T, T + T / 4, T + T / 4]))

"""`AttentionMaps` on hand-built layouts and rows (no model): grids, reductions and pixel maps against
values computed by hand from the documented rules."""
import pytest
import torch

from vlmplug.layout import ImageLayout, Layout, SampleLayout, View, grid_boxes
from vlmplug.results import AttentionMaps


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def _pos(*p):
    return torch.tensor(p, dtype=torch.long)


def _maps(layout, rows):
    """rows: layer -> nested list [B][H][L]."""
    r = {li: _t(v) for li, v in rows.items()}
    counts = {li: torch.ones(t.shape[0], dtype=torch.long) for li, t in r.items()}
    return AttentionMaps(layout=layout, rows=r, counts=counts)


def _one_image(views, L, main=0, size=None, processed_size=(4, 4)):
    im = ImageLayout(positions=torch.cat([v.positions for v in views]), views=views, main=main, size=size,
                     processed_size=processed_size)
    return Layout([SampleLayout(images=[im], seq_len=L, first_real=0, last_real=L - 1)])


# ---------------------------------------------------------------------------- grids
def _two_sample_layout():
    # sample 0: a 2x2 grid at positions 2..5 and a 1x2 grid at positions 7, 8
    a = ImageLayout(positions=_pos(2, 3, 4, 5), views=[View("image", 2, 2, _pos(2, 3, 4, 5))])
    b = ImageLayout(positions=_pos(7, 8), views=[View("image", 1, 2, _pos(7, 8))])
    # sample 1: LLaVA-NeXT-like: base 1x1 at 1, highres 2x2 at 3, 4, 6, 7 (newlines at 5, 8); main = highres
    c = ImageLayout(positions=_pos(1, 2, 3, 4, 5, 6, 7, 8),
                    views=[View("base", 1, 1, _pos(1)), View("highres", 2, 2, _pos(3, 4, 6, 7))], main=1)
    return Layout([SampleLayout(images=[a, b], seq_len=10), SampleLayout(images=[c], seq_len=10)])


def _coded_rows():
    """rows[layer][b, h, p] = layer * 1000 + b * 100 + h * 10 + p (layers 3 and 7, 2 heads, 10 keys)."""
    return {li: [[[li * 1000 + b * 100 + h * 10 + p for p in range(10)] for h in range(2)] for b in range(2)]
            for li in (7, 3)}


def test_image_picks_positions_per_layer_and_head():
    m = _maps(_two_sample_layout(), _coded_rows())
    assert m.layers == [3, 7]
    g = m.image(0, 0)
    assert g.shape == (2, 2, 2, 2)
    assert g.tolist() == [
        [[[3002, 3003], [3004, 3005]], [[3012, 3013], [3014, 3015]]],
        [[[7002, 7003], [7004, 7005]], [[7012, 7013], [7014, 7015]]],
    ]
    assert m.image(0, 1).tolist() == [[[[3007, 3008]], [[3017, 3018]]], [[[7007, 7008]], [[7017, 7018]]]]
    # main view of sample 1 is highres
    assert m.image(1, 0).tolist() == [
        [[[3103, 3104], [3106, 3107]], [[3113, 3114], [3116, 3117]]],
        [[[7103, 7104], [7106, 7107]], [[7113, 7114], [7116, 7117]]],
    ]
    assert m.image(1, 0, view="base").tolist() == [[[[3101]], [[3111]]], [[[7101]], [[7111]]]]
    with pytest.raises(KeyError):
        m.image(1, 0, view="tile_0")


def test_images_main_named_and_all():
    m = _maps(_two_sample_layout(), _coded_rows())
    main = m.images()
    assert [len(s) for s in main] == [2, 1]
    assert main[0][1].tolist() == [[[[3007, 3008]], [[3017, 3018]]], [[[7007, 7008]], [[7017, 7018]]]]
    assert main[1][0][1, 0].tolist() == [[7103, 7104], [7106, 7107]]
    every = m.images("all")
    assert list(every[1][0]) == ["base", "highres"]
    assert every[1][0]["base"].tolist() == [[[[3101]], [[3111]]], [[[7101]], [[7111]]]]
    assert list(every[0][0]) == ["image"]
    assert every[0][0]["image"][0, 1].tolist() == [[3012, 3013], [3014, 3015]]


def _old_image_attention(layout, layers, view="main"):
    """`Record.image_attention` as it was before `AttentionMaps` (commit 0cfeed1), over
    layers = {layer: (rows [B, H, L], counts [B])} in ascending layer order: the oracle for `images`."""
    order = list(layers)
    out = []
    for b, s in enumerate(layout.samples):
        per_image = []
        for im in s.images:
            def grid(v):
                rows = torch.stack([layers[li][0][b][:, v.positions] for li in order])
                return rows.view(len(order), rows.shape[1], v.rows, v.cols)

            if view == "all":
                per_image.append({v.name: grid(v) for v in im.views})
            else:
                per_image.append(grid(im.main_view if view == "main" else im.view(view)))
        out.append(per_image)
    return out


def test_images_identical_to_old_record_image_attention():
    layout = _two_sample_layout()
    m = _maps(layout, _coded_rows())
    old_layers = {li: (m.rows[li], m.counts[li]) for li in sorted(m.rows)}
    for view in ("main", "all"):
        theirs, mine = _old_image_attention(layout, old_layers, view), m.images(view)
        assert len(theirs) == len(mine)
        for ts, ms in zip(theirs, mine):
            assert len(ts) == len(ms)
            for t, x in zip(ts, ms):
                if view == "all":
                    assert list(t) == list(x)
                    for k in t:
                        assert torch.equal(t[k], x[k])
                else:
                    assert torch.equal(t, x)


def test_repr():
    r = repr(_maps(_two_sample_layout(), _coded_rows()))
    assert "layers=[3, 7]" in r and "batch=2" in r and "images_per_sample=[2, 1]" in r


# ---------------------------------------------------------------------------- reduce
def _reduce_maps():
    # one sample, one 1x2 image at positions 0, 1; layers 0, 2, 5; 3 heads
    layout = _one_image([View("image", 1, 2, _pos(0, 1), grid_boxes(1, 2, 0, 0, 4, 4))], L=3)
    rows = {
        0: [[[1, 2, 99], [3, 4, 99], [5, 6, 99]]],
        2: [[[7, 8, 99], [9, 10, 99], [11, 12, 99]]],
        5: [[[0, 20, 99], [13, 1, 99], [2, 2, 99]]],
    }
    return _maps(layout, rows)


def test_reduce_mean_sum_max_over_chosen_layers_and_heads():
    m = _reduce_maps()
    # (layer 0, head 0) [1, 2], (0, 2) [5, 6], (5, 0) [0, 20], (5, 2) [2, 2]
    assert m.reduce(0, 0, layers=[0, 5], heads=[0, 2], how="mean").tolist() == [[2.0, 7.5]]
    assert m.reduce(0, 0, layers=[0, 5], heads=[0, 2], how="sum").tolist() == [[8.0, 30.0]]
    assert m.reduce(0, 0, layers=[0, 5], heads=[0, 2], how="max").tolist() == [[5.0, 20.0]]
    # all 9 (layer, head) pairs: token 0 sums to 51, token 1 to 65
    assert torch.allclose(m.reduce(0, 0), _t([[51 / 9, 65 / 9]]))
    assert m.reduce(0, 0, how="max").tolist() == [[13.0, 20.0]]


def test_reduce_negative_indices():
    m = _reduce_maps()
    # layer -1 is decoder layer 5: heads [0, 20], [13, 1], [2, 2]
    assert torch.allclose(m.reduce(0, 0, layers=[-1]), _t([[15 / 3, 23 / 3]]))
    # layer -3 is decoder layer 0, head -3 is head 0, head -1 is head 2
    assert m.reduce(0, 0, layers=[-3], heads=[-3], how="sum").tolist() == [[1.0, 2.0]]
    assert m.reduce(0, 0, layers=[-2], heads=[-1], how="sum").tolist() == [[11.0, 12.0]]
    # a single int works like a one-element list
    assert m.reduce(0, 0, layers=2, heads=1).tolist() == [[9.0, 10.0]]


@pytest.mark.parametrize("kwargs, word", [
    (dict(layers=[1]), "layers"),
    (dict(layers=[0, 7]), "layers"),
    (dict(layers=[-4]), "layers"),
    (dict(layers=[]), "layers"),
    (dict(layers=[5, -1]), "layers"),
    (dict(heads=[3]), "heads"),
    (dict(heads=[-4]), "heads"),
    (dict(heads=[0.5]), "heads"),
    (dict(how="median"), "how"),
])
def test_reduce_errors_name_the_parameter(kwargs, word):
    m = _reduce_maps()
    with pytest.raises(ValueError, match=word):
        m.reduce(0, 0, **kwargs)
    with pytest.raises(ValueError, match=word):  # to_pixels reduces the same way
        m.to_pixels(0, 0, **kwargs)


def test_reduce_unrecorded_layer_message_lists_recorded():
    with pytest.raises(ValueError, match=r"decoder layer 1 was not recorded.*\[0, 2, 5\]"):
        _reduce_maps().reduce(0, 0, layers=[1])


# ---------------------------------------------------------------------------- to_pixels
def _quad_maps(frame="processed", size=None):
    # a 2x2 grid over a 4x4 frame at positions 0..3; head 0 gives every token 4, head 1 gives 4, 8, 12, 16
    v = View("image", 2, 2, _pos(0, 1, 2, 3), grid_boxes(2, 2, 0, 0, 4, 4), frame)
    return _maps(_one_image([v], L=4, size=size), {0: [[[4, 4, 4, 4], [4, 8, 12, 16]]]})


def test_to_pixels_quadrants_get_value_over_area():
    m = _quad_maps()
    px = m.to_pixels(0, 0, heads=[1])
    assert px.dtype == torch.float32
    assert px.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    assert px.sum().item() == pytest.approx(40)
    # head sum: 8, 12, 16, 20 over 4 pixels each
    assert m.to_pixels(0, 0, how="sum").tolist() == [[2, 2, 3, 3], [2, 2, 3, 3], [4, 4, 5, 5], [4, 4, 5, 5]]
    with pytest.raises(ValueError, match="how"):
        m.to_pixels(0, 0, how="median")
    with pytest.raises(ValueError, match="heads"):
        m.to_pixels(0, 0, heads=[2])


def test_to_pixels_sums_densities_of_base_and_highres():
    base = View("base", 1, 1, _pos(0), grid_boxes(1, 1, 0, 0, 4, 4), "original")
    hr = View("highres", 2, 2, _pos(2, 3, 4, 5), grid_boxes(2, 2, 0, 0, 4, 4), "original")
    # base token 16 -> density 1 everywhere; highres 4, 8, 12, 16 -> 1, 2, 3, 4 per quadrant pixel
    m = _maps(_one_image([base, hr], L=6, main=1, size=(4, 4)), {0: [[[16, 99, 4, 8, 12, 16]]]})
    px = m.to_pixels(0, 0)
    assert px.tolist() == [[2, 2, 3, 3], [2, 2, 3, 3], [4, 4, 5, 5], [4, 4, 5, 5]]
    assert px.sum().item() == pytest.approx(56)


def test_to_pixels_fractional_boxes():
    # a 3x3 grid over a 4x4 frame: each box is 4/3 x 4/3 (area 16/9), columns [0, 4/3], [4/3, 8/3], [8/3, 4]
    v = View("image", 3, 3, _pos(*range(9)), grid_boxes(3, 3, 0, 0, 4, 4))
    m = _maps(_one_image([v], L=9), {0: [[[1, 2, 3, 4, 5, 6, 7, 8, 9]]]})
    px = m.to_pixels(0, 0)
    assert px.shape == (4, 4)
    assert px.sum().item() == pytest.approx(45, rel=1e-6)
    # pixel (0, 0) lies inside box (0, 0): 1 / (16/9)
    assert px[0, 0].item() == pytest.approx(9 / 16, rel=1e-6)
    # pixel (1, 1) = [1, 2] x [1, 2]: per axis 1/3 in cell 0 and 2/3 in cell 1, so cells (0,0), (0,1), (1,0),
    # (1,1) cover 1/9, 2/9, 2/9, 4/9 of it: (1*1 + 2*2 + 4*2 + 5*4) / 9 / (16/9) = 33/16
    assert px[1, 1].item() == pytest.approx(33 / 16, rel=1e-6)


def test_to_pixels_clips_boxes_to_the_frame():
    # boxes [-2, 2] x [0, 4] and [2, 6] x [0, 4] in a 4x4 frame: clipped to 2x4 each (area 8)
    boxes = _t([[-2, 0, 2, 4], [2, 0, 6, 4]])
    v = View("image", 1, 2, _pos(0, 1), boxes)
    px = _maps(_one_image([v], L=2), {0: [[[8, 16]]]}).to_pixels(0, 0)
    assert px.tolist() == [[1, 1, 2, 2]] * 4
    assert px.sum().item() == pytest.approx(24)


def test_to_pixels_boxes_that_are_not_a_grid():
    # overlapping boxes [0, 2]^2 (value 4, density 1) and [1, 4]^2 (value 9, density 1)
    v = View("image", 1, 2, _pos(0, 1), _t([[0, 0, 2, 2], [1, 1, 4, 4]]))
    px = _maps(_one_image([v], L=2), {0: [[[4, 9]]]}).to_pixels(0, 0)
    assert px.tolist() == [[1, 1, 0, 0], [1, 2, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
    assert px.sum().item() == pytest.approx(13)
    # fractional, not a grid: [0.5, 2.5] x [0.5, 1.5] (value 2, area 2) and [0, 4] x [2, 4] (value 8, area 8)
    v = View("image", 1, 2, _pos(0, 1), _t([[0.5, 0.5, 2.5, 1.5], [0, 2, 4, 4]]))
    px = _maps(_one_image([v], L=2), {0: [[[2, 8]]]}).to_pixels(0, 0)
    assert px.tolist() == [[0.25, 0.5, 0.25, 0], [0.25, 0.5, 0.25, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert px.sum().item() == pytest.approx(10)


def test_to_pixels_skips_views_without_boxes_and_raises_without_any():
    tile = View("tile_0", 1, 1, _pos(0), None)
    glob = View("global", 1, 1, _pos(1), grid_boxes(1, 1, 0, 0, 4, 4))
    m = _maps(_one_image([tile, glob], L=2), {0: [[[100, 16]]]})
    assert m.to_pixels(0, 0).tolist() == [[1.0] * 4] * 4
    none = _maps(_one_image([View("tile_0", 1, 1, _pos(0), None)], L=1), {0: [[[1]]]})
    with pytest.raises(ValueError, match="no view has boxes"):
        none.to_pixels(0, 0)


def test_to_pixels_frame_choice():
    # original frame with a known size: a 6x2 map; the one token covers it all (value 12 -> density 1)
    v = View("image", 1, 1, _pos(0), grid_boxes(1, 1, 0, 0, 6, 2), "original")
    px = _maps(_one_image([v], L=1, size=(6, 2), processed_size=(4, 4)), {0: [[[12]]]}).to_pixels(0, 0)
    assert px.tolist() == [[1.0] * 6] * 2
    # processed frame (even with a known original size): processed_size (3.5, 2.2) rounds up to 4 x 3;
    # the box [0, 3.5] x [0, 2.2] of value 7.7 has density 1; the corner pixel is covered 0.5 x 0.2
    v = View("image", 1, 1, _pos(0), _t([[0, 0, 3.5, 2.2]]), "processed")
    px = _maps(_one_image([v], L=1, size=(6, 2), processed_size=(3.5, 2.2)), {0: [[[7.7]]]}).to_pixels(0, 0)
    assert px.shape == (3, 4)
    assert px[0, 0].item() == pytest.approx(1.0, rel=1e-6)
    assert px[2, 3].item() == pytest.approx(0.1, rel=1e-5)
    assert px[2, 0].item() == pytest.approx(0.2, rel=1e-5)
    assert px.sum().item() == pytest.approx(7.7, rel=1e-6)


def test_to_pixels_original_boxes_without_a_usable_original_frame_raise():
    v = View("image", 1, 1, _pos(0), grid_boxes(1, 1, 0, 0, 4, 4), "original")
    with pytest.raises(ValueError, match="original size is unknown"):
        _maps(_one_image([v], L=1, size=None), {0: [[[1]]]}).to_pixels(0, 0)
    a = View("a", 1, 1, _pos(0), grid_boxes(1, 1, 0, 0, 4, 4), "original")
    b = View("b", 1, 1, _pos(1), grid_boxes(1, 1, 0, 0, 4, 4), "processed")
    with pytest.raises(ValueError, match="processed frame"):
        _maps(_one_image([a, b], L=2, size=(4, 4)), {0: [[[1, 1]]]}).to_pixels(0, 0)


def test_to_pixels_size_preserves_total():
    m = _quad_maps()
    # 2x2 output: each output pixel is one quadrant, so it holds the quadrant's whole value
    assert m.to_pixels(0, 0, heads=[1], size=(2, 2)).tolist() == [[4, 8], [12, 16]]
    # 8x8 output: each quadrant's value over 16 pixels
    px = m.to_pixels(0, 0, heads=[1], size=(8, 8))
    assert px[0, 0].item() == 0.25 and px[0, 7].item() == 0.5 and px[7, 0].item() == 0.75 and px[7, 7].item() == 1
    assert px.sum().item() == pytest.approx(40)
    # 2 wide, 1 high: left column 4 + 12, right column 8 + 16
    assert m.to_pixels(0, 0, heads=[1], size=(2, 1)).tolist() == [[16, 24]]
    with pytest.raises(ValueError, match="size"):
        m.to_pixels(0, 0, size=(0, 4))

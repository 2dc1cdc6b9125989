"""`vlmplug.ground()` through a real processor (the embedded world model's LlavaProcessor) and the `Grounding`
post-processing (point, box, point prompts, overlay) against hand-computed values."""
import numpy as np
import pytest
import torch
from PIL import Image

import vlmplug
from vlmplug.errors import MethodConfigError
from vlmplug.grounding import Grounding, ground
from vlmplug.grounding.tokens import phrase_tokens
from vlmplug.world.scenes import draw_scene


@pytest.fixture(scope="module")
def world():
    from vlmplug.world import load_world

    return load_world()


def _scene(size=(96, 64)):
    import random

    return draw_scene([("circle", "red", 0.3), ("square", "blue", 0.3)], size=size, rng=random.Random(3))


# ------------------------------------------------------------------------------------------ post-processing
def test_box_is_the_most_confident_8_connected_region():
    hm = np.zeros((6, 8), dtype=np.float32)
    hm[1, 1] = hm[2, 2] = 0.6  # diagonal neighbours: one region under 8-connectivity (two under 4)
    hm[4, 5:8] = 1.0  # the peak region
    hm[0, 7] = 0.4  # below the threshold
    g = Grounding(hm, "q", "raw")
    assert g.box == (5, 4, 8, 5)
    assert [r.box for r in g.regions] == [(5, 4, 8, 5), (1, 1, 3, 3)]
    assert g.regions[1].area == 2 and g.regions[1].confidence == pytest.approx(0.6)
    assert g.point == (6.5, 4.5)  # the centre of the peak plateau, not its first pixel
    g2 = Grounding(hm, "q", "raw", threshold=0.3)
    assert len(g2.regions) == 3


def test_ties_go_to_the_larger_region_and_points_follow_vl_sam():
    hm = np.zeros((5, 9), dtype=np.float32)
    hm[0, 0] = 1.0
    hm[2:5, 5:9] = 0.7
    hm[3, 7] = 1.0  # same confidence as (0, 0), larger region
    hm[4, 0] = 0.05
    g = Grounding(hm, "q", "raw", info={"seen": hm >= 0})
    assert g.box == (5, 2, 9, 5)
    pos, neg = g.points
    assert pos == (7.5, 3.5, 1)  # the peak of the largest region
    assert neg[2] == 0 and hm[int(neg[1]), int(neg[0])] == 0.0  # the least attended pixel outside it
    assert Grounding(np.zeros((3, 3), np.float32), "q", "raw").box is None
    assert Grounding(np.zeros((3, 3), np.float32), "q", "raw").points == []


def test_overlay_is_an_rgb_image_of_the_picture():
    img = Image.new("RGB", (8, 6), (0, 0, 0))
    hm = np.zeros((6, 8), np.float32)
    hm[0, 0] = 1.0
    ov = Grounding(hm, "q", "raw", image=img).overlay(alpha=1.0, cmap="gray")
    assert ov.size == (8, 6) and ov.mode == "RGB"
    assert ov.getpixel((0, 0)) == (255, 255, 255) and ov.getpixel((5, 5)) == (0, 0, 0)


# ------------------------------------------------------------------------------------------ query tokens
def test_phrase_tokens_spell_the_phrase(world):
    _, proc = world
    tok = proc.tokenizer
    ids = tok("USER: Is there a red circle? ASSISTANT:", add_special_tokens=False)["input_ids"]
    pos = phrase_tokens(tok, ids, 0, len(ids) - 1, "a red circle", content_only=False)
    assert tok.decode([ids[p] for p in pos]).strip() == "a red circle"
    content = phrase_tokens(tok, ids, 0, len(ids) - 1, "A RED circle")  # case-insensitive; stop words left out
    assert tok.decode([ids[p] for p in content]).strip() == "red circle"
    assert phrase_tokens(tok, ids, 0, len(ids) - 1, "triangle") == []


# ------------------------------------------------------------------------------------------ ground()
def test_ground_maps_the_original_pixels_and_equals_ground_inputs(world):
    from vlmplug.grounding import ground_inputs
    from vlmplug.pipeline import prepare_inputs

    model, proc = world
    sc = _scene()
    g = vlmplug.ground(model, proc, sc.image, "What color is the circle?")
    # the engine on the same prompt, the query tokens given by hand: "color" and "circle" of
    # "USER: <image>\nwhat color is the circle? ASSISTANT:"
    inputs = prepare_inputs(model, proc, [sc.image], "What color is the circle?")
    ids = inputs["input_ids"][0].tolist()
    tok = proc.tokenizer
    hand = [i for i, t in enumerate(ids) if tok.decode([t]).strip() in ("color", "circle")]
    heat = ground_inputs(model, inputs, method="tag", targets=[hand], image_sizes=[[sc.image.size]],
                        processor=proc)[0][0]["heat"]
    assert np.allclose(g.heatmap, (heat / heat.max()).numpy(), atol=1e-6)
    assert g.heatmap.shape == (64, 96) and g.heatmap.dtype == np.float32
    assert float(g.heatmap.max()) == pytest.approx(1.0) and float(g.heatmap.min()) >= 0
    assert g.method == "tag" and [t.strip() for t in g.tokens] == ["color", "circle"]
    assert len(g.info["pairs"]) == 2 and all(len(p) == 10 for p in g.info["pairs"])
    x, y = g.point
    assert 0 <= x <= 96 and 0 <= y <= 64
    assert g.overlay().size == sc.image.size
    assert "_vlmplug_handle" not in model.__dict__


@pytest.mark.parametrize("method", ["tag", "raw", "relative", "rollout"])
def test_batched_ground_equals_one_at_a_time(world, method):
    """Prompts of different lengths (left padding in the batch; the generic prompt of 'relative' pads otherwise)."""
    model, proc = world
    scenes = [_scene((96, 64)), _scene((64, 64))]
    queries = ["What color is the circle?", "Is there a blue square on the left or a red circle?"]
    lens = [len(proc.tokenizer(q)["input_ids"]) for q in queries]
    assert lens[0] != lens[1]
    together = ground(model, proc, [s.image for s in scenes], queries, method=method)
    for s, q, t in zip(scenes, queries, together):
        alone = ground(model, proc, s.image, q, method=method)
        assert alone.tokens == t.tokens
        assert np.allclose(alone.heatmap, t.heatmap, atol=1e-4)


def test_world_model_points_at_the_asked_object(world):
    """On the trained world model the answer position's map peaks on the object asked about (the pointing game of
    eval/world_grounding.py, on three fixed scenes)."""
    import random

    model, proc = world
    for seed, shape in [(1, "circle"), (2, "square"), (3, "triangle")]:
        others = [s for s in ("circle", "square", "triangle") if s != shape]
        sc = draw_scene([(shape, "green", 0.3), (others[0], "red", 0.3), (others[1], "blue", 0.3)], size=64,
                        rng=random.Random(seed))
        box = sc.objects[0].box
        g = ground(model, proc, sc.image, f"What color is the {shape}?", tokens="last")
        x, y = g.point
        assert box[0] <= x < box[2] and box[1] <= y < box[3], (shape, g.point, box)


def test_bad_calls_say_what_to_do(world):
    model, proc = world
    img = _scene().image
    with pytest.raises(MethodConfigError, match="method"):
        ground(model, proc, img, "circle", method="gradcam")
    with pytest.raises(MethodConfigError, match="target="):
        ground(model, proc, img, "What color is the circle?", target="hexagon")
    with pytest.raises(MethodConfigError, match="per query"):
        ground(model, proc, [img], ["a", "b"])
    with pytest.raises(MethodConfigError, match="non-empty"):
        ground(model, proc, img, "  ")
    with pytest.raises(MethodConfigError, match="threshold"):
        ground(model, proc, img, "circle", threshold=0)
    for kw, word in [(dict(layers=[100]), "out of range"), (dict(layers=[]), "empty"),
                     (dict(method="raw", heads=[99]), "out of range"), (dict(method="raw", heads=[]), "empty"),
                     (dict(heads=[0]), "raw"), (dict(method="relative", tokens="query"), "last token"),
                     (dict(tokens="last", target="circle"), "tokens='query'"), (dict(prompt="Say {x}"), "must contain")]:
        with pytest.raises(MethodConfigError, match=word):
            ground(model, proc, img, "What color is the circle?", **kw)
    assert "_vlmplug_handle" not in model.__dict__


def test_several_images_in_one_prompt_give_one_map_each(world):
    """One query over two images: the tokens of each land on its own picture (equal to the engine's maps)."""
    from vlmplug.grounding import ground_inputs
    from vlmplug.pipeline import prepare_inputs

    model, proc = world
    a, b = _scene((96, 64)), _scene((64, 64))
    gs = ground(model, proc, [a.image, b.image], "What color is the circle?", tokens="last", method="raw")
    assert [g.heatmap.shape for g in gs] == [(64, 96), (64, 64)]
    inputs = prepare_inputs(model, proc, [a.image, b.image], "What color is the circle?")
    maps = ground_inputs(model, inputs, method="raw", image_sizes=[[a.image.size, b.image.size]], processor=proc)[0]
    for g, m in zip(gs, maps):
        assert np.allclose(g.heatmap, (m["heat"] / m["heat"].max()).numpy(), atol=1e-6)
    both = ground(model, proc, [[a.image, b.image], b.image], ["What color is the circle?", "Is there a circle?"],
                  tokens="last", method="raw")
    assert isinstance(both[0], list) and len(both[0]) == 2 and isinstance(both[1], Grounding)
    assert np.allclose(both[0][0].heatmap, gs[0].heatmap, atol=1e-4)


def test_prompt_template_with_braces(world):
    model, proc = world
    g = ground(model, proc, _scene().image, "circle", prompt='Reply as {"x": 1}. What color is the {query}?')
    assert [t.strip() for t in g.tokens] == ["circle"]

"""`record` on a tiny model of every family: outputs untouched, maps equal eager attention in the
right grid cells, padding-invariant, and apply -> remove restores the model exactly."""
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_attentions as _eager_attentions
from vlmplug.testing.tiny import make_batch, split_batch


def _views_by_truth(image_layout, truth_image):
    """Pair each ground-truth view with the adapter's view of the same name (tiles by order)."""
    mine = {v.name: v for v in image_layout.views}
    my_tiles = [v for v in image_layout.views if v.name.startswith("tile_")]
    t_tiles = [v for v in truth_image.views if v.name.startswith("tile_")]
    pairs = []
    for tv in truth_image.views:
        if tv.name in mine:
            pairs.append((tv, mine[tv.name]))
        elif tv.name.startswith("tile_"):
            pairs.append((tv, my_tiles[t_tiles.index(tv)]))
        else:
            raise AssertionError(f"adapter has no view {tv.name!r}: {list(mine)}")
    return pairs


def _last_real(am, b):
    return int(torch.nonzero(am[b]).max())


def test_layout_matches_ground_truth(family):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2, 0))
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        model(**batch.inputs)
        lay = h.layout
    assert [len(s.images) for s in lay.samples] == [len(t) for t in batch.truth]
    for s, truth in zip(lay.samples, batch.truth):
        for im, ti in zip(s.images, truth):
            assert im.positions.tolist() == ti.positions
            for tv, v in _views_by_truth(im, ti):
                assert (v.rows, v.cols) == (tv.rows, tv.cols), tv.name
                assert v.positions.tolist() == tv.positions, tv.name


def test_record_keeps_outputs_and_matches_eager(family):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    with torch.no_grad():
        ref = model(**batch.inputs).logits
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        out = model(**batch.inputs).logits
        maps = h.image_attention(view="all")
        lay = h.layout
    am = batch.inputs["attention_mask"]
    real = am.bool()
    assert (out - ref)[real].abs().max() <= 1e-5
    atts = _eager_attentions(model, batch.inputs)
    n_layers = len(atts)
    for b, truth in enumerate(batch.truth):
        last = _last_real(am, b)
        for i, ti in enumerate(truth):
            for tv, v in _views_by_truth(lay.samples[b].images[i], ti):
                got = maps[b][i][v.name]
                assert got.shape == (n_layers, model.config.get_text_config().num_attention_heads, tv.rows, tv.cols)
                for li in range(n_layers):
                    # eager attention of the last real token to the true cell positions, row-major
                    exp = atts[li][b, :, last, tv.positions].reshape(-1, tv.rows, tv.cols)
                    assert torch.allclose(got[li], exp, atol=1e-5), (tv.name, li)


def test_record_generate_tokens_identical_and_latest_map(family):
    model = tiny(family)
    batch = make_batch(family, model, (1,))
    kw = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        ref = model.generate(**batch.inputs, **kw)
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        out = model.generate(**batch.inputs, **kw)
        maps = h.image_attention()
        main = h.layout.samples[0].images[0].main_view
    assert torch.equal(ref, out)
    # the latest forward fed the second-to-last generated token: compare with one eager pass over it
    seq = out[:, :-1]
    inputs = dict(batch.inputs)
    inputs["input_ids"] = seq
    inputs["attention_mask"] = torch.ones_like(seq)
    for k in ("mm_token_type_ids", "token_type_ids"):
        if k in inputs:
            inputs[k] = torch.nn.functional.pad(inputs[k], (0, seq.shape[1] - inputs[k].shape[1]))
    atts = _eager_attentions(model, inputs)
    for li, a in enumerate(atts):
        exp = a[0, :, -1, main.positions].reshape(-1, main.rows, main.cols)
        assert torch.allclose(maps[0][0][li], exp, atol=1e-5)


def test_left_padded_batch_equals_samples_alone(family):
    model = tiny(family)
    batch = make_batch(family, model, (2, 1, 0))
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        model(**batch.inputs)
        together = h.image_attention(view="all")
        for b in range(3):
            single = split_batch(batch, b)
            model(**single.inputs)
            alone = h.image_attention(view="all")
            if not batch.truth[b]:
                # an image-free sample alone records nothing; in the batch its list is empty
                assert together[b] == []
                continue
            assert len(alone[0]) == len(together[b])
            for a, t in zip(alone[0], together[b]):
                for name in a:
                    assert torch.allclose(a[name], t[name], atol=1e-5), name


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "gemma3"])
def test_record_query_modes_and_layers(fam):
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 1))
    atts = _eager_attentions(model, batch.inputs)
    am = batch.inputs["attention_mask"]
    with vlmplug.apply(model, "record", layers=[-1], queries="after_image") as h, torch.no_grad():
        model(**batch.inputs)
        maps = h.image_attention()
        lay = h.layout
    assert maps[0][0].shape[0] == 1
    for b in range(2):
        v = lay.samples[b].images[0].main_view
        after = torch.arange(int(lay.samples[b].image_positions.max()) + 1, _last_real(am, b) + 1)
        exp = atts[-1][b][:, after][:, :, v.positions].mean(1).reshape(-1, v.rows, v.cols)
        assert torch.allclose(maps[b][0][0], exp, atol=1e-5)
    with vlmplug.apply(model, "record", layers=[0], queries=[-2]) as h, torch.no_grad():
        model(**batch.inputs)
        maps = h.image_attention()
        lay = h.layout
    for b in range(2):
        v = lay.samples[b].images[0].main_view
        exp = atts[0][b, :, _last_real(am, b) - 1, v.positions].reshape(-1, v.rows, v.cols)
        assert torch.allclose(maps[b][0][0], exp, atol=1e-5)


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "idefics3", "internvl"])
def test_record_bf16(fam):
    model = tiny(fam, torch.bfloat16)
    batch = make_batch(fam, model, (1, 2))
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    with torch.no_grad():
        ref = model(**inputs).logits
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        out = model(**inputs).logits
        maps = h.image_attention()
        lay = h.layout
    assert torch.equal(out, ref)
    atts = _eager_attentions(model, inputs)
    v = lay.samples[1].images[1].main_view
    last = _last_real(inputs["attention_mask"], 1)
    for li, a in enumerate(atts):
        exp = a[1, :, last, v.positions].float().reshape(-1, v.rows, v.cols)
        assert torch.allclose(maps[1][1][li], exp, atol=2e-2, rtol=5e-2)
    assert maps[1][1].dtype == torch.float32


def _state(model):
    cfgs = {}
    from vlmplug.runtime.install import all_configs as _all_configs

    for c in _all_configs(model):
        cfgs[id(c)] = c._attn_implementation_internal
    hooks = {}
    attrs = {}
    for name, m in model.named_modules():
        hooks[name] = tuple(
            len(getattr(m, a)) for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs")
        )
        attrs[name] = sorted(k for k in vars(m) if not k.startswith("_") or k.startswith("_vlmplug"))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return cfgs, hooks, attrs, sd


def test_apply_remove_restores_everything(family):
    model = tiny(family)
    batch = make_batch(family, model, (1,))
    before = _state(model)
    h = vlmplug.apply(model, "record")
    with torch.no_grad():
        model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
    assert before[0] != _state(model)[0]  # something was switched while applied
    h.remove()
    after = _state(model)
    assert before[0] == after[0]
    assert before[1] == after[1]
    assert before[2] == after[2]
    assert before[3].keys() == after[3].keys() and all(torch.equal(before[3][k], after[3][k]) for k in before[3])
    assert "get_image_features" not in vars(model.base_model)
    h.remove()  # idempotent


@pytest.mark.parametrize("fam", ["llava", "llava_next", "idefics3"])
def test_attention_maps_project_every_view_onto_the_pixels(fam):
    """AttentionMaps.to_pixels on a real layout: the map's mass equals the attention the image's tokens (all views
    with boxes: NeXT's base + high-res grids, Idefics3's tiles + global image) received, checked against the eager
    attention of the unpatched model."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        model(**batch.inputs)
        maps = h.result("record")
    att = _eager_attentions(model, batch.inputs)
    last = _last_real(batch.inputs["attention_mask"], 0)
    im = maps.layout.samples[0].images[0]
    boxed, seen = [], set()
    for v in im.views:  # boxed views, each token once (Idefics3's assembled 'tiles' grid repeats its tiles)
        if v.boxes is not None and not set(v.positions.tolist()) <= seen:
            boxed.append(v)
            seen |= set(v.positions.tolist())
    assert boxed and (fam == "llava" or len(boxed) > 1)
    # expected mass: head-mean, layer-mean attention of the last token on every boxed token (views may share none)
    want = sum(float(torch.stack([a[0, :, last, v.positions].mean(0) for a in att]).mean(0).sum()) for v in boxed)
    px = maps.to_pixels(0, 0)
    assert px.dim() == 2 and (px >= 0).all()
    assert abs(float(px.sum()) - want) <= 1e-4 * max(1.0, want)
    assert repr(maps).startswith("AttentionMaps(layers=[0, 1]")


def test_record_with_a_static_cache_matches_the_dynamic_cache():
    """A static cache's prefill attends top-left aligned over its preallocated slots (SDPA's is_causal); the probes
    must align the same way (they once saw future tokens there)."""
    from transformers import DynamicCache, StaticCache

    from vlmplug.compat import with_cache

    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    tc = model.config.get_text_config(decoder=True)
    L = batch.inputs["input_ids"].shape[1]
    maps = {}
    for impl in ("dynamic", "static"):
        cache = DynamicCache(config=tc) if impl == "dynamic" else StaticCache(config=tc, max_cache_len=L + 10)
        with vlmplug.apply(model, vlmplug.Record(queries="after_image")) as h, torch.no_grad():
            model(**batch.inputs, **with_cache(model, cache), use_cache=True)
            maps[impl] = h.result("record")
    for li in maps["dynamic"].layers:
        L = maps["dynamic"].rows[li].shape[-1]
        assert torch.allclose(maps["static"].rows[li][..., :L], maps["dynamic"].rows[li], atol=1e-5)
        assert torch.allclose(maps["static"].rows[li].sum(-1), torch.ones(1), atol=1e-5)

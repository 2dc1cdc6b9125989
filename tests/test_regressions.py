"""Cases a review found: static caches, sliding-window caches, composed pruning, beams, one-column
Idefics3 tilings, per-prompt image sizes."""
import pytest
import torch

import vlmplug
import vlmplug.testing.tiny as T
from conftest import tiny
from reference import eager_attentions
from vlmplug.adapters.base import get_adapter
from vlmplug.methods.pruning.fastv import FastV
from vlmplug.methods.pruning.plphp import PLPHP
from vlmplug.testing.tiny import make_batch


def test_record_with_static_cache_and_pruning_refuses_it():
    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    kw = dict(max_new_tokens=3, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(**batch.inputs, **kw)
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        out = model.generate(**batch.inputs, **kw)
        maps = h.image_attention()
        v = h.layout.samples[0].images[0].main_view
    assert torch.equal(ref, out)
    inputs = dict(batch.inputs, input_ids=out[:, :-1], attention_mask=torch.ones_like(out[:, :-1]))
    atts = eager_attentions(model, inputs)
    for li, a in enumerate(atts):
        assert torch.allclose(maps[0][0][li], a[0, :, -1, v.positions].reshape(-1, v.rows, v.cols), atol=1e-5)
    with vlmplug.apply(model, "fastv", layer=1), torch.no_grad():
        with pytest.raises(vlmplug.MethodConfigError, match="dynamic KV cache"):
            model.generate(**batch.inputs, **kw)


def test_plphp_leaves_sliding_window_layers_alone(monkeypatch):
    orig = T.tiny_config

    def three_layers(family):
        c = orig(family)
        c.text_config.num_hidden_layers = 3
        c.text_config.layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
        return c

    monkeypatch.setattr(T, "tiny_config", three_layers)
    model = T.build_tiny_model("gemma3")
    batch = make_batch("gemma3", model, (1, 2))  # prompts longer than the window of 8
    assert batch.inputs["input_ids"].shape[1] > model.config.text_config.sliding_window
    gen = dict(max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        ref = model.generate(**batch.inputs, **gen)
    with vlmplug.apply(model, "plphp", start_layer=1, keep_ratio=1.0, delta=0.0), torch.no_grad():
        assert torch.equal(model.generate(**batch.inputs, **gen), ref)
    m = PLPHP(start_layer=1, keep_ratio=0.5)
    with vlmplug.apply(model, m) as h, torch.no_grad():
        model.generate(**batch.inputs, **gen)
        assert h.method("plphp").kv_prune_layers == (2,) and list(h.session.state.kv_index) == [2]


@pytest.mark.parametrize("other", [FastV(layer=1), "cluster"])
def test_drop_and_kv_prune_in_the_same_layers_are_refused(other):
    model = tiny("llava")
    from vlmplug.methods.pruning.cluster import Cluster

    first = Cluster() if other == "cluster" else other
    with pytest.raises(vlmplug.MethodConfigError, match="KV pruning in layers at or after"):
        vlmplug.apply(model, [first, PLPHP(start_layer=1)])
    assert "_vlmplug_handle" not in vars(model) and not model.base_model._forward_pre_hooks


@pytest.mark.parametrize("fam", ["qwen2_vl", "llava_next", "llava_onevision"])
def test_beams_and_several_sequences_keep_the_layout(fam):
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    with vlmplug.apply(model, "fastv", layer=1, keep_ratio=0.5) as h, torch.no_grad():
        model.generate(**batch.inputs, max_new_tokens=2, do_sample=False, num_beams=2, num_return_sequences=2)
        lay = h.layout
        kept = h.stats["fastv"]["tokens_kept_per_image"]
    assert len(lay.samples) == 2 and all(len(s.images) == 1 for s in lay.samples)
    assert lay.samples[0].images[0].positions.tolist() == lay.samples[1].images[0].positions.tolist()
    n = lay.samples[0].images[0].positions.numel()
    assert kept == [[round(n * 0.5)], [round(n * 0.5)]]


@pytest.mark.parametrize("rows,cols", [(2, 2), (3, 1), (1, 3)])
def test_idefics3_tile_rows_and_columns(rows, cols):
    ad = get_adapter(tiny("idefics3"))
    side, n = ad._tile_tokens()
    img = ad.image_token_id
    NL, FAKE, GLOB, ROW = 10, 11, 12, 13  # stand-ins for "\n", <fake_token_around_image>, <global-img>, <row_r_col_c>
    ids = [1]
    for r in range(rows):
        for c in range(cols):
            ids += [FAKE, ROW + r * cols + c] + [img] * n
        ids += [NL]
    ids += [NL, FAKE, GLOB] + [img] * n + [FAKE]
    im = ad.locate(torch.tensor([ids]), None, None).samples[0].images[0]
    assert (im.main_view.rows, im.main_view.cols) == (rows * side, cols * side)
    assert [v.name for v in im.views if v.name.startswith("tile_")] == [f"tile_{r}_{c}" for r in range(rows) for c in range(cols)]


def test_image_sizes_apply_to_the_next_prompt_only():
    model = tiny("qwen2_vl")
    batch = make_batch("qwen2_vl", model, (1,))
    with vlmplug.apply(model, "record", layers=[0]) as h, torch.no_grad():
        h.set_image_sizes([[(300, 140)]])
        model(**batch.inputs)
        assert h.layout.samples[0].images[0].main_view.frame == "original"
        model(**batch.inputs)
        assert h.layout.samples[0].images[0].main_view.frame == "processed"

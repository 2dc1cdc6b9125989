"""transformers renames what it passes between modules (5.24: `past_key_values` -> `cache`). vlmplug reads those
names in one place (vlmplug/compat.py) and raises TransformersMismatchError when a hook misses, instead of answering
without the method's effect. Each test below makes one hook miss on purpose and asserts the loud error."""
import pytest
import torch
import transformers
from transformers import DynamicCache

import vlmplug
import vlmplug.backend.drop as drop_mod
import vlmplug.backend.kvprune as kv_mod
from conftest import tiny
from vlmplug import compat
from vlmplug.errors import TransformersMismatchError
from vlmplug.testing.tiny import make_batch

GEN = dict(max_new_tokens=3, do_sample=False)
FAMS = ["llava", "qwen2_vl"]


def _raises(fn, *words):
    with pytest.raises(TransformersMismatchError) as e:
        fn()
    msg = str(e.value)
    assert transformers.__version__ in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _still_plain(model, batch, before):
    """After the error and remove(), the model answers exactly as before it was patched."""
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, before)


def test_read_takes_either_name_and_write_keeps_the_callers():
    c = DynamicCache()
    assert compat.read({"cache": c}, "cache") is c
    assert compat.read({"past_key_values": c}, "cache") is c
    assert compat.find_cache({"attention_mask": None}, "x") is None
    kw = {"past_key_values": None}
    compat.write(kw, "cache", c)
    assert kw == {"past_key_values": c}
    kw = {}
    compat.write(kw, "cache", c)
    assert kw == {compat.ROLES["cache"][0]: c}


def test_a_cache_under_an_unknown_name_raises():
    _raises(lambda: compat.find_cache({"kv_store": DynamicCache()}, "Somewhere.forward"), "kv_store", "Somewhere")


def test_cache_kwarg_is_the_one_this_release_takes(family):
    model = tiny(family)
    import inspect

    name = compat.cache_kwarg(model)
    assert name in inspect.signature(model.forward).parameters
    batch = make_batch(family, model, (1,))
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad():
        out = model(**batch.inputs, **compat.with_cache(model, cache), use_cache=True)
    assert compat.output_cache(out) is cache and cache.get_seq_length() == batch.inputs["input_ids"].shape[1]


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("method", [("fastv", {"layer": 1}), ("plphp", {"start_layer": 1}), ("record", {})])
def test_a_renamed_cache_kwarg_raises(fam, method, monkeypatch):
    """The 5.24 failure: the cache arrives under a name vlmplug does not know. Before, every decode step ran as
    a fresh prefill and FastV reported '0% saved'; now the first forward names the argument."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    with torch.no_grad():
        before = model(**batch.inputs).logits
    real_name = compat.cache_kwarg(model)  # what this release passes
    unknown = "kv_cache_of_a_future_release"
    monkeypatch.setitem(compat.ROLES, "cache", (unknown,))
    with vlmplug.apply(model, method[0], **method[1]), torch.no_grad():
        msg = _raises(lambda: model.generate(**batch.inputs, **GEN), "KV cache")
    assert f"`{real_name}`" in msg
    _still_plain(model, batch, before)


@pytest.mark.parametrize("fam", FAMS)
def test_a_cache_read_as_absent_is_caught_by_the_phase_check(fam, monkeypatch):
    """Second line of defence: even if the cache lookup silently returns nothing, the backend sees cached keys in
    what was taken for a prefill and raises before any method acts on the wrong tokens."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    monkeypatch.setattr(compat, "find_cache", lambda kwargs, where: None)
    monkeypatch.setattr(compat, "read", lambda kwargs, role: None if role == "cache" else kwargs.get(role))
    with vlmplug.apply(model, "record"), torch.no_grad():
        _raises(lambda: model.generate(**batch.inputs, **GEN), "prefill", "cached tokens")


@pytest.mark.parametrize("fam", FAMS)
def test_dropping_method_whose_drop_hook_misses_raises(fam, monkeypatch):
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 1))
    with torch.no_grad():
        before = model(**batch.inputs).logits
    monkeypatch.setattr(drop_mod, "_make_hook", lambda *a, **k: (lambda module, args, kwargs: None))
    with vlmplug.apply(model, "fastv", layer=1, keep_ratio=0.5), torch.no_grad():
        _raises(lambda: model(**batch.inputs), "fastv", "decoder layer 1")
    _still_plain(model, batch, before)


@pytest.mark.parametrize("fam", FAMS)
def test_vision_side_method_whose_feature_hook_misses_raises(fam, monkeypatch):
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    from vlmplug.runtime.features import FeatureInterceptor

    monkeypatch.setattr(FeatureInterceptor, "apply", lambda self: setattr(self, "_out", None))
    with vlmplug.apply(model, "visionzip", keep_tokens=2), torch.no_grad():
        _raises(lambda: model.generate(**batch.inputs, **GEN), "visionzip", "chose no tokens")


@pytest.mark.parametrize("fam", FAMS)
def test_kv_pruning_method_whose_hook_misses_raises(fam, monkeypatch):
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    monkeypatch.setattr(kv_mod, "_make_hook", lambda session, li: (lambda module, args, kwargs, output: None))
    with vlmplug.apply(model, "plphp", start_layer=1), torch.no_grad():
        msg = _raises(lambda: model.generate(**batch.inputs, **GEN), "plphp", "KV cache of decoder layers")
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    assert str(list(range(1, n))) in msg


@pytest.mark.parametrize("fam", FAMS)
def test_kv_pruning_layer_that_gets_no_cache_while_the_model_has_one_raises(fam, monkeypatch):
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    real_find = compat.find_cache
    monkeypatch.setattr(compat, "find_cache",
                        lambda kwargs, where: None if where.startswith("the attention") else real_find(kwargs, where))
    with vlmplug.apply(model, "plphp", start_layer=1), torch.no_grad():
        _raises(lambda: model.generate(**batch.inputs, **GEN), "got no KV cache")


@pytest.mark.parametrize("fam", FAMS)
def test_record_whose_probes_never_run_raises(fam):
    """The backend is called but a kernel ignores the plan (as if an edit path were bypassed): record says which
    layers it expected."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    with vlmplug.apply(model, "record", layers=[0, -1]) as h, torch.no_grad():
        h.session.kernel = lambda module, q, k, v, mask, scaling, kw, plan: sdpa_attention_forward(
            module, q, k, v, mask, scaling=scaling)[0]
        n = model.config.get_text_config(decoder=True).num_hidden_layers
        _raises(lambda: model(**batch.inputs), "record expected attention maps", str([0, n - 1]))


@pytest.mark.parametrize("fam", FAMS)
def test_attention_that_stops_dispatching_to_vlmplug_raises(fam):
    """If transformers stopped reading the attention implementation where vlmplug sets it, no edit or probe would
    run; the forward says so instead of answering unpatched."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        h.session.adapter.text_config._attn_implementation_internal = "sdpa"
        _raises(lambda: model(**batch.inputs), "did not run through vlmplug's attention function", "record")



def test_loaders_opt_out_of_hub_kernels():
    """transformers 5.25 kernelizes at load by default (needs the `kernels` package, fetches hub kernels): vlmplug's
    loaders pass use_kernels=False unless the caller asks otherwise."""
    from vlmplug.compat import load_kwargs
    from vlmplug.world import load_world

    assert load_kwargs() == {"use_kernels": False}
    assert load_kwargs(use_kernels=True, dtype="x") == {"use_kernels": True, "dtype": "x"}
    model, _ = load_world()
    assert not getattr(model, "use_kernels", False)

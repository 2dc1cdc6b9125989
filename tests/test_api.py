"""Public API: registries, errors that name what to do, no silent stacking, light import."""
import dataclasses
import subprocess
import sys

import pytest
import torch

import vlmplug
from conftest import tiny
from vlmplug.testing.tiny import make_batch


def test_registries():
    assert "record" in vlmplug.available_methods()
    assert set(vlmplug.supported_models()) >= {
        "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "internvl"
    }


def test_unsupported_model_patches_nothing():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    impl = m.config._attn_implementation
    with pytest.raises(vlmplug.UnsupportedModelError, match="llama.*Supported"):
        vlmplug.apply(m, "record")
    assert m.config._attn_implementation == impl and "_vlmplug_handle" not in vars(m)


def test_unknown_method_and_bad_params_name_the_allowed_values():
    model = tiny("llava")
    with pytest.raises(vlmplug.MethodConfigError, match="unknown method 'fastvv'.*record"):
        vlmplug.apply(model, "fastvv")
    with pytest.raises(vlmplug.MethodConfigError, match=r"unknown parameter.*\['layers', 'queries'\]"):
        vlmplug.apply(model, "record", layer=[0])
    with pytest.raises(vlmplug.MethodConfigError, match="queries='first'"):
        vlmplug.apply(model, "record", queries="first")
    with pytest.raises(vlmplug.MethodConfigError, match=r"layers=\(7,\) names \[7\]; this model has decoder layers 0..1"):
        vlmplug.apply(model, "record", layers=[7])
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert "_vlmplug_handle" not in vars(model)


def test_no_silent_stacking_and_explicit_replace():
    model = tiny("qwen2_vl")
    h = vlmplug.apply(model, "record", layers=[0])
    try:
        with pytest.raises(vlmplug.AlreadyAppliedError, match="replace=True"):
            vlmplug.apply(model, "record")
        h2 = vlmplug.apply(model, vlmplug.Record(layers=[1]), replace=True)
        assert not h.active and h2.active
        batch = make_batch("qwen2_vl", model, (1,))
        with torch.no_grad():
            model(**batch.inputs)
        assert h2.method("record").recorded_layers == [1]
        # one pre-hook on the base model, not two
        assert len(model.base_model._forward_pre_hooks) == 1
        h2.remove()
    finally:
        h.remove()
    assert len(model.base_model._forward_pre_hooks) == 0


def test_objects_compose_and_duplicates_are_rejected():
    model = tiny("llava")
    with pytest.raises(vlmplug.MethodConfigError, match="twice"):
        vlmplug.apply(model, [vlmplug.Record(), vlmplug.Record()])
    with pytest.raises(vlmplug.MethodConfigError, match="single method name"):
        vlmplug.apply(model, [vlmplug.Record()], layers=[0])


def test_image_free_forward_is_skipped_not_crashed(family):
    model = tiny(family)
    batch = make_batch(family, model, (0, 0))
    with vlmplug.apply(model, "record") as h, torch.no_grad():
        model(**batch.inputs)
        assert h.image_attention() == []
        assert h.stats["images_per_sample"] == [0, 0]


def test_stats_and_repr():
    model = tiny("gemma3")
    batch = make_batch("gemma3", model, (2,))
    with vlmplug.apply(model, "record", layers=[1]) as h, torch.no_grad():
        model(**batch.inputs)
        s = h.stats
        assert s["images_per_sample"] == [2] and s["record"]["recorded_layers"] == [1]
        assert "record" in repr(h) and "active" in repr(h)
    assert "removed" in repr(h)


def test_import_is_light():
    code = "import sys, vlmplug; bad = [m for m in ('gradio', 'bitsandbytes', 'lmms_eval', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_every_config_is_exported_and_round_trips():
    from vlmplug.registry import method_registry

    for name, cls in method_registry().items():
        assert getattr(vlmplug, cls.__name__) is cls and cls.__name__ in vlmplug.__all__, name
        cfg = cls()
        assert vlmplug.MethodConfig.from_dict(cfg.to_dict()) == cfg and cls.from_dict(cfg.to_dict()) == cfg
        assert repr(cfg).startswith(cls.__name__ + "(")
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.keep_ratio = 0.1  # configs are data: frozen
    assert vlmplug.FastV(keep_ratio=0.5).replace(keep_tokens=3) == vlmplug.FastV(keep_tokens=3)
    with pytest.raises(vlmplug.MethodConfigError, match="use MethodConfig.from_dict"):
        vlmplug.FastV.from_dict({"method": "record"})


def test_registry_refuses_a_taken_name():
    from vlmplug.registry import method_registry, register_method

    method_registry()

    with pytest.raises(ValueError, match="'fastv' is taken by vlmplug.methods.pruning.fastv.FastV"):
        @register_method("fastv")
        @dataclasses.dataclass(frozen=True)
        class Other(vlmplug.MethodConfig):
            pass
    assert method_registry()["fastv"] is vlmplug.FastV


VISION_SIDE = {"visionzip": {}, "hiprune": dict(object_layer=0), "flowcut": {}, "cluster": {}, "random": {}, "pool": {}}


@pytest.mark.parametrize("method", list(VISION_SIDE))
@pytest.mark.parametrize("fam", ["llava", "llava_next", "qwen2_vl", "idefics3", "gemma3", "internvl"])
def test_remove_restores_the_vision_towers_attention(fam, method):
    """Each vision-side method: the vision tower's attention implementation (its config and the config every vision
    attention module reads) is what it was before apply() once the handle is removed. Methods that score vision
    attention switch it to vlmplug's while applied (so the check is not vacuous); the others never switch it."""
    from vlmplug.adapters import get_adapter

    model = tiny(fam)
    ad = get_adapter(model)
    vcfg = getattr(model.config, ad.vision_config_key)

    def impls():
        return [vcfg._attn_implementation] + [m.config._attn_implementation for m in ad.vision_attention_modules()]

    before, text_before = impls(), model.config.get_text_config()._attn_implementation
    assert set(before) == {"sdpa"}
    batch = make_batch(fam, model, (1,))
    with vlmplug.apply(model, method, keep_tokens=2, **VISION_SIDE[method]) as h, torch.no_grad():
        model.generate(**batch.inputs, max_new_tokens=1, do_sample=False)
        during = impls()
        scores_vision = h.method(method).needs_vision_attention
    assert set(during) == ({"vlmplug"} if scores_vision else {"sdpa"}), during
    assert impls() == before, "remove() left the vision tower's attention implementation switched"
    assert model.config.get_text_config()._attn_implementation == text_before
    assert "_vlmplug_handle" not in vars(model)


def test_remove_keeps_an_instance_attribute_set_before_apply():
    """A user's own wrapper of `get_image_features`, set on the instance before apply(), is there again after remove()
    (vlmplug wraps the instance's method and used to delete the instance attribute on undo, dropping the user's)."""
    model = tiny("llava")
    base = model.base_model
    assert "get_image_features" not in vars(base)
    orig = base.get_image_features
    calls = []

    def user_wrapper(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    base.get_image_features = user_wrapper
    try:
        batch = make_batch("llava", model, (1,))
        with vlmplug.apply(model, "visionzip", keep_tokens=2), torch.no_grad():
            model(**batch.inputs)
        assert calls, "vlmplug's wrapper calls the user's"
        assert vars(base).get("get_image_features") is user_wrapper, "remove() dropped the user's instance attribute"
    finally:
        del base.get_image_features
    assert "get_image_features" not in vars(base)

"""vlmplug on models spread over devices by accelerate (`device_map`, CPU + disk offload) and with offloading KV caches.

A tiny model (LLaVA, Qwen2-VL, Gemma 3) is saved with `save_pretrained` and loaded back with `device_map="auto"`, a
`max_memory` small enough that decoder layers go to "disk" (`offload_folder`): accelerate then wraps every module's
forward and hangs an `AlignDevicesHook` on it (`_hf_hook`); the disk-offloaded modules hold meta parameters that the
hook loads for each call. Layouts (LAYOUTS): decoder layers split over "cpu" and "disk" (LLaVA, Qwen2-VL; Gemma 3's
stay together, all on "disk"), and LLaVA with its whole language model on "disk", embeddings and lm_head included
(VAR's sink-dimension calibration read the meta embedding weight there and failed at apply() before the fix in
vlmplug/methods/attention/var.py). Checked for every registered method:

1. identity parameters give the offloaded unpatched model's outputs, bit for bit (forward and generate());
2. active parameters act on the offloaded model exactly as on the same model loaded without offload (same logits,
   tokens, stats and results, bit for bit: the weights are the same float32 tensors), with the budgets the method
   states (tokens kept per image, the KV cache of the cut layers shortened); `record`'s maps equal the plain model's;
3. `remove()` restores the model exactly and leaves accelerate's own patching as it was: the same `_hf_hook` objects
   on the same modules, the same forward wrappers, the same hook dicts;
4. offloading KV caches (`DynamicCache(offloading=True)`, which `generate(cache_implementation="offloaded")`
   builds): layer 0 cannot be padded back after a pre-LLM cut, so the six pre-LLM methods hide the dropped tokens
   in layer 0 instead (README, "What is there") with the padded path's tokens; a one-layer model has no layer to
   fall back to and gets a clear `MethodConfigError`. transformers' offloaded cache synchronises CUDA streams in
   `Cache.update`, so on a CPU-only torch `cache_implementation="offloaded"` fails inside transformers, with or
   without vlmplug (checked to fail the same way); the layout itself is exercised on CPU by a cache that is that
   class with the stream calls left out (`_CpuOffloadingCache`).

`_snapshot` here avoids `state_dict()`: with bitsandbytes 0.50.2 on a CPU with AVX512-BF16, `state_dict()` of a 4-bit
layer that has already run unpacks its weight for saving and leaves the quantisation state altered, so the next
forward gives different logits (tests/test_quantized.py shares this snapshot).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import vlmplug
from conftest import tiny
from vlmplug.compat import load_kwargs, output_cache, with_cache
from vlmplug.errors import MethodConfigError
from vlmplug.registry import method_registry
from vlmplug.testing import tiny as tiny_mod
from vlmplug.testing.tiny import build_tiny_model, make_batch, text_decoder_layers

METHODS = vlmplug.available_methods()
NEW = 3  # generated tokens
GEN = dict(max_new_tokens=NEW, do_sample=False)
GEN_OUT = dict(GEN, output_logits=True, return_dict_in_generate=True)

# Per method: (identity parameters, active parameters) on the tiny models (2 decoder layers, 2 vision layers).
# Kept here, not read from tests/test_contract.py's CONTRACT, so a budget asserted below is visible next to the
# parameters that set it; a method registered later fails test_every_method_has_parameters until it is added.
PARAMS: dict[str, tuple[dict, dict]] = {
    "record": ({}, {}),
    "fastv": (dict(layer=1, keep_ratio=1.0), dict(layer=1, keep_tokens=2)),
    # delta 0: every pruned layer keeps exactly keep_tokens (otherwise vision-attentive layers keep delta more)
    "plphp": (dict(start_layer=1, keep_ratio=1.0, delta=0.0), dict(start_layer=1, keep_tokens=2, delta=0.0)),
    "visionzip": (dict(keep_ratio=1.0), dict(keep_tokens=2, dominant_share=0.5)),
    "hiprune": (dict(keep_ratio=1.0, object_layer=0), dict(keep_tokens=3, object_layer=0, alpha=1.0)),
    "flowcut": (dict(keep_ratio=1.0), dict(keep_tokens=2)),
    "cluster": (dict(keep_ratio=1.0), dict(keep_tokens=2)),
    "random": (dict(keep_ratio=1.0), dict(keep_tokens=2, seed=1)),
    "pool": (dict(keep_ratio=1.0), dict(keep_tokens=2)),
    "pai": (dict(alpha=0.0, layers="1:", gamma=1.0), dict(alpha=0.5, layers="1:", gamma=1.0)),
    "var": (dict(p=1.0, layers="0:"), dict(tau=1.0, summ=0.0, layers="0:")),
    "act": (dict(beta=1.0, layers="0:"), dict(layers="0:", threshold=0.02)),
    "modpai": (dict(alpha=0.0, beta=0.0, layers="0:", gamma=1.0), dict(layers="0:", gamma=1.0, local_ratio=0.5)),
    "vhr": (dict(alpha=1.0, layers="0:"), dict(layers="0:")),
}
PRE_LLM = ("visionzip", "hiprune", "flowcut", "cluster", "random", "pool")  # select before the LLM (README)


@pytest.fixture(autouse=True, scope="module")
def _own_var_cache(tmp_path_factory):
    """VAR caches calibrated sink dimensions on disk per model path: keep these tmp paths out of ~/.cache/vlmplug."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMPLUG_CACHE", str(tmp_path_factory.mktemp("vlmplug-cache")))
        yield


def params(method: str, kind: str) -> dict:
    if method not in PARAMS:
        pytest.fail(f"method {method!r} is registered but {__file__} has no PARAMS[{method!r}] = (identity, active)")
    return dict(PARAMS[method][0 if kind == "identity" else 1])


# --------------------------------------------------------------------------------------------------------------------
# Snapshot of everything apply() may touch, without state_dict() (see the module docstring); shared with
# tests/test_quantized.py.
# --------------------------------------------------------------------------------------------------------------------
from test_contract import _HOOK_DICTS, _configs  # noqa: E402 - one definition of what a snapshot covers


def _copy(t: torch.Tensor):
    """A tensor's value; meta tensors (offloaded weights) by shape and dtype."""
    t = t.detach()
    return ("meta", tuple(t.shape), t.dtype) if t.device.type == "meta" else t.clone()


def _tensors(model) -> dict:
    """Parameters and buffers, and the tensors quantised parameters carry beside their data (bitsandbytes 4-bit:
    `quant_state.absmax`, ...; 8-bit: `SCB`)."""
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = _copy(p)
        for k, v in vars(p).items():
            if isinstance(v, torch.Tensor):
                out[f"{name}:{k}"] = _copy(v)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for k, v in vars(qs).items():
                if isinstance(v, torch.Tensor):
                    out[f"{name}:quant_state.{k}"] = _copy(v)
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            out[f"buffer:{name}"] = _copy(b)
    return out


def _accelerate_state(model) -> dict:
    """accelerate's patching, by identity: each module's `_hf_hook` and the forward wrapper around the original."""
    out = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        hook = mod.__dict__.get("_hf_hook")
        if hook is None:
            continue
        sub = [id(h) for h in getattr(hook, "hooks", ())]  # SequentialHook
        out[name] = (id(hook), type(hook).__name__, sub, id(mod.__dict__.get("forward")),
                     id(mod.__dict__.get("_old_forward")), id(getattr(hook, "weights_map", None)),
                     getattr(hook, "offload", None), str(getattr(hook, "execution_device", None)))
    return out


def _snapshot(model) -> dict:
    import torch.nn.modules.module as mm

    mods = list(model.named_modules(remove_duplicate=False))
    return {
        "tensors": _tensors(model),
        "attn": [(id(c), getattr(c, "_attn_implementation_internal", "<none>")) for c in _configs(model)],
        "config": model.config.to_dict(),
        "generation_config": model.generation_config.to_dict(),
        # the hooks themselves (their ids), not only how many
        "hooks": {name: tuple(tuple(getattr(mod, d, {}) or {}) for d in _HOOK_DICTS) for name, mod in mods},
        # callables by identity (a wrapped method put back in place of the original); data attributes by name only
        "attrs": {name: {k: id(v) if callable(v) else None for k, v in vars(mod).items()} for name, mod in mods},
        "classes": {cls: {k: v for k, v in vars(cls).items() if callable(v) or hasattr(v, "__get__")}
                    for cls in {type(mod) for _, mod in mods}},
        "global_hooks": tuple(len(getattr(mm, n)) for n in dir(mm) if n.startswith("_global_") and n.endswith("hooks")),
        "accelerate": _accelerate_state(model),
        "handle": "_vlmplug_handle" in vars(model),
    }


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _assert_restored(model, before: dict) -> None:
    after = _snapshot(model)
    assert not after["handle"], "_vlmplug_handle left on the model"
    assert after["tensors"].keys() == before["tensors"].keys(), "parameters / buffers / quantisation state changed"
    changed = [k for k, v in before["tensors"].items() if not _same_value(v, after["tensors"][k])]
    assert not changed, f"tensors changed: {changed[:5]}"
    assert after["attn"] == before["attn"], "a (sub-)config's _attn_implementation_internal was not restored"
    assert after["config"] == before["config"], "model.config changed"
    assert after["generation_config"] == before["generation_config"], "generation_config changed"
    hooks = {k: (before["hooks"][k], v) for k, v in after["hooks"].items() if before["hooks"].get(k) != v}
    assert not hooks, f"hooks {_HOOK_DICTS} changed (before, after): {dict(list(hooks.items())[:3])}"
    assert after["accelerate"] == before["accelerate"], "accelerate's hooks or forward wrappers changed"
    for name, attrs in after["attrs"].items():
        old = before["attrs"][name]
        assert attrs.keys() == old.keys(), (
            f"module {name or '<model>'!r}: attributes added {sorted(attrs.keys() - old.keys())}, "
            f"removed {sorted(old.keys() - attrs.keys())}")
        swapped = [k for k in attrs if attrs[k] != old[k]]
        assert not swapped, f"module {name or '<model>'!r}: attributes replaced: {swapped}"
    for cls, d in after["classes"].items():
        old = before["classes"][cls]
        bad = sorted(k for k in d.keys() | old.keys() if d.get(k, None) is not old.get(k, None))
        assert not bad, f"class {cls.__name__}: attributes patched and not restored: {bad}"
    assert after["global_hooks"] == before["global_hooks"], "torch global module hooks changed"


def _same(a, b) -> bool:
    """Structural equality of stats / results (tensors bit-equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) or hasattr(a, "__dict__"):
        return _same(vars(a), vars(b))
    return a == b


# --------------------------------------------------------------------------------------------------------------------
# What a method must have done (shared with tests/test_quantized.py)
# --------------------------------------------------------------------------------------------------------------------
def expected_kept(config, n: int) -> int:
    """Image tokens a pruning config keeps of an image with n tokens (one image per sample)."""
    if getattr(config, "keep_tokens", None) is not None:
        return min(n, int(config.keep_tokens))
    return min(n, int(round(n * config.keep_ratio)))


def check_budget(handle, method: str, generated, prompt_len: int) -> None:
    """A pruning method kept its budget in the last prefill: stats per image, and the KV cache generate() returned
    (layers from the cut on hold the kept prompt tokens; the last generated token was never fed back)."""
    runner = handle.method(method)
    if runner.drop_layer is None and not runner.kv_prune_layers:
        return
    st = handle.stats[method]
    lay, state = handle.layout, handle.session.state
    n_img = [[int(im.positions.numel()) for im in s.images] for s in lay.samples]
    want = [[expected_kept(runner.config, n) for n in row] for row in n_img]
    assert all(len(row) == 1 for row in n_img), "these checks assume one image per sample"
    drop = [row[0] - w[0] for row, w in zip(n_img, want)]
    assert len(set(drop)) == 1, "these checks assume every sample drops the same number of tokens"
    cache = output_cache(generated)
    assert cache is not None, "generate() returned no KV cache"
    lens = [int(layer.get_seq_length()) for layer in cache.layers]  # (quantized layers keep `keys` empty)
    types = getattr(handle.session.adapter.text_config, "layer_types", None) or ["full_attention"] * len(lens)
    full = prompt_len + NEW - 1
    if runner.drop_layer is not None:
        assert st["tokens_kept_per_image"] == want, (st["tokens_kept_per_image"], want)
        cut = state.cache_cut
        assert cut is not None
        for li, n in enumerate(lens):
            if types[li] == "sliding_attention":
                continue  # holds its window only
            assert n == (full - drop[0] if li >= cut else full), (li, cut, lens, drop)
    else:  # KV pruning after prefill (PLPHP): per layer, per head
        kept = st["image_tokens_kept_per_layer"]
        assert sorted(kept) == [li % len(lens) for li in runner.kv_prune_layers]
        for li in kept:
            assert kept[li] == [w[0] for w in want], (li, kept[li], want)
            assert lens[li] == full - drop[0], (li, lens, drop)


def acts(runner) -> bool:
    return runner.drop_layer is not None or bool(runner.kv_prune_layers)


# --------------------------------------------------------------------------------------------------------------------
# Offloaded models
# --------------------------------------------------------------------------------------------------------------------
_SAVED: dict = {}
_OFFLOADED: dict = {}
_REF: dict = {}


def _module_names(model) -> dict:
    return {id(m): n for n, m in model.named_modules()}


def placement(model, module_name: str) -> str:
    """Where accelerate put a module (the longest `hf_device_map` entry that contains it)."""
    dm = model.hf_device_map
    best = max((k for k in dm if k == "" or module_name == k or module_name.startswith(k + ".")), key=len)
    return str(dm[best])


def _decoder_placements(model) -> list[str]:
    names = _module_names(model)
    return [placement(model, names[id(layer)]) for layer in text_decoder_layers(model)]


# layout -> (family, what the CPU budget must achieve)
LAYOUTS = {
    "llava": ("llava", "split"),
    "qwen2_vl": ("qwen2_vl", "split"),
    "gemma3": ("gemma3", "split"),
    # the whole language model on disk (embeddings and lm_head too): calibration passes and input devices go
    # through accelerate's hooks (VAR read the meta embedding weight before the fix in methods/attention/var.py)
    "llava-lm-on-disk": ("llava", "lm-on-disk"),
}


def _wanted(model, goal: str) -> bool | None:
    """True: this placement is the goal; None: acceptable if nothing better comes (Gemma 3's split)."""
    where = _decoder_placements(model)
    if goal == "lm-on-disk":
        names = _module_names(model)
        return placement(model, names[id(model.get_input_embeddings())]) == "disk" and set(where) == {"disk"} \
            and "cpu" in model.hf_device_map.values()
    if "cpu" in where and "disk" in where:
        return True
    return None if "disk" in where and "cpu" in model.hf_device_map.values() else False


def offloaded(layout: str, tmp_path_factory):
    """The tiny model of the layout's family, saved and loaded back with device_map="auto", an `offload_folder` and a
    CPU budget (`max_memory`, in 2% steps of the model's size, the smallest that works) that sends decoder layers to
    "disk": "split" leaves one decoder layer on "cpu" and one on "disk" where accelerate splits them (LLaVA, Qwen2-VL),
    else the largest budget that still sends them (Gemma 3: its decoder layers stay together, all on "disk", the rest
    on "cpu"); "lm-on-disk" sends the whole language model. Returns (model, batch, family), warmed up unpatched."""
    if layout not in _OFFLOADED:
        family, goal = LAYOUTS[layout]
        plain = tiny(family)
        if family not in _SAVED:  # a copy of the same weights (save_pretrained writes config.architectures)
            _SAVED[family] = tmp_path_factory.mktemp(f"{family}-saved")
            build_tiny_model(family).save_pretrained(_SAVED[family])
        total = sum(p.numel() * p.element_size() for p in plain.parameters())
        tried, model, fallback = [], None, None
        for pct in range(80 if goal == "split" else 50, 200, 2):  # below 80%: whole language models on disk
            m = type(plain).from_pretrained(
                _SAVED[family], device_map="auto", max_memory={"cpu": total * pct // 100},
                offload_folder=str(tmp_path_factory.mktemp(f"{family}-offload")), dtype=torch.float32,
                attn_implementation="sdpa", **load_kwargs())
            if getattr(m, "hf_device_map", None) is None:  # everything fits on the CPU: no offload
                break
            ok = _wanted(m, goal)
            tried.append((pct, m.hf_device_map))
            if ok:
                model = m
                break
            if ok is None:
                fallback = m
        model = model if model is not None else fallback
        assert model is not None, f"no CPU budget gave {layout!r}: {tried}"
        model.eval()
        batch = make_batch(family, plain, (1, 1))
        with torch.no_grad():  # warm-up: transformers / accelerate install some state lazily at the first forward
            model.generate(**batch.inputs, **GEN)
        _OFFLOADED[layout] = (model, batch, family)
    model, batch, family = _OFFLOADED[layout]
    h = model.__dict__.get("_vlmplug_handle")
    if h is not None:  # a failed test left a patch
        h.remove()
    return model, batch, family


def _unpatched(layout: str, model, batch):
    if layout not in _REF:
        with torch.no_grad():
            _REF[layout] = (model(**batch.inputs).logits, model.generate(**batch.inputs, **GEN_OUT))
    return _REF[layout]


def test_every_method_has_parameters():
    missing = sorted(set(METHODS) - set(PARAMS))
    assert not missing, f"add PARAMS entries for {missing}"
    for m in METHODS:
        for kind in ("identity", "active"):
            method_registry()[m].from_params(**params(m, kind))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_model_is_really_offloaded(layout, tmp_path_factory):
    """Decoder layers on "disk" (and on "cpu" where accelerate splits them), the rest on "cpu", meta weights behind
    accelerate's hooks, the plain model's outputs."""
    model, batch, family = offloaded(layout, tmp_path_factory)
    where = _decoder_placements(model)
    assert "disk" in where and "cpu" in model.hf_device_map.values(), model.hf_device_map
    if layout in ("llava", "qwen2_vl"):
        assert "cpu" in where, where
    if layout == "llava-lm-on-disk":
        assert model.get_input_embeddings().weight.device.type == "meta"
    names = _module_names(model)
    on_disk = [layer for layer, w in zip(text_decoder_layers(model), where) if w == "disk"]
    for layer in on_disk:
        hooked = [m for m in layer.modules() if getattr(m, "_hf_hook", None) is not None and m._hf_hook.offload]
        assert hooked, f"{names[id(layer)]}: no offloading AlignDevicesHook"
        assert type(hooked[0]._hf_hook).__name__ == "AlignDevicesHook"
        assert all(p.device.type == "meta" for p in layer.parameters()), "disk-offloaded weights should be meta"
    assert "forward" in vars(model) and getattr(model, "_hf_hook", None) is not None
    ref, gref = _unpatched(layout, model, batch)
    with torch.no_grad():
        plain = tiny(family)
        assert torch.equal(ref, plain(**batch.inputs).logits)
        assert torch.equal(gref.sequences, plain.generate(**batch.inputs, **GEN))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_parameters_equal_the_offloaded_model(method, layout, tmp_path_factory):
    model, batch, _ = offloaded(layout, tmp_path_factory)
    ref, gref = _unpatched(layout, model, batch)
    real = batch.inputs["attention_mask"].bool()
    with vlmplug.apply(model, method, **params(method, "identity")), torch.no_grad():
        out = model(**batch.inputs).logits
        g = model.generate(**batch.inputs, **GEN_OUT)
    assert torch.equal(out[real], ref[real]), f"forward: max diff {(out[real] - ref[real]).abs().max().item():.3g}"
    assert torch.equal(g.sequences, gref.sequences)
    for i, (a, b) in enumerate(zip(g.logits, gref.logits)):
        assert torch.equal(a, b), f"generate step {i}: max diff {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_methods_act_as_on_the_plain_model_and_remove_keeps_accelerate_hooks(method, layout, tmp_path_factory):
    model, batch, family = offloaded(layout, tmp_path_factory)
    ref, gref = _unpatched(layout, model, batch)
    plain = tiny(family)
    cfg = method_registry()[method].from_params(**params(method, "active"))
    L = batch.inputs["input_ids"].shape[1]
    before = _snapshot(model)

    with vlmplug.apply(plain, cfg) as hp, torch.no_grad():
        p_out = plain(**batch.inputs).logits
        p_gen = plain.generate(**batch.inputs, **GEN_OUT)
        p_stats, p_res = copy.deepcopy(hp.stats), copy.deepcopy(hp.result(method))

    with vlmplug.apply(model, cfg) as h, torch.no_grad():
        out = model(**batch.inputs).logits
        gen = model.generate(**batch.inputs, **GEN_OUT)
        stats, res = copy.deepcopy(h.stats), copy.deepcopy(h.result(method))
        check_budget(h, method, gen, L)
        if acts(h.method(method)):
            assert stats["phase"] == "decode"

    assert torch.equal(out, p_out), f"forward differs from the plain model by {(out - p_out).abs().max().item():.3g}"
    assert torch.equal(gen.sequences, p_gen.sequences)
    for i, (a, b) in enumerate(zip(gen.logits, p_gen.logits)):
        assert torch.equal(a, b), f"generate step {i}: differs from the plain model by {(a - b).abs().max().item():.3g}"
    assert _same(stats, p_stats), (stats, p_stats)
    assert _same(res, p_res), "the method's result differs from the plain model's"
    if method != "record":  # the active parameters change the logits (PLPHP: the decode steps' only)
        changed = not torch.equal(out, ref) or any(not torch.equal(a, b) for a, b in zip(gen.logits, gref.logits))
        assert changed, f"{method} with {params(method, 'active')} changed nothing"

    _assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, ref), "logits after remove() differ from before apply()"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_record_maps_equal_the_plain_models(layout, tmp_path_factory):
    model, batch, family = offloaded(layout, tmp_path_factory)
    plain = tiny(family)
    maps = {}
    for name, m in (("offloaded", model), ("plain", plain)):
        with vlmplug.apply(m, "record", queries="last") as h, torch.no_grad():
            m.generate(**batch.inputs, **GEN)
            maps[name] = (h.image_attention(), sorted(h.result("record").rows))
    (a, la), (b, lb) = maps["offloaded"], maps["plain"]
    n_layers = len(text_decoder_layers(model))
    assert la == lb == list(range(n_layers)), (la, lb)
    assert len(a) == len(b) == 2 and all(len(x) == 1 for x in a)
    for x, y in zip(a, b):
        assert x[0].shape[:2] == (n_layers, 4) and torch.isfinite(x[0]).all() and x[0].sum() > 0
        assert torch.equal(x[0], y[0])


def test_var_refuses_meta_embeddings_without_an_offload_hook():
    """VAR's calibration reads the input embeddings; meta weights that no accelerate hook holds (a model built on the
    meta device, never loaded) are refused at apply() with a VlmplugError, the model untouched."""
    model = build_tiny_model("llava")
    model.get_input_embeddings().to("meta")
    before = _snapshot(model)
    with pytest.raises(MethodConfigError, match="input embeddings are on the meta device"):
        vlmplug.apply(model, "var", layers="0:")
    _assert_restored(model, before)
    vlmplug.apply(model, "var", layers="0:", sink_dims=[0, 1]).remove()  # explicit sink dims need no calibration


# --------------------------------------------------------------------------------------------------------------------
# Offloading KV caches
# --------------------------------------------------------------------------------------------------------------------
def _cpu_offloading_cache(model):
    """transformers' offloading DynamicCache (what `cache_implementation="offloaded"` builds: `offloading=True`, each
    layer moved to "cpu" after its update) with the CUDA stream synchronisation of `Cache.update` left out, so it
    runs on a CPU-only torch."""
    from transformers import DynamicCache

    class _CpuOffloadingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.offloading = False  # transformers' update without its stream calls ...
            try:
                out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            finally:
                self.offloading = True
            self.offload(layer_idx, self.only_non_sliding)  # ... and its offload
            return out

    cache = _CpuOffloadingCache(config=model.config.get_text_config(decoder=True), offloading=True)
    assert cache.offloading
    return cache


def test_cache_implementation_offloaded_fails_alike_with_and_without_vlmplug():
    """On a CPU-only torch transformers' offloaded cache raises in `Cache.update` (it waits on CUDA streams); a patched
    model raises the same error and stays usable. Where it runs (a CUDA build), the identity run equals the unpatched
    model's and fastv keeps its budget through the offloaded cache."""
    model = tiny("llava")
    batch = make_batch("llava", model, (1, 1))
    gen = dict(GEN_OUT, cache_implementation="offloaded")
    err = None
    with torch.no_grad():
        try:
            ref = model.generate(**batch.inputs, **gen)
        except Exception as e:  # noqa: BLE001 - whatever transformers raises, vlmplug must raise the same
            err = e
    for method in ("fastv", "cluster"):
        for kind in ("identity", "active"):
            before = _snapshot(model)
            with vlmplug.apply(model, method, **params(method, kind)) as h, torch.no_grad():
                if err is not None:
                    with pytest.raises(type(err)) as got:
                        model.generate(**batch.inputs, **gen)
                    assert str(got.value) == str(err)
                    model.generate(**batch.inputs, **GEN)  # still usable with the default cache
                    continue
                out = model.generate(**batch.inputs, **gen)
                assert torch.equal(out.sequences, ref.sequences) or kind == "active"
                if kind == "active":
                    check_budget(h, method, out, batch.inputs["input_ids"].shape[1])
            _assert_restored(model, before)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", PRE_LLM)
def test_pre_llm_selection_on_an_offloading_cache_masks_layer_0(method, family):
    """Layer 0 of an offloading cache cannot be padded back to the prompt's length: the selection is hidden in layer 0
    (mask) and cut before layer 1. Same tokens as the padded path, logits within float32 rounding."""
    model = tiny(family)
    batch = make_batch(family, model, (1, 1))
    L = batch.inputs["input_ids"].shape[1]
    with vlmplug.apply(model, method, **params(method, "active")) as h, torch.no_grad():
        padded = model.generate(**batch.inputs, **GEN_OUT)
        assert (h.session.state.drop_layer, h.session.state.cache_cut) == (0, 1)
        kept_padded = h.stats[method]["tokens_kept_per_image"]
        cache = _cpu_offloading_cache(model)
        masked = model.generate(**batch.inputs, **GEN_OUT, **with_cache(model, cache))
        assert output_cache(masked) is cache and cache.offloading
        assert (h.session.state.drop_layer, h.session.state.cache_cut) == (1, 1), "expected the masked layer-0 fallback"
        assert all(layer.keys.device.type == "cpu" for layer in cache.layers)
        assert h.stats[method]["tokens_kept_per_image"] == kept_padded
        check_budget(h, method, masked, L)
    assert torch.equal(masked.sequences, padded.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(masked.logits, padded.logits))
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("method", ["fastv", "plphp", "pai", "record"])
def test_in_llm_methods_on_an_offloading_cache_equal_the_default_cache(method):
    """Methods that cut at layer >= 1, prune the KV cache or edit attention: the offloading cache changes nothing."""
    model = tiny("qwen2_vl")
    batch = make_batch("qwen2_vl", model, (1, 1))
    with vlmplug.apply(model, method, **params(method, "active")) as h, torch.no_grad():
        dflt = model.generate(**batch.inputs, **GEN_OUT)
        cache = _cpu_offloading_cache(model)
        off = model.generate(**batch.inputs, **GEN_OUT, **with_cache(model, cache))
        check_budget(h, method, off, batch.inputs["input_ids"].shape[1])
    assert torch.equal(off.sequences, dflt.sequences)
    for a, b in zip(off.logits, dflt.logits):
        assert torch.equal(a, b)


def _one_layer_llava():
    orig = tiny_mod.tiny_config

    def one_layer(family):
        cfg = orig(family)
        cfg.get_text_config().num_hidden_layers = 1
        return cfg

    tiny_mod.tiny_config = one_layer
    try:
        return build_tiny_model("llava")
    finally:
        tiny_mod.tiny_config = orig


def test_one_layer_model_with_an_offloading_cache_is_refused_clearly():
    """Pre-LLM selection needs a layer to cut before; a one-layer model on a cache whose layer 0 cannot be padded has
    none: a clear MethodConfigError naming the cache, and the patched model keeps working with the default cache."""
    model = _one_layer_llava()
    batch = make_batch("llava", model, (1, 1))
    with torch.no_grad():
        ref = model(**batch.inputs).logits
    before = _snapshot(model)
    with vlmplug.apply(model, "cluster", keep_tokens=2) as h, torch.no_grad():
        with pytest.raises(MethodConfigError, match="one-layer model needs a plain DynamicCache; got _CpuOffloading"):
            model.generate(**batch.inputs, **GEN, **with_cache(model, _cpu_offloading_cache(model)))
        out = model.generate(**batch.inputs, **GEN_OUT)  # the default cache: padded layer 0
        check_budget(h, "cluster", out, batch.inputs["input_ids"].shape[1])
    _assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, ref)

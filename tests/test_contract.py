"""The contract every registered method meets on every tiny family.

Parametrised over `vlmplug.available_methods()` x FAMILIES, both read at collection time: a method registered later
is covered automatically and FAILS here until CONTRACT below gives its parameters. Per combination:

1. apply -> generate -> remove restores the model exactly (weights, attention implementations, hooks, instance
   attributes, no handle left) and the unpatched logits afterwards are bit-equal to before;
2. identity parameters give the unpatched model's outputs (tokens equal, logits bit-equal; the few cases where the
   backend's own SDPA call differs in the last bits are listed in NOT_BIT_EQUAL with the reason);
3. active parameters: each sample of a left-padded batch gets what it gets alone;
4. one config object applied to two models: two independent runners; removing one leaves the other working;
5. `handle.stats` follows one schema (JSON, same top-level keys, the pruning keys with the right types);
6. invalid parameters raise a `VlmplugError` subclass and a refused apply leaves the model untouched.
Beyond one method: 7. two token-dropping methods composed are refused at apply() or work.
Bugs it found were fixed: NaN parameters passed range checks; two token-dropping methods composed silently.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import vlmplug
from conftest import tiny
from vlmplug.methods.base import Method, MethodConfig
from vlmplug.registry import method_registry
from vlmplug.testing.tiny import FAMILIES, build_tiny_model, make_batch, split_batch

# --------------------------------------------------------------------------------------------------------------------
# Per-method contract parameters (tiny text models have 2 decoder layers, tiny vision towers 2 layers;
# every layer index is 0-based).
#   active:         small budgets that make the method act (drop / merge / prune something) on every family
#   identity:       parameters under which the method must not change any output
#   invalid_config: each raises a VlmplugError when the config is constructed (and at apply)
#   invalid_model:  each is a valid config that apply() refuses for the tiny models (before patching)
#   refuses:        families apply() refuses on purpose, with the reason (the error contract is checked there)
# "unknown parameter" is checked for every method without being listed.
# --------------------------------------------------------------------------------------------------------------------
CONTRACT: dict[str, dict] = {
    "pai": dict(
        # the tiny text models have 2 layers (the default "2:" selects none); gamma=1: no CFG branch (test_pai.py)
        active=dict(alpha=0.5, layers="1:", gamma=1.0),
        identity=dict(alpha=0.0, layers="1:", gamma=1.0),
        invalid_config=[dict(alpha=-0.1), dict(alpha=float("inf")), dict(layers="x")],
        invalid_model=[dict(layers=[5]), dict(layers="2:")],
    ),
    # the attention methods' default layers ("2:", "2:-1") select none of the tiny models' 2 layers
    "var": dict(
        active=dict(tau=1.0, summ=0.0, layers="0:"),  # sink dims calibrated per model
        identity=dict(p=1.0, layers="0:"),  # code variant: keep all of the sink mass
        invalid_config=[dict(p=1.5), dict(variant="x"), dict(rho=-0.1), dict(sink_dims=[]), dict(tau=float("nan")),
                        dict(n_sink_dims=0)],
        invalid_model=[dict(layers=[5]), dict(layers="2:"), dict(sink_dims=[100_000], layers="0:")],
    ),
    "act": dict(
        active=dict(layers="0:", threshold=0.02),
        identity=dict(beta=1.0, layers="0:"),
        invalid_config=[dict(beta=1.5), dict(threshold=-1.0), dict(heads=[]), dict(heads={0: [-1]})],
        invalid_model=[dict(heads=[(0, 99)]), dict(layers=[5]), dict(layers="2:-1")],
    ),
    "modpai": dict(
        active=dict(layers="0:", gamma=1.0, local_ratio=0.5),  # gamma=1: no CFG branch (test_modpai.py)
        identity=dict(alpha=0.0, beta=0.0, layers="0:", gamma=1.0),
        invalid_config=[dict(alpha=-1.0), dict(heads="x"), dict(local_ratio=2.0), dict(gamma=0.5)],
        invalid_model=[dict(layers=[5])],
    ),
    "vhr": dict(
        active=dict(layers="0:"),
        identity=dict(alpha=1.0, layers="0:"),
        invalid_config=[dict(alpha=-1.0), dict(outlier_filter="yes"), dict(layers="x")],
        invalid_model=[dict(layers=[5])],
    ),
    "record": dict(
        active={},  # record never changes outputs: its "active" run is its identity run
        identity={},
        invalid_config=[dict(queries="first"), dict(queries=[]), dict(layers="x")],
        invalid_model=[dict(layers=[7])],
    ),
    "fastv": dict(
        active=dict(layer=1, keep_tokens=2),
        identity=dict(layer=1, keep_ratio=1.0),
        invalid_config=[dict(keep_ratio=2.0), dict(keep_ratio=0.5, keep_tokens=2), dict(layer=0),
                        dict(scores="first")],
        invalid_model=[dict(layer=5)],
    ),
    "plphp": dict(
        active=dict(start_layer=1, keep_tokens=2),
        identity=dict(start_layer=1, keep_ratio=1.0, delta=0.0),
        invalid_config=[dict(keep_ratio=2.0), dict(delta=-0.1), dict(alpha=0.1, beta=0.2), dict(start_layer=0)],
        invalid_model=[dict(start_layer=2)],
    ),
    "visionzip": dict(
        active=dict(keep_tokens=2, dominant_share=0.5),  # one dominant + one merged contextual token per image
        identity=dict(keep_ratio=1.0),
        invalid_config=[dict(keep_ratio=2.0), dict(keep_tokens=-1), dict(dominant_share=1.5)],
        invalid_model=[],
    ),
    "hiprune": dict(
        # object_layer is 0-based (the tiny vision towers have layers 0..1; 1 is also the deep / feature layer)
        active=dict(keep_tokens=3, object_layer=0, alpha=1.0),  # one anchor + its buffers
        identity=dict(keep_ratio=1.0, object_layer=0),
        invalid_config=[dict(keep_ratio=2.0), dict(object_layer=1.5), dict(object_layer=True), dict(alpha=2.0)],
        invalid_model=[dict(object_layer=2), dict(object_layer=-3)],
    ),
    "flowcut": dict(
        active=dict(keep_tokens=2),
        identity=dict(keep_ratio=1.0),
        invalid_config=[dict(keep_ratio=2.0), dict(decay=2.0)],
        invalid_model=[],
        refuses={"qwen2_5_vl": "windowed vision tower: no CLS / image-wide global token to score the flow"},
    ),
    "cluster": dict(
        active=dict(keep_tokens=2),
        identity=dict(keep_ratio=1.0),
        invalid_config=[dict(keep_ratio=2.0), dict(iters=-1), dict(keep_tokens=1.5)],
        invalid_model=[],
    ),
    "random": dict(
        active=dict(keep_tokens=2, seed=1),
        identity=dict(keep_ratio=1.0),
        invalid_config=[dict(keep_ratio=2.0), dict(keep_ratio=0.5, keep_tokens=2), dict(keep_tokens=-1),
                        dict(seed=-1), dict(seed=1.5), dict(seed=True)],
        invalid_model=[],
    ),
    "pool": dict(
        active=dict(keep_tokens=2),  # a 1x2 cell grid (or one token per view) per image
        identity=dict(keep_ratio=1.0),
        invalid_config=[dict(keep_ratio=2.0), dict(keep_ratio=0.5, keep_tokens=2), dict(keep_tokens=1.5)],
        invalid_model=[],
    ),
}

# Identity runs whose decode-step logits are not bit-equal to the unpatched model (but within 1e-5, with equal tokens);
# the prefill (the forward logits and generate's first step) stays bit-equal everywhere and is asserted so.
# (record's decode steps differed by ~1e-7 until a plan that only reads (probes, taps) ran transformers' own SDPA
# call; kept so a future exception is listed with its reason.)
NOT_BIT_EQUAL: dict[tuple[str, str], str] = {}  # record's decode steps were here until read-only plans ran
# transformers' own SDPA call (backend/kernels.py: LayerPlan.read_only)

# Known library bugs: (check, method, family) -> reason; the test is marked xfail(strict=True).
KNOWN_BUGS: dict[tuple[str, str, str], str] = {}

METHODS = vlmplug.available_methods()
COMBOS = [(m, f) for m in METHODS for f in FAMILIES]
GEN = dict(max_new_tokens=2, do_sample=False)
TOP_KEYS = {"forward_index", "phase", "images_per_sample"}
PRUNING_KEYS = {"tokens_kept_per_image": list, "tokens_per_layer": list, "kv_cache_bytes": int, "flops_saved": float}


def _combos(check: str):
    out = []
    for m, f in COMBOS:
        marks = []
        reason = KNOWN_BUGS.get((check, m, f))
        if reason:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        out.append(pytest.param(m, f, id=f"{m}-{f}", marks=marks))
    return out


def _spec(method: str) -> dict:
    spec = CONTRACT.get(method)
    if spec is None:
        pytest.fail(
            f"method {method!r} is registered but has no contract parameters: add CONTRACT[{method!r}] = dict(active=..., "
            f"identity=..., invalid_config=[...], invalid_model=[...], refuses={{family: reason}}) in {__file__}"
        )
    return spec


# --------------------------------------------------------------------------------------------------------------------
# Shared inputs (cheap, built once per family)
# --------------------------------------------------------------------------------------------------------------------
_BATCH: dict = {}
_SECOND: dict = {}


_WARM: set = set()


def _batch(family: str, model):
    """Left-padded: two samples with one image each and different text lengths (6 and 10 tokens).

    The model is warmed up once, unpatched: transformers installs some hooks lazily at the first forward (output
    recorders of LLaVA's / InternVL's vision towers), which must not be mistaken for hooks vlmplug left behind."""
    if family not in _BATCH:
        _BATCH[family] = make_batch(family, model, (1, 1))
    if id(model) not in _WARM:
        assert "_vlmplug_handle" not in vars(model)
        with torch.no_grad():
            model.generate(**_BATCH[family].inputs, **GEN)
        _WARM.add(id(model))
    return _BATCH[family]


def _second_model(family: str):
    """A second model of the family (same weights as `tiny(family)`, a different object)."""
    if family not in _SECOND:
        _SECOND[family] = build_tiny_model(family)
    m = _SECOND[family]
    h = m.__dict__.get("_vlmplug_handle")
    if h is not None:
        h.remove()
    return m


# --------------------------------------------------------------------------------------------------------------------
# Model snapshot: everything apply() may touch
# --------------------------------------------------------------------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _configs(model) -> list:
    seen, out, stack = set(), [], [model.config] + [getattr(m, "config", None) for m in model.modules()]
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen or not hasattr(c, "to_dict"):
            continue
        seen.add(id(c))
        out.append(c)
        for key in getattr(c, "sub_configs", {}) or {}:
            stack.append(getattr(c, key, None))
    return out


def _snapshot(model) -> dict:
    import torch.nn.modules.module as mm

    mods = list(model.named_modules(remove_duplicate=False))
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers(remove_duplicate=False) if v is not None},
        "attn": [(id(c), getattr(c, "_attn_implementation_internal", "<none>")) for c in _configs(model)],
        "config": model.config.to_dict(),
        "generation_config": model.generation_config.to_dict(),
        "hooks": {name: tuple(len(getattr(mod, d, {}) or {}) for d in _HOOK_DICTS) for name, mod in mods},
        # callables by identity (a wrapped method put back in place of the original); data attributes by name only
        # (transformers itself rebinds some during a forward, e.g. Qwen's rope_deltas)
        "attrs": {name: {k: id(v) if callable(v) else None for k, v in vars(mod).items()} for name, mod in mods},
        # methods and descriptors of the module classes (transformers caches plain data on them, e.g.
        # _can_set_attn_implementation_cached_value)
        "classes": {cls: {k: v for k, v in vars(cls).items() if callable(v) or hasattr(v, "__get__")}
                    for cls in {type(mod) for _, mod in mods}},
        "global_hooks": tuple(len(getattr(mm, n)) for n in dir(mm) if n.startswith("_global_") and n.endswith("hooks")),
        "handle": "_vlmplug_handle" in vars(model),
    }


def _assert_restored(model, before: dict) -> None:
    after = _snapshot(model)
    assert not after["handle"], "_vlmplug_handle left on the model"
    assert after["tensors"].keys() == before["tensors"].keys(), "state dict keys changed"
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed, f"state dict tensors changed: {changed[:5]}"
    assert after["buffers"].keys() == before["buffers"].keys(), "buffers changed"
    changed = [k for k, v in before["buffers"].items() if not torch.equal(v, after["buffers"][k])]
    assert not changed, f"buffers changed: {changed[:5]}"
    assert after["attn"] == before["attn"], "a (sub-)config's _attn_implementation_internal was not restored"
    assert after["config"] == before["config"], "model.config changed"
    assert after["generation_config"] == before["generation_config"], "generation_config changed"
    hooks = {k: (before["hooks"][k], v) for k, v in after["hooks"].items() if before["hooks"].get(k) != v}
    assert not hooks, f"hook counts {_HOOK_DICTS} changed (before, after): {dict(list(hooks.items())[:5])}"
    for name, attrs in after["attrs"].items():
        old = before["attrs"][name]
        assert attrs.keys() == old.keys(), (
            f"module {name or '<model>'!r}: instance attributes added {sorted(attrs.keys() - old.keys())}, "
            f"removed {sorted(old.keys() - attrs.keys())}")
        swapped = [k for k in attrs if attrs[k] != old[k]]
        assert not swapped, f"module {name or '<model>'!r}: instance attributes replaced: {swapped}"
    for cls, d in after["classes"].items():
        old = before["classes"][cls]
        bad = sorted(k for k in d.keys() | old.keys() if d.get(k, None) is not old.get(k, None))
        assert not bad, f"class {cls.__name__}: attributes patched and not restored: {bad}"
    assert after["global_hooks"] == before["global_hooks"], "torch global module hooks changed"


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------
def _same_new(g_batch, b: int, batch, g_alone, single) -> bool:
    """Sample b's new tokens in a batched generate() equal those generated alone (an alone run that met EOS
    early stops there; the batch pads after it)."""
    new_b = g_batch[b, batch.inputs["input_ids"].shape[1]:]
    new_a = g_alone[0, single.inputs["input_ids"].shape[1]:]
    return len(new_a) > 0 and torch.equal(new_b[: len(new_a)], new_a)


def _apply(model, method: str, family: str, params=None, *, config=None):
    """apply() or, for a combination refused on purpose, check the refusal leaves the model untouched and skip."""
    spec = _spec(method)
    what = config if config is not None else method
    kw = {} if config is not None else dict(params)
    reason = spec.get("refuses", {}).get(family)
    if reason is not None:
        before = _snapshot(model)
        with pytest.raises(vlmplug.VlmplugError):
            vlmplug.apply(model, what, **kw)
        _assert_restored(model, before)
        pytest.skip(f"{method} refuses {family} on purpose ({reason}); the refusal left the model untouched")
    try:
        return vlmplug.apply(model, what, **kw)
    except vlmplug.VlmplugError as e:
        pytest.fail(f"{method} refused {family} ({type(e).__name__}: {e}); if that is on purpose, add "
                    f"CONTRACT[{method!r}]['refuses'][{family!r}] with the reason")


def _acts(runner: Method) -> bool:
    """The runner drops tokens or prunes the KV cache."""
    return runner.drop_layer is not None or bool(runner.kv_prune_layers)


def _overrides(runner: Method, name: str) -> bool:
    return getattr(type(runner), name) is not getattr(Method, name)


def _same(a, b) -> bool:
    """Structural equality of results (tensors bit-equal)."""
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


def _real(batch) -> torch.Tensor:
    return batch.inputs["attention_mask"].bool()


# --------------------------------------------------------------------------------------------------------------------
# 0. every registered method has contract parameters; the valid ones construct
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_contract_parameters_are_given(method):
    spec = _spec(method)
    assert {"active", "identity", "invalid_config", "invalid_model"} <= spec.keys(), f"CONTRACT[{method!r}] incomplete"
    unknown = set(spec.get("refuses", {})) - set(FAMILIES)
    assert not unknown, f"CONTRACT[{method!r}]['refuses'] names unknown families {unknown}"
    cls = method_registry()[method]
    for kind in ("active", "identity"):
        cls(**spec[kind])  # valid configs
    for bad in spec["invalid_model"]:
        cls(**bad)  # valid as data: only the model refuses it


def test_no_stale_contract_entries():
    stale = set(CONTRACT) - set(METHODS)
    assert not stale, f"CONTRACT has entries for methods that are not registered: {sorted(stale)}; remove them"
    stale = {k for k in NOT_BIT_EQUAL if k[0] not in METHODS or k[1] not in FAMILIES}
    assert not stale, f"NOT_BIT_EQUAL lists unknown combinations: {sorted(stale)}"


# --------------------------------------------------------------------------------------------------------------------
# 1. apply -> generate -> remove restores the model exactly
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,family", _combos("restore"))
def test_remove_restores_model(method, family):
    spec = _spec(method)
    model = tiny(family)
    batch = _batch(family, model)
    before = _snapshot(model)
    with torch.no_grad():
        ref = model(**batch.inputs).logits
    h = _apply(model, method, family, spec["active"])
    with h, torch.no_grad():
        assert vars(model).get("_vlmplug_handle") is h
        out = model.generate(**batch.inputs, **GEN)
        assert out.shape[1] == batch.inputs["input_ids"].shape[1] + GEN["max_new_tokens"]
    assert not h.active
    h.remove()  # idempotent
    _assert_restored(model, before)
    with torch.no_grad():
        after = model(**batch.inputs).logits
    assert torch.equal(after, ref), "the unpatched model's logits changed after apply -> generate -> remove"


# --------------------------------------------------------------------------------------------------------------------
# 2. identity parameters: the unpatched model's outputs
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,family", _combos("identity"))
def test_identity_parameters_change_nothing(method, family):
    spec = _spec(method)
    model = tiny(family)
    batch = _batch(family, model)
    real = _real(batch)
    gen = dict(GEN, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model(**batch.inputs).logits
        gref = model.generate(**batch.inputs, **gen)
    with _apply(model, method, family, spec["identity"]), torch.no_grad():
        out = model(**batch.inputs).logits
        g = model.generate(**batch.inputs, **gen)
    assert torch.equal(g.sequences, gref.sequences), "greedy tokens differ under identity parameters"
    exact = [("forward", out[real], ref[real]), ("generate step 0 (prefill)", g.logits[0], gref.logits[0])]
    decode = [(f"generate step {i} (decode)", a, b) for i, (a, b) in enumerate(zip(g.logits, gref.logits)) if i]
    reason = NOT_BIT_EQUAL.get((method, family))
    if reason is None:
        exact += decode
    for what, a, b in exact:
        assert torch.equal(a, b), (f"{what}: logits not bit-equal under identity parameters (max diff "
                                   f"{(a - b).abs().max().item():.3g}); if expected, list it in NOT_BIT_EQUAL")
    if reason is not None:
        diffs = {what: (a - b).abs().max().item() for what, a, b in decode}
        assert max(diffs.values()) <= 1e-5, diffs
        assert any(d > 0 for d in diffs.values()), (
            f"NOT_BIT_EQUAL lists {(method, family)} ({reason}) but its decode logits are now bit-equal: remove the entry")


# --------------------------------------------------------------------------------------------------------------------
# 3. active parameters: a left-padded batch equals each sample alone
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,family", _combos("padding"))
def test_padded_batch_equals_each_sample_alone(method, family):
    spec = _spec(method)
    model = tiny(family)
    batch = _batch(family, model)
    with _apply(model, method, family, spec["active"]), torch.no_grad():
        together = model(**batch.inputs).logits[:, -1]
        gt = model.generate(**batch.inputs, **GEN)
        for b in range(batch.inputs["input_ids"].shape[0]):
            single = split_batch(batch, b)
            alone = model(**single.inputs).logits[:, -1]
            diff = (alone[0] - together[b]).abs().max().item()
            assert diff <= 1e-5, f"sample {b}: last-position logits differ from the sample alone by {diff:.3g}"
            ga = model.generate(**single.inputs, **GEN)
            assert _same_new(gt, b, batch, ga, single), f"sample {b}: greedy tokens differ from the sample alone"


# --------------------------------------------------------------------------------------------------------------------
# 4. one config object, two models
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,family", _combos("two_models"))
def test_one_config_two_models(method, family):
    spec = _spec(method)
    cls = method_registry()[method]
    cfg = cls.from_params(**spec["active"])
    d0 = cfg.to_dict()
    json.dumps(d0)
    assert d0["method"] == method
    for c in (cfg, cls.from_params(**spec["identity"]), cls()):
        assert MethodConfig.from_dict(c.to_dict()) == c
        assert cls.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    field = dataclasses.fields(cfg)[0].name if dataclasses.fields(cfg) else None
    if field is not None:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, field, getattr(cfg, field))

    m1, m2 = tiny(family), _second_model(family)
    batch = _batch(family, m1)
    _batch(family, m2)  # warm-up
    single = split_batch(batch, 1)
    before2 = _snapshot(m2)
    h1 = _apply(m1, method, family, config=cfg)
    with h1:
        h2 = vlmplug.apply(m2, cfg)
        with h2, torch.no_grad():
            r1, r2 = h1.method(method), h2.method(method)
            assert r1 is not r2, "the two models share one runner"
            assert r1.config is cfg and r2.config is cfg and h1.configs == [cfg] and h2.configs == [cfg]
            # different prompts on the two models (same weights): state shared between the runners would show
            g1 = m1.generate(**batch.inputs, **GEN)
            g2 = m2.generate(**single.inputs, **GEN)
            assert _same_new(g1, 1, batch, g2, single), "second model: tokens differ from the first model's"
            s1, s2 = copy.deepcopy(h1.stats), copy.deepcopy(h2.stats)
            assert s1["images_per_sample"] == [1, 1] and s2["images_per_sample"] == [1], (s1, s2)
            res1, res2 = copy.deepcopy(h1.result(method)), copy.deepcopy(h2.result(method))
            if _overrides(r2, "stats"):
                assert s1[method] and s2[method], f"{method} reports empty stats after a forward"
            if _overrides(r2, "result"):
                assert res1 is not None and res2 is not None, f"{method} has no result after a forward"

            h1.remove()
            assert r1.session is None and r2.session is h2.session
            assert h2.active and vars(m2).get("_vlmplug_handle") is h2
            assert h2.stats == s2, "removing the first handle changed the second's stats"
            assert _same(h2.result(method), res2), "removing the first handle changed the second's result"

            # the second handle still acts: the first model's prompt now gives the first model's tokens, stats, result
            g = m2.generate(**batch.inputs, **GEN)
            assert torch.equal(g, g1)
            s = h2.stats
            assert s["forward_index"] > s2["forward_index"]
            assert {k: v for k, v in s.items() if k != "forward_index"} == \
                   {k: v for k, v in s1.items() if k != "forward_index"}, "second model: stats differ from the first's"
            assert _same(h2.result(method), res1), "second model: result differs from the first model's"
    assert cfg.to_dict() == d0, "applying a config changed it"
    _assert_restored(m2, before2)


# --------------------------------------------------------------------------------------------------------------------
# 5. stats schema
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,family", _combos("stats"))
def test_stats_schema(method, family):
    spec = _spec(method)
    model = tiny(family)
    batch = _batch(family, model)
    B = batch.inputs["input_ids"].shape[0]
    with _apply(model, method, family, spec["active"]) as h, torch.no_grad():
        empty = h.stats  # before any forward
        assert set(empty) == TOP_KEYS | {method}, sorted(empty)
        assert isinstance(empty[method], dict)
        json.dumps(empty)
        model.generate(**batch.inputs, **GEN)
        st = h.stats
        runner = h.method(method)
        lay = h.layout
    assert set(st) == TOP_KEYS | {method}, f"top-level stats keys {sorted(st)}"
    assert isinstance(st["forward_index"], int) and st["phase"] in ("prefill", "decode")
    assert st["images_per_sample"] == [1] * B
    mine = st[method]
    assert isinstance(mine, dict), type(mine)
    json.dumps(st)
    if not _acts(runner):
        return
    missing = PRUNING_KEYS.keys() - mine.keys()
    assert not missing, f"{method} drops tokens / prunes the KV cache but its stats lack {sorted(missing)}"
    for k, t in PRUNING_KEYS.items():
        v = mine[k]
        assert isinstance(v, t) and not isinstance(v, bool), f"stats[{method!r}][{k!r}] = {v!r}, expected {t.__name__}"
    n_layers = model.config.get_text_config().num_hidden_layers
    kept = mine["tokens_kept_per_image"]
    assert len(kept) == B and all(isinstance(x, list) and len(x) == 1 for x in kept), kept
    for b, per in enumerate(kept):
        n_img = int(lay.samples[b].images[0].positions.numel())
        assert all(isinstance(x, int) and 0 <= x <= n_img for x in per), (b, per, n_img)
    lens = mine["tokens_per_layer"]
    L = batch.inputs["input_ids"].shape[1]
    assert len(lens) == n_layers and all(isinstance(x, int) and 0 < x <= L for x in lens), lens
    tc = model.config.get_text_config()
    full = n_layers * L * 2 * tc.num_key_value_heads * tc.head_dim * 4 * B  # float32
    assert 0 < mine["kv_cache_bytes"] < full, "active parameters should shrink the KV cache"
    assert 0.0 <= mine["flops_saved"] < 1.0


# --------------------------------------------------------------------------------------------------------------------
# 6. errors
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_invalid_config_raises(method):
    spec = _spec(method)
    cls = method_registry()[method]
    with pytest.raises(vlmplug.VlmplugError, match="unknown parameter"):
        cls.from_params(not_a_parameter=1)
    with pytest.raises(vlmplug.VlmplugError):
        MethodConfig.from_dict({"method": method, "not_a_parameter": 1})
    for bad in spec["invalid_config"]:
        with pytest.raises(vlmplug.VlmplugError):
            cls(**bad)
        with pytest.raises(vlmplug.VlmplugError):
            cls.from_params(**bad)
        with pytest.raises(vlmplug.VlmplugError):
            cls().replace(**bad)


def _float_fields():
    out = []
    for m in METHODS:
        for f in dataclasses.fields(method_registry()[m]):
            if f.init and "float" in str(f.type):
                out.append(pytest.param(m, f.name, id=f"{m}-{f.name}"))
    return out


@pytest.mark.parametrize("method,field", _float_fields())
def test_nan_parameter_is_rejected(method, field):
    """Every float parameter of every registered config: NaN is invalid (it is in no range)."""
    with pytest.raises(vlmplug.VlmplugError):
        method_registry()[method](**{field: float("nan")})


@pytest.mark.parametrize("method,family", _combos("errors"))
def test_invalid_apply_leaves_model_untouched(method, family):
    spec = _spec(method)
    model = tiny(family)
    before = _snapshot(model)
    bad = [dict(not_a_parameter=1)] + spec["invalid_config"] + spec["invalid_model"]
    for params in bad:
        with pytest.raises(vlmplug.VlmplugError):
            vlmplug.apply(model, method, **params)
        _assert_restored(model, before)
    if family in spec.get("refuses", {}):
        for params in (spec["active"], spec["identity"]):
            with pytest.raises(vlmplug.VlmplugError):
                vlmplug.apply(model, method, **params)
            _assert_restored(model, before)
        with pytest.raises(vlmplug.VlmplugError):
            vlmplug.apply(model, method_registry()[method].from_params(**spec["active"]))
        _assert_restored(model, before)


# --------------------------------------------------------------------------------------------------------------------
# 7. beyond one method: two token-dropping methods composed. apply() must refuse a composition it cannot run (as it
#    does for droppers at different layers on most families, leaving the model untouched), never accept it and then
#    fail at the first forward or silently let one method override the other's selection.
# --------------------------------------------------------------------------------------------------------------------
def _needs(*names):
    missing = [n for n in names if n not in METHODS]
    if missing:
        pytest.skip(f"methods {missing} are not registered")
    return [method_registry()[n].from_params(**_spec(n)["active"]) for n in names]


@pytest.mark.parametrize("pair", [("fastv", "cluster"), ("cluster", "hiprune")])
@pytest.mark.parametrize("family", FAMILIES)
def test_two_token_droppers_are_refused_before_patching(family, pair):
    """One prompt has one token selection: two droppers in the same pass are refused at apply() (before, two pre-LLM
    selectors let the last one override the other silently, and fastv + a selector on Gemma 3 / Qwen3-VL, both
    cutting at layer 1, failed at the first forward)."""
    cfgs = _needs(*pair)
    model = tiny(family)
    before = _snapshot(model)
    with pytest.raises(vlmplug.MethodConfigError, match="each choose which tokens to drop|drop tokens after different"):
        vlmplug.apply(model, cfgs)
    _assert_restored(model, before)


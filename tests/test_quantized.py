"""vlmplug on bitsandbytes-quantized models, loaded the way users load them.

A tiny model of LLaVA, Qwen2-VL and Gemma 3 is saved with `save_pretrained` and loaded back with
`from_pretrained(dir, quantization_config=BitsAndBytesConfig(...))`: 8-bit (LLM.int8), 4-bit NF4 with float32 compute,
and 4-bit FP4 (LLaVA) / NF4 (Gemma 3) with bfloat16 compute in a bfloat16 model. Every Linear but `lm_head` becomes a
bitsandbytes layer, the vision tower's and the projector's included. bitsandbytes' 4-bit layers need in_features
divisible by their 64-element blocks, so the tiny configs are widened (`_quantizable_config`: hidden 64, MLP 128,
head_dim 16; the same token geometry as `vlmplug.testing.tiny`). For every registered method on every model:

1. identity parameters give the unpatched quantized model's logits bit for bit (forward, and every generate() step
   through the KV cache); tolerance 0;
2. active parameters act (logits change; pruning methods keep their budget, in `handle.stats` and in the KV cache
   generate() returns), generate() runs through the KV cache, and `remove()` restores the model exactly: weights and
   quantisation state, attention implementations, hooks (by identity), instance attributes, and the logits;
3. no method reads a weight it would find quantised: none is refused on these models (were one to read
   `o_proj.weight`, apply() would have to refuse it with a VlmplugError; nothing here does);
4. PAI's / modPAI's text-only CFG branch runs beside generate() on them.

Quantized KV caches (transformers' QuantizedCache, fp8 backend, no bitsandbytes needed; these tests run without it):
identity parameters equal the unpatched model on the same cache; pre-LLM methods take the masked layer 0 with the
default cache's budget; KV pruning (PLPHP) is refused with a MethodConfigError (it raised an IndexError from inside
the cache before the check in vlmplug/backend/kvprune.py).

bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a 4-bit layer's weight at its first forward, and `state_dict()`
then unpacks it for saving and leaves the quantisation state altered (the next forward's logits change by ~0.1):
the snapshot (tests/test_offload.py) reads parameters and their quantisation state directly, never `state_dict()`.
"""
from __future__ import annotations

import copy

import pytest
import torch

import vlmplug
from conftest import tiny
from test_offload import GEN, GEN_OUT, METHODS, PRE_LLM, _assert_restored, _snapshot, check_budget, params
from test_offload import _own_var_cache  # noqa: F401 - autouse: VAR's disk cache in a tmp dir
from vlmplug.compat import load_kwargs, output_cache
from vlmplug.errors import MethodConfigError
from vlmplug.registry import method_registry
from vlmplug.testing import tiny as tiny_mod
from vlmplug.testing.tiny import build_tiny_model, make_batch, split_batch, text_decoder_layers

try:
    import bitsandbytes as bnb
except ImportError:  # the [quant] extra; the quantized KV-cache tests below need no bitsandbytes
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is the [quant] extra (pip install vlmplug[quant])")

FAMILIES = ("llava", "qwen2_vl", "gemma3")
QUANTS = ("int8", "nf4")
MODELS = [(f, q) for f in FAMILIES for q in QUANTS] + [("llava", "fp4-bf16"), ("gemma3", "nf4-bf16")]
IDS = [f"{f}-{q}" for f, q in MODELS]


def _bnb_config(quant: str):
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True), torch.float32
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.float32), torch.float32
    if quant in ("fp4-bf16", "nf4-bf16"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant[:3],
                                  bnb_4bit_compute_dtype=torch.bfloat16), torch.bfloat16
    raise ValueError(quant)


def _quantizable_config(family: str):
    """`tiny_config(family)` with every quantised Linear's in_features a multiple of 64 (bitsandbytes' 4-bit block)."""
    cfg = _ORIG_TINY_CONFIG(family)
    t = cfg.get_text_config()
    t.hidden_size, t.intermediate_size, t.head_dim = 64, 128, 16  # 4 query / 2 KV heads of 16
    if hasattr(t, "query_pre_attn_scalar"):
        t.query_pre_attn_scalar = 16
    rope = getattr(t, "rope_parameters", None)
    if rope and "mrope_section" in rope:
        rope["mrope_section"] = [4, 2, 2]  # head_dim / 2
    v = cfg.vision_config
    if family.startswith("qwen"):
        v.embed_dim = v.hidden_size = 64  # merger: 4 * 64 -> 256 -> text hidden 64
        if hasattr(v, "out_hidden_size"):
            v.out_hidden_size = 64
    else:
        v.hidden_size, v.intermediate_size = 64, 128
        if hasattr(v, "projection_dim"):
            v.projection_dim = 64
    return cfg


_ORIG_TINY_CONFIG = tiny_mod.tiny_config
_SAVED: dict = {}
_MODELS: dict = {}
_REF: dict = {}


def _saved(family: str, tmp_path_factory):
    if family not in _SAVED:
        tiny_mod.tiny_config = _quantizable_config  # build_tiny_model's own weights, sharpening and generation config
        try:
            model = build_tiny_model(family)
        finally:
            tiny_mod.tiny_config = _ORIG_TINY_CONFIG
        path = tmp_path_factory.mktemp(f"{family}-float")
        model.save_pretrained(path)
        _SAVED[family] = path
    return _SAVED[family]


def quantized(family: str, quant: str, tmp_path_factory):
    """The quantised model and its left-padded batch (two samples, one image each), warmed up unpatched (bitsandbytes
    prepares 4-bit CPU weights at the first forward)."""
    key = (family, quant)
    if key not in _MODELS:
        qcfg, dtype = _bnb_config(quant)
        cls = tiny_mod._model_class(family)
        model = cls.from_pretrained(_saved(family, tmp_path_factory), quantization_config=qcfg, dtype=dtype,
                                    attn_implementation="sdpa", **load_kwargs()).eval()
        batch = make_batch(family, model, (1, 1))
        with torch.no_grad():
            model.generate(**batch.inputs, **GEN)
            model(**batch.inputs)
        _MODELS[key] = (model, batch)
    model, batch = _MODELS[key]
    h = model.__dict__.get("_vlmplug_handle")
    if h is not None:  # a failed test left a patch
        h.remove()
    return model, batch


def _unpatched(key, model, batch):
    if key not in _REF:
        with torch.no_grad():
            _REF[key] = (model(**batch.inputs).logits, model.generate(**batch.inputs, **GEN_OUT))
    return _REF[key]


@needs_bnb
@pytest.mark.parametrize("family,quant", MODELS, ids=IDS)
def test_the_model_is_really_quantized(family, quant, tmp_path_factory):
    model, batch = quantized(family, quant, tmp_path_factory)
    want = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    for layer in text_decoder_layers(model):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layer.self_attn, name), want), (name, type(getattr(layer.self_attn, name)))
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert linears == ["lm_head"], linears
    ref, gref = _unpatched((family, quant), model, batch)
    assert torch.isfinite(ref).all()
    assert gref.sequences.shape[1] == batch.inputs["input_ids"].shape[1] + GEN["max_new_tokens"]


@needs_bnb
@pytest.mark.parametrize("family,quant", MODELS, ids=IDS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_parameters_equal_the_unpatched_quantized_model(method, family, quant, tmp_path_factory):
    model, batch = quantized(family, quant, tmp_path_factory)
    ref, gref = _unpatched((family, quant), model, batch)
    real = batch.inputs["attention_mask"].bool()
    with vlmplug.apply(model, method, **params(method, "identity")), torch.no_grad():
        out = model(**batch.inputs).logits
        g = model.generate(**batch.inputs, **GEN_OUT)
    assert torch.equal(out[real], ref[real]), f"forward: max diff {(out[real] - ref[real]).abs().max().item():.3g}"
    assert torch.equal(g.sequences, gref.sequences)
    for i, (a, b) in enumerate(zip(g.logits, gref.logits)):
        assert torch.equal(a, b), f"generate step {i}: max diff {(a - b).abs().max().item():.3g}"


@needs_bnb
@pytest.mark.parametrize("family,quant", MODELS, ids=IDS)
@pytest.mark.parametrize("method", METHODS)
def test_active_parameters_act_keep_budget_generate_and_remove_restores(method, family, quant, tmp_path_factory):
    model, batch = quantized(family, quant, tmp_path_factory)
    ref, gref = _unpatched((family, quant), model, batch)
    L = batch.inputs["input_ids"].shape[1]
    cfg = method_registry()[method].from_params(**params(method, "active"))
    before = _snapshot(model)
    with vlmplug.apply(model, cfg) as h, torch.no_grad():
        out = model(**batch.inputs).logits
        gen = model.generate(**batch.inputs, **GEN_OUT)
        stats = copy.deepcopy(h.stats)
        check_budget(h, method, gen, L)
        if method == "record":
            maps = h.image_attention()
            assert len(maps) == 2 and all(len(m) == 1 and torch.isfinite(m[0]).all() and m[0].sum() > 0 for m in maps)
    assert gen.sequences.shape[1] == L + GEN["max_new_tokens"] and len(gen.logits) == GEN["max_new_tokens"]
    assert stats["phase"] == "decode" and stats["images_per_sample"] == [1, 1]
    # generate()'s prefill is the forward's last position, up to the rounding of a one-row vs all-rows matmul
    # (measured: <= 2.4e-7 in float32, the same unpatched)
    tol = 1e-5 if model.dtype == torch.float32 else 2e-2
    assert (gen.logits[0] - out[:, -1]).abs().max().item() <= tol
    if method == "record":
        assert torch.equal(out, ref)
    else:  # the active parameters change the logits (PLPHP: the decode steps' only)
        changed = not torch.equal(out, ref) or any(not torch.equal(a, b) for a, b in zip(gen.logits, gref.logits))
        assert changed, f"{method} with {params(method, 'active')} changed nothing"
    _assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, ref), "logits after remove() differ from before apply()"


@needs_bnb
@pytest.mark.parametrize("method", ["pai", "modpai"])
@pytest.mark.parametrize("family,quant", [("llava", "nf4"), ("qwen2_vl", "int8")], ids=["llava-nf4", "qwen2_vl-int8"])
def test_cfg_branch_runs_on_quantized_models(method, family, quant, tmp_path_factory):
    """PAI's / modPAI's text-only CFG branch (gamma != 1) beside model.generate(), through the KV cache (one prompt:
    PassMix refuses a left-padded second prompt on M-RoPE models)."""
    model, batch = quantized(family, quant, tmp_path_factory)
    single = split_batch(batch, 1)
    L = single.inputs["input_ids"].shape[1]
    gen = dict(GEN, output_scores=True, return_dict_in_generate=True)
    before = _snapshot(model)
    with vlmplug.apply(model, method, **dict(params(method, "active"), gamma=1.0)), torch.no_grad():
        plain = model.generate(**single.inputs, **gen)  # the same method without its branch
    with vlmplug.apply(model, method, **dict(params(method, "active"), gamma=1.5)) as h, torch.no_grad():
        procs = h.guidance(single.inputs)
        assert len(procs) == 1
        g = model.generate(**single.inputs, **gen, logits_processor=procs)
        branch = h.session.state_of(procs[0].label)
        assert branch is not None and branch.forward_index >= 1, "the text-only branch never ran"
    assert L < g.sequences.shape[1] <= L + GEN["max_new_tokens"]  # (EOS may end either run early)
    assert not torch.equal(g.scores[0], plain.scores[0]), "the CFG branch changed nothing"
    _assert_restored(model, before)


# --------------------------------------------------------------------------------------------------------------------
# Quantized KV caches (transformers' QuantizedCache, generate(cache_implementation="quantized")), fp8 backend: no
# extra package. Its layers keep their states quantised beside an empty `keys`, so layer 0 cannot be padded back after
# a pre-LLM cut (the six pre-LLM methods hide the dropped tokens in layer 0 instead) and KV pruning cannot gather them
# (refused with a MethodConfigError). transformers refuses this cache on models with sliding-window layers (Gemma 3).
# --------------------------------------------------------------------------------------------------------------------
QCACHE_FAMILIES = ("llava", "qwen2_vl")


def _fp8_cache(model) -> dict:
    """generate() kwargs for the fp8 quantized KV cache; skip where this transformers has no fp8 backend."""
    try:
        from transformers.cache_utils import QuantizedCache

        QuantizedCache(backend="fp8", config=model.config.get_text_config(decoder=True))
    except (ImportError, TypeError, ValueError) as e:
        pytest.skip(f"this transformers has no fp8 QuantizedCache ({e})")
    return dict(cache_implementation="quantized", cache_config={"backend": "fp8"})


@pytest.mark.parametrize("family", QCACHE_FAMILIES)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "plphp"])
def test_methods_on_a_quantized_kv_cache(method, family):
    """Identity parameters: the unpatched model's tokens and logits on the same cache, bit for bit. Active parameters:
    the budget of the default cache (pre-LLM methods through the masked layer 0), the same prefill logits."""
    from transformers.cache_utils import QuantizedCache

    model = tiny(family)
    batch = make_batch(family, model, (1, 1))
    q = _fp8_cache(model)
    L = batch.inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref = model.generate(**batch.inputs, **GEN_OUT, **q)
    with vlmplug.apply(model, method, **params(method, "identity")), torch.no_grad():
        g = model.generate(**batch.inputs, **GEN_OUT, **q)
    assert isinstance(output_cache(g), QuantizedCache)
    assert torch.equal(g.sequences, ref.sequences)
    for i, (a, b) in enumerate(zip(g.logits, ref.logits)):
        assert torch.equal(a, b), f"identity, generate step {i}: max diff {(a - b).abs().max().item():.3g}"

    with vlmplug.apply(model, method, **params(method, "active")) as h, torch.no_grad():
        dflt = model.generate(**batch.inputs, **GEN_OUT)
        where_dflt = (h.session.state.drop_layer, h.session.state.cache_cut)
        kept_dflt = copy.deepcopy(h.stats[method].get("tokens_kept_per_image"))
        qg = model.generate(**batch.inputs, **GEN_OUT, **q)
        assert isinstance(output_cache(qg), QuantizedCache)
        check_budget(h, method, qg, L)
        assert h.stats[method].get("tokens_kept_per_image") == kept_dflt
        if method in PRE_LLM:
            assert where_dflt == (0, 1), "the default cache takes the padded path"
            assert (h.session.state.drop_layer, h.session.state.cache_cut) == (1, 1), "expected the masked layer 0"
    # the prefill attends to the unquantised states (the masked layer 0 moves float32 rounding only)
    assert (qg.logits[0] - dflt.logits[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", QCACHE_FAMILIES)
def test_kv_pruning_refuses_a_quantized_kv_cache(family):
    """PLPHP gathers cached keys and values per head: on a quantized cache it raises a MethodConfigError naming the
    layer class (nothing gathered), and the patched model keeps working with the default cache."""
    model = tiny(family)
    batch = make_batch(family, model, (1, 1))
    q = _fp8_cache(model)
    with torch.no_grad():
        ref = model(**batch.inputs).logits
    before = _snapshot(model)
    with vlmplug.apply(model, "plphp", **params("plphp", "active")) as h, torch.no_grad():
        with pytest.raises(MethodConfigError, match=r"KV-cache pruning .* \(QuantizedCache / Fp8QuantizedLayer\)"):
            model.generate(**batch.inputs, **GEN_OUT, **q)
        out = model.generate(**batch.inputs, **GEN_OUT)
        check_budget(h, "plphp", out, batch.inputs["input_ids"].shape[1])
    _assert_restored(model, before)
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, ref)


def test_cli_runs_a_4bit_checkpoint_from_disk(tmp_path, capsys, monkeypatch):
    """`vlmplug run --model PATH --load-in-4bit` with the real processor saved beside the model: the methods act on
    the NF4 model the CLI loaded (the answer line and the kept tokens printed)."""
    pytest.importorskip("bitsandbytes")
    from PIL import Image

    from vlmplug.cli import main
    from vlmplug.testing.processors import save_tiny_checkpoint

    tiny_mod.tiny_config = _quantizable_config
    try:
        model = build_tiny_model("llava")
    finally:
        tiny_mod.tiny_config = _ORIG_TINY_CONFIG
    path = save_tiny_checkpoint("llava", tmp_path / "ckpt", model=model)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    import bitsandbytes as bnb

    import vlmplug.loading

    seen, real_load = [], vlmplug.loading.load
    monkeypatch.setattr(vlmplug.loading, "load", lambda *a, **k: seen.append(real_load(*a, **k)) or seen[-1])
    rc = main(["run", "--model", str(path), "--image", str(tmp_path / "red.png"), "--prompt", "What color?",
               "--method", "fastv", "--param", "layer=1", "--param", "keep_ratio=0.5", "--load-in-4bit",
               "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "FastV(layer=1, keep_ratio=0.5" in out and "fastv: image tokens kept per image" in out
    (loaded, _), = seen
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())  # what the CLI ran was NF4
    assert main(["run", "--load-in-4bit"]) == 2  # the embedded model is not quantized on request
    assert "quantize a checkpoint given by --model" in capsys.readouterr().err

"""VAR against an eager reference written from the paper and the official code (seilk/VisAttnSink logic.py): the
unpatched model with full eager attention; sinks from phi(x) = max_d |x[d] / RMS(x)| on each layer's input hidden
states at prefill; per text query row and head, the image mass and the visual-sink portion; the redistribution
in the selected (row, head) pairs. Image positions come from the batch's ground truth, not from vlmplug."""
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_with, run_reference
from vlmplug.methods.attention.var import find_sink_dims
from vlmplug.testing.tiny import make_batch

GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


def image_mask(batch):
    real = batch.inputs["attention_mask"].bool()
    img = torch.zeros(real.shape, dtype=torch.bool)
    for b, ims in enumerate(batch.truth):
        for im in ims:
            img[b, list(im.positions)] = True
    return real, img


def var_reference(model, batch, layers, dims, tau, rho, p, summ, variant):
    """(attention fn, {layer: pre-hook}): the hooks record each layer's sink positions at prefill (a dynamic cache and
    nothing pruned: key j is position j)."""
    real, img = image_mask(batch)
    B, L = real.shape
    text_rows = real & ~img
    eps = float(getattr(model.config.get_text_config(), "rms_norm_eps", 1e-6) or 1e-6)
    sinks, steps = {}, {}

    def hook(li):
        def pre(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None).double()
            if x.shape[1] == L:  # prefill
                rms = x.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
                sinks[li] = (x[..., list(dims)] / rms).abs().amax(-1) >= tau  # [B, L]
                steps[li] = 0

        return pre

    def edit(module, a):
        li = module.layer_idx
        if li not in layers:
            return None
        a = a.clone()
        _, H, Lq, S = a.shape
        if Lq == 1:
            steps[li] += 1
        total = L + steps[li]
        pos = torch.arange(total - S, total)  # key j's position (a sliding-window cache keeps the last S)
        for b in range(B):
            sk = torch.zeros(total, dtype=torch.bool)
            sk[:L] = sinks[li][b]
            im = torch.zeros(total, dtype=torch.bool)
            im[:L] = img[b]
            sk, im = sk[pos], im[pos]
            for i in range(Lq):
                if Lq > 1 and not text_rows[b, i]:  # prefill: text rows only; decode: the new token
                    continue
                for h in range(H):
                    row = a[b, h, i]
                    summation = row[im].sum()
                    if summation <= 0:
                        continue
                    if variant == "code":  # portion of visual sinks <= rho; keep p of the sink mass
                        chosen = bool(row[im & sk].sum() / summation <= rho) and bool(summation >= summ)
                        keep, moved = p, 1 - p
                    else:  # non-sink ratio >= rho; move p
                        chosen = bool(row[im & ~sk].sum() / summation >= rho) and bool(summation >= summ)
                        keep, moved = 1 - p, p
                    tgt = im & ~sk
                    if not chosen or row[tgt].sum() <= 0:
                        continue
                    budget = moved * row[sk].sum()
                    new = row.clone()
                    new[sk] = row[sk] * keep
                    new[tgt] = row[tgt] + budget * row[tgt] / row[tgt].sum()
                    a[b, h, i] = new
        return a

    return eager_with(edit_probs=edit), {li: hook(li) for li in layers}


def run_var_reference(model, batch, layers, dims, variant, params, gen=GEN):
    from vlmplug.adapters.base import get_adapter

    fn, hooks = var_reference(model, batch, layers, dims, variant=variant, **params)
    decoder = get_adapter(model).decoder_layers()  # where the decoder layers are; the hooks are the test's own
    handles = [decoder[li].register_forward_pre_hook(h, with_kwargs=True) for li, h in hooks.items()]
    try:
        return run_reference(model, "var_ref", fn, batch.inputs, gen)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_var_matches_the_rule(family, variant):
    model = tiny(family)
    batch = make_batch(family, model, (2, 1, 0))  # several images, one sample without any, left padding
    dims = find_sink_dims(model)
    params = dict(tau=1.0, rho=0.5, p=0.6 if variant == "code" else 0.4, summ=0.05)
    layers = {0, 1}
    cfg = vlmplug.VAR(variant=variant, layers=sorted(layers), sink_dims=dims, **params)
    with torch.no_grad():
        plain = model(**batch.inputs).logits
        with vlmplug.apply(model, cfg) as h:
            out = model(**batch.inputs).logits
            stats = h.stats["var"]
            g = model.generate(**batch.inputs, **GEN)
    assert stats["sink_dims"] == list(dims)
    assert any(0 < s < 1 for s in stats["selected"])  # some (row, head) pairs chosen, others not
    ref, gr = run_var_reference(model, batch, layers, dims, variant, params)
    real = batch.inputs["attention_mask"].bool()
    assert (out - ref)[real].abs().max() <= 1e-5
    assert (out[:2, -1] - plain[:2, -1]).abs().max() > 1e-4  # it acts on samples with images
    assert (out[2] - plain[2]).abs().max() <= 1e-6  # and leaves the image-free one alone (the same SDPA, wider)
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):  # decode steps reuse the prefill's sinks
        assert (a - b).abs().max() <= 1e-4


def test_sink_dims_are_found_by_calibration_and_cached(tmp_path, monkeypatch):
    """A massive activation planted in two channels of the first token's embedding is what the calibration finds;
    the result is cached per model (config and weights), on disk for a model with a name."""
    from vlmplug.methods.attention import var as var_mod
    from vlmplug.testing.tiny import build_tiny_model

    monkeypatch.setenv("VLMPLUG_CACHE", str(tmp_path))
    model = build_tiny_model("llava")
    emb = model.get_input_embeddings().weight
    bos = model.config.get_text_config().bos_token_id
    with torch.no_grad():
        emb[bos, 3] = 40.0
        emb[bos, 11] = -35.0
    assert find_sink_dims(model) == (3, 11)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    assert find_sink_dims(model) == (3, 11) and not calls  # cached: no second pass
    other = build_tiny_model("llava")  # same config, other weights: calibrated on its own
    assert find_sink_dims(other) != (3, 11)
    # a named model is cached on disk too, and read back by a fresh process (memory cache cleared)
    model.config._name_or_path = "someone/tiny-llava"
    var_mod._MEMORY.clear()
    assert find_sink_dims(model) == (3, 11)
    assert "someone/tiny-llava" in (tmp_path / "sink_dims.json").read_text()
    var_mod._MEMORY.clear()
    calls.clear()
    assert find_sink_dims(model) == (3, 11) and not calls
    with vlmplug.apply(model, vlmplug.VAR(tau=5.0, layers=[1])) as h, torch.no_grad():
        batch = make_batch("llava", model, (1,))
        model(**batch.inputs)
        assert h.stats["var"]["sink_dims"] == [3, 11]
        bos_pos = batch.inputs["attention_mask"][0].argmax()
        assert int(batch.inputs["input_ids"][0, bos_pos]) == bos
    with pytest.raises(vlmplug.MethodConfigError, match="sink_dims"):
        vlmplug.apply(model, vlmplug.VAR(sink_dims=[10_000], layers=[1]))
    assert "_vlmplug_handle" not in vars(model)


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_var_composes(fam):
    """With FastV (sinks found on the kept tokens), with VHR's head scaling in the same layers, and refused beside
    another redistribution (ACT) in the same layer."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 1))
    var = vlmplug.VAR(tau=1.0, summ=0.05, layers=[0, 1], sink_dims=find_sink_dims(model))
    with torch.no_grad():
        with vlmplug.apply(model, [vlmplug.FastV(layer=1, keep_ratio=0.5), var]) as h:
            model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
            assert h.stats["fastv"]["tokens_kept_per_image"]
        with vlmplug.apply(model, [var, vlmplug.VHR(layers=[1])]) as h:
            model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
            assert h.stats["vhr"]["heads"][0]
    with pytest.raises(vlmplug.MethodConfigError, match="redistribute or amplify"):
        vlmplug.apply(model, [var, vlmplug.ACT(layers=[1])])
    assert "_vlmplug_handle" not in vars(model)


def test_calibration_on_a_patched_model():
    """apply() on a model that already has a handle: without replace it refuses before any calibration pass runs;
    with replace the calibration sees the unpatched model (the old handle paused), and the old handle's state is
    not touched by it."""
    from vlmplug.testing.tiny import build_tiny_model

    model = build_tiny_model("llava")
    emb = model.get_input_embeddings().weight
    bos = model.config.get_text_config().bos_token_id
    with torch.no_grad():
        emb[bos, 5] = 40.0
        emb[bos, 20] = -35.0
    batch = make_batch("llava", model, (1,))
    calls = []
    # a paused session runs the model unpatched, in a pass of its own (ACT would change even a text-only forward)
    text = batch.inputs["input_ids"][0]
    ids = {"input_ids": text[text != model.config.image_token_id][None, -8:]}
    with torch.no_grad():
        with vlmplug.apply(model, vlmplug.ACT(layers="0:", threshold=0.02), replace=True) as act:
            patched = model(**ids).logits
            n_main = act.session.state_of("main").forward_index
            with act.session.paused():
                paused = model(**ids).logits
            assert act.session.state_of("main").forward_index == n_main
        plain = model(**ids).logits
    assert torch.equal(paused, plain) and not torch.equal(patched, plain)
    old = vlmplug.apply(model, vlmplug.FastV(layer=1, keep_tokens=2))
    with torch.no_grad():
        model(**batch.inputs)
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(vlmplug.AlreadyAppliedError):
        vlmplug.apply(model, vlmplug.VAR(layers=[1]))
    assert not calls and old.active
    with vlmplug.apply(model, vlmplug.VAR(layers=[1], tau=5.0), replace=True) as h:
        assert calls and not old.active
        assert h.stats["var"]["sink_dims"] == [5, 20]
    hook.remove()

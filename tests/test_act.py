"""ACT against an eager reference transcribed from the rule of the official code (GATECH-EIC/ACT,
llama_modelling_aug.py `atten_process_eval`), applied to each sample's own [real rows x real keys] block of the full
eager attention map: column sums over the rows divided by the number of rows that see each key, the keys above the
threshold minus the first of them, scaled by beta, the removed mass spread over the other keys in proportion to the
map with those sink columns zeroed. Decoding (outside the official code): the new row against the prefill's sinks."""
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_with, run_reference
from vlmplug.testing.tiny import make_batch

GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)


def act_block(m: torch.Tensor, beta: float, thres: float, seeing: torch.Tensor | None = None):
    """One head's [n, n] map of one sample -> (edited map, sink key indices). `seeing`: rows that see each key (the
    official arange(n, 0, -1) under a plain causal mask; given for a sliding window)."""
    n = m.shape[0]
    seeing = torch.arange(n, 0, -1, dtype=m.dtype) if seeing is None else seeing
    idx = torch.nonzero(m.sum(0) / seeing > thres).flatten()[1:]
    copied = m.clone()
    avail = m[:, idx].sum(1, keepdim=True) * (1 - beta)
    out = m.clone()
    out[:, idx] *= beta
    copied[1:, idx] = 0
    ratios = copied / copied.sum(1, keepdim=True)
    out = out + avail * ratios
    out[0, 0] = 1
    dead = copied.sum(1) == 0  # every visible key a sink: the official code divides by zero; left unchanged
    out[dead] = m[dead]
    return out, idx


def act_reference(batch, heads: dict, beta: float, thres: float):
    real = batch.inputs["attention_mask"].bool()
    B, L = real.shape
    first = real.float().argmax(1)
    sinks, steps = {}, {}

    def edit(module, a):
        li = module.layer_idx
        if li not in heads:
            return None
        a = a.clone()
        _, H, Lq, S = a.shape
        if Lq > 1:
            steps[li] = 0
            for b in range(B):
                f = int(first[b])
                for h in heads[li]:
                    # rows that see each key: arange(n, 0, -1) under a causal mask; Gemma 3's sliding window and
                    # bidirectional image block change it, so count the rows with attention on the key
                    seeing = (a[b, h, f:, f:] > 0).sum(0).double()
                    a[b, h, f:, f:], idx = act_block(a[b, h, f:, f:], beta, thres, seeing)
                    sinks[(li, b, h)] = idx + f
            return a
        steps[li] += 1
        total = L + steps[li]
        pos = torch.arange(total - S, total)
        for b in range(B):
            for h in heads[li]:
                sk = torch.isin(pos, sinks[(li, b, h)])
                row = a[b, h, 0]
                mass = row[sk].sum()
                new = row.clone()
                new[sk] = row[sk] * beta
                new[~sk] = row[~sk] + (1 - beta) * mass * row[~sk] / row[~sk].sum()
                a[b, h, 0] = new
        return a

    return eager_with(edit_probs=edit)


def test_act_matches_the_official_rule(family):
    model = tiny(family)
    batch = make_batch(family, model, (2, 1, 0))
    beta, thres = 0.4, 0.05
    heads = {0: [1, 3], 1: [0, 1, 2, 3]}
    cfg = vlmplug.ACT(beta=beta, threshold=thres, heads={0: [1, 3], 1: [0, 1, 2, 3]})
    with torch.no_grad():
        plain = model(**batch.inputs).logits
        with vlmplug.apply(model, cfg) as h:
            out = model(**batch.inputs).logits
            g = model.generate(**batch.inputs, **GEN)
            st = h.stats["act"]
    assert st["layers"] == [0, 1] and st["heads"] == [2, 4]
    assert all(s and s > 0 for s in st["sinks_per_head"])  # hidden sinks found
    fn = act_reference(batch, heads, beta, thres)
    ref, gr = run_reference(model, "act_ref", fn, batch.inputs, GEN)
    real = batch.inputs["attention_mask"].bool()
    assert (out - ref)[real].abs().max() <= 1e-5
    assert (out - plain)[real].abs().max() > 1e-4
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):
        assert (a - b).abs().max() <= 1e-4


def test_act_head_search():
    """calibrate_heads keeps exactly the heads whose calibration raises the score (checked head by head)."""
    from vlmplug.methods.attention.act import calibrate_heads

    model = tiny("llava")
    batch = make_batch("llava", model, (1,))
    target = batch.inputs["input_ids"][:, -1]

    def score(m):
        with torch.no_grad():
            logp = torch.log_softmax(m(**batch.inputs).logits[:, -2].double(), -1)
        return float(logp.gather(1, target[:, None]).mean())

    cands = [(0, 0), (0, 1), (1, 2), (1, 3)]
    kept = calibrate_heads(model, score, cands, threshold=0.05, progress=False)
    base = score(model)
    for li, hd in cands:
        with vlmplug.apply(model, vlmplug.ACT(threshold=0.05, heads=[(li, hd)])):
            assert ((li, hd) in kept) == (score(model) > base)
    assert "_vlmplug_handle" not in vars(model)


def test_act_parameters():
    with pytest.raises(vlmplug.MethodConfigError, match="heads"):
        vlmplug.ACT(heads={0: ["a"]})
    with pytest.raises(vlmplug.MethodConfigError, match="heads"):
        vlmplug.ACT(heads=[])
    model = tiny("llava")
    with pytest.raises(vlmplug.MethodConfigError, match="out of range"):
        vlmplug.apply(model, vlmplug.ACT(heads=[(0, 9)]))
    cfg = vlmplug.ACT(heads={1: [2, 0]})
    assert cfg.heads == ((1, 0), (1, 2))
    assert vlmplug.MethodConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_act_without_a_mask(fam):
    """One unpadded prompt: transformers may pass no mask (SDPA's is_causal); the rows seeing each key come from the
    causal rule then."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1,))
    heads = {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    with torch.no_grad(), vlmplug.apply(model, vlmplug.ACT(threshold=0.05, heads=heads)):
        out = model(**batch.inputs).logits
    ref, _ = run_reference(model, "act_ref", act_reference(batch, heads, 0.4, 0.05), batch.inputs)
    assert (out - ref).abs().max() <= 1e-5

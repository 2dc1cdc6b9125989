"""PLPHP: identity at full retention; the per-layer, per-head kept sets equal an eager reference of
the paper's rule; decoding through the pruned cache equals masked eager attention; batches."""
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_attentions as _eager_attn
from reference import masked_eager_attention, register_reference
from vlmplug.testing.tiny import make_batch, split_batch

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _reference(att, inputs, truth, r, delta, alpha, beta, hkv):
    """Kept image tokens per (sample, KV head) from the rule, using eager attention of the last token."""
    am = inputs["attention_mask"]
    out = []
    for b, images in enumerate(truth):
        img = torch.tensor(sorted(p for im in images for p in im.positions), dtype=torch.long)
        last = int(torch.nonzero(am[b]).max())
        row = att[b, :, last]  # [Hq, S]
        share = float(row[:, img].sum(-1).mean())
        rate = r + delta if share >= alpha else (r - delta if share <= beta else r)
        k = int(round(img.numel() * min(1.0, max(0.0, rate))))
        per_kv = row.view(hkv, -1, row.shape[-1]).mean(1)[:, img]
        out.append([sorted(img[torch.argsort(per_kv[h].double(), descending=True, stable=True)[:k]].tolist()) for h in range(hkv)])
    return out


def test_full_retention_is_identity(family):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    with torch.no_grad():
        ref = model.generate(**batch.inputs, **GEN)
    with vlmplug.apply(model, "plphp", start_layer=1, keep_ratio=1.0, delta=0.0), torch.no_grad():
        out = model.generate(**batch.inputs, **GEN)
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "gemma3", "internvl"])
def test_kept_heads_match_reference_and_decode_matches_masked_eager(fam):
    _check_against_reference(fam, dict(keep_ratio=0.5, delta=0.25, alpha=0.5, beta=0.2, start_layer=1))


def _shares(att, inputs, truth):
    """Per sample: the share of the last real token's attention (mean over heads) on the image tokens."""
    out = []
    for b, images in enumerate(truth):
        img = torch.tensor(sorted(p for im in images for p in im.positions), dtype=torch.long)
        last = int(torch.nonzero(inputs["attention_mask"][b]).max())
        out.append(float(att[b, :, last][:, img].sum(-1).mean()))
    return out


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl", "gemma3", "internvl"])
def test_vision_indifferent_layers_keep_less(fam):
    """The paper's third class: a layer whose image share is <= beta keeps keep_ratio - delta. Thresholds are put
    between the two samples' shares (from eager attention, so the reference decides the class): the sample below
    is vision-indifferent (0.25 of its image tokens), the one above vision-attentive (0.75); then alpha=1,
    beta=0.999 makes every sample indifferent. Kept sets per KV head and decoding checked as above."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    shares = _shares(_eager_attn(model, batch.inputs)[1], batch.inputs, batch.truth)
    lo, hi = sorted(shares)
    assert hi - lo > 0.02, shares  # the tiny model separates the samples
    mid = (lo + hi) / 2
    n = [sum(len(im.positions) for im in images) for images in batch.truth]
    for alpha, beta, rates in [(mid, mid, [0.25 if x <= mid else 0.75 for x in shares]), (1.0, 0.999, [0.25, 0.25])]:
        kept = _check_against_reference(fam, dict(keep_ratio=0.5, delta=0.25, alpha=alpha, beta=beta, start_layer=1))
        assert kept == {1: [round(k * r) for k, r in zip(n, rates)]}, (alpha, beta, shares)


def _check_against_reference(fam, kw):
    """Kept image tokens per (sample, KV head) of layer `start_layer` = the reference rule on eager attention;
    decoding through the pruned cache = masked eager attention. Returns stats' image tokens kept per layer."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    att = _eager_attn(model, batch.inputs)
    hkv = model.config.get_text_config().num_key_value_heads
    ref = _reference(att[1], batch.inputs, batch.truth, kw["keep_ratio"], kw["delta"], kw["alpha"], kw["beta"], hkv)
    with vlmplug.apply(model, "plphp", **kw) as h, torch.no_grad():
        g = model.generate(**batch.inputs, **GEN)
        idx = h.session.state.kv_index[1]
        dead = h.session.state.kv_dead.get(1)
        st = h.stats["plphp"]
    L = batch.inputs["input_ids"].shape[1]
    dropped = torch.zeros(2, hkv, L, dtype=torch.bool)
    for b in range(2):
        img = torch.tensor(sorted(p for im in batch.truth[b] for p in im.positions), dtype=torch.long)  # ground truth
        for hh in range(hkv):
            rows = idx[b, hh] if dead is None else idx[b, hh][~dead[b, hh]]
            assert sorted(rows[torch.isin(rows, img)].tolist()) == ref[b][hh]
            dropped[b, hh, img] = True
            dropped[b, hh, torch.tensor(ref[b][hh], dtype=torch.long)] = False
    assert st["kv_cache_bytes"] < 2 * L * 2 * hkv * 8 * 4 * 2
    register_reference("refplphp", masked_eager_attention(kv_drop={1: dropped}))
    model.set_attn_implementation({"text_config": "refplphp"})
    try:
        with torch.no_grad():
            gr = model.generate(**batch.inputs, **GEN)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert torch.equal(g.sequences, gr.sequences)
    for a, b in zip(g.logits, gr.logits):
        assert (a - b).abs().max() <= 1e-4
    assert st["image_tokens_kept_per_layer"] == {1: [len(r[0]) for r in ref]}
    return st["image_tokens_kept_per_layer"]


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "gemma3"])
def test_padded_batch_equals_each_sample_alone(fam):
    model = tiny(fam)
    batch = make_batch(fam, model, (2, 1, 0))
    with vlmplug.apply(model, "plphp", start_layer=1, keep_tokens=3), torch.no_grad():
        gt = model.generate(**batch.inputs, **GEN)
        for b in range(3):
            ga = model.generate(**split_batch(batch, b).inputs, **GEN)
            assert torch.equal(ga.sequences[0, -4:], gt.sequences[b, -4:])
            for x, y in zip(ga.logits, gt.logits):
                assert (x[0] - y[b]).abs().max() <= 1e-4


def test_parameter_errors():
    model = tiny("llava")
    with pytest.raises(vlmplug.MethodConfigError, match="beta=0.5 must not exceed alpha=0.2"):
        vlmplug.apply(model, "plphp", beta=0.5)
    with pytest.raises(vlmplug.MethodConfigError, match="start_layer=0"):
        vlmplug.apply(model, "plphp", start_layer=0)
    with pytest.raises(vlmplug.MethodConfigError, match="start_layer=2"):
        vlmplug.apply(model, "plphp", start_layer=2)

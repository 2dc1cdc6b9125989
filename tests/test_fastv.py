"""FastV on every family: identity at keep_ratio=1, the kept set equals the eager reference's top-k,
padding-invariant batches, generate() through the pruned KV cache."""
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_attentions
from vlmplug.testing.tiny import FAMILIES, make_batch, split_batch

GEN = dict(max_new_tokens=4, do_sample=False)


def _eager_layer_attn(model, inputs, layer):
    return eager_attentions(model, inputs)[layer]


def _reference_scores(att, inputs, mode="last"):
    """FastV's score of every key, per sample: the head-mean attention of the last real token (official code) or the
    mean over every real query row (the paper's description), from eager attention [B, H, L, L]."""
    am = inputs["attention_mask"]
    out = []
    for b in range(att.shape[0]):
        real = torch.nonzero(am[b]).flatten()
        if mode == "last":
            out.append(att[b, :, real[-1]].double().mean(0))
        else:
            out.append(att[b][:, real[0]: real[-1] + 1].double().mean(0).mean(0))
    return out


def _reference_keep(att, inputs, truth, ratio, mode="last", keep=None):
    """FastV's selection written from the paper/code: head-mean attention row(s), top round(n*ratio) (or `keep`)."""
    scores = _reference_scores(att, inputs, mode)
    out = []
    for b, images in enumerate(truth):
        img = torch.tensor(sorted(p for im in images for p in im.positions), dtype=torch.long)
        s = scores[b]
        k = int(round(img.numel() * ratio)) if keep is None else min(keep, img.numel())
        sc = s[img]
        top = sorted(img[torch.argsort(sc.double(), descending=True, stable=True)[:k]].tolist())
        out.append(top)
    return out


def _alive_images(h, b, truth):
    """Kept image positions of sample b; which positions are image tokens comes from the batch's ground truth, not
    from vlmplug's layout."""
    s = h.session.state
    keep = s.keep[b]
    if s.dead is not None:
        keep = keep[~s.dead[b]]
    img = torch.tensor(sorted(p for im in truth[b] for p in im.positions), dtype=torch.long)
    return sorted(keep[torch.isin(keep, img)].tolist())


def test_keep_all_is_identity(family):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    with torch.no_grad():
        ref = model(**batch.inputs).logits[:, -1]
        gref = model.generate(**batch.inputs, **GEN)
    with vlmplug.apply(model, "fastv", layer=1, keep_ratio=1.0), torch.no_grad():
        out = model(**batch.inputs).logits[:, -1]
        gout = model.generate(**batch.inputs, **GEN)
    assert (out - ref).abs().max() <= 1e-5
    assert torch.equal(gref, gout)


@pytest.mark.parametrize("mode", ["last", "all"])
def test_kept_tokens_equal_eager_reference(family, mode):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    att = _eager_layer_attn(model, batch.inputs, 0)
    ref = _reference_keep(att, batch.inputs, batch.truth, 0.5, mode)
    with vlmplug.apply(model, "fastv", layer=1, keep_ratio=0.5, scores=mode) as h, torch.no_grad():
        out = model.generate(**batch.inputs, **GEN)
        assert out.shape[1] == batch.inputs["input_ids"].shape[1] + 4
        for b in range(2):
            assert _alive_images(h, b, batch.truth) == ref[b]
        st = h.stats["fastv"]
    assert [sum(x) for x in st["tokens_kept_per_image"]] == [len(r) for r in ref]
    assert st["flops_saved"] > 0 and st["tokens_per_layer"][1] < st["tokens_per_layer"][0]


def test_padded_batch_equals_each_sample_alone(family):
    model = tiny(family)
    batch = make_batch(family, model, (2, 1, 0))
    with vlmplug.apply(model, "fastv", layer=1, keep_tokens=3), torch.no_grad():
        together = model(**batch.inputs).logits[:, -1]
        gt = model.generate(**batch.inputs, **GEN)
        for b in range(3):
            single = split_batch(batch, b)
            alone = model(**single.inputs).logits[:, -1]
            assert (alone[0] - together[b]).abs().max() <= 1e-4, b
            ga = model.generate(**single.inputs, **GEN)
            assert torch.equal(ga[0, -4:], gt[b, -4:]), b


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
def test_bf16_and_budget_errors(fam):
    model = tiny(fam, torch.bfloat16)
    batch = make_batch(fam, model, (1,))
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    with vlmplug.apply(model, "fastv", layer=1, keep_tokens=2) as h, torch.no_grad():
        model.generate(**inputs, **GEN)
        assert h.stats["fastv"]["tokens_kept_per_image"] == [[2]]
    with pytest.raises(vlmplug.MethodConfigError, match="keep_ratio=1.5"):
        vlmplug.apply(model, "fastv", keep_ratio=1.5)
    with pytest.raises(vlmplug.MethodConfigError, match="not both"):
        vlmplug.apply(model, "fastv", keep_ratio=0.5, keep_tokens=3)
    with pytest.raises(vlmplug.MethodConfigError, match="layer=5"):
        vlmplug.apply(model, "fastv", layer=5)
    assert "_vlmplug_handle" not in vars(model)


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "internvl"])
def test_composes_with_record(fam):
    """record after a drop sees only kept image tokens, at their original grid cells."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    from vlmplug.methods.pruning.fastv import FastV

    with vlmplug.apply(model, [vlmplug.Record(), FastV(layer=1, keep_tokens=3)]) as h, torch.no_grad():
        model.generate(**batch.inputs, **GEN)
        maps = h.image_attention()
        lay = h.layout
        for b in range(2):
            alive = set(_alive_images(h, b, batch.truth))
            for im, m in zip(lay.samples[b].images, maps[b]):
                v = im.main_view
                kept_cells = torch.tensor([int(p) in alive for p in v.positions]).view(v.rows, v.cols)
                assert torch.equal(m[1].abs().sum(0) > 0, kept_cells)  # layer 1 (after the drop)
                assert (m[0] > 0).all()  # layer 0 sees every token


def test_defaults_are_the_papers_headline_setting():
    """FastV's paper: "1/2 tokens after layer 2", i.e. K=2, R=50% (reference notes 2.1; README A-OKVQA table). The
    tiny models have 2 layers (K=1 is the only cut): with the default ratio each sample keeps round(n / 2)."""
    cfg = vlmplug.FastV()
    assert (cfg.layer, cfg.keep_ratio, cfg.keep_tokens, cfg.scores) == (2, 0.5, None, "last")
    model = tiny("llava")
    batch = make_batch("llava", model, (1, 2))
    with vlmplug.apply(model, "fastv", layer=1) as h, torch.no_grad():
        model(**batch.inputs)
        kept = h.stats["fastv"]["tokens_kept_per_image"]
    n = [sum(len(im.positions) for im in images) for images in batch.truth]  # 16 and 32 image tokens
    assert [sum(k) for k in kept] == [round(x / 2) for x in n] == [8, 16]


@pytest.mark.parametrize("mode", ["last", "all"])
def test_scores_equal_eager_reference_values(family, mode):
    """The scores FastV ranks by (its probe's head-mean rows, every key of layer K-1) equal eager attention averaged
    by the paper's rule: for "all", every real query row from the first real token to the last one included, and no
    padding row. Values, not only the top-k: a rule that drops a row or counts padding rescales or shifts them."""
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    ref = _reference_scores(_eager_layer_attn(model, batch.inputs, 0), batch.inputs, mode)
    with vlmplug.apply(model, "fastv", layer=1, keep_ratio=0.5, scores=mode) as h, torch.no_grad():
        runner = h.method("fastv")
        seen = []
        orig = runner.tokens_to_keep

        def spy(ctx):
            if "probs" in runner._scores:
                seen.append(runner._scores["probs"].clone())
            return orig(ctx)

        runner.tokens_to_keep = spy
        model(**batch.inputs)
    assert len(seen) == 1
    probs = seen[0]
    for b in range(2):  # every key, padding (0 in both) included
        got = probs[b].double()
        assert got.shape == ref[b].shape
        assert (got - ref[b]).abs().max() <= 1e-5, b


# fp32 reference scores whose k-th and (k+1)-th image tokens differ by at least this share of the top score are
# ranked the same way in bf16: the largest bf16 - fp32 difference of these scores on the tiny families is 0.43% of
# the top score (gemma3; llava 0.8e-3 of 0.1), so a 2% gap leaves both scores more than twice their error apart
BF16_MARGIN = 0.02


@pytest.mark.parametrize("fam", FAMILIES)
def test_bf16_selection_equals_fp32_reference_where_the_margin_allows(fam):
    """bf16 keeps the tokens the fp32 eager reference keeps, at the budget k with the largest fp32 gap between the
    k-th and (k+1)-th score (the same k for both samples; asserted to clear the bf16 error by the margin)."""
    ref_model = tiny(fam)
    batch = make_batch(fam, ref_model, (1, 2))
    att = _eager_layer_attn(ref_model, batch.inputs, 0)
    scores = _reference_scores(att, batch.inputs)
    imgs = [torch.tensor(sorted(p for im in images for p in im.positions)) for images in batch.truth]
    best_k, best_gap = None, -1.0
    for k in range(1, min(len(i) for i in imgs)):
        gap = min(float((s[i].sort(descending=True).values[k - 1] - s[i].sort(descending=True).values[k]) / s[i].max())
                  for s, i in zip(scores, imgs))
        if gap > best_gap:
            best_k, best_gap = k, gap
    assert best_gap >= BF16_MARGIN, f"{fam}: no budget separates the fp32 scores by {BF16_MARGIN:.0%} ({best_gap:.3g})"
    ref = _reference_keep(att, batch.inputs, batch.truth, None, keep=best_k)
    model = tiny(fam, torch.bfloat16)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    with vlmplug.apply(model, "fastv", layer=1, keep_tokens=best_k) as h, torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
        got = [_alive_images(h, b, batch.truth) for b in range(2)]
    assert got == ref
    assert all(torch.isfinite(x.float()).all() for x in g.logits)

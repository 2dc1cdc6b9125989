"""FastV on every family: identity at keep_ratio=1, the kept set equals the eager reference's top-k,
padding-invariant batches, generate() through the pruned KV cache."""
import pytest
import torch

import vlmplug
from conftest import tiny
from reference import eager_attentions
from vlmplug.testing.tiny import make_batch, split_batch

GEN = dict(max_new_tokens=4, do_sample=False)


def _eager_layer_attn(model, inputs, layer):
    return eager_attentions(model, inputs)[layer]


def _reference_keep(att, inputs, truth, ratio, mode="last"):
    """FastV's selection written from the paper/code: head-mean attention row(s), top round(n*ratio)."""
    am = inputs["attention_mask"]
    out = []
    for b, images in enumerate(truth):
        img = torch.tensor(sorted(p for im in images for p in im.positions), dtype=torch.long)
        real = torch.nonzero(am[b]).flatten()
        if mode == "last":
            s = att[b, :, real[-1]].mean(0)
        else:
            s = att[b][:, real[0]: real[-1] + 1].mean(0).mean(0)
        k = int(round(img.numel() * ratio))
        sc = s[img]
        top = sorted(img[torch.argsort(sc.double(), descending=True, stable=True)[:k]].tolist())
        out.append(top)
    return out


def _alive_images(h, b):
    s = h.session.state
    keep = s.keep[b]
    if s.dead is not None:
        keep = keep[~s.dead[b]]
    img = h.layout.samples[b].image_positions
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
            assert _alive_images(h, b) == ref[b]
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
            alive = set(_alive_images(h, b))
            for im, m in zip(lay.samples[b].images, maps[b]):
                v = im.main_view
                kept_cells = torch.tensor([int(p) in alive for p in v.positions]).view(v.rows, v.cols)
                assert torch.equal(m[1].abs().sum(0) > 0, kept_cells)  # layer 1 (after the drop)
                assert (m[0] > 0).all()  # layer 0 sees every token

"""Smoke tests for vlmplug.testing.tiny: every family builds, runs forward + generate, and the
ground truth of image-token positions / grids is consistent with the inputs and the model."""

from __future__ import annotations

import time

import pytest
import torch

from vlmplug.testing import tiny
from vlmplug.testing.tiny import FAMILIES, SPECIAL_IDS, build_tiny_model, make_batch, split_batch

LAYOUTS = [(1, 2), (1, 0)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops: intra-op threads only add overhead, and are 30-50x slower when the cores are busy.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# Build each model once per test session (each build is well under a second anyway).
_MODELS: dict[str, torch.nn.Module] = {}


def _model(family):
    if family not in _MODELS:
        _MODELS[family] = build_tiny_model(family)
    return _MODELS[family]


def _check_truth(family, model, batch):
    ids = batch.inputs["input_ids"]
    am = batch.inputs["attention_mask"]
    img = model.config.image_token_id
    assert img == tiny.IDS["image"]
    for s, images in enumerate(batch.truth):
        all_pos = []
        for it in images:
            assert it.positions == sorted(it.positions)
            assert len(set(it.positions)) == len(it.positions)
            assert (ids[s, it.positions] == img).all()
            assert (am[s, it.positions] == 1).all()
            in_views = set()
            for v in it.views:
                assert len(v.positions) == v.rows * v.cols > 0
                assert set(v.positions) <= set(it.positions)
                assert not (set(v.positions) & in_views), "views overlap"
                in_views |= set(v.positions)
            extra = set(it.positions) - in_views
            if family in ("llava_next", "llava_onevision"):
                # newline slots: image-token ids that belong to no view; one per high-res row, or one
                # after the base grid when there is no high-res grid (OneVision multi-image)
                hi = [v for v in it.views if v.name == "highres"]
                assert it.views[0].name == "base"
                assert len(extra) == (hi[0].rows if hi else 1)
                assert (ids[s, sorted(extra)] == img).all()
                if hi:  # each newline slot directly follows the last cell of a high-res row
                    ends = {hi[0].positions[r * hi[0].cols + hi[0].cols - 1] + 1 for r in range(hi[0].rows)}
                    assert ends == extra
            else:
                assert not extra
            all_pos += it.positions
        # no image token outside the truth
        assert sorted(all_pos) == torch.nonzero(ids[s] == img).flatten().tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_forward_generate_truth(family):
    tiny._model_class(family)  # resolve the lazy transformers import outside the timing
    tiny.tiny_config(family)
    t0 = time.perf_counter()
    model = build_tiny_model(family)
    assert time.perf_counter() - t0 < 1.0
    _MODELS[family] = model
    assert not model.training
    cfg = model.config.get_text_config()
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    for layout in LAYOUTS:
        batch = make_batch(family, model, layout)
        assert batch.family == family
        assert [len(t) for t in batch.truth] == list(layout)
        assert [len(s) for s in batch.image_sizes] == list(layout)
        ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        # left padding: samples differ in length, pad at the start of the shorter one
        lens = am.sum(-1).tolist()
        assert len(set(lens)) == len(lens)
        for s, n in enumerate(lens):
            assert (am[s, ids.shape[1] - n:] == 1).all() and (am[s, : ids.shape[1] - n] == 0).all()
            assert (ids[s, : ids.shape[1] - n] == cfg.pad_token_id).all()
        # random text is drawn from a range holding no special id
        for s in range(ids.shape[0]):
            real = ids[s][am[s].bool()]
            is_text = (real >= tiny.TEXT_LOW) & (real < tiny.TEXT_HIGH)
            assert not set(real[is_text].tolist()) & set(SPECIAL_IDS)
            assert set(real[~is_text].tolist()) <= set(SPECIAL_IDS) | {cfg.bos_token_id}
        _check_truth(family, model, batch)

        with torch.no_grad():
            out = model(**batch.inputs)
        assert out.logits.shape[:2] == ids.shape
        assert torch.isfinite(out.logits).all()
        gen = model.generate(**batch.inputs, max_new_tokens=3, do_sample=False)
        assert gen.shape[0] == ids.shape[0] and ids.shape[1] < gen.shape[1] <= ids.shape[1] + 3
        assert (gen[:, : ids.shape[1]] == ids).all()
        assert not set(gen[:, ids.shape[1]:].flatten().tolist()) & set(SPECIAL_IDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_batch_matches_batch(family):
    model = _model(family)
    batch = make_batch(family, model, (1, 2, 0), seed=3)
    with torch.no_grad():
        full = model(**batch.inputs).logits
    for i in range(3):
        one = split_batch(batch, i)
        assert one.inputs["attention_mask"].all()
        n = one.inputs["input_ids"].shape[1]
        pad = full.shape[1] - n
        assert torch.equal(one.inputs["input_ids"][0], batch.inputs["input_ids"][i, pad:])
        assert [[p + pad for p in it.positions] for it in one.truth[0]] == [it.positions for it in batch.truth[i]]
        assert one.image_sizes == [batch.image_sizes[i]]
        if not batch.truth[i]:
            assert "pixel_values" not in one.inputs
        _check_truth(family, model, one)
        with torch.no_grad():
            logits = model(**one.inputs).logits
        torch.testing.assert_close(logits[0], full[i, pad:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_grid_matches_mrope(family):
    """The (row, col) of each grid cell agrees with the model's own M-RoPE (t, h, w) position ids."""
    model = _model(family)
    batch = make_batch(family, model, (1, 2))
    inp = batch.inputs
    pos, _ = model.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp["image_grid_thw"],
                                        attention_mask=inp["attention_mask"])
    for s, images in enumerate(batch.truth):
        for it in images:
            (v,) = it.views
            assert v.name == "image"
            h = pos[1, s, v.positions].view(v.rows, v.cols)
            w = pos[2, s, v.positions].view(v.rows, v.cols)
            assert torch.equal(h - h[0, 0], torch.arange(v.rows)[:, None].expand(v.rows, v.cols))
            assert torch.equal(w - w[0, 0], torch.arange(v.cols)[None].expand(v.rows, v.cols))


def test_default_views():
    """The default layouts exercise differing grids per image."""
    views = {}
    for family in FAMILIES:
        b = make_batch(family, _model(family), (1, 2))
        views[family] = [[(v.name, v.rows, v.cols) for v in it.views] for imgs in b.truth for it in imgs]
    assert len({tuple(v) for v in views["llava_next"]}) == 3  # three different anyres grids
    assert views["llava_onevision"][1] == [("base", 4, 4)]  # multi-image sample: base grid only
    assert len({tuple(v) for v in views["qwen2_vl"]}) == 3
    assert [n for n, _, _ in views["idefics3"][0]] == ["tile_0_0", "tile_0_1", "tile_1_0", "tile_1_1", "global"]
    assert views["idefics3"][1] == [("global", 4, 4)]
    assert views["internvl"][0] == [("image", 2, 2)]
    assert views["internvl"][1][-1] == ("thumbnail", 2, 2)
    assert views["gemma3"][0] == [("image", 2, 2)]


def test_gemma3_image_block_is_bidirectional_in_batch():
    model = _model("gemma3")
    batch = make_batch("gemma3", model, (1, 2))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch.inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    for s, images in enumerate(batch.truth):
        for it in images:
            first, last = it.positions[0], it.positions[-1]
            assert (out.attentions[0][s, :, first, last] > 0).all()  # earlier image token sees a later one
            nxt = last + 1  # but nothing sees the future outside the block
            assert (out.attentions[0][s, :, first, nxt] == 0).all()


def test_image_features_distinct_and_attention_sharp():
    for family in ("llava", "gemma3", "qwen2_vl", "idefics3"):
        model = _model(family)
        batch = make_batch(family, model, (1,))
        lm = model.model.language_model if hasattr(model.model, "language_model") else model.model.text_model
        cap = {}
        h = lm.register_forward_pre_hook(lambda m, a, kw: cap.__setitem__("e", kw["inputs_embeds"]),
                                         with_kwargs=True)
        try:
            with torch.no_grad():
                model(**batch.inputs)
        finally:
            h.remove()
        pos = [p for v in batch.truth[0][0].views for p in v.positions]
        x = cap["e"][0, pos].float()
        d = torch.cdist(x, x) + torch.eye(len(pos)) * 1e9
        assert d.min() > 0.1 * x.norm(dim=-1).mean(), family
    # sharpening makes attention clearly non-uniform
    model = build_tiny_model("llava", sharpen=8.0)
    flat = build_tiny_model("llava", sharpen=1.0)
    batch = make_batch("llava", model, (1,))

    def entropy(m):
        m.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                a = m(**batch.inputs, output_attentions=True).attentions[-1][0, :, -1]
        finally:
            m.set_attn_implementation("sdpa")
        return -(a * a.clamp_min(1e-12).log()).sum(-1).mean().item()

    assert entropy(model) < entropy(flat) - 0.05

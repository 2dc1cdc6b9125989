"""The honest baselines of issue 14: `random` (seeded uniform drop) and `pool` (average pooling of each view's token
grid), both before the LLM. Budgets exact per image (counted from the tiny batches' own ground truth), the random
selection seeded, reproducible, independent of the global RNG and uniform, pool's features equal to a hand-computed
average of the unpatched model's projected features, full budget = the unpatched model, generate() with the KV cache
= without it, a left-padded batch = each sample alone, apply -> remove restores the model."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import vlmplug
from conftest import tiny
from vlmplug.methods.pruning.pool import pool_cells, pooled_grid
from vlmplug.methods.pruning.random_drop import image_seed, random_select
from vlmplug.testing.tiny import make_batch, split_batch

GEN = dict(max_new_tokens=4, do_sample=False)
METHODS = ("random", "pool")


# ---------------------------------------------------------------------------------------------- independent rules
def _budget(n, keep_ratio=None, keep_tokens=None):
    return min(n, keep_tokens) if keep_tokens is not None else min(n, int(round(n * keep_ratio)))


def _largest_remainder(k, sizes):
    """k split over sizes in proportion (largest remainder, ties to the earlier part)."""
    k = min(k, sum(sizes))
    exact = [k * s / sum(sizes) for s in sizes]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (out[i] - exact[i], i))[: k - sum(out)]:
        out[i] += 1
    return out


def _expected_kept(method, image, **budget):
    """Tokens one image keeps (ImageTruth: the tiny batch's own ground truth, not vlmplug's layout)."""
    n = len(image.positions)
    k = _budget(n, **budget)
    if k >= n:
        return n
    if method == "random":
        return k
    sizes = [v.rows * v.cols for v in image.views]
    assert sum(sizes) == len({p for v in image.views for p in v.positions})  # the truth's views are disjoint
    total = 0
    for v, kv in zip(image.views, _largest_remainder(k, sizes)):
        r, c = pooled_grid(v.rows, v.cols, kv)
        total += r * c
    return total


# ------------------------------------------------------------------------------------------------ pool's grid rule
@pytest.mark.parametrize("R,C,k,grid", [
    (24, 24, 64, (8, 8)), (24, 24, 128, (11, 11)), (24, 24, 144, (12, 12)), (24, 24, 192, (13, 14)),
    (24, 24, 50, (7, 7)), (4, 6, 10, (3, 3)), (4, 6, 12, (3, 4)), (4, 4, 2, (1, 2)), (4, 4, 8, (2, 3)),
    (4, 4, 9, (3, 3)), (4, 8, 17, (3, 5)), (2, 50, 3, (1, 3)), (50, 2, 3, (3, 1)), (4, 4, 16, (4, 4)),
    (4, 4, 0, (0, 0)), (4, 4, 1, (1, 1)),
])
def test_pooled_grid_hand_values(R, C, k, grid):
    assert pooled_grid(R, C, k) == grid


def test_pooled_grid_rule_brute_force():
    """Every grid up to 12 x 12 and budget: the largest rows*cols <= k among grids whose sides are within one cell of
    the exactly scaled grid (R*s, C*s), ties to the closest aspect ratio, then fewer rows."""
    for R in range(1, 13):
        for C in range(1, 13):
            for k in range(1, R * C):
                s = math.sqrt(k / (R * C))
                ok = [(r, c) for r in range(1, R + 1) for c in range(1, C + 1)
                      if r * c <= k and abs(r - R * s) < 1 and abs(c - C * s) < 1]
                if not ok:  # a scaled side below one cell
                    assert R * s < 1 or C * s < 1
                    want = (1, min(C, k)) if R * s < 1 else (min(R, k), 1)
                else:
                    want = max(ok, key=lambda g: (g[0] * g[1], -Fraction(max(g[0] * C, g[1] * R), min(g[0] * C, g[1] * R)), -g[0]))
                assert pooled_grid(R, C, k) == want, (R, C, k)


def test_pool_cells_equal_avg_pool2d_when_divisible():
    x = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    cell, centre = pool_cells(6, 8, 3, 2)
    flat = x[0].reshape(3, -1).T  # [48, 3] row-major tokens
    means = torch.zeros(6, 3, dtype=torch.float64).index_add_(0, cell, flat) / torch.bincount(cell)[:, None]
    ref = torch.nn.functional.avg_pool2d(x, (2, 4))[0].reshape(3, -1).T
    assert torch.allclose(means, ref)
    # centre token of each 2 x 4 cell: row top + 0, column left + 1
    assert centre.tolist() == [r * 8 + c for r in (0, 2, 4) for c in (1, 5)]


# ------------------------------------------------------------------------------------------ budgets (stats) exact
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [dict(keep_tokens=1), dict(keep_tokens=5), dict(keep_ratio=0.3),
                                    dict(keep_ratio=0.5)], ids=["k1", "k5", "r0.3", "r0.5"])
def test_budget_per_image(family, method, budget):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    with vlmplug.apply(model, method, **budget) as h, torch.no_grad():
        model(**batch.inputs)
        kept = h.stats[method]["tokens_kept_per_image"]
    want = [[_expected_kept(method, im, **budget) for im in sample] for sample in batch.truth]
    assert kept == want
    if method == "random":  # exactly the budget
        assert kept == [[_budget(len(im.positions), **budget) for im in s] for s in batch.truth]


def test_pool_budget_hand_counts_llava_next():
    """LLaVA-NeXT image of 52 tokens (base 4x4, high-res 4x8, 4 newlines), keep_ratio 0.5: 26 split 9 / 17 over the
    grids -> 3x3 and 3x5 pooled cells = 24 tokens, newlines dropped. `random`: exactly 26 = 9 + 17, no newline."""
    model = tiny("llava_next")
    batch = make_batch("llava_next", model, (1,))
    im = batch.truth[0][0]
    assert [(v.rows, v.cols) for v in im.views] == [(4, 4), (4, 8)] and len(im.positions) == 52
    for method, per_view in (("pool", (9, 15)), ("random", (9, 17))):
        with vlmplug.apply(model, method, keep_ratio=0.5) as h, torch.no_grad():
            model(**batch.inputs)
            keep = set(h.session.state.keep[0].tolist())
            assert h.stats[method]["tokens_kept_per_image"] == [[sum(per_view)]]
        assert tuple(len(keep & set(v.positions)) for v in im.views) == per_view
        newlines = set(im.positions) - {p for v in im.views for p in v.positions}
        assert len(newlines) == 4 and not keep & newlines


# ----------------------------------------------------------------------------------------------------- random
def _kept(model, batch, **params):
    with vlmplug.apply(model, "random", **params) as h, torch.no_grad():
        model(**batch.inputs)
        st = h.session.state
        return [k[~d].tolist() if st.dead is not None else k.tolist() for k, d in
                zip(st.keep, st.dead if st.dead is not None else [None] * len(st.keep))]


def test_random_is_seeded_reproducible_and_ignores_the_global_rng(family):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    torch.manual_seed(1)
    first = _kept(model, batch, keep_tokens=3)
    torch.manual_seed(12345)
    rng = torch.get_rng_state()
    again = _kept(model, batch, keep_tokens=3)
    assert torch.equal(torch.get_rng_state(), rng), "random drew from the global RNG"
    assert again == first
    by_seed = {tuple(map(tuple, _kept(model, batch, keep_tokens=3, seed=s))) for s in range(4)}
    assert tuple(map(tuple, first)) in by_seed and len(by_seed) > 1, "the seed does not change the selection"


def test_random_images_of_a_prompt_draw_differently():
    """The two same-size images of a LLaVA sample draw from generators seeded by their places (0 and 1)."""
    model = tiny("llava")
    batch = make_batch("llava", model, (2,))
    keep = set(_kept(model, batch, keep_tokens=4)[0])
    a, b = (im.positions for im in batch.truth[0])
    rel = [sorted(i for i, p in enumerate(pos) if p in keep) for pos in (a, b)]
    assert len(rel[0]) == len(rel[1]) == 4 and rel[0] != rel[1]
    assert image_seed(0, 0) != image_seed(0, 1) != image_seed(1, 1)


def test_random_selection_is_uniform():
    """Each of 16 rows is kept by about 4 of 16 draws; each 2-view draw splits its budget 4 / 8 (sizes 8 and 16)."""
    counts = torch.zeros(16)
    n = 4000
    for s in range(n):
        g = torch.Generator().manual_seed(image_seed(s, 0))
        counts[random_select([torch.arange(16)], torch.zeros(0, dtype=torch.long), 4, g)] += 1
    freq = counts / n
    assert (freq - 0.25).abs().max() < 0.035, freq  # ~5 standard deviations (sd 0.0068)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        kept = random_select([torch.arange(8), torch.arange(8, 24)], torch.arange(24, 26), 12, g)
        assert len(set(kept.tolist())) == 12 and int((kept < 8).sum()) == 4 and int((kept >= 24).sum()) == 0
    kept = random_select([torch.arange(8)], torch.arange(8, 12), 10, g)  # more than the views hold: extras fill
    assert sorted(kept.tolist())[:8] == list(range(8)) and len(set(kept.tolist())) == 10


# ----------------------------------------------------------------------------------------------------- pool
def _layer0_inputs(model):
    """Decoder layer 0's input hidden states (after vlmplug drops tokens before it)."""
    from vlmplug.adapters import get_adapter

    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    return seen, get_adapter(model).decoder_layers()[0].register_forward_pre_hook(hook, with_kwargs=True)


# bands of the documented rule, written out by hand: (token rows of each pooled row, the centre row of each)
HAND_BANDS = {(4, 2): ([[0, 1], [2, 3]], [0, 2]), (4, 3): ([[0], [1], [2, 3]], [0, 1, 2]),
              (4, 1): ([[0, 1, 2, 3]], [1])}


@pytest.mark.parametrize("keep_tokens,grid", [(4, (2, 2)), (9, (3, 3)), (8, (2, 3)), (2, (1, 2))])
def test_pool_features_equal_hand_average_llava(keep_tokens, grid):
    model = tiny("llava")
    batch = make_batch("llava", model, (1, 2))
    cfg = model.config
    with torch.no_grad():  # the projected features, computed here from the unpatched model
        vt = model.model.vision_tower(batch.inputs["pixel_values"], output_hidden_states=True)
        hs = vt.hidden_states[cfg.vision_feature_layer]
        assert cfg.vision_feature_select_strategy == "default"
        feats = model.model.multi_modal_projector(hs[:, 1:]).double()  # [images, 16, D]
        embed = model.get_input_embeddings()(batch.inputs["input_ids"]).double()
    images = [im for s in batch.truth for im in s]
    assert feats.shape[:2] == (len(images), 16)
    expected = [{} for _ in batch.truth]  # sample -> {position: feature}
    i = 0
    for b, sample in enumerate(batch.truth):
        for im in sample:
            (v,) = im.views
            assert (v.rows, v.cols) == (4, 4)
            F = feats[i].reshape(4, 4, -1).numpy()
            rbands, rcentre = HAND_BANDS[(4, grid[0])]
            cbands, ccentre = HAND_BANDS[(4, grid[1])]
            for rb, rc in zip(rbands, rcentre):
                for cb, cc in zip(cbands, ccentre):
                    cell = np.stack([F[y, x] for y in rb for x in cb])
                    expected[b][v.positions[rc * 4 + cc]] = cell.mean(0)
            i += 1
    with vlmplug.apply(model, "pool", keep_tokens=keep_tokens) as h, torch.no_grad():
        seen, hook = _layer0_inputs(model)
        try:
            model(**batch.inputs)
        finally:
            hook.remove()
        st = h.session.state
        keep, dead = st.keep, st.dead
    (hidden,) = seen
    for b, sample in enumerate(batch.truth):
        image_pos = {p for im in sample for p in im.positions}
        rows = {int(p): hidden[b, t].double().numpy() for t, p in enumerate(keep[b].tolist())
                if dead is None or not bool(dead[b, t])}
        kept_image = {p for p in rows if p in image_pos}
        assert kept_image == set(expected[b]), "pooled tokens are not at the cells' centre tokens"
        for p, want in expected[b].items():
            assert np.allclose(rows[p], want, atol=1e-5), (b, p, np.abs(rows[p] - want).max())
        for p in set(rows) - image_pos:  # text and padding tokens: their own embeddings
            assert np.array_equal(rows[p], embed[b, p].numpy())


# --------------------------------------------------------------------------------- identity, generate, batches
@pytest.mark.parametrize("method", METHODS)
def test_full_budget_is_identity(family, method):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    gen = dict(GEN, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(**batch.inputs, **gen)
    with vlmplug.apply(model, method, keep_ratio=1.0), torch.no_grad():
        out = model.generate(**batch.inputs, **gen)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_the_kv_cache_equals_without(family, method):
    """The cached generate() (pre-LLM drop, padded layer-0 cache) gives what re-running the whole sequence each step
    gives; its prefill logits equal one plain forward's."""
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    gen = dict(GEN, output_logits=True, return_dict_in_generate=True)
    with vlmplug.apply(model, method, keep_ratio=0.4) as h, torch.no_grad():
        fwd = model(**batch.inputs).logits[:, -1]
        cached = model.generate(**batch.inputs, **gen)
        assert h.stats[method]["tokens_kept_per_image"] == [[_expected_kept(method, im, keep_ratio=0.4) for im in s]
                                                            for s in batch.truth]
        uncached = model.generate(**batch.inputs, use_cache=False, **gen)
    L = batch.inputs["input_ids"].shape[1]
    assert cached.sequences.shape[1] == L + GEN["max_new_tokens"]
    assert (cached.logits[0] - fwd).abs().max() <= 1e-5
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        assert (a - b).abs().max() <= 1e-4


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fam", ["llava", "llava_next", "qwen2_vl", "idefics3", "internvl", "gemma3"])
def test_padded_batch_equals_each_sample_alone(fam, method):
    model = tiny(fam)
    batch = make_batch(fam, model, (2, 1, 0))
    with vlmplug.apply(model, method, keep_ratio=0.4), torch.no_grad():
        together = model(**batch.inputs).logits[:, -1]
        gt = model.generate(**batch.inputs, **GEN)
        for b in range(3):
            single = split_batch(batch, b)
            alone = model(**single.inputs).logits[:, -1]
            assert (alone[0] - together[b]).abs().max() <= 1e-4
            assert torch.equal(model.generate(**single.inputs, **GEN)[0, -4:], gt[b, -4:])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fam", ["llava_next", "idefics3", "qwen3_vl"])
def test_apply_remove_restores(fam, method):
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    with torch.no_grad():
        model(**batch.inputs)  # transformers installs some hooks lazily at the first forward
        ref = model(**batch.inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    fns = {k: id(v) for k, v in vars(model.model).items() if callable(v)}
    h = vlmplug.apply(model, method, keep_tokens=3)
    with torch.no_grad():
        patched = model(**batch.inputs).logits
        model.generate(**batch.inputs, **GEN)
    assert not torch.equal(patched, ref)
    h.remove()
    assert "_vlmplug_handle" not in vars(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert {k: id(v) for k, v in vars(model.model).items() if callable(v)} == fns
    with torch.no_grad():
        assert torch.equal(model(**batch.inputs).logits, ref)


def test_configs_and_errors():
    cfg = vlmplug.RandomDrop(keep_ratio=0.25, seed=7)
    assert cfg.to_dict() == {"method": "random", "keep_ratio": 0.25, "keep_tokens": None, "seed": 7}
    assert vlmplug.MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert vlmplug.Pool().keep_tokens == 64 and vlmplug.RandomDrop().keep_tokens == 64  # the pre-LLM default
    assert cfg.replace(keep_tokens=9).keep_ratio is None
    for bad in (dict(seed=-1), dict(seed=2.0), dict(seed=True), dict(keep_ratio=0.5, keep_tokens=3),
                dict(keep_ratio=float("nan"))):
        with pytest.raises(vlmplug.MethodConfigError):
            vlmplug.RandomDrop(**bad)
    for bad in (dict(keep_tokens=-1), dict(keep_ratio=1.5), dict(keep_ratio=0.5, keep_tokens=3)):
        with pytest.raises(vlmplug.MethodConfigError):
            vlmplug.Pool(**bad)
    assert {"random", "pool"} <= set(vlmplug.available_methods())

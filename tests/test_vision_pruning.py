"""HiPrune and VisionZip against references written from the papers' rules over eager vision
attention (captured with an eager attention function on the unpatched model), and end-to-end against
masked eager attention with the reference's tokens removed.

The references take the tower's geometry (CLS, feature layer, pooling, merge runs, windows) from the model config and
hand-built layouts (tests/geometry.py, itself checked against the models in test_geometry.py), never from the code
under test; "llava_deep" is LLaVA with a 3-layer tower reading layer 1 (vision_feature_layer = -2, LLaVA-1.5's
choice), so a method reading the wrong layer disagrees with its reference. Only LLaVA-NeXT / OneVision's packed crop
map comes from the adapter: test_vision_grid_maps_patches_to_their_llm_tokens checks it by perturbing patches."""
import functools

import pytest
import torch

import vlmplug
from conftest import tiny
from geometry import (checked_samples, deeper, feature_capture, groups, qwen_widths, tower, vision_attention,
                      window_order)
from reference import eager_softmax, masked_eager_attention, register_reference, split_by_weight
from vlmplug.testing.tiny import build_tiny_model, make_batch, split_batch

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
HIPRUNE_FAMS = ["llava", "llava_deep", "gemma3", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl"]


def _model(name):
    """(family, model): the cached tiny model, or for "llava_deep" the 3-layer LLaVA reading layer 1."""
    return ("llava", deeper("llava", layers=3, feature_layer=-2)) if name == "llava_deep" else (name, tiny(name))


def _vision_capture(model, inputs):
    """Eager attention maps of every vision attention call, keys, and the projector input."""
    maps, keys, proj_in = {}, {}, []

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        a = eager_softmax(module, query, key, attention_mask, scaling, dict(kwargs, is_causal=False))
        maps.setdefault(id(module), []).append(a.float())
        keys.setdefault(id(module), []).append(key.mean(1).double())
        out = (a @ value.double()).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    register_reference("refvis", fn)
    handles = []
    proj = getattr(model.base_model, "multi_modal_projector", None)
    if proj is not None:
        handles.append(proj.register_forward_pre_hook(lambda m, a: proj_in.append(a[0].detach().clone())))
    model.set_attn_implementation({"vision_config": "refvis"})
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
        for h in handles:
            h.remove()
    mods = vision_attention(model)
    # per vision layer: one entry per crop, [H, S, S] (Qwen's tower attends per image: variable S)
    per_crop = [[a for call in maps[id(m)] for a in call] for m in mods]
    return per_crop, [torch.cat(keys[id(m)]) if len({k.shape for k in keys[id(m)]}) == 1 else None for m in mods], proj_in


def _window_order(model, batch):
    return window_order(model, batch.inputs)


def _unwindow(rows, grid, windowing):
    """rows [patches, d] in window order (all calls of a layer) -> per image [tokens, d] in token order."""
    order, sizes = windowing
    win = rows.double().view(-1, grid.merge, rows.shape[-1]).mean(1)
    out = torch.empty_like(win)
    for i, o in enumerate(order.tolist()):
        out[o] = win[i]
    return list(out.split(sizes))


def _token_scores(crops, grid, windowing=None):
    """Column mean over queries and heads, CLS column removed, pooled onto LLM tokens, per crop (windowed towers:
    per image, from every window's call)."""
    if grid.windowed:
        return [t[:, 0] for t in _unwindow(torch.cat([a.double().mean(0).mean(0) for a in crops])[:, None], grid, windowing)]
    out = []
    for a in crops:
        s = a.double().mean(0).mean(0)
        if grid.cls:
            s = s[1:]
        if grid.merge:
            out.append(s.view(-1, grid.merge).mean(1))
            continue
        side = int(round(s.numel() ** 0.5))
        if grid.pool > 1:
            s = torch.nn.functional.avg_pool2d(s.view(1, 1, side, side), grid.pool).flatten()
        out.append(s)
    return out


def _hiprune_ref(obj, deep, width, k, alpha):
    n = obj.numel()
    if k >= n:
        return list(range(n))
    anchors = sorted(range(n), key=lambda i: (-float(obj[i]), i))[: round(k * alpha / 5)]
    chosen = []
    for a in anchors:
        for j in (a, a - 1, a + 1, a - width, a + width):
            j = min(max(j, 0), n - 1)
            if j not in chosen:
                chosen.append(j)
    chosen = chosen[:k]
    rest = [i for i in sorted(range(n), key=lambda i: (-float(deep[i]), i)) if i not in chosen]
    return sorted(chosen + rest[: k - len(chosen)])


def _alive(h, b):
    s = h.session.state
    keep = s.keep[b] if s.dead is None else s.keep[b][~s.dead[b]]
    return keep


@pytest.mark.parametrize("fam", HIPRUNE_FAMS)
def test_hiprune_matches_reference(fam):
    fam, model = _model(fam)
    batch = make_batch(fam, model, (1, 2))
    grid = tower(model)
    widths = qwen_widths(model, batch.inputs) if grid.merge else None
    maps, _, _ = _vision_capture(model, batch.inputs)
    win = _window_order(model, batch) if grid.windowed else None
    obj = _token_scores(maps[0], grid, win)
    deep = _token_scores(maps[grid.feature_layer], grid, win)
    ratio, alpha = 0.5, 0.4
    with vlmplug.apply(model, "hiprune", keep_ratio=ratio, object_layer=0, alpha=alpha) as h, torch.no_grad():
        out = model(**batch.inputs).logits[:, -1]
        g = model.generate(**batch.inputs, **GEN)
        lay = h.layout
        alive = [_alive(h, b) for b in range(2)]
    crop, image = 0, 0
    dropped = torch.zeros(2, batch.inputs["input_ids"].shape[1], dtype=torch.bool)
    for b, s in enumerate(checked_samples(lay, batch)):
        for im in s.images:
            image += 1
            n = im.positions.numel()
            sizes, covered = [], 0
            while covered < n:
                sizes.append(obj[crop + len(sizes)].numel())
                covered += sizes[-1]
            assert covered == n, "the crops' tokens cover the image exactly"
            crops = len(sizes)
            k_total = int(round(n * ratio))
            ref, off = [], 0
            for c in range(crops):
                k = k_total // crops + (1 if c < k_total % crops else 0)
                width = widths[image - 1] if grid.merge else int(round(sizes[c] ** 0.5))
                ref += [i + off for i in _hiprune_ref(obj[crop + c], deep[crop + c], width, k, alpha)]
                off += sizes[c]
            crop += crops
            got = sorted(torch.nonzero(torch.isin(im.positions, alive[b])).flatten().tolist())
            assert got == sorted(ref)
            mask = torch.ones(n, dtype=torch.bool)
            mask[ref] = False
            dropped[b, im.positions[mask]] = True
    register_reference("refhip", masked_eager_attention(drop_from_layer=0, dropped=dropped))
    model.set_attn_implementation({"text_config": "refhip"})
    try:
        with torch.no_grad():
            ref_out = model(**batch.inputs).logits[:, -1]
            # Gemma 3's tiny sliding window is shorter than the prompt: decoding differs by design (README)
            gr = None if fam == "gemma3" else model.generate(**batch.inputs, **GEN)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert (out - ref_out).abs().max() <= 1e-5
    if gr is None:
        return
    assert torch.equal(g.sequences, gr.sequences)
    for a, b_ in zip(g.logits, gr.logits):
        assert (a - b_).abs().max() <= 1e-4


def _visionzip_ref(cls_attn, keys, hidden, k, share):
    n = cls_attn.numel()
    n_dom = min(k, round(k * share))
    dom = sorted(sorted(range(n), key=lambda i: (-float(cls_attn[i]), i))[:n_dom])
    rest = [i for i in range(n) if i not in dom]
    n_ctx = k - n_dom
    if n_ctx == 0:
        return dom, hidden.double().clone()
    step = max(1, len(rest) // n_ctx)
    targets = [rest[i] for i in range(0, len(rest), step)][:n_ctx]
    others = [i for i in rest if i not in targets]
    kn = torch.nn.functional.normalize(keys.double(), dim=-1)
    h = hidden.double().clone()
    groups = {t: [] for t in targets}
    for o in others:
        sims = [float(kn[o] @ kn[t]) for t in targets]
        groups[targets[max(range(len(targets)), key=lambda j: (sims[j], -j))]].append(o)
    for t, members in groups.items():
        if members:
            h[t] = hidden[t].double() + hidden[members].double().mean(0)
    return sorted(dom + targets), h


@pytest.mark.parametrize("fam", ["llava", "llava_deep"])
@pytest.mark.parametrize("share", [5.4 / 6.4, 0.5])
def test_visionzip_matches_reference_end_to_end(share, fam):
    """share 5.4/6.4 (the paper's split): 7 dominant + 1 contextual token of 8; 0.5: 4 + 4, so each remaining token
    must join its MOST similar target (official code: argmax of the normalised keys' dot products)."""
    fam, model = _model(fam)
    batch = make_batch(fam, model, (1, 2))
    grid = tower(model)
    maps, keys, proj_in = _vision_capture(model, batch.inputs)
    cls = torch.stack([a[:, 0, 1:].sum(0) for a in maps[grid.feature_layer]])
    ks = keys[grid.feature_layer][:, 1:]
    hidden = proj_in[0]
    k = 8
    refs = [_visionzip_ref(cls[c], ks[c], hidden[c], k, share) for c in range(hidden.shape[0])]
    if share == 0.5:  # several contextual tokens, and the merge targets differ from a least-similar assignment
        assert _contextual_groups(cls, ks, k, share, most=True) != _contextual_groups(cls, ks, k, share, most=False)
    with vlmplug.apply(model, "visionzip", keep_tokens=k, dominant_share=share) as h, torch.no_grad():
        g = model.generate(**batch.inputs, **GEN)
        lay = h.layout
        alive = [_alive(h, b) for b in range(2)]
    images = [(b, im) for b, s in enumerate(checked_samples(lay, batch)) for im in s.images]
    dropped = torch.zeros(2, batch.inputs["input_ids"].shape[1], dtype=torch.bool)
    assert len(images) == len(refs)
    for (b, im), (ref_keep, _) in zip(images, refs):
        got = sorted(torch.nonzero(torch.isin(im.positions, alive[b])).flatten().tolist())
        assert got == ref_keep
        mask = torch.ones(im.positions.numel(), dtype=torch.bool)
        mask[ref_keep] = False
        dropped[b, im.positions[mask]] = True
    # reference run: merged projector input + the reference's tokens removed from layer 0 on
    merged = torch.stack([r[1] for r in refs]).to(hidden.dtype)
    _check_merged_reference(model, batch, g, merged, dropped)


def _contextual_groups(cls, keys, k, share, most=True):
    """Per crop: {target: members} of VisionZip's contextual merge, each member joining its most (or least) similar
    target; a test's own check that several contextual tokens with members exist and the choice matters."""
    out = []
    for c in range(cls.shape[0]):
        n = cls[c].numel()
        n_dom = min(k, round(k * share))
        dom = sorted(range(n), key=lambda i: (-float(cls[c][i]), i))[:n_dom]
        rest = [i for i in range(n) if i not in dom]
        step = max(1, len(rest) // (k - n_dom))
        targets = [rest[i] for i in range(0, len(rest), step)][: k - n_dom]
        kn = torch.nn.functional.normalize(keys[c].double(), dim=-1)
        groups = {t: [] for t in targets}
        for o in rest:
            if o not in targets:
                sims = [float(kn[o] @ kn[t]) for t in targets]
                pick = max if most else min
                groups[targets[pick(range(len(targets)), key=lambda j: (sims[j], -j) if most else (sims[j], j))]].append(o)
        assert len(targets) == k - n_dom
        out.append(groups)
    return out


def _check_merged_reference(model, batch, g, merged, dropped):
    """Generate with the reference's merged projector input and its dropped tokens masked from layer 0 on
    (eager LLM attention); tokens and logits must match the patched run `g`."""
    hook = model.base_model.multi_modal_projector.register_forward_pre_hook(lambda m, a: (merged,))
    register_reference("refvz", masked_eager_attention(drop_from_layer=0, dropped=dropped))
    model.set_attn_implementation({"text_config": "refvz"})
    try:
        with torch.no_grad():
            gr = model.generate(**batch.inputs, **GEN)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        hook.remove()
    assert torch.equal(g.sequences, gr.sequences)
    for a, b_ in zip(g.logits, gr.logits):
        assert (a - b_).abs().max() <= 1e-4


@pytest.mark.parametrize("meth,fam,kw", [("hiprune", "llava", dict(object_layer=0)), ("hiprune", "idefics3", dict(object_layer=0)),
                                         ("visionzip", "llava", {}), ("hiprune", "llava_onevision", dict(object_layer=0)),
                                         ("visionzip", "llava_next", {}), ("flowcut", "llava_next", {}),
                                         ("flowcut", "llava_onevision", dict(decay=0.5))])
def test_identity_and_padded_batch(meth, fam, kw):
    model = tiny(fam)
    batch = make_batch(fam, model, (2, 1, 0))
    with torch.no_grad():
        ref = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
    with vlmplug.apply(model, meth, keep_ratio=1.0, **kw), torch.no_grad():
        assert torch.equal(model.generate(**batch.inputs, max_new_tokens=4, do_sample=False), ref)
    with vlmplug.apply(model, meth, keep_tokens=10**6, **kw), torch.no_grad():
        assert torch.equal(model.generate(**batch.inputs, max_new_tokens=4, do_sample=False), ref)
    with vlmplug.apply(model, meth, keep_tokens=5, **kw), torch.no_grad():
        gt = model.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
        for b in range(3):
            ga = model.generate(**split_batch(batch, b).inputs, max_new_tokens=4, do_sample=False)
            assert torch.equal(ga[0, -4:], gt[b, -4:])


def test_unsupported_families_say_so():
    """Every mapped tower takes hiprune / visionzip; flowcut refuses Qwen2.5-VL's windowed tower; a LLaVA whose
    features concatenate several layers has no single feature layer to map (nothing is patched on refusal)."""
    with pytest.raises(vlmplug.MethodConfigError, match="flowcut: 'qwen2_5_vl' attends within windows"):
        vlmplug.apply(tiny("qwen2_5_vl"), "flowcut")
    assert "_vlmplug_handle" not in vars(tiny("qwen2_5_vl"))
    model = build_tiny_model("llava")
    model.config.vision_feature_layer = [-2, -1]
    for meth in ("hiprune", "visionzip", "flowcut"):
        with pytest.raises(vlmplug.MethodConfigError, match=f"{meth}: scoring vision-tower patches is not implemented for 'llava'"):
            vlmplug.apply(model, meth)
    assert "_vlmplug_handle" not in vars(model)
    # a projector fed by the embeddings (feature layer before the first attention layer): nothing to score
    model.config.vision_feature_layer = -(model.config.vision_config.num_hidden_layers + 1)
    for meth in ("hiprune", "visionzip", "flowcut"):
        with pytest.raises(vlmplug.MethodConfigError, match=f"{meth}: the projector reads the vision embeddings"):
            vlmplug.apply(model, meth, **({"object_layer": 0} if meth == "hiprune" else {}))
    assert "_vlmplug_handle" not in vars(model)


@pytest.mark.parametrize("fam", HIPRUNE_FAMS + ["llava_next", "llava_onevision"])
def test_vision_grid_maps_patches_to_their_llm_tokens(fam):
    """Perturb one patch at the feature layer and see which LLM image-token rows move: exactly the tokens the
    grid mapping (used by every vision-side method) names, in the crop's place in token order. For LLaVA-NeXT /
    OneVision the adapter's packed crop map names them (none for a patch that unpadding removed)."""
    from vlmplug.adapters import get_adapter

    fam, model = _model(fam)
    batch = make_batch(fam, model, (1, 2))
    ad = get_adapter(model)
    grid = tower(model)
    attn = vision_attention(model)[grid.feature_layer]
    base = model.base_model
    orig = base.get_image_features
    feats, target = [], {}

    def hook(module, args, out):
        o = out[0] if isinstance(out, tuple) else out
        calls = target.setdefault("calls", [])
        calls.append(o.shape)
        if "where" in target and len(calls) - 1 == target["where"][0]:
            o = o.clone()
            delta = 50.0 * torch.randn(o.shape[-1], generator=torch.Generator().manual_seed(0))  # survives LayerNorm
            if o.dim() == 3:
                o[target["where"][1], target["where"][2]] += delta
            else:
                o[target["where"][2]] += delta
            return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
        return None

    capture = feature_capture(orig, feats)

    with vlmplug.apply(model, "record") as rec, torch.no_grad():  # the layout, for the packed maps
        model(**batch.inputs)
        images = [im for s in rec.layout.samples for im in s.images]
    h = attn.register_forward_hook(hook)
    base.get_image_features = capture
    try:
        with torch.no_grad():
            model(**batch.inputs)
            ref = feats.pop()
            shapes = list(target["calls"])
            # crops in token order: (call, index in call, patches); Qwen's tower runs one call per image (packed rows)
            crops = []
            for ci, s in enumerate(shapes):
                if len(s) == 3:
                    crops += [(ci, b, s[1]) for b in range(s[0])]
                else:
                    crops.append((ci, None, s[0]))
            expected = []  # per crop: patch -> sorted rows
            if grid.packed:
                row0 = 0
                for im in images:
                    n_crops, crop, patch = ad.crop_token_map(im)
                    for c in range(n_crops):
                        expected.append(lambda j, c=c, crop=crop, patch=patch, row0=row0:
                                        [row0 + int(r) for r in torch.nonzero((crop == c) & (patch == j)).flatten()])
                    row0 += crop.numel()
            elif grid.windowed:  # calls hold patches in window order: global group (p0 + j) // m, then un-permute
                order, _ = _window_order(model, batch)
                p0 = 0
                for ci, b, S in crops:
                    expected.append(lambda j, p0=p0: [int(order[(p0 + j) // grid.merge])])
                    p0 += S
                row0 = p0 // grid.merge
            else:
                row0 = 0
                for ci, b, S in crops:
                    gid, G = groups(S - (1 if grid.cls else 0), grid)
                    expected.append(lambda j, gid=gid, row0=row0: [row0 + int(gid[j])])
                    row0 += G
            assert row0 == ref.shape[0] and len(expected) == len(crops)
            off = 1 if grid.cls else 0
            for (ci, b, S), exp in zip(crops, expected):
                for j in sorted({0, (S - off) // 2, S - off - 1}):
                    target.update(calls=[], where=(ci, b if b is not None else 0, j + off))
                    model(**batch.inputs)
                    moved = (feats.pop() - ref).abs().amax(-1) > 1e-4
                    assert torch.nonzero(moved).flatten().tolist() == exp(j), (ci, b, j)
                target.pop("where")
    finally:
        h.remove()
        del base.get_image_features  # the class's method again: no instance attribute left on the cached model


def _hiprune_ref_allowed(obj, deep, width, k, alpha, allowed):
    n = obj.numel()
    cand = [i for i in range(n) if allowed[i]]
    if k >= len(cand):
        return cand
    anchors = sorted(cand, key=lambda i: (-float(obj[i]), i))[: round(k * alpha / 5)]
    chosen = []
    for a in anchors:
        for j in (a, a - 1, a + 1, a - width, a + width):
            j = min(max(j, 0), n - 1)
            if allowed[j] and j not in chosen:
                chosen.append(j)
    chosen = chosen[:k]
    rest = [i for i in sorted(cand, key=lambda i: (-float(deep[i]), i)) if i not in chosen]
    return sorted(chosen + rest[: k - len(chosen)])


@pytest.mark.parametrize("fam", ["llava_next", "llava_onevision"])
def test_hiprune_packed_matches_reference(fam):
    """LLaVA-NeXT / OneVision: per crop over the patches that have a token, budget split by tokens per crop."""
    from vlmplug.adapters import get_adapter

    model = tiny(fam)
    batch = make_batch(fam, model, (1, 2))
    ad = get_adapter(model)
    grid = tower(model)
    maps, _, _ = _vision_capture(model, batch.inputs)
    obj = _token_scores(maps[0], grid)  # packed grids: per patch, CLS removed
    deep = _token_scores(maps[grid.feature_layer], grid)
    ratio, alpha = 0.4, 0.6
    with vlmplug.apply(model, "hiprune", keep_ratio=ratio, object_layer=0, alpha=alpha) as h, torch.no_grad():
        out = model(**batch.inputs).logits[:, -1]
        g = model.generate(**batch.inputs, **GEN)
        lay = h.layout
        alive = [_alive(h, b) for b in range(2)]
    dropped = torch.zeros(2, batch.inputs["input_ids"].shape[1], dtype=torch.bool)
    crop0 = 0
    for b, s in enumerate(checked_samples(lay, batch)):
        for im in s.images:
            n_crops, crop, patch = ad.crop_token_map(im)
            n = im.positions.numel()
            counts = [int((crop == c).sum()) for c in range(n_crops)]
            ref = []
            for c, k in enumerate(split_by_weight(int(round(n * ratio)), counts)):
                P = obj[crop0 + c].numel()
                allowed = [False] * P
                rows = {}
                for r in torch.nonzero(crop == c).flatten().tolist():
                    allowed[int(patch[r])] = True
                    rows[int(patch[r])] = r
                sel = _hiprune_ref_allowed(obj[crop0 + c], deep[crop0 + c], int(round(P ** 0.5)), k, alpha, allowed)
                ref += [rows[p] for p in sel]
            crop0 += n_crops
            got = sorted(torch.nonzero(torch.isin(im.positions, alive[b])).flatten().tolist())
            assert got == sorted(ref)
            mask = torch.ones(n, dtype=torch.bool)
            mask[ref] = False
            dropped[b, im.positions[mask]] = True
    assert crop0 == len(obj)
    register_reference("refhipp", masked_eager_attention(drop_from_layer=0, dropped=dropped))
    model.set_attn_implementation({"text_config": "refhipp"})
    try:
        with torch.no_grad():
            ref_out = model(**batch.inputs).logits[:, -1]
            gr = model.generate(**batch.inputs, **GEN)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert (out - ref_out).abs().max() <= 1e-5
    assert torch.equal(g.sequences, gr.sequences)


def test_visionzip_llava_next_matches_reference():
    """Per crop over the patches that have a token; merged rows enter the projector; newline tokens dropped."""
    from vlmplug.adapters import get_adapter

    fam = "llava_next"
    model = tiny(fam)
    ad = get_adapter(model)
    grid = tower(model)
    batch = make_batch(fam, model, (1, 2))
    maps, keys, proj_in = _vision_capture(model, batch.inputs)
    cls = torch.stack([a[:, 0, 1:].sum(0) for a in maps[grid.feature_layer]])
    ks = keys[grid.feature_layer][:, 1:]
    hidden = proj_in[0]
    ratio, share = 0.4, 5.4 / 6.4
    with vlmplug.apply(model, "visionzip", keep_ratio=ratio) as h, torch.no_grad():
        g = model.generate(**batch.inputs, **GEN)
        lay = h.layout
        alive = [_alive(h, b) for b in range(2)]
    merged = hidden.clone()
    dropped = torch.zeros(2, batch.inputs["input_ids"].shape[1], dtype=torch.bool)
    c0 = 0
    for b, s in enumerate(checked_samples(lay, batch)):
        for im in s.images:
            n_crops, crop, patch = ad.crop_token_map(im)
            counts = [int((crop == c).sum()) for c in range(n_crops)]
            sel = []
            for c, k in enumerate(split_by_weight(int(round(im.positions.numel() * ratio)), counts)):
                allowed = sorted(int(p) for p in patch[crop == c])
                sub = torch.tensor(allowed)
                keep_local, hsub = _visionzip_ref(cls[c0 + c][sub], ks[c0 + c][sub], hidden[c0 + c][sub], k, share) \
                    if k < len(allowed) else (list(range(len(allowed))), hidden[c0 + c][sub].double())
                merged[c0 + c][sub] = hsub.to(hidden.dtype)
                kept = {allowed[i] for i in keep_local}
                sel += [r for r in torch.nonzero(crop == c).flatten().tolist() if int(patch[r]) in kept]
            c0 += n_crops
            got = sorted(torch.nonzero(torch.isin(im.positions, alive[b])).flatten().tolist())
            assert got == sorted(sel)
            mask = torch.ones(im.positions.numel(), dtype=torch.bool)
            mask[sel] = False
            dropped[b, im.positions[mask]] = True
    _check_merged_reference(model, batch, g, merged, dropped)


def _pool_rows(x, grid):
    """[S, d] per patch (CLS first where present) -> [n, d] per LLM token (mean over the token's patches)."""
    x = x.double()
    if grid.cls:
        x = x[1:]
    if grid.merge:
        return x.view(-1, grid.merge, x.shape[-1]).mean(1)
    if grid.packed or grid.pool == 1:
        return x
    side = int(round(x.shape[0] ** 0.5))
    out = torch.zeros(side // grid.pool, side // grid.pool, x.shape[-1], dtype=x.dtype)
    for r in range(side):
        for c in range(side):
            out[r // grid.pool, c // grid.pool] += x[r * side + c] / grid.pool**2
    return out.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("share", [5.4 / 6.4, 0.25])  # 0.25: several contextual tokens per crop
@pytest.mark.parametrize("fam", ["gemma3", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision"])
def test_visionzip_on_llm_tokens_matches_reference(fam, share):
    """Towers without CLS or with pooled tokens: dominant tokens by CLS attention (or mean attention received),
    contextual merging by keys averaged over each token's patches, applied to the projected features."""
    from vlmplug.adapters import get_adapter

    model = tiny(fam)
    ad = get_adapter(model)
    grid = tower(model)
    batch = make_batch(fam, model, (1, 2))
    maps, _, _ = _vision_capture(model, batch.inputs)
    keys = []
    def tap(module, q, k, v, attention_mask=None, scaling=None, dropout=0.0, **kw):
        if module is feat_mod:
            keys.extend(list(k.double().mean(1)))
        a = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * (scaling or q.shape[-1] ** -0.5), -1)
        return (a @ v.double()).to(q.dtype).transpose(1, 2).contiguous(), None
    register_reference("refkeys", tap)
    base = model.base_model
    orig = base.get_image_features
    feats = []
    capture = feature_capture(orig, feats)
    # keys of the feature layer only: route just that module to the tap
    feat_mod = vision_attention(model)[grid.feature_layer]
    base.get_image_features = capture
    model.set_attn_implementation({"vision_config": "refkeys"})
    try:
        with torch.no_grad():
            model(**batch.inputs)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
        del base.get_image_features  # the class's method again: no instance attribute left on the cached model
    x_all = feats[0].double()
    crop_maps = maps[grid.feature_layer]
    if grid.windowed:
        win = _window_order(model, batch)
        scores = _token_scores(crop_maps, grid, win)
        tok_keys = _unwindow(torch.cat(keys), grid, win)
    else:
        scores = [(_pool_rows(a[:, 0, :].sum(0)[:, None], grid) if grid.cls else _pool_rows(a.mean(0).mean(0)[:, None], grid))[:, 0]
                  for a in crop_maps]
        tok_keys = [_pool_rows(k, grid) for k in keys]
    ratio = 0.5
    with vlmplug.apply(model, "visionzip", keep_ratio=ratio, dominant_share=share) as h, torch.no_grad():
        out = model(**batch.inputs).logits[:, -1]
        lay = h.layout
        alive = [_alive(h, b) for b in range(2)]
    merged = x_all.clone()
    dropped = torch.zeros(2, batch.inputs["input_ids"].shape[1], dtype=torch.bool)
    row0, c0 = 0, 0
    for b, s in enumerate(checked_samples(lay, batch)):
        for im in s.images:
            n = im.positions.numel()
            k_total = int(round(n * ratio))
            if grid.packed:
                n_crops, crop, patch = ad.crop_token_map(im)
                parts = [(c0 + c, torch.nonzero(crop == c).flatten(), patch[crop == c]) for c in range(n_crops)]
                budgets = split_by_weight(k_total, [len(r) for _, r, _ in parts])
                c0 += n_crops
            else:
                parts, got_rows = [], 0
                while got_rows < n:
                    m = scores[c0].numel()
                    parts.append((c0, torch.arange(got_rows, got_rows + m), torch.arange(m)))
                    got_rows += m
                    c0 += 1
                budgets = [k_total // len(parts) + (1 if i < k_total % len(parts) else 0) for i in range(len(parts))]
            sel = []
            for (ci, rows, tok), k in zip(parts, budgets):
                if k >= len(rows):
                    sel += rows.tolist()
                    continue
                keep, hh = _visionzip_ref(scores[ci][tok], tok_keys[ci][tok], x_all[row0 + rows], k, share)
                merged[row0 + rows] = hh
                sel += [int(rows[i]) for i in keep]
            got = sorted(torch.nonzero(torch.isin(im.positions, alive[b])).flatten().tolist())
            assert got == sorted(sel)
            mask = torch.ones(n, dtype=torch.bool)
            mask[sel] = False
            dropped[b, im.positions[mask]] = True
            row0 += n
    assert row0 == x_all.shape[0]

    def inject(*a, **k):
        o = orig(*a, **k)
        p = o.pooler_output
        if isinstance(p, (list, tuple)):
            out_l, r = [], 0
            for t in p:
                m = t.reshape(-1, t.shape[-1]).shape[0]
                out_l.append(merged[r : r + m].to(t.dtype).reshape(t.shape))
                r += m
            o.pooler_output = type(p)(out_l) if isinstance(p, tuple) else out_l
        else:
            o.pooler_output = merged.to(p.dtype).reshape(p.shape)
        return o

    register_reference("refvzp", masked_eager_attention(drop_from_layer=0, dropped=dropped))
    base.get_image_features = functools.wraps(orig)(inject)
    model.set_attn_implementation({"text_config": "refvzp"})
    try:
        with torch.no_grad():
            ref_out = model(**batch.inputs).logits[:, -1]
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        del base.get_image_features  # the class's method again: no instance attribute left on the cached model
    assert (out - ref_out).abs().max() <= 1e-4


@pytest.mark.parametrize("fam", ["llava", "llava_next", "qwen2_vl", "gemma3"])
@pytest.mark.parametrize("meth", ["hiprune", "visionzip", "flowcut", "cluster"])
def test_bf16_generate_keeps_the_budget(fam, meth):
    model = tiny(fam, torch.bfloat16)
    batch = make_batch(fam, model, (1, 2))
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    kw = dict(object_layer=0) if meth == "hiprune" else {}
    with vlmplug.apply(model, meth, keep_tokens=3, **kw) as h, torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        kept = h.stats[meth]["tokens_kept_per_image"]
    assert kept == [[3], [3, 3]]
    assert all(torch.isfinite(l.float()).all() for l in g.logits)


def test_hiprune_default_object_layer_follows_the_official_code_scaled_to_the_tower():
    """None -> the official layer for the family (Qwen2.5-VL: the 16th of 32), else the paper's 9th of CLIP-L's 24,
    scaled to the tower's depth; 0-based. Hand values: CLIP-L 24 -> 8, Qwen2.5-VL 32 -> 15, the world model's 5 -> 1
    (round(1.875) = 2, the 2nd layer), Gemma 3's SigLIP 27 -> 9 (round(10.125) = 10), a 2-layer tiny tower -> 0."""
    from vlmplug.methods.pruning.hiprune import default_object_layer

    assert default_object_layer("llava", 24) == 8
    assert default_object_layer("qwen2_5_vl", 32) == 15
    assert default_object_layer("llava", 5) == 1
    assert default_object_layer("gemma3", 27) == 9
    assert default_object_layer("llava", 2) == 0 and default_object_layer("qwen2_5_vl", 1) == 0


def test_hiprune_runs_with_its_defaults_on_the_world_model():
    from vlmplug.pipeline import generate_info
    from vlmplug.world import load_world, sample_scene

    model, processor = load_world()
    image, meta = sample_scene()
    info = generate_info(model, processor, image, meta["question"], methods="hiprune",
                         method_params={"keep_ratio": 0.5})
    assert sum(info["stats"]["hiprune"]["tokens_kept_per_image"][0]) == 32
    # the default is the explicit layer 1 (the 2nd of 5)
    explicit = generate_info(model, processor, image, meta["question"], methods="hiprune",
                             method_params={"keep_ratio": 0.5, "object_layer": 1})
    assert info["text"] == explicit["text"]


def test_hiprune_alpha_default_and_anchor_count_by_hand():
    """alpha: the official default 0.1 (Danielement321/HiPrune, reference notes 2.4); anchors = round(k * alpha / 5).
    An 8 x 8 grid whose object-layer scores peak at 25 > 29 > 49 > 53 (rows 3 and 6, columns 1 and 5: buffers never
    overlap) and whose deep scores fall with the index, k = 20: the kept sets written out by hand."""
    from vlmplug.methods.pruning.hiprune import hiprune_select

    assert vlmplug.HiPrune().alpha == 0.1
    obj = torch.zeros(64)
    obj[[25, 29, 49, 53]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    deep = -torch.arange(64.0)
    buffers = {25: [17, 24, 25, 26, 33], 29: [21, 28, 29, 30, 37], 49: [41, 48, 49, 50, 57], 53: [45, 52, 53, 54, 61]}
    cases = {0.0: [], 0.1: [], 0.25: [25], 0.5: [25, 29], 1.0: [25, 29, 49, 53]}  # round(20 * alpha / 5) anchors
    for alpha, anchors in cases.items():
        chosen = sorted(j for a in anchors for j in buffers[a])
        registers = list(range(20 - len(chosen)))  # the highest deep scores outside the anchors' groups
        want = sorted(set(chosen) | set(registers))
        assert len(want) == 20
        assert hiprune_select(obj, deep, 8, 20, alpha).tolist() == want, alpha
    # the default alpha at a budget of 50 of a 16 x 16 grid: one anchor (round(50 * 0.1 / 5) = 1; alpha 0.2 would
    # give 2) with its 4 neighbours, then the 45 highest deep scores
    obj = torch.zeros(256)
    obj[[165, 170]] = torch.tensor([2.0, 1.0])  # rows 10, columns 5 and 10
    got = hiprune_select(obj, -torch.arange(256.0), 16, 50, vlmplug.HiPrune().alpha).tolist()
    assert got == sorted([149, 164, 165, 166, 181] + list(range(45)))


# bf16 - fp32 differences of the vision scores on the tiny towers reach 0.34% of the top score (llava_onevision's
# column means); where the fp32 gap between the last kept and the first dropped score is at least 2% of the top score,
# both stay more than twice their error apart and bf16 must choose what fp32 chooses. Most tiny towers attend almost
# uniformly (column-mean gaps below 0.1%): the margin allows the CLS scores of LLaVA and Gemma 3's pooled scores.
VISION_BF16_MARGIN = 0.02


def _gap(s, k):
    """(k-th - (k+1)-th largest score) / the largest, or inf where nothing is cut."""
    srt = s.double().sort(descending=True).values
    return float((srt[k - 1] - srt[k]) / srt[0]) if 0 < k < s.numel() else float("inf")


def _hiprune_gap(obj, deep, width, k, alpha):
    """The smallest fp32 gap HiPrune's selection at budget k depends on: the anchors' cut in the object-layer scores and
    the registers' cut in the deep scores of the tokens not yet chosen."""
    n_anchor = round(k * alpha / 5)
    anchors = sorted(range(obj.numel()), key=lambda i: (-float(obj[i]), i))[:n_anchor]
    chosen = []
    for a in anchors:
        for j in (a, a - 1, a + 1, a - width, a + width):
            j = min(max(j, 0), obj.numel() - 1)
            if j not in chosen:
                chosen.append(j)
    chosen = chosen[:k]
    rest = torch.tensor([float(deep[i]) for i in range(deep.numel()) if i not in chosen], dtype=torch.float64)
    return min(_gap(obj, n_anchor) if n_anchor else float("inf"), _gap(rest, k - len(chosen)) if rest.numel() else float("inf"))


@pytest.mark.parametrize("meth,fam,kw", [("visionzip", "llava", dict(dominant_share=1.0)),
                                         ("visionzip", "gemma3", dict(dominant_share=1.0)),
                                         ("hiprune", "gemma3", dict(object_layer=0, alpha=0.0)),
                                         ("hiprune", "gemma3", dict(object_layer=0, alpha=1.0))])
def test_bf16_selection_equals_fp32_reference_where_the_margin_allows(meth, fam, kw):
    """The bf16 model keeps the tokens the fp32 reference (eager vision attention of the fp32 model, the papers' rules)
    keeps, at the budget with the largest fp32 margin (asserted to clear the bf16 error). Two same-size images, one
    crop each. visionzip with dominant_share=1: the top-k by CLS attention (LLaVA) or by mean attention received;
    hiprune with alpha=0 (registers only) and alpha=1 (anchors and buffers first)."""
    from vlmplug.testing.tiny import _default_sizes

    ref_model = tiny(fam)
    size = _default_sizes(fam)[0]
    batch = make_batch(fam, ref_model, (1, 1), image_sizes=[[size], [size]])
    grid = tower(ref_model)
    maps, _, _ = _vision_capture(ref_model, batch.inputs)
    feat = maps[grid.feature_layer]
    assert len(feat) == 2, "one crop per image"
    if meth == "visionzip":
        scores = [a[:, 0, 1:].double().sum(0) for a in feat] if grid.cls else _token_scores(feat, grid)
        n = scores[0].numel()
        cands = [(min(_gap(s, k) for s in scores), k) for k in range(1, n)]
        refs = lambda k: [sorted(sorted(range(n), key=lambda i: (-float(s[i]), i))[:k]) for s in scores]  # noqa: E731
    else:
        obj, deep = _token_scores(maps[0], grid), _token_scores(feat, grid)
        n, width, alpha = obj[0].numel(), int(round(obj[0].numel() ** 0.5)), kw["alpha"]
        cands = [(min(_hiprune_gap(o, d, width, k, alpha) for o, d in zip(obj, deep)), k) for k in range(1, n)
                 if alpha == 0 or round(k * alpha / 5) >= 1]
        refs = lambda k: [_hiprune_ref(o, d, width, k, alpha) for o, d in zip(obj, deep)]  # noqa: E731
    margin, k = max(cands)
    assert margin >= VISION_BF16_MARGIN, f"no budget separates the fp32 scores by {VISION_BF16_MARGIN:.0%}: {margin:.3g}"
    model = tiny(fam, torch.bfloat16)
    inputs = {key: (v.to(torch.bfloat16) if v.is_floating_point() else v) for key, v in batch.inputs.items()}
    with vlmplug.apply(model, meth, keep_tokens=k, **kw) as h, torch.no_grad():
        model(**inputs)
        lay = h.layout
        got = [sorted(torch.nonzero(torch.isin(s.images[0].positions, _alive(h, b))).flatten().tolist())
               for b, s in enumerate(checked_samples(lay, batch))]
    assert got == refs(k)

"""tests/geometry.py (the vision geometry every method reference uses) against the models themselves, and the
adapters' `vision_grid()` against it:
- the feature layer: perturbing the output of vision layer i moves the image features exactly for i <= F;
- CLS and patch counts: every vision attention call's sequence is the crop's patches (from the config's image and
  patch sizes, or Qwen's image_grid_thw), plus one where the tower has a CLS token;
- tokens: the image-token count in input_ids equals the hand-built layout's LLM tokens summed over the crops
  (LLaVA-NeXT / OneVision: unpadding and newlines make that count image-dependent; their crop map is checked by patch
  perturbation in test_vision_pruning.py)."""
import pytest
import torch

from conftest import tiny
from geometry import deeper, feature_capture, groups, perturb_output, tower, vision_attention, vision_blocks
from reference import eager_softmax, register_reference
from vlmplug.testing.tiny import FAMILIES, make_batch

CASES = list(FAMILIES) + ["llava@3,-2", "internvl@3,-2", "llava_next@3,-3", "llava_onevision@3,-2", "qwen2_vl@3,None",
                          "gemma3@3,None"]


def _model(case):
    if "@" not in case:
        return case, tiny(case)
    fam, spec = case.split("@")
    layers, fl = spec.split(",")
    return fam, deeper(fam, layers=int(layers), feature_layer=None if fl == "None" else int(fl))


def _features(model, inputs):
    """The projected image features of a forward on `inputs`, [rows, D] in token order (read from the model's own
    `get_image_features`, called by its forward with the arguments it passes)."""
    base = model.base_model
    got = []
    base.get_image_features = feature_capture(base.get_image_features, got)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        del base.get_image_features  # the class's method again
    assert len(got) == 1
    return got[0]


@pytest.mark.parametrize("case", CASES)
def test_feature_layer_is_the_last_layer_that_moves_the_features(case):
    fam, model = _model(case)
    geo = tower(model)
    batch = make_batch(fam, model, (1, 2))
    attn = vision_attention(model)
    assert len(attn) == geo.L == len(vision_blocks(model))
    ref = _features(model, batch.inputs)
    moved = []
    for i, mod in enumerate(attn):
        # inside layer i (its attention output), so the layer's own output carries it: transformers records
        # hidden_states with hooks of its own, which a hook on the layer's output would run after
        h = perturb_output(mod, 3.0, seed=i)
        try:
            moved.append(bool(((_features(model, batch.inputs) - ref).abs().amax() > 1e-4).item()))
        finally:
            h.remove()
    assert moved == [i <= geo.F for i in range(geo.L)], (moved, geo.F)


@pytest.mark.parametrize("case", CASES)
def test_sequence_and_token_counts_follow_the_hand_built_layout(case):
    fam, model = _model(case)
    geo = tower(model)
    cfg = model.config
    vc = cfg.vision_config
    batch = make_batch(fam, model, (1, 2))
    seqs = []

    def fn(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        if module is first:
            seqs.append((q.shape[0], k.shape[2]))
        a = eager_softmax(module, q, k, attention_mask, scaling, dict(kw, is_causal=False))
        return (a @ v.double()).to(q.dtype).transpose(1, 2).contiguous(), None

    first = vision_attention(model)[0]
    register_reference("refgeo", fn)
    model.set_attn_implementation({"vision_config": "refgeo"})
    try:
        _features(model, batch.inputs)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    off = 1 if geo.cls else 0
    image_token = getattr(cfg, "image_token_id", None)
    if image_token is None:
        image_token = cfg.image_token_index
    n_tokens = int((batch.inputs["input_ids"] == image_token).sum())
    if geo.merge:  # Qwen: one call per image or per batch of windows; the patches are t * h * w per image
        thw = batch.inputs["image_grid_thw"].tolist()
        patches = sum(t * h * w for t, h, w in thw)
        assert sum(b * s for b, s in seqs) == patches  # every patch once, no CLS
        assert n_tokens == patches // geo.merge
        return
    size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
    patch = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
    per_crop = (int(size) // int(patch)) ** 2
    crops = sum(b for b, _ in seqs)
    assert {s for _, s in seqs} == {per_crop + off}, (seqs, per_crop, off)
    if geo.packed:
        return
    assert n_tokens == crops * groups(per_crop, geo)[1]


@pytest.mark.parametrize("case", CASES)
def test_adapter_vision_grid_agrees_with_the_reference_geometry(case):
    from vlmplug.adapters import get_adapter

    fam, model = _model(case)
    geo = tower(model)
    g = get_adapter(model).vision_grid()
    got = dict(cls=g.cls, feature_layer=g.feature_layer, num_layers=g.num_layers, merge=g.merge, packed=g.packed,
               windowed=g.windowed, pool=g.pool if not g.merge else 1)
    want = dict(cls=geo.cls, feature_layer=geo.F, num_layers=geo.L, merge=geo.merge, packed=geo.packed,
                windowed=geo.windowed, pool=geo.pool)
    assert got == want
    assert get_adapter(model).vision_attention_modules() == vision_attention(model)

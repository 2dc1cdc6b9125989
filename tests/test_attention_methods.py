"""The attention-redistribution and head methods together: bf16 runs, composition in one apply(), vlmplug.generate
with the CFG branch."""
import pytest
import torch

import vlmplug
from conftest import tiny
from vlmplug.testing.tiny import make_batch

CONFIGS = {
    "pai": lambda: vlmplug.PAI(alpha=0.8, layers="0:", gamma=1.0),
    "var": lambda: vlmplug.VAR(tau=1.0, summ=0.0, layers="0:"),
    "act": lambda: vlmplug.ACT(layers="0:", threshold=0.02),
    "modpai": lambda: vlmplug.ModPAI(layers="0:", gamma=1.0, local_ratio=0.5),
    "vhr": lambda: vlmplug.VHR(layers="0:"),
}


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16(fam, name):
    """In bf16 the method acts (logits move away from plain bf16) and lands where it does in fp32."""
    m32, m16 = tiny(fam), tiny(fam, torch.bfloat16)
    batch = make_batch(fam, m32, (1, 1))
    in16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch.inputs.items()}
    with torch.no_grad():
        plain16 = m16(**in16).logits[:, -1].float()
        with vlmplug.apply(m32, CONFIGS[name]()):
            out32 = m32(**batch.inputs).logits[:, -1]
        with vlmplug.apply(m16, CONFIGS[name]()):
            out16 = m16(**in16).logits[:, -1].float()
            g = m16.generate(**in16, max_new_tokens=3, do_sample=False)
    plain32 = m32(**batch.inputs).logits[:, -1].detach()
    effect = (out32 - plain32).abs().max()
    assert (out16 - out32).abs().max() < effect / 2 + 0.02
    assert (out16 - plain16).abs().max() > 0
    assert g.shape[1] == in16["input_ids"].shape[1] + 3


@pytest.mark.parametrize("fam", ["llava", "internvl"])
def test_methods_compose_in_one_apply(fam):
    """Redistribution (VAR), amplification (PAI), head reinforcement (VHR) and pruning (FastV) in one apply(), each
    in its own layers; two amplifications in one layer are refused before patching."""
    model = tiny(fam)
    batch = make_batch(fam, model, (1, 1))
    methods = [vlmplug.VAR(tau=1.0, summ=0.0, layers=[0]), vlmplug.PAI(layers=[1], gamma=1.0),
               vlmplug.VHR(layers=[0, 1]), vlmplug.FastV(layer=1, keep_ratio=0.5)]
    with torch.no_grad(), vlmplug.apply(model, methods) as h:
        model.generate(**batch.inputs, max_new_tokens=3, do_sample=False)
        st = h.stats
        assert st["var"]["selected"][0] is not None and st["vhr"]["heads"][1][0]
        assert st["fastv"]["tokens_kept_per_image"]
    with pytest.raises(vlmplug.MethodConfigError, match="redistribute or amplify attention in \\[1\\]"):
        vlmplug.apply(model, [vlmplug.PAI(layers=[1]), vlmplug.ModPAI(layers=[1])])
    assert "_vlmplug_handle" not in vars(model)


def test_modpai_cfg_through_vlmplug_generate():
    """vlmplug.generate runs modPAI's text-only branch (as PAI's): the answer equals model.generate with
    handle.guidance(inputs)."""
    from vlmplug.pipeline import prepare_inputs
    from vlmplug.world import heldout_scenes, load_world

    model, processor = load_world()
    scene = heldout_scenes(1, seed=3)[0]
    q = scene.questions[0].text
    text = vlmplug.generate(model, processor, scene.image, q, methods=vlmplug.ModPAI(gamma=1.5), max_new_tokens=4)
    inputs = prepare_inputs(model, processor, scene.image, q)
    with torch.no_grad(), vlmplug.apply(model, vlmplug.ModPAI(gamma=1.5), processor=processor) as h:
        procs = h.guidance(inputs)
        assert procs and procs[0].label == "modpai-text"
        g = model.generate(**inputs, logits_processor=procs, max_new_tokens=4, do_sample=False)
    want = processor.batch_decode(g[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert text == want

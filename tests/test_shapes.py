"""Benchmark shapes: deepen_shared gives real depth with one layer's weights, and the model still runs."""
import torch

from vlmplug.compat import output_cache
from vlmplug.testing.shapes import build_random, deepen_shared, llava15_config, llava_prompt


def test_deepen_shared_runs_full_depth_with_one_layer_of_weights():
    cfg = llava15_config(text_layers=1, vision_layers=1)
    cfg.text_config.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4))
    cfg.vision_config.update(dict(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    model = build_random(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    deepen_shared(model, 5, 3)
    assert sum(p.numel() for p in model.parameters()) == n_params
    from vlmplug.adapters import get_adapter

    ad = get_adapter(model)
    assert [layer.self_attn.layer_idx for layer in ad.decoder_layers()] == list(range(5))
    assert len(ad.vision_attention_modules()) == 3
    inputs = llava_prompt(cfg)
    calls = []
    hook = ad.decoder_layers()[4].register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    hook.remove()
    assert len(output_cache(out).layers) == 5 and len(calls) == 2


def test_qwen2vl_prompt_fits_its_config():
    """The Qwen2-VL bench prompt (widths shrunk here) carries the image grid, M-RoPE token types and as many
    image tokens as the tower yields; the adapter finds the image and a pre-LLM method runs through generate()."""
    import vlmplug
    from vlmplug.testing.shapes import qwen2vl_config, qwen2vl_prompt

    cfg = qwen2vl_config(text_layers=2, vision_layers=1)
    cfg.text_config.update(dict(vocab_size=151700, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                num_key_value_heads=2))
    cfg.text_config.rope_parameters["mrope_section"] = [2, 3, 3]
    cfg.vision_config.update(dict(embed_dim=32, hidden_size=64, num_heads=4))
    model = build_random(cfg)
    inputs = qwen2vl_prompt(cfg, grid=8)
    n_img = int((inputs["input_ids"] == cfg.image_token_id).sum())
    assert n_img == 16 and inputs["pixel_values"].shape[0] == 64
    with vlmplug.apply(model, "visionzip", keep_tokens=4) as h, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert h.stats["visionzip"]["tokens_kept_per_image"] == [[4]]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2

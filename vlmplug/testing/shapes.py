"""Real-size architectures with random weights, for speed and memory benchmarks (speed needs no
trained weights). Depth can be cut so they fit a CPU; widths, heads and token counts stay real."""
from __future__ import annotations

import torch


def llava15_config(text_layers: int = 32, vision_layers: int = 24, text_heads: int = 32):
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14 at 336 px (576 image tokens), Vicuna-7B (Llama) text."""
    from transformers import LlavaConfig

    return LlavaConfig(
        text_config=dict(
            model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_heads,
            max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
            num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
        ),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def qwen2vl_config(text_layers: int = 28, vision_layers: int = 32):
    """Qwen2-VL-7B shapes: 675M-parameter ViT (patch 14, 2x2 merge), Qwen2-7B text (GQA 28/4 heads, M-RoPE)."""
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(
            model_type="qwen2_vl_text", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
            num_hidden_layers=text_layers, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
            rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
        ),
        vision_config=dict(depth=vision_layers, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    )


def qwen2vl_prompt(config, grid: int = 48, text_before: int = 16, text_after: int = 48, device="cpu", seed: int = 0):
    """One image of grid x grid patches (48: 672 px, 576 tokens after the 2x2 merge) between random text."""
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    n_img = (grid // vc.spatial_merge_size) ** 2
    ids = torch.cat([
        torch.randint(3, 150000, (1, text_before), generator=g),
        torch.tensor([[config.vision_start_token_id]]),
        torch.full((1, n_img), config.image_token_id),
        torch.tensor([[config.vision_end_token_id]]),
        torch.randint(3, 150000, (1, text_after), generator=g),
    ], dim=1)
    px = torch.randn(grid * grid, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=g)
    mm = (ids == config.image_token_id).long()  # what the processor returns: 1 marks image tokens
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "pixel_values": px.to(device),
            "image_grid_thw": torch.tensor([[1, grid, grid]], device=device), "mm_token_type_ids": mm.to(device)}


ARCHS = ("llava15", "qwen2vl")


def arch_setup(arch: str, text_layers: int, vision_layers: int | None = None, device="cpu"):
    """(config, prompt inputs, image token id) of a named benchmark architecture; vision_layers defaults to the
    real depth (24 for LLaVA-1.5's CLIP-L/336, 32 for Qwen2-VL's ViT)."""
    if arch == "llava15":
        cfg = llava15_config(text_layers=text_layers, vision_layers=24 if vision_layers is None else vision_layers)
        return cfg, llava_prompt(cfg, device=device), cfg.image_token_index
    if arch == "qwen2vl":
        cfg = qwen2vl_config(text_layers=text_layers, vision_layers=32 if vision_layers is None else vision_layers)
        return cfg, qwen2vl_prompt(cfg, device=device), cfg.image_token_id
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def build_random(config, dtype=torch.float32, device="cpu", seed: int = 0):
    """Instantiate with random weights quickly (small normal init, no per-module init passes)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def llava_prompt(config, text_before: int = 16, text_after: int = 48, batch: int = 1, device="cpu", seed: int = 0):
    """input_ids with one image (576 image tokens) between random text, plus pixel_values."""
    g = torch.Generator().manual_seed(seed)
    n_img = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    ids = torch.cat([
        torch.randint(3, 31000, (batch, text_before), generator=g),
        torch.full((batch, n_img), config.image_token_index),
        torch.randint(3, 31000, (batch, text_after), generator=g),
    ], dim=1)
    px = torch.randn(batch, 3, config.vision_config.image_size, config.vision_config.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "pixel_values": px.to(device)}


def deepen_shared(model, text_layers: int, vision_layers: int | None = None):
    """Give a 1-layer random model its real depth with every layer sharing the first layer's weights.

    Activations, attention shapes and FLOPs per layer are those of the real depth while the weights take
    the memory of one layer, so a CPU can measure full-depth time and activation memory (random weights
    carry no meaning either way). Each added layer is its own module with its own layer index and cache slot.
    """
    from vlmplug.adapters import get_adapter

    ad = get_adapter(model)
    layers = _layer_list(model, ad.decoder_layers()[0])
    _extend(layers, text_layers, lambda i: type(layers[0])(ad.text_config, i))
    ad.text_config.num_hidden_layers = text_layers
    if getattr(ad.text_config, "layer_types", None):
        ad.text_config.layer_types = [ad.text_config.layer_types[0]] * text_layers
    if vision_layers is not None:
        vcfg = model.config.vision_config
        enc = _layer_list(model, ad.vision_attention_modules()[0], parent_of_attention=True)
        _extend(enc, vision_layers, lambda i: type(enc[0])(vcfg))
        vcfg.num_hidden_layers = vision_layers
    return model


def _layer_list(model, first, parent_of_attention: bool = False):
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and (m[0] is first or (parent_of_attention and any(c is first for c in m[0].modules()))):
            return m
    raise ValueError("layer list not found")


def _extend(layers, n: int, make) -> None:
    first = layers[0]
    shared = dict(first.named_parameters())
    for i in range(len(layers), n):
        with torch.device("meta"):
            new = make(i)
        for name, _ in list(new.named_parameters()):
            owner = new.get_submodule(name.rsplit(".", 1)[0]) if "." in name else new
            owner._parameters[name.rsplit(".", 1)[-1]] = shared[name]
        for name, buf in list(new.named_buffers()):
            owner = new.get_submodule(name.rsplit(".", 1)[0]) if "." in name else new
            owner._buffers[name.rsplit(".", 1)[-1]] = dict(first.named_buffers())[name]
        new.eval()
        layers.append(new)

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

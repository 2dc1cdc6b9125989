"""Per-layer, per-head KV-cache pruning after prefill (PLPHP-style).

A forward hook on each chosen attention module, at prefill, asks the methods which cache rows to keep
per KV head ([B, Hkv, S'] logical positions) and gathers that layer's cached keys and values. Later
decode steps append to the shorter cache; the backend gathers the model's (logical-length) mask per
head to match. Layer 0 is never pruned: generate() reads the logical length from it.
"""
from __future__ import annotations

import torch

from .. import compat
from ..errors import MethodConfigError, TransformersMismatchError


def install_kv_hooks(session) -> list:
    attn = session.adapter.text_attention_modules()
    hooks = []
    layers = sorted({li % len(attn) for m in session.methods for li in m.kv_prune_layers})
    if layers and layers[0] == 0:
        raise MethodConfigError("the KV cache of layer 0 cannot be pruned (generate() reads the sequence length from it)")
    types = getattr(session.adapter.text_config, "layer_types", None) or []
    sliding = [li for li in layers if li < len(types) and types[li] == "sliding_attention"]
    if sliding:
        raise MethodConfigError(f"layers {sliding} use sliding-window caches, which cannot be pruned per head")
    for li in layers:
        hooks.append(attn[li].register_forward_hook(_make_hook(session, li), with_kwargs=True))
    return hooks


def _make_hook(session, li: int):
    def hook(module, args, kwargs, output):
        st = session.state
        if st.phase != "prefill":
            return None
        cache = compat.find_cache(kwargs, f"the attention of decoder layer {li}")
        if cache is None:
            st.effects.add(("kv-no-cache", li))
            if st.has_cache:
                raise TransformersMismatchError(
                    f"vlmplug: the attention of decoder layer {li} got no KV cache although the model's forward had "
                    f"one, so its cache could not be pruned; {compat.version_note()}")
            return None
        keep = None
        for m in session.active:
            if li in [x % session.adapter.num_layers for x in m.kv_prune_layers]:
                keep = m.kv_keep(session.kv_context(li))
        if keep is None:
            return None
        layer = cache.layers[li]
        if not _plain_layer(layer):
            raise MethodConfigError(
                f"{[m.name for m in session.methods]}: KV-cache pruning gathers each layer's cached keys and values, "
                f"but layer {li} of this cache ({type(cache).__name__} / {type(layer).__name__}) keeps them in another "
                "form (e.g. generate(cache_implementation='quantized')); use the default dynamic cache")
        if st.keep is not None and st.drop_layer is not None and li >= st.drop_layer:
            raise MethodConfigError("KV pruning after token dropping in the same layer is not supported")
        dead = None
        if isinstance(keep, (list, tuple)):  # per-sample [Hkv, S'_b]: pad with hidden slots
            keep, dead = _equalize(keep, layer.keys.shape[2], st.attention_mask)
        idx = keep.to(layer.keys.device)
        B, H, S = idx.shape
        D = layer.keys.shape[-1]
        layer.keys = torch.gather(layer.keys, 2, idx[..., None].expand(B, H, S, D))
        layer.values = torch.gather(layer.values, 2, idx[..., None].expand(B, H, S, layer.values.shape[-1]))
        st.kv_index[li] = idx.cpu()
        st.effects.add(("kv", li))
        if dead is not None:
            st.kv_dead[li] = dead
        return None

    return hook


def _plain_layer(layer) -> bool:
    """The layer holds all its cached states as [B, Hkv, S, D] key / value tensors (a dynamic layer; not a quantized
    one, whose states live in a backend's quantized form beside an empty or partial `keys`)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == 4):
        return False
    return not hasattr(layer, "get_seq_length") or int(layer.get_seq_length()) == keys.shape[-2]


def _equalize(keeps, S: int, pad2d):
    """Per-sample keep lists [Hkv, S'_b] -> [B, Hkv, S'] plus dead [B, Hkv, S'] (padding slots)."""
    n = max(int(k.shape[1]) for k in keeps)
    out, dead = [], []
    for b, k in enumerate(keeps):
        H, m = k.shape
        if m == n:
            out.append(k.cpu())
            dead.append(torch.zeros(H, n, dtype=torch.bool))
            continue
        rows, drows = [], []
        for h in range(H):
            rest = torch.ones(S, dtype=torch.bool)
            rest[k[h].cpu()] = False
            cand = torch.nonzero(rest).flatten()
            if pad2d is not None:
                cand = cand[torch.argsort(pad2d[b, cand].cpu().to(torch.int8), stable=True)]
            allk = torch.cat([k[h].cpu(), cand[: n - m]])
            order = torch.argsort(allk)
            rows.append(allk[order])
            drows.append(torch.cat([torch.zeros(m, dtype=torch.bool), torch.ones(n - m, dtype=torch.bool)])[order])
        out.append(torch.stack(rows))
        dead.append(torch.stack(drows))
    dead = torch.stack(dead)
    return torch.stack(out), (dead if dead.any() else None)


def per_head_mask(session, module, attention_mask, device=None, q_len: int = 1):
    """During decode of a pruned layer: gather the logical-length mask per KV head -> [B, Hq, q, S']."""
    li = getattr(module, "layer_idx", None)
    st = session.state
    if li not in st.kv_index or st.phase != "decode":
        return attention_mask
    B = st.kv_index[li].shape[0]
    if attention_mask is None:
        if li not in st.kv_dead:
            return None
        attention_mask = session.logical_mask(B, q_len, device)  # causal among several new tokens
    elif attention_mask.shape[-1] != st.logical_len:  # sized by a pruned cache (hybrid models)
        attention_mask = session.logical_mask(B, attention_mask.shape[2], attention_mask.device)
    idx = st.kv_index[li].to(attention_mask.device)  # [B, Hkv, S']
    B, Hkv, Sp = idx.shape
    tail = torch.arange(st.prompt_len, attention_mask.shape[-1], device=idx.device)
    kv = torch.cat([idx, tail.expand(B, Hkv, -1)], dim=-1)
    G = module.num_key_value_groups if hasattr(module, "num_key_value_groups") else 1
    kv = kv.repeat_interleave(G, dim=1)  # [B, Hq, S]
    m = attention_mask.expand(B, kv.shape[1], attention_mask.shape[2], attention_mask.shape[3])
    m = torch.gather(m, 3, kv[:, :, None, :].expand(B, kv.shape[1], m.shape[2], kv.shape[2]))
    if li in st.kv_dead:
        d = st.kv_dead[li].to(m.device)
        d = torch.cat([d, torch.zeros(B, Hkv, tail.numel(), dtype=torch.bool, device=m.device)], -1)
        m = m & ~d.repeat_interleave(G, dim=1)[:, :, None, :]
    return m

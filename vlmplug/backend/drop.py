"""Token dropping between decoder layers (FastV-style), through forward() and generate().

Pre-hooks on decoder layers >= K shorten what each layer sees at prefill: the hidden states (at K),
the rotary (cos, sin), the attention mask on both axes and the position ids, all gathered with the
same kept positions, so later layers and their KV caches hold only kept tokens while every token keeps
its original (RoPE / M-RoPE) position. During decoding the mask's key axis is gathered the same way.
generate() reads the cache length from layer 0, so layer 0's cache must stay the logical length: in-LLM
dropping (K >= 1) leaves layer 0 whole; pre-LLM selection (K = 0) lets layer 0 compute kept tokens only and
then pads its cache back to the prompt's length with zero slots that stay hidden while decoding.

Samples of a batch may keep different numbers of tokens: shorter keep lists are padded with "dead"
slots (dropped tokens, padding first) that no other token can see, so each sample's result equals
running it alone.
"""
from __future__ import annotations

import torch

from .. import compat
from ..errors import MethodConfigError, TransformersMismatchError


def _gather_seq(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather positions `keep` [B, L'] along `dim` of x (whose batch dim 0 may be 1)."""
    B = keep.shape[0]
    if x.shape[0] != B:
        x = x.expand(B, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = B, keep.shape[1]
    idx = keep.view(shape).expand(*[keep.shape[1] if d == dim else s for d, s in enumerate(x.shape)])
    return torch.gather(x, dim, idx)


def equalize(keeps: list[torch.Tensor], L: int, pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack per-sample keep lists of different lengths; returns (keep [B, L'], dead [B, L'] or None)."""
    n = max(int(k.numel()) for k in keeps)
    if all(int(k.numel()) == n for k in keeps):
        return torch.stack([k.sort().values for k in keeps]), None
    out, dead = [], []
    for b, k in enumerate(keeps):
        need = n - k.numel()
        rest = torch.ones(L, dtype=torch.bool)
        rest[k] = False
        cand = torch.nonzero(rest).flatten()
        if pad is not None:  # padding positions first: they are invisible anyway
            cand = cand[torch.argsort((~pad[b, cand]).to(torch.int8), stable=True)]
        extra = cand[:need]
        allk = torch.cat([k, extra])
        order = torch.argsort(allk)
        out.append(allk[order])
        dead.append(torch.cat([torch.zeros(k.numel(), dtype=torch.bool), torch.ones(need, dtype=torch.bool)])[order])
    return torch.stack(out), torch.stack(dead)


def install_drop_hooks(session, K: int, start: int | None = None) -> list:
    """Hooks for dropping before layer K. With `start` <= K (pre-LLM selection, e.g. vision-side methods)
    the selection is made at layer `start`; layers start..K-1 hide the dropped tokens through the mask.
    K = 0 (pre-LLM selection only) removes them before the LLM: layer 0 computes kept tokens only and its
    KV cache is then padded back to the prompt's length with hidden slots (generate() reads the length there);
    a layer-0 cache that cannot be padded (not a plain DynamicLayer) falls back to hiding them at layer 0."""
    layers = session.adapter.decoder_layers()
    lo = 0 if start is not None else session.adapter.min_drop_layer
    if not lo <= K < len(layers):
        raise MethodConfigError(
            f"tokens can be dropped before layers {lo}..{len(layers) - 1} of this model, got {K}"
        )
    start = K if start is None else start
    session.drop_layer = K
    hooks = [layers[li].register_forward_pre_hook(_make_hook(session, li, K, start), with_kwargs=True)
             for li in range(start, len(layers))]
    if K == 0:
        hooks.append(layers[0].register_forward_hook(_pad_cache_hook(session), with_kwargs=True))
    return hooks


def _paddable(cache) -> bool:
    """Whether layer 0 of `cache` can be padded back to the prompt's length after it stored kept tokens only."""
    from transformers.cache_utils import DynamicLayer

    if cache is None:
        return True
    if getattr(cache, "offloading", False):
        return False
    layers = getattr(cache, "layers", None)
    if layers:
        return type(layers[0]) is DynamicLayer
    # DynamicCache() without a config creates its layers when they are first written
    return layers is not None and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer


def _pad_cache_hook(session):
    from transformers.cache_utils import DynamicLayer

    def hook(module, args, kwargs, output):
        st = session.state
        if st.phase != "prefill" or st.keep is None or st.drop_layer != 0:
            return None
        cache = compat.find_cache(kwargs, "decoder layer 0")
        if cache is None:
            if st.has_cache:
                raise TransformersMismatchError(
                    "vlmplug: decoder layer 0 got no KV cache although the model's forward had one, so its cache "
                    f"could not be padded back to the prompt's length after token dropping; {compat.version_note()}")
            return None
        layer = cache.layers[0]
        if type(layer) is not DynamicLayer:
            raise MethodConfigError(f"vlmplug: expected a DynamicLayer at layer 0 of the KV cache, got {type(layer).__name__}")
        keep = st.keep.to(layer.keys.device)
        L = st.hidden.shape[1]
        for name in ("keys", "values"):
            t = getattr(layer, name)
            B, H, _, D = t.shape
            full = t.new_zeros(B, H, L, D)
            full.scatter_(2, keep[:, None, :, None].expand(B, H, keep.shape[1], D), t)
            setattr(layer, name, full)
        st.cache_cut = 1  # layer 0 now holds the logical length; dropped slots stay hidden when decoding
        return None

    return hook


def _select(session, hs, K):
    st = session.state
    st.keep, st.dead, st.hidden = None, None, None
    for m in session.active:
        if m.drop_layer == K:
            keep = m.tokens_to_keep(session.drop_context(hs))
            if keep is None:
                continue
            if isinstance(keep, (list, tuple)):
                pad = ~st.attention_mask.bool().cpu() if st.attention_mask is not None else None
                keep, dead = equalize([k.cpu() for k in keep], hs.shape[1], pad)
            else:
                dead = None
            st.keep, st.dead = keep, dead
            st.effects.add(("keep", m.name))
            hidden = torch.ones(keep.shape[0], hs.shape[1], dtype=torch.bool)
            alive = keep if dead is None else keep.masked_fill(dead, -1)
            for b in range(keep.shape[0]):
                a = alive[b][alive[b] >= 0]
                hidden[b, a] = False
            st.hidden = hidden


def _mask_only(session, kwargs, hs, decode: bool):
    """Layers before K under pre-LLM selection: same length, dropped tokens invisible as keys."""
    st = session.state
    hidden = st.hidden
    if hidden is None:
        return None
    B, q = hs.shape[0], hs.shape[1]
    m = compat.read(kwargs, "attention_mask")
    if decode:
        if not (isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[-1] == st.logical_len):
            m = session.logical_mask(B, q, hs.device)
        tail = torch.zeros(B, st.logical_len - hidden.shape[1], dtype=torch.bool)
        compat.write(kwargs, "attention_mask", _hide_dead(m, torch.cat([hidden, tail], 1), None))
        return kwargs
    if not (isinstance(m, torch.Tensor) and m.dim() == 4):
        pos = torch.arange(q, device=hs.device)
        m = (pos[:, None] >= pos[None, :])[None, None].expand(B, 1, q, q)
    compat.write(kwargs, "attention_mask", _hide_dead(m, hidden, hidden))
    return kwargs


def _hide_dead(m: torch.Tensor, dead_kv: torch.Tensor, q_dead: torch.Tensor | None) -> torch.Tensor:
    """Mask dead keys; a dead query row still sees itself so its (unused) output stays finite."""
    if m.dtype != torch.bool:
        raise MethodConfigError("token dropping with ragged budgets needs boolean masks (the vlmplug mask function)")
    m = m & ~dead_kv[:, None, None, :].to(m.device)
    if q_dead is not None:
        Lq = m.shape[2]
        eye = torch.eye(Lq, m.shape[3], dtype=torch.bool, device=m.device)[None, None] & q_dead[:, None, :, None].to(m.device)
        m = m | eye
    return m


def _make_hook(session, li: int, K: int, start: int):
    def hook(module, args, kwargs):
        hs = args[0] if args else compat.read(kwargs, "hidden_states")
        st = session.state
        if st.phase == "prefill":
            if li == start:
                st.drop_layer, st.cache_cut = K, K
                _select(session, hs, K)
                cache = compat.find_cache(kwargs, f"decoder layer {li}")
                if K == 0 and st.keep is not None and not _paddable(cache):
                    if len(session.adapter.decoder_layers()) < 2:
                        raise MethodConfigError(
                            f"pre-LLM token selection on a one-layer model needs a plain DynamicCache; got "
                            f"{type(cache).__name__} (pass use_cache=False or the default cache)")
                    st.drop_layer, st.cache_cut = 1, 1  # this cache: hide them at layer 0 instead
            cut = st.drop_layer
            if li < cut:
                out = _mask_only(session, kwargs, hs, decode=False)
                return None if out is None else (args, out)
            keep, dead = st.keep, st.dead
            if keep is None:
                return None
            keep = keep.to(hs.device)
            if li == cut:
                st.effects.add("drop")
                hs = _gather_seq(hs, keep, 1)
                if args:
                    args = (hs,) + tuple(args[1:])
                else:
                    compat.write(kwargs, "hidden_states", hs)
            pe = compat.read(kwargs, "position_embeddings")
            if isinstance(pe, tuple):
                compat.write(kwargs, "position_embeddings", tuple(_gather_seq(t, keep, 1) for t in pe))
            m = compat.read(kwargs, "attention_mask")
            if isinstance(m, torch.Tensor) and m.dim() == 4:
                m = _gather_seq(_gather_seq(m, keep, 2), keep, 3)
            elif dead is not None:  # no mask was needed before; now dead slots must be hidden
                m = (keep[:, :, None] >= keep[:, None, :])[:, None]
            if dead is not None:
                m = _hide_dead(m, dead, dead)
            if m is not None:
                compat.write(kwargs, "attention_mask", m)
            pid = compat.read(kwargs, "position_ids")
            if isinstance(pid, torch.Tensor) and pid.dim() == 2:
                compat.write(kwargs, "position_ids", _gather_seq(pid, keep, 1))
            return args, kwargs
        if st.cache_cut is None or li < st.cache_cut:
            out = _mask_only(session, kwargs, hs, decode=True)
            return None if out is None else (args, out)
        keep, dead = st.keep, st.dead
        if keep is None:
            return None
        m = compat.read(kwargs, "attention_mask")
        B, q, S = keep.shape[0], hs.shape[1], st.logical_len
        if (m is None and dead is not None) or (isinstance(m, torch.Tensor) and m.dim() == 4 and m.shape[-1] != S):
            # Hybrid models size some decode masks by a pruned or sliding cache: rebuild the logical
            # padding mask; the backend keeps its last key-length columns for sliding caches.
            m = session.logical_mask(B, q, hs.device)
        if isinstance(m, torch.Tensor) and m.dim() == 4:
            tail = torch.arange(st.prompt_len, S, device=m.device)
            kv = torch.cat([keep.to(m.device), tail.expand(B, -1)], dim=1)
            m = _gather_seq(m, kv, 3)
            if dead is not None:
                m = _hide_dead(m, torch.cat([dead.to(m.device), torch.zeros(B, tail.numel(), dtype=torch.bool, device=m.device)], 1), None)
            compat.write(kwargs, "attention_mask", m)
            return args, kwargs
        return None

    return hook

"""Token dropping between decoder layers (FastV-style), through forward() and generate().

Pre-hooks on decoder layers >= K shorten what each layer sees at prefill: the hidden states (at K),
the rotary (cos, sin), the attention mask on both axes and the position ids, all gathered with the
same kept positions, so later layers and their KV caches hold only kept tokens while every token keeps
its original (RoPE / M-RoPE) position. During decoding the mask's key axis is gathered the same way.
Layer 0 is never shortened, so the cache length generate() reads stays the logical one.
"""
from __future__ import annotations

import torch

from ..errors import MethodConfigError


def _gather_seq(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather positions `keep` [B, L'] along `dim` of x (whose batch dim 0 may be 1)."""
    B = keep.shape[0]
    if x.shape[0] != B:
        x = x.expand(B, *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = B, keep.shape[1]
    idx = keep.view(shape).expand(*[keep.shape[1] if d == dim else s for d, s in enumerate(x.shape)])
    return torch.gather(x, dim, idx)


def install_drop_hooks(session, K: int) -> list:
    layers = session.adapter.decoder_layers()
    if not session.adapter.min_drop_layer <= K < len(layers):
        raise MethodConfigError(
            f"tokens can be dropped after layers {session.adapter.min_drop_layer}..{len(layers) - 1} of this model, got {K}"
        )
    session.drop_layer = K
    hooks = []
    for li in range(K, len(layers)):
        hooks.append(layers[li].register_forward_pre_hook(_make_hook(session, li, K), with_kwargs=True))
    return hooks


def _make_hook(session, li: int, K: int):
    def hook(module, args, kwargs):
        if session.phase == "prefill":
            hs = args[0] if args else kwargs["hidden_states"]
            if li == K:
                keep = None
                for m in session.methods:
                    if getattr(m, "drop_layer", None) == K:
                        keep = m.keep_tokens(session.drop_context(hs))
                session.keep = keep
            keep = session.keep
            if keep is None:
                return None
            keep = keep.to(hs.device)
            if li == K:
                hs = _gather_seq(hs, keep, 1)
            args = (hs,) + tuple(args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = hs
            pe = kwargs.get("position_embeddings")
            if isinstance(pe, tuple):
                kwargs["position_embeddings"] = tuple(_gather_seq(t, keep, 1) for t in pe)
            m = kwargs.get("attention_mask")
            if isinstance(m, torch.Tensor) and m.dim() == 4:
                kwargs["attention_mask"] = _gather_seq(_gather_seq(m, keep, 2), keep, 3)
            pid = kwargs.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.dim() == 2:
                kwargs["position_ids"] = _gather_seq(pid, keep, 1)
            return args, kwargs
        keep = session.keep
        m = kwargs.get("attention_mask")
        if keep is not None and isinstance(m, torch.Tensor) and m.dim() == 4:
            tail = torch.arange(session.prompt_len, m.shape[-1], device=m.device)
            kv = torch.cat([keep.to(m.device), tail.expand(keep.shape[0], -1)], dim=1)
            kwargs["attention_mask"] = _gather_seq(m, kv, 3)
            return args, kwargs
        return None

    return hook

"""What the running transformers passes to the modules vlmplug hooks, read in one place.

transformers renames the keyword arguments its models pass between modules (5.24 renamed the KV cache
`past_key_values` -> `cache`). Every hook in vlmplug reads those arguments through `read` / `write`
here, so a rename is one line in `ROLES`, and a cache passed under a name vlmplug does not know raises
`TransformersMismatchError` at the first forward instead of being silently missed.

Tested releases: TESTED_RANGE (the Makefile's test-compat runs the oldest, test-latest the newest the
registry serves; the lock file pins the one `make test` uses).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from .errors import TransformersMismatchError

#: oldest and newest transformers releases the suite has passed on
TESTED_RANGE = ("5.17.0", "5.25.0")

#: role -> the keyword names transformers has used for it, newest first
ROLES: dict[str, tuple[str, ...]] = {
    "cache": ("cache", "past_key_values"),  # 5.24 renamed past_key_values -> cache (deprecated until 5.40)
    "attention_mask": ("attention_mask",),
    "input_ids": ("input_ids",),
    "inputs_embeds": ("inputs_embeds",),
    "pixel_values": ("pixel_values",),
    # 5.24: generate() encodes the images once and hands the encoder outputs to every forward that needs them
    "mm_encoder_outputs": ("mm_encoder_outputs",),
    "position_ids": ("position_ids",),
    "position_embeddings": ("position_embeddings",),
    "hidden_states": ("hidden_states",),
}


def load_kwargs(**given) -> dict:
    """Keyword arguments vlmplug passes to `from_pretrained`, merged under the caller's own.

    transformers 5.25 kernelizes every model at load by default (`use_kernels` None -> True): it needs the `kernels`
    package and replaces layer forwards with kernels fetched from the hub. vlmplug loads with `use_kernels=False`
    (every release since 5.17 accepts the flag; earlier ones defaulted to False); pass `use_kernels=True` to opt in
    (attention still dispatches through vlmplug's function, and a layer that bypasses it fails loudly).
    """
    return {"use_kernels": False, **given}


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def version_note() -> str:
    """One sentence for error messages: the running release and the tested range."""
    lo, hi = TESTED_RANGE
    return f"transformers {transformers_version()} is running; vlmplug is tested on {lo} to {hi}"


def read(kwargs: dict, role: str) -> Any:
    """The value transformers passed for `role` under any of its known names, or None."""
    for name in ROLES[role]:
        if name in kwargs:
            return kwargs[name]
    return None


def write(kwargs: dict, role: str, value: Any) -> None:
    """Set `role` under the name the caller used (the newest known name when it passed none)."""
    for name in ROLES[role]:
        if name in kwargs:
            kwargs[name] = value
            return
    kwargs[ROLES[role][0]] = value


@functools.lru_cache(maxsize=None)
def _cache_class():
    from transformers.cache_utils import Cache

    return Cache


def find_cache(kwargs: dict, where: str) -> Any:
    """The KV cache among a forward's kwargs. Raises TransformersMismatchError when a Cache object sits under a
    name vlmplug does not know (a rename it would otherwise miss, running every step as a fresh prefill)."""
    cache = read(kwargs, "cache")
    if cache is not None:
        return cache
    Cache = _cache_class()
    stray = [k for k, v in kwargs.items() if isinstance(v, Cache)]
    if stray:
        raise TransformersMismatchError(
            f"vlmplug: {where} received the KV cache as `{stray[0]}`, a name vlmplug does not read "
            f"(it knows {list(ROLES['cache'])}); {version_note()}. Install a tested release "
            f"(pip install 'transformers=={TESTED_RANGE[1]}') or a vlmplug that supports this one."
        )
    return None


def cache_kwarg(model) -> str:
    """The keyword `model.forward` takes its KV cache under (for code that calls models: tests, eval)."""
    params = inspect.signature(model.forward).parameters
    for name in ROLES["cache"]:
        if name in params:
            return name
    raise TransformersMismatchError(
        f"vlmplug: {type(model).__name__}.forward takes none of {list(ROLES['cache'])}; {version_note()}"
    )


def with_cache(model, cache) -> dict:
    """`model(**inputs, **with_cache(model, cache))`: the cache under the name this release's forward takes."""
    return {cache_kwarg(model): cache}


def output_cache(output) -> Any:
    """The KV cache a model output or generate() result carries, under its name in this release."""
    for name in ROLES["cache"]:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def projected_image_features(output) -> torch.Tensor:
    """The projected image features of a VLM forward's output as rows [image tokens, D], every image in order:
    5.24 moved them from `image_hidden_states` (now a deprecated alias) to `image_outputs.pooler_output`, which
    holds one tensor per image."""
    enc = getattr(output, "image_outputs", None)
    feats = getattr(enc, "pooler_output", None) if enc is not None else None
    if feats is None:
        feats = getattr(output, "image_hidden_states", None)
    if isinstance(feats, (list, tuple)) and feats and all(isinstance(x, torch.Tensor) for x in feats):
        feats = torch.cat([x.reshape(-1, x.shape[-1]) for x in feats])
    if not isinstance(feats, torch.Tensor):
        raise TransformersMismatchError(
            f"vlmplug: the model output carries no projected image features ({type(output).__name__} has neither "
            f"image_outputs.pooler_output nor an image_hidden_states tensor); {version_note()}"
        )
    return feats.reshape(-1, feats.shape[-1])


"""`ground()`: where a VLM looks for a query, from its own attention, on any supported family, at SDPA cost.

Data flow: prompt -> processor -> one forward under the grounding probe (the query tokens' softmax rows in the chosen
layers, O(rows x S); rollout also keeps each layer's q / k) -> per image, a value per token (the method's
aggregation) -> `pixel_density` places every view's tokens on the original image through the adapter's boxes
(anyres base + high-res, tiles + thumbnail or global image, LLaVA's centre crop undone) -> `Grounding`.

Methods:
  tag       TAG (Xu et al., AAAI 2025): per query token, the top_k (layer, head) pairs by attention mass on the image;
            the token's map is the mean of those pairs' rows; maps are averaged over the query tokens; max-normalised.
  raw       the mean over chosen layers and heads (and query tokens) of the attention rows.
  relative  ViCrop's rel-att (Zhang et al., ICLR 2025): the last prompt position's head-mean attention in one middle
            layer (LLaVA-1.5-7B: 14 of 32; scaled to the model's depth) divided by the same for a generic prompt
            ("Write a general description of the image."), as a ratio of pixel densities.
  rollout   attention rollout (Abnar & Zuidema 2020): the query tokens' row of (0.5 A_L + 0.5 I) ... (0.5 A_1 + 0.5 I),
            A the head-mean attention, computed backwards from the last layer as a row vector times each layer's
            attention, rows recomputed in chunks from the kept q / k: one O(L) accumulator, never L x L.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..backend.kernels import weighted_attention
from ..errors import MethodConfigError
from ..results import covering_views, pixel_density
from .probe import TokenProbe
from .result import Grounding
from .tokens import phrase_tokens

METHODS = ("tag", "relative", "rollout", "raw")
TOKEN_MODES = ("query", "last")
GENERIC_PROMPT = "Write a general description of the image."
#: ViCrop's layer for LLaVA-1.5-7B (mllms_know, ATT_LAYER = 14 of 32), scaled to other depths
RELATIVE_DEPTH = 14 / 32
TAG_TOP_K = 10  # TAG's --topk_layer_head
TAG_THRESHOLD = 0.5  # TAG's filter_thresold


def default_layers(method: str, num_layers: int) -> list[int]:
    if method == "relative":
        return [min(num_layers - 1, round(RELATIVE_DEPTH * num_layers))]
    return list(range(num_layers))


def check_layers(layers, n: int) -> list[int]:
    """Decoder layers (negative from the end) -> sorted distinct indices; MethodConfigError when out of range."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise MethodConfigError("ground: layers=[] is empty; give decoder layers or None (the method's default)")
    for li in layers:
        if isinstance(li, bool) or not isinstance(li, int) or not -n <= li < n:
            raise MethodConfigError(f"ground: layer {li!r} is out of range for a {n}-layer model")
    return sorted({li % n for li in layers})


def check_heads(heads, H: int, method: str) -> None:
    if heads is None:
        return
    if method in ("tag", "rollout"):
        raise MethodConfigError(f"ground: heads= is for 'raw' and 'relative'; {method!r} "
                                + ("chooses its own (layer, head) pairs" if method == "tag" else "averages every head"))
    heads = list(heads)
    if not heads:
        raise MethodConfigError("ground: heads=[] is empty; give head indices or None (all)")
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < H:
            raise MethodConfigError(f"ground: head {h!r} is out of range for {H} heads")


def check_args(method: str, tokens: str, top_k: int, threshold: float) -> None:
    if method not in METHODS:
        raise MethodConfigError(f"ground: method={method!r}; choose one of {list(METHODS)}")
    if tokens not in TOKEN_MODES:
        raise MethodConfigError(f"ground: tokens={tokens!r}; choose one of {list(TOKEN_MODES)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise MethodConfigError(f"ground: top_k={top_k!r} must be a positive int")
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise MethodConfigError(f"ground: threshold={threshold!r} must be in (0, 1]")


# ---------------------------------------------------------------------------------------------- forwards
def probe_forward(model, inputs: dict, image_sizes, *, layers, targets=None, capture_qk=False, processor=None):
    """One forward of `inputs` under a grounding probe: (probe, layout)."""
    from ..api import apply

    probe = TokenProbe(layers=layers, targets=targets, capture_qk=capture_qk)
    with apply(model, [probe], processor=processor) as h:
        if image_sizes is not None:
            h.set_image_sizes(image_sizes)
        with torch.no_grad():  # the maps need no logits but the last position's (full-vocab logits are large)
            model(**inputs, use_cache=False, logits_to_keep=1)
        layout = h.layout
    return probe, layout


def rollout_rows(probe: TokenProbe, layers: Sequence[int], start: torch.Tensor) -> torch.Tensor:
    """start: float [B, L] (the query tokens' weights, each row summing to 1) -> float [B, L]: start times
    (0.5 A_l + 0.5 I) for l from the last chosen layer down to the first, A_l the head-mean softmax attention of
    layer l, from the kept q / k by the backend's `weighted_attention` (only rows with weight are recomputed)."""
    v = start.double()
    for li in sorted(layers, reverse=True):
        c = probe.qk[li]
        u = weighted_attention(c.query, c.key, c.mask, c.scale, c.causal, v[:, : c.query.shape[2]])
        v = 0.5 * u[:, : v.shape[1]].double().cpu() + 0.5 * v
    return v.float()


# ---------------------------------------------------------------------------------------------- aggregation
def _stack(step, layers: Sequence[int], b: int) -> torch.Tensor:
    """float [T, n_layers, H, L]: sample b's rows of every chosen query token in the chosen layers."""
    return torch.stack([step.rows[li][b] for li in layers], 1)


def tag_values(step, layers: Sequence[int], b: int, positions: torch.Tensor, top_k: int) -> tuple[torch.Tensor, list]:
    """TAG's per-token aggregation for one image (positions: its tokens): value per sequence position [L] and the
    (layer, head) pairs kept per token."""
    R = _stack(step, layers, b)  # [T, nL, H, L]
    T, nL, H, L = R.shape
    have = step.counts[b] > 0
    k = min(top_k, nL * H)
    vals, pairs = [], []
    for t in range(T):
        if not bool(have[t]):
            continue
        mass = R[t][:, :, positions].sum(-1).flatten()  # [nL * H]
        top = torch.topk(mass, k).indices
        vals.append(R[t].reshape(nL * H, L)[top].mean(0))
        pairs.append([(int(layers[i // H]), int(i % H)) for i in top.tolist()])
    if not vals:
        raise ValueError(f"sample {b}: none of the chosen query tokens was probed")
    return torch.stack(vals).mean(0), pairs


def raw_values(step, layers: Sequence[int], b: int, heads: Sequence[int] | None) -> torch.Tensor:
    R = _stack(step, layers, b)  # [T, nL, H, L]
    if heads is not None:
        R = R[:, :, list(heads)]
    have = step.counts[b] > 0
    if not bool(have.any()):
        raise ValueError(f"sample {b}: none of the chosen query tokens was probed")
    return R[have].mean((0, 1, 2))


def seen_pixels(im, views) -> np.ndarray:
    """bool [H, W]: pixels some placed token's box covers."""
    ones = torch.ones(int(im.positions.max()) + 1)
    return (pixel_density(im, ones, views=views) > 0).numpy()


def _normalise(heat: torch.Tensor) -> np.ndarray:
    heat = heat.clamp(min=0)
    top = float(heat.max())
    return (heat / top if top > 0 else heat).numpy().astype(np.float32)


def ground_inputs(model, inputs: dict, *, method: str = "tag", targets: list[list[int]] | None = None,
                  layers: Sequence[int] | None = None, heads: Sequence[int] | None = None, top_k: int = TAG_TOP_K,
                  image_sizes=None, generic_inputs: dict | None = None, processor=None) -> list[list[dict]]:
    """The grounding maps of every image of every sample of one batch of model inputs (the engine under `ground()`).

    targets: per sample, the sequence positions of the query tokens (None: each sample's last real token).
    generic_inputs: for "relative", the same images with the generic prompt.
    image_sizes: per sample, per image, the original (width, height) (maps in those pixels), or None.
    Returns per sample, per image, dict(heat=float tensor [H, W] (not normalised), info=dict).
    """
    from ..adapters.base import get_adapter

    n_layers = get_adapter(model, processor).num_layers
    H = int(model.config.get_text_config().num_attention_heads)
    chosen = default_layers(method, n_layers) if layers is None else check_layers(layers, n_layers)
    check_heads(heads, H, method)
    if method == "relative":
        if generic_inputs is None:
            raise MethodConfigError("ground: method='relative' needs the generic prompt's inputs")
        targets = None  # ViCrop reads the last prompt position
    probe, layout = probe_forward(model, inputs, image_sizes, layers=chosen, targets=targets,
                                  capture_qk=method == "rollout", processor=processor)
    step = probe.steps[-1]
    gstep = glayout = None
    if method == "relative":  # its own layout: the generic prompts pad differently from the questions
        gprobe, glayout = probe_forward(model, generic_inputs, image_sizes, layers=chosen, processor=processor)
        gstep = gprobe.steps[-1]
        if [len(s.images) for s in glayout.samples] != [len(s.images) for s in layout.samples]:
            raise ValueError("relative: the generic inputs do not hold the same images as the question's")
    rolled = None
    if method == "rollout":
        B, L = len(layout), next(iter(step.rows.values())).shape[-1]
        start = torch.zeros(B, L)
        for b, s in enumerate(layout.samples):
            pos = [s.last_real] if targets is None else list(targets[b])
            start[b, pos] = 1.0 / len(pos)
        rolled = rollout_rows(probe, chosen, start)
        probe.qk.clear()
    out = []
    for b, s in enumerate(layout.samples):
        per = []
        for i, im in enumerate(s.images):
            views = covering_views(im)
            where = f"sample {b}, image {i}"
            info: dict[str, Any] = {"layers": chosen, "views": views, "grid": (im.main_view.rows, im.main_view.cols)}
            if method == "tag":
                placed = torch.cat([im.view(n).positions for n in views]).unique()
                vals, pairs = tag_values(step, chosen, b, placed, top_k)
                info["pairs"] = pairs
                heat = pixel_density(im, vals, views=views, where=where)
            elif method == "raw":
                heat = pixel_density(im, raw_values(step, chosen, b, heads), views=views, where=where)
                info["heads"] = None if heads is None else list(heads)
            elif method == "rollout":
                heat = pixel_density(im, rolled[b], views=views, where=where)
            else:
                hq = pixel_density(im, raw_values(step, chosen, b, heads), views=views, where=where)
                gim = glayout.samples[b].images[i]
                hg = pixel_density(gim, raw_values(gstep, chosen, b, heads), views=covering_views(gim), where=where)
                if hg.shape != hq.shape:
                    raise ValueError(f"{where}: the generic prompt's map is {tuple(hg.shape)}, the question's "
                                     f"{tuple(hq.shape)}: not the same image")
                heat = torch.where(hg > 0, hq / hg.clamp(min=1e-30), torch.zeros_like(hq))
            info["seen"] = seen_pixels(im, views)
            per.append({"heat": heat, "info": info})
        out.append(per)
    return out


# ---------------------------------------------------------------------------------------------- user API
def locate_query(model, processor, inputs: dict, phrases: Sequence[str]) -> tuple[list[list[int]], list[list[str]]]:
    """Per sample, the positions of the query tokens (content words of the phrase, in the text after the last image
    token) and their decoded text."""
    tok = getattr(processor, "tokenizer", processor)
    ids = inputs["input_ids"]
    am = inputs.get("attention_mask")
    from ..adapters.base import get_adapter

    img = {get_adapter(model, processor).image_token_id}
    targets, texts = [], []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        real = torch.nonzero(am[b]).flatten() if am is not None else torch.arange(len(row))
        first, last = int(real.min()), int(real.max())
        after = max([p for p, t in enumerate(row) if t in img], default=first - 1) + 1
        pos = phrase_tokens(tok, row, after, last, phrases[b])
        if not pos:
            raise MethodConfigError(f"ground: the phrase {phrases[b]!r} is not in prompt {b}'s text after the image; "
                                    "give target= a phrase of the query (or tokens='last')")
        targets.append(pos)
        texts.append([tok.decode([row[p]]) for p in pos])
    return targets, texts


def ground(model, processor, image, query, method: str = "tag", *, target: str | Sequence[str] | None = None,
           tokens: str | None = None, layers: Sequence[int] | int | None = None, heads: Sequence[int] | None = None,
           top_k: int = TAG_TOP_K, threshold: float = TAG_THRESHOLD, prompt: str = "{query}",
           generic_prompt: str = GENERIC_PROMPT):
    """Where the model looks for `query` in `image`: a `Grounding` (heatmap over the original pixels, point, box,
    point prompts, overlay).

    Shapes: one image and one query -> a Grounding; a list of images and one query -> one prompt with those images,
    a list of Groundings (one per image); a list of queries with a list of the same length, each item an image or a
    list of images -> one batch, per query a Grounding (or a list, for a list of images).

    method: "tag" (default), "relative", "rollout" or "raw" (see vlmplug/grounding/core.py).
    prompt: the text asked, "{query}" replaced by the query (default: the query itself).
    tokens: "query" (the tokens of `target`, default the query, without stop words: TAG's prompt side) or "last"
        (the prompt's last token, whose output is the answer's first token: ViCrop's query row). Default: "query"
        for "tag", "last" for the others; "relative" reads the last token only.
    target: the phrase of the query whose tokens are read (one per query in a batch; with tokens="query").
    layers: decoder layers (default: all; "relative": ViCrop's layer 14 of 32 scaled to the model's depth);
    heads: heads for "raw" / "relative" (default all); top_k: TAG's (layer, head) pairs per token;
    threshold: fraction of the maximum for `Grounding.box` / `.points` (TAG: 0.5).
    """
    from ..pipeline import _load_images, prepare_batch

    if tokens is None:
        tokens = "query" if method == "tag" else "last"
    check_args(method, tokens, top_k, threshold)
    if method == "relative" and tokens != "last":
        raise MethodConfigError("ground: 'relative' reads the prompt's last token (ViCrop); tokens='query' does not apply")
    if target is not None and tokens != "query":
        raise MethodConfigError("ground: target= picks query tokens; it needs tokens='query'")
    batched = isinstance(query, (list, tuple))
    queries = list(query) if batched else [query]
    if batched:
        if not isinstance(image, (list, tuple)) or len(image) != len(queries):
            n = len(image) if isinstance(image, (list, tuple)) else 1
            raise MethodConfigError(f"ground: {n} images for {len(queries)} queries; give one image (or one list of "
                                    "images) per query")
        groups = [_load_images(list(im) if isinstance(im, (list, tuple)) else [im]) for im in image]
        several = [isinstance(im, (list, tuple)) for im in image]
    else:
        several = [isinstance(image, (list, tuple))]
        groups = [_load_images(list(image) if several[0] else [image])]
    if not all(groups):
        raise MethodConfigError("ground: every query needs at least one image")
    if not all(isinstance(q, str) and q.strip() for q in queries):
        raise MethodConfigError("ground: every query must be a non-empty string")
    if not isinstance(prompt, str) or "{query}" not in prompt:
        raise MethodConfigError(f"ground: prompt={prompt!r} must contain {{query}}")
    if target is None:
        phrases = queries
    else:
        phrases = list(target) if isinstance(target, (list, tuple)) else [target] * len(queries)
        if len(phrases) != len(queries):
            raise MethodConfigError(f"ground: {len(phrases)} targets for {len(queries)} queries")
    texts = [prompt.replace("{query}", q) for q in queries]
    inputs = prepare_batch(model, processor, groups, texts)
    sizes = [[im.size for im in g] for g in groups]
    targets, token_text = None, [[] for _ in queries]
    if tokens == "query":
        targets, token_text = locate_query(model, processor, inputs, phrases)
    generic = prepare_batch(model, processor, groups, [generic_prompt] * len(queries)) if method == "relative" else None
    maps = ground_inputs(model, inputs, method=method, targets=targets, layers=layers, heads=heads, top_k=top_k,
                         image_sizes=sizes, generic_inputs=generic, processor=processor)
    tok = getattr(processor, "tokenizer", processor)
    out = []
    for b, q in enumerate(queries):
        if len(maps[b]) != len(groups[b]):
            raise RuntimeError(f"query {b}: the model saw {len(maps[b])} images, {len(groups[b])} were given")
        if targets is None:
            last = int(torch.nonzero(inputs["attention_mask"][b]).max()) if "attention_mask" in inputs else -1
            token_text[b] = [tok.decode([int(inputs["input_ids"][b, last])])]
        per = []
        for m, im in zip(maps[b], groups[b]):
            if tuple(m["heat"].shape[::-1]) != im.size:
                raise RuntimeError(f"the map is {tuple(m['heat'].shape[::-1])}, the image {im.size}: the adapter "
                                   "could not place the tokens in the original image")
            per.append(Grounding(heatmap=_normalise(m["heat"]), query=q, method=method, image=im,
                                 tokens=token_text[b], info=m["info"], threshold=float(threshold)))
        out.append(per if several[b] else per[0])
    return out if batched else out[0]

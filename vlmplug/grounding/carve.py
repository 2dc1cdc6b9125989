"""CARVE (Ge et al., "Focusing by Contrastive Attention", arXiv 2509.06461; YuyaoGe/CARVE): contrast the attention
of the question with that of a general instruction, mask the image to where the question looks, ask again.

1. Pass Q: answer the question (up to max_new_tokens), reading at every step the new token's attention over the image
   in the chosen layers, head mean (the official code re-runs the whole prefix without a KV cache at every step;
   here the cached step reads the same row).
2. Pass G: the same for "Write a general description of the image.".
3. For step t (paired by index) and layer l: A_Q / (A_G + lambda) per image token, placed on the original pixels,
   summed over the layers, then over the steps with weight t + 1 -> the map S.
4. Mask: pixels in the top `top_p` share of S; connected components ranked by their sum of S; the best
   max(K, int(#components * top_p)) kept.
5. The image with every pixel outside the mask set to black, cropped to the mask's bounding box and enlarged
   (LANCZOS) by max(W / w, H / h); re-ask with [original, refined].

Deviation: step 3 places each token's contrast uniformly over its box (vlmplug's one pixel rule, which also merges
anyres / tiled views) where the official code upsamples a single grid bilinearly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import MethodConfigError
from .core import GENERIC_PROMPT

#: CARVE's DEFAULT_LAYERS = range(20, 26), for 28-36-layer models; vlmplug scales 20..25 of 32 to the model's depth
LAYER_SPAN = (20 / 32, 25 / 32)


@dataclass(frozen=True)
class CARVE:
    """layers: decoder layers (default CARVE's 20-25, as a share of 32 layers scaled to the model: the official
    code uses 20-25 whatever the depth); lam: the contrast's lambda (1e-8); top_p: the mask's pixel share (0.2); k:
    components kept at least (3); max_new_tokens: steps of the question's attention pass (32; the general pass runs
    as many steps as the question's answer took, the steps CARVE pairs); question_suffix: appended to the question
    in the attention pass (the official code appends " Answer the question using a single word or phrase.")."""

    name: ClassVar[str] = "carve"
    layers: tuple[int, ...] | None = None
    lam: float = 1e-8
    top_p: float = 0.2
    k: int = 3
    max_new_tokens: int = 32
    generic_prompt: str = GENERIC_PROMPT
    question_suffix: str = ""

    def __post_init__(self):
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise MethodConfigError(f"carve: top_p={self.top_p!r} must be in (0, 1]")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise MethodConfigError(f"carve: k={self.k!r} must be a positive int")
        if isinstance(self.lam, bool) or not (isinstance(self.lam, (int, float)) and self.lam > 0):
            raise MethodConfigError(f"carve: lam={self.lam!r} must be > 0 (CARVE: 1e-8)")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise MethodConfigError(f"carve: max_new_tokens={self.max_new_tokens!r} must be a positive int")


def default_layers(n: int) -> list[int]:
    lo, hi = (min(n - 1, round(f * n)) for f in LAYER_SPAN)
    return list(range(lo, hi + 1))


def step_maps(model, processor, image, prompt: str, layers, max_new_tokens: int) -> tuple[list, object]:
    """Generate an answer to `prompt`, reading each step's new-token attention: ([per step: float [n_layers, L]
    head-mean rows], image layout)."""
    from ..api import apply
    from ..pipeline import _run_generate, prepare_inputs
    from .probe import TokenProbe

    inputs = prepare_inputs(model, processor, [image], prompt)
    probe = TokenProbe(layers=layers, steps=True)
    with apply(model, [probe], processor=processor) as h:
        h.set_image_sizes([[image.size]])
        _run_generate(model, inputs, dict(max_new_tokens=max_new_tokens))
        layout = h.layout
    steps = [torch.stack([s.rows[li][0, 0].mean(0) for li in layers]) for s in probe.steps]
    return steps, layout


def contrast_map(q_steps, g_steps, layout, lam: float) -> torch.Tensor:
    """S [H, W]: sum over paired steps t (weight t + 1) and layers of A_Q / (A_G + lam), placed on the pixels."""
    from ..results import covering_views, pixel_density

    im = layout.samples[0].images[0]
    views = covering_views(im)
    S = None
    for t, (q, g) in enumerate(zip(q_steps, g_steps)):
        L = min(q.shape[-1], g.shape[-1])  # the image sits at the same positions in both prompts' layouts
        for li in range(q.shape[0]):
            ratio = q[li, :L] / (g[li, :L] + lam)
            m = pixel_density(im, ratio, views=views) * (t + 1)
            S = m if S is None else S + m
    return S


def carve_mask(S: np.ndarray, top_p: float, k: int) -> np.ndarray:
    """bool [H, W]: the top_p share of pixels by S, in its max(k, int(n * top_p)) components of largest total S."""
    from scipy import ndimage

    thr = np.quantile(S, 1 - top_p)
    above = (S >= thr) & (S > 0)  # never the unseen margins (a crop's cut-away sides read 0)
    lab, n = ndimage.label(above)
    if n == 0:
        return above
    sums = ndimage.sum(S, lab, index=np.arange(1, n + 1))
    keep = np.argsort(-sums)[: max(k, int(n * top_p))] + 1
    return np.isin(lab, keep)


def refine(image, mask: np.ndarray):
    """The masked image cropped to the mask's box and enlarged by max(W / w, H / h): (PIL image, box)."""
    from PIL import Image

    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("carve: the mask is empty (the map gave the image no attention)")
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    arr = np.asarray(image.convert("RGB")).copy()
    arr[~mask] = 0
    crop = Image.fromarray(arr).crop(box)
    W, H = image.size
    w, h = crop.size
    s = max(W / w, H / h)
    return crop.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS), box


def run(model, processor, images, question: str, cfg: CARVE) -> dict:
    """Both attention passes, the map, the mask and the refined image: dict(mask, box, refined, map, images)."""
    from ..adapters.base import get_adapter

    if len(images) != 1:
        raise MethodConfigError(f"carve works on one image per question; got {len(images)}")
    image = images[0]
    n = get_adapter(model, processor).num_layers
    if cfg.layers is None:
        layers = default_layers(n)
    else:
        from .core import check_layers

        layers = check_layers(cfg.layers, n)
    q_steps, layout = step_maps(model, processor, image, question + cfg.question_suffix, layers, cfg.max_new_tokens)
    g_steps, g_layout = step_maps(model, processor, image, cfg.generic_prompt, layers, len(q_steps))
    qi, gi = layout.samples[0].images[0], g_layout.samples[0].images[0]
    if qi.positions.tolist() != gi.positions.tolist():
        raise RuntimeError("carve: the image sits at different positions under the two prompts")
    S = contrast_map(q_steps, g_steps, layout, cfg.lam).numpy()
    if S.shape != (image.size[1], image.size[0]):
        raise RuntimeError(f"carve: the map is {S.shape[::-1]}, the image {image.size}: the adapter could not place "
                           "the tokens in the original image")
    mask = carve_mask(S, cfg.top_p, cfg.k)
    refined, box = refine(image, mask)
    return {"mask": mask, "box": box, "refined": refined, "map": S, "steps": min(len(q_steps), len(g_steps)),
            "images": [image, refined]}

"""Image-feature interception: what the image-feature call encoded (for the layout), and the feature plans of
methods that select or merge image tokens before the LLM (`Method.feature_plan`, `Method.projector_input`).

generate() encodes the images before the prefill forward; inside a forward (and in transformers releases that
encode per forward) the layout is known at once. Plans wait for the layout: the same tensors are scattered into
the prompt later, so edits made at the prefill's start still reach the LLM.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch

from ..adapters.base import ImageMeta


class FeatureInterceptor:
    def __init__(self, session):
        self.session = session
        self.pending_meta: ImageMeta | None = None  # what the latest image-feature call encoded
        self._out = None  # image-feature output waiting for the prefill (generate path)

    # ------------------------------------------------------------ install
    def install(self, installer, base) -> None:
        orig = getattr(base, "get_image_features", None)
        if orig is not None:
            installer.set_attr(base, "get_image_features", self._wrap(orig))
        proj = getattr(base, "multi_modal_projector", None)
        if proj is not None and any(m.wants_projector_input for m in self.session.methods):
            installer.hook(proj.register_forward_pre_hook(self._projector_hook))

    def _wrap(self, orig):
        try:
            sig = inspect.signature(orig)
        except (TypeError, ValueError):  # pragma: no cover - builtins only
            sig = None
        session = self.session

        @functools.wraps(orig)  # generate() reads this signature to pick the encoder's kwargs
        def get_image_features(*args, **kwargs):
            bound = dict(kwargs)
            if sig is not None:
                try:
                    bound = dict(sig.bind_partial(*args, **kwargs).arguments)
                    bound.update(bound.pop("kwargs", {}) or {})
                except TypeError:
                    pass
            self.pending_meta = session.adapter.capture_meta(bound)
            # inside a forward every row brought its own images; before it, generate() encodes them once and
            # may repeat rows afterwards (beams), which then share their images
            self.pending_meta.values["encoded_in_forward"] = session.in_forward
            session.state.layout_done = False
            for m in session.active:
                m.begin_vision()
            out = orig(*args, **kwargs)
            if any(m.wants_image_features for m in session.active):
                self._out = out
                if session.in_forward:
                    self.apply()
            return out

        return get_image_features

    def _projector_hook(self, module, args):
        feats = args[0]
        for m in self.session.active:
            if m.wants_projector_input:
                new = m.projector_input(feats)
                if new is not None:
                    feats = new
        return (feats,) + tuple(args[1:])

    # ------------------------------------------------------------ plans
    @property
    def pending(self) -> bool:
        """Image features encoded before this forward wait for their plans (generate's path)."""
        return self._out is not None

    def at_prefill(self, reuses_encoder_outputs: bool) -> None:
        """A prefill starts: features encoded before it (generate path) get their plans now. A prefill that reuses
        encoder outputs already planned (generate(use_cache=False) hands the same ones to every step; their merged
        rows were written into them) keeps the pass's latest selection."""
        if self._out is not None:
            self.apply()
        elif reuses_encoder_outputs:
            st = self.session.state
            st.feature_keep = dict(st.last_feature_keep)

    def apply(self) -> None:
        out, self._out = self._out, None
        session = self.session
        feats = getattr(out, "pooler_output", None) if out is not None else None
        lay = session.layout
        if feats is None or lay is None:
            return
        images = [(b, im) for b, s in enumerate(lay.samples) for im in s.images]
        rows = _rows_per_image(feats, [int(im.positions.numel()) for _, im in images])
        if rows is None:
            warnings.warn("vlmplug: image features do not match the image tokens; feature methods skipped")
            return
        for m in session.active:
            if not m.wants_image_features:
                continue
            plan = m.feature_plan(rows, images, session)
            if plan is None:
                continue
            with torch.no_grad():
                for i, new in plan.overwrite:
                    rows[i].copy_(new.to(rows[i].dtype))  # views of the tensors the model scatters into the prompt
            session.state.feature_keep[m.name] = session.state.last_feature_keep[m.name] = plan.keep


def _rows_per_image(feats, sizes: list[int]) -> list[torch.Tensor] | None:
    """Views [n_i, D] of each image's rows in the image-feature output (one tensor, or one block per image or per
    sample holding several images, as Idefics3 returns), or None when they do not match the image tokens."""
    if isinstance(feats, torch.Tensor):
        flat = feats.reshape(-1, feats.shape[-1])
        if flat.data_ptr() != feats.data_ptr() or flat.shape[0] != sum(sizes):
            return None
        return list(flat.split(sizes))
    rows, queue = [], [x.reshape(-1, x.shape[-1]) for x in feats if x.numel()]
    for n in sizes:
        while queue and queue[0].shape[0] == 0:
            queue.pop(0)
        if not queue or queue[0].shape[0] < n:
            return None
        rows.append(queue[0][:n])
        queue[0] = queue[0][n:]
    return rows

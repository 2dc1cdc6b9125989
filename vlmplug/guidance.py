"""Logits-level hooks: a second pass of the patched model beside generate()'s own, mixed into its logits.

`PassMix` is a transformers `LogitsProcessor`: `model.generate(..., logits_processor=[PassMix(...)])` runs, at
every step, one forward of a second prompt (its own inputs, its own KV cache, its own vlmplug pass state: e.g.
the question without the image for classifier-free guidance, PAI's text-only branch) and returns
`mix(main_logits, second_logits)`. The two passes advance side by side; neither resets the other's state.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from transformers import LogitsProcessor

from . import compat
from .errors import MethodConfigError


def cfg_mix(gamma: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Classifier-free guidance in log-probabilities: (1 + gamma) log p_main - gamma log p_second."""

    def mix(main: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return (1 + gamma) * torch.log_softmax(main.float(), -1) - gamma * torch.log_softmax(second.float(), -1)

    return mix


class PassMix(LogitsProcessor):
    """Run `inputs` as pass `label` beside generate(), feeding it the tokens generate() picks, and mix the logits.

    inputs: the second prompt's model inputs (input_ids, attention_mask, pixel_values or none, ...), same batch
        size as generate()'s (one row per sequence; beams and num_return_sequences > 1 are refused).
    mix: (main logits [B, V], second logits [B, V]) -> logits [B, V]; `cfg_mix(gamma)` by default gamma=1.
    """

    def __init__(self, model, inputs: dict, mix: Callable | None = None, label: str = "second"):
        if "input_ids" not in inputs:
            raise MethodConfigError("PassMix needs the second prompt's input_ids")
        if not isinstance(label, str) or not label or label == "main":
            raise MethodConfigError(f"PassMix: label={label!r}; the second pass needs its own label (not 'main', "
                                    "the pass generate() itself runs)")
        self.model = model
        self.inputs = dict(inputs)
        self.mix = mix or cfg_mix(1.0)
        self.label = label
        self.cache = None
        mask = inputs.get("attention_mask")
        # decode steps need the padding mask only where the second prompt has padding; M-RoPE models (Qwen-VL) derive
        # decode positions from a mask over the whole sequence, which is wrong for a single new token there
        self.mask = mask if mask is not None and not bool(mask.bool().all()) else None
        base = getattr(model, "model", model)
        if self.mask is not None and hasattr(base, "rope_deltas"):
            raise MethodConfigError(
                f"PassMix: a left-padded second prompt on {type(model).__name__} (M-RoPE positions) is not supported; "
                "run one prompt per call"
            )
        self._mask0 = self.mask
        self.last_logits: torch.Tensor | None = None  # the second pass's logits at the latest step
        self._fed = 0  # tokens of generate()'s sequence already fed to the second pass
        self._seen: torch.Tensor | None = None  # generate()'s sequence at the latest call
        self._held: dict = {}  # model attributes that carry per-prompt state (Qwen's rope_deltas)

    def reset(self) -> None:
        """Forget the second pass's cache: the next call starts it again (a new generate() call)."""
        self.cache, self._fed, self._seen, self.mask, self._held = None, 0, None, self._mask0, {}

    def _swap(self) -> None:
        """Exchange model-held per-prompt state between the passes (Qwen-VL keeps rope_deltas on the model)."""
        base = getattr(self.model, "model", self.model)
        if hasattr(base, "rope_deltas"):
            mine = self._held.get("rope_deltas")
            self._held["rope_deltas"] = base.rope_deltas
            base.rope_deltas = mine

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from transformers import DynamicCache

        B = self.inputs["input_ids"].shape[0]
        if input_ids.shape[0] != B:
            raise MethodConfigError(
                f"PassMix: generate() runs {input_ids.shape[0]} rows for a second prompt of {B}; beams and "
                "num_return_sequences > 1 are not supported"
            )
        handle = self.model.__dict__.get("_vlmplug_handle")
        if handle is not None and handle.active and handle.session._label == self.label:
            raise MethodConfigError(f"PassMix: label {self.label!r} is the pass generate() is running in; choose another")
        seen = self._seen
        if self.cache is not None and (input_ids.shape[1] <= self._fed or seen is None
                                       or not torch.equal(input_ids[:, : seen.shape[1]], seen)):
            self.reset()  # a new generate() call (or a rolled-back sequence): start the second pass again
        self._seen = input_ids.clone()
        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
            kwargs = dict(self.inputs)
            self._fed = input_ids.shape[1]
        else:
            new = input_ids[:, self._fed:]
            self._fed = input_ids.shape[1]
            if self.mask is not None:
                self.mask = torch.cat([self.mask, self.mask.new_ones(B, new.shape[1])], 1)
            kwargs = {"input_ids": new}
            if self.mask is not None:
                kwargs["attention_mask"] = self.mask
        self._swap()
        try:
            with torch.no_grad(), (handle.pass_(self.label) if handle is not None and handle.active else contextlib.nullcontext()):
                out = self.model(**kwargs, **compat.with_cache(self.model, self.cache), use_cache=True,
                                 logits_to_keep=1)
        finally:
            self._swap()
        self.last_logits = out.logits[:, -1].to(scores.dtype)
        return self.mix(scores, self.last_logits).to(scores.dtype)


"""A continuation's log-probabilities under the methods: its tokens forced through `generate` one step at a time, so
they are scored by exactly the forwards an answer would get (the pruned prompt and KV cache, guidance passes).
Used by V*'s option scoring (`vlmplug eval vstar`) and the lmms-eval plugin's `loglikelihood`."""
from __future__ import annotations

from typing import Any


def continuation_ids(processor: Any, prompt: str, n_images: int, continuation: str) -> list[int]:
    """The continuation's tokens as they follow the chat-formatted prompt (tokenised together, so a merge across the
    boundary counts as the tokenizer makes it; encoded alone when the prompt's own tokens change)."""
    from ..pipeline import build_prompt

    tok = getattr(processor, "tokenizer", processor)
    head = build_prompt(processor, prompt, n_images)
    pre = tok(head, add_special_tokens=False)["input_ids"]
    full = tok(head + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(pre)] == pre:
        return full[len(pre):]
    return tok(continuation, add_special_tokens=False)["input_ids"]


def score_continuation(model: Any, processor: Any, images: list, prompt: str, ids: list[int], methods: Any = None,
                       method_params: dict | None = None) -> tuple[list[float], bool, dict]:
    """(per-token log-probabilities of `ids` after the prompt, whether greedy decoding gives exactly `ids`, the
    `generate_info` of the forced run). The log-probabilities are taken from the scores the methods produce (their
    guidance processors run before this one), before any sampling setting."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from ..pipeline import generate_info

    class Force(LogitsProcessor):
        def __init__(self):
            self.logp: list[float] = []
            self.greedy = True

        def __call__(self, input_ids, scores):
            t = ids[len(self.logp)]
            row = scores[0].float()
            self.logp.append(float(torch.log_softmax(row, -1)[t]))
            self.greedy = self.greedy and int(row.argmax()) == t
            forced = torch.full_like(scores, float("-inf"))
            forced[:, t] = 0.0
            return forced

    if not ids:
        return [], True, {}
    force = Force()
    info = generate_info(model, processor, images, prompt, methods=methods, method_params=method_params,
                         max_new_tokens=len(ids), repetition_penalty=1.0, logits_processor=LogitsProcessorList([force]))
    return force.logp, force.greedy, info

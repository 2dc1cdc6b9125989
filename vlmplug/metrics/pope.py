"""POPE (Li et al., EMNLP 2023): yes/no object-existence questions, scored as the official evaluation script does
(RUCAIBox/POPE `evaluate.py`, also LLaVA's `eval_pope.py` and VCD's): keep the answer's first sentence (up to the
first '.'), drop commas, split on single spaces; an answer containing the word "No", "no" or "not" is "no", anything
else is "yes". "yes" is the positive class."""
from __future__ import annotations

from typing import Sequence


def parse_answer(text: str) -> str:
    """"yes" or "no", as the official script reads a free-form answer (case-sensitive words: "No", "no", "not";
    "NO" or "Not" read as "yes", as there)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """{"accuracy", "precision", "recall", "f1", "yes_ratio"} as fractions 0..1, plus the counts "tp", "fp", "tn",
    "fn", "n". predictions: the model's answers (free text); labels: "yes" / "no" (any other label counts as "yes",
    as in the official script). A ratio whose denominator is 0 is 0.0 (the official script divides by zero)."""
    if len(predictions) != len(labels):
        raise ValueError(f"pope: {len(predictions)} predictions for {len(labels)} labels")
    if not predictions:
        raise ValueError("pope: no predictions")
    pred = [parse_answer(p) == "yes" for p in predictions]
    gold = [lab != "no" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}

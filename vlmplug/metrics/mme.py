"""MME (Fu et al., 2023): per subtask, accuracy over questions, acc+ over images (both of an image's two questions
right) and score = acc + acc+ (each x100); perception and cognition totals are the sums of their subtasks' scores.
Answers are read as the official `eval_tool/calculation.py` reads them: lower-cased; "yes" / "no" exactly, else
"yes" if its first four characters contain "yes", "no" if they contain "no", otherwise "other" (always wrong)."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_answer(text: str) -> str:
    """"yes", "no" or "other" (e.g. "Not sure" reads "no": its first four characters hold "no", as officially)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def parse_line(line: str) -> dict:
    """One line of the official results layout, "image_name<TAB>question<TAB>gt_answer<TAB>prediction"."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 4:
        raise ValueError(f"mme: a result line has 4 tab-separated fields (image, question, answer, prediction); got "
                         f"{len(parts)}: {line[:80]!r}")
    image, question, answer, prediction = parts
    return {"image": image, "question": question, "answer": answer, "prediction": prediction}


def mme(records: Iterable[dict]) -> dict:
    """records: dicts with "category" (an MME subtask), "image", "answer" ("Yes"/"No"), "prediction" (free text).
    Returns {"subtasks": {name: {"acc", "acc_plus", "score", "n"}}, "perception", "cognition"} with acc, acc+ in
    0..100 and score = acc + acc+ (0..200), as the official tool reports them. acc+ groups a subtask's questions by
    image (the official tool takes consecutive lines two by two: the same for its files)."""
    per: dict[str, list] = defaultdict(list)
    for r in records:
        gold = str(r["answer"]).lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"mme: answer {r['answer']!r} of {r.get('image')!r} is not yes / no")
        per[r["category"]].append((r["image"], parse_answer(str(r["prediction"])) == gold))
    if not per:
        raise ValueError("mme: no records")
    out = {}
    for cat, items in per.items():
        by_image: dict[str, list[bool]] = defaultdict(list)
        for image, ok in items:
            by_image[image].append(ok)
        acc = 100.0 * sum(ok for _, ok in items) / len(items)
        acc_plus = 100.0 * sum(all(v) for v in by_image.values()) / len(by_image)
        out[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(items)}
    return {"subtasks": out,
            "perception": sum(v["score"] for k, v in out.items() if k in PERCEPTION),
            "cognition": sum(v["score"] for k, v in out.items() if k in COGNITION)}

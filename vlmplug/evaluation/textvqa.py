"""TextVQA on disk, as released: DATA/TextVQA_0.5.1_val.json ({"data": [{question_id, question, image_id,
answers (ten strings), ...}]}) and the images as DATA/train_images/IMAGE_ID.jpg (the val split's images ship in
train_val_images/train_images). Scored with `vlmplug.metrics.vqa_accuracy` (the standard answer normalisation, the
mean over the ten leave-one-annotator-out subsets); the answers are also written as the EvalAI submission list
[{question_id, answer}]."""
from __future__ import annotations

import json
from pathlib import Path

from .base import Benchmark

QUESTION_FILE = "TextVQA_0.5.1_val.json"


class TextVQA(Benchmark):
    name = "textvqa"
    splits = ("val",)
    max_new_tokens = 16
    layout = f"DATA/{QUESTION_FILE} and DATA/train_images/IMAGE_ID.jpg"
    question_file = QUESTION_FILE
    image_folder = "train_images"

    def read(self, data: Path, split: str) -> list[dict]:
        path = Path(data) / self.question_file
        doc = self.load_json(path, "its question file")
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise self.missing(path, 'a {"data": [...]} question file at')
        items = []
        for n, r in enumerate(doc["data"]):
            self.need(r, ("question_id", "question", "image_id", "answers"), f"{path} data[{n}]")
            image = Path(data) / self.image_folder / f"{r['image_id']}.jpg"
            if not image.exists() and (image.with_suffix(".png")).exists():
                image = image.with_suffix(".png")
            items.append({"question_id": r["question_id"], "text": r["question"], "answers": list(r["answers"]),
                          "images": [self.image(image, f"{path} question {r['question_id']}")]})
        return items

    def score(self, items: list[dict], answers: list[dict]) -> dict:
        from ..metrics import vqa_accuracy

        accs = [vqa_accuracy(a["text"], it["answers"]) for it, a in zip(items, answers)]
        return {"accuracy": sum(accs) / len(accs), "n": len(accs)}

    def export(self, items: list[dict], answers: list[dict], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "submission.json").write_text(json.dumps(
            [{"question_id": it["question_id"], "answer": a["text"]} for it, a in zip(items, answers)]))

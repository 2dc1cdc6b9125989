"""CHAIR on COCO, from the files COCO ships: DATA/annotations/instances_val2014.json, DATA/annotations/
captions_val2014.json and the images DATA/val2014/FILE_NAME (the instances' "images" list names them). The images
are taken in a seeded random order (`seed`), so `--limit 500` is the usual random 500-image subset; each is
captioned with "Please describe this image in detail." (OPERA / PAI / VHR's prompt) and scored with
`vlmplug.metrics.chair` against the objects its annotations and reference captions name. The captions are also
written as the jsonl ({"image_id", "caption"}) the official `chair.py` reads."""
from __future__ import annotations

import json
import random
from pathlib import Path

from .base import Benchmark


class CHAIR(Benchmark):
    name = "chair"
    splits = ("val2014",)
    max_new_tokens = 512
    headline = "CHAIR_s"
    columns = (("CHAIR_s", "CHAIR_s ↓", 100.0), ("CHAIR_i", "CHAIR_i ↓", 100.0), ("recall", "recall", 100.0),
               ("length", "length", 1.0))
    layout = ("DATA/annotations/{instances,captions}_val2014.json and DATA/val2014/ (COCO val2014 images, named as "
              "in the instances file)")
    prompt_text = "Please describe this image in detail."

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._truth: dict = {}

    def read(self, data: Path, split: str) -> list[dict]:
        from ..metrics.chair import ground_truth_from_coco

        ann = Path(data) / "annotations"
        instances = self.load_json(ann / f"instances_{split}.json", "the instance annotations")
        captions = self.load_json(ann / f"captions_{split}.json", "the caption annotations")
        self.need(instances, ("images", "annotations", "categories"), str(ann / f"instances_{split}.json"))
        self._truth = ground_truth_from_coco(instances, captions)
        images = sorted(instances["images"], key=lambda im: im["id"])
        random.Random(self.seed).shuffle(images)
        return [{"question_id": im["id"], "text": self.prompt_text,
                 "images": [self.image(Path(data) / split / im["file_name"], f"image {im['id']}")]} for im in images]

    def score(self, items: list[dict], answers: list[dict]) -> dict:
        from ..metrics import chair

        r = chair({it["question_id"]: a["text"] for it, a in zip(items, answers)},
                  {it["question_id"]: self._truth.get(it["question_id"], set()) for it in items})
        r.pop("per_image", None)
        r["n"] = len(items)
        return r

    def export(self, items: list[dict], answers: list[dict], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "captions.jsonl", "w") as f:
            for it, a in zip(items, answers):
                f.write(json.dumps({"image_id": it["question_id"], "caption": a["text"]}) + "\n")

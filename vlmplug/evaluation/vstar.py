"""V* Bench on disk, as released (penghao-wu/vstar, `vstar_bench/`): two folders, direct_attributes/ and
relative_position/, each image NAME.jpg beside its NAME.json ({"question", "options": [...], "target_object",
"bbox"}); the first option is the right one. Scored as the official `vstar_bench_eval.py` scores a VQA model: each
option's mean token cross-entropy as the answer to the question (the option's tokens and the end of turn), the
lowest wins; accuracy per folder and overall. Here each option's tokens are forced through `generate`, so every
method sees exactly the decoding path it sees when answering (KV cache, pruned prompt)."""
from __future__ import annotations

from pathlib import Path

from .base import Benchmark, BenchmarkFilesError

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


class VStar(Benchmark):
    name = "vstar"
    kind = "choice"
    splits = ("direct_attributes", "relative_position")
    layout = "DATA/{direct_attributes,relative_position}/NAME.jpg + NAME.json (question, options; the first is right)"

    def read(self, data: Path, split: str) -> list[dict]:
        folder = Path(data) / split
        if not folder.is_dir():
            raise self.missing(folder, "the folder")
        items = []
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            ann = self.load_json(image.with_suffix(".json"), f"the annotation of {image.name},")
            self.need(ann, ("question", "options"), str(image.with_suffix(".json")))
            if len(ann["options"]) < 2:
                raise BenchmarkFilesError(f"vstar: {image.with_suffix('.json')} has fewer than two options")
            items.append({"question_id": image.stem, "text": ann["question"], "options": list(ann["options"]),
                          "images": [image]})
        if not items:
            raise self.missing(folder, "images with their .json annotations in")
        return items

    def score(self, items: list[dict], answers: list[dict]) -> dict:
        right = [a["choice"] == 0 for a in answers]
        return {"accuracy": sum(right) / len(right), "n": len(right)}

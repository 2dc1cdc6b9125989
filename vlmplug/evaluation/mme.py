"""MME on disk, in its release layout (MME_Benchmark_release_version): one folder per subtask. Five subtasks keep
their images under SUBTASK/images/ and their question files under SUBTASK/questions_answers_YES_or_NO/; the rest keep
both side by side in SUBTASK/. A question file NAME.txt belongs to the image NAME.jpg / NAME.png and holds one
"question<TAB>Yes|No" line per question (two per image). Scored with `vlmplug.metrics.mme`; the answers are also
written in the official eval tool's layout (one SUBTASK.txt per subtask, "image<TAB>question<TAB>answer<TAB>
prediction" lines), so `eval_tool/calculation.py --results_dir` reads them as they are."""
from __future__ import annotations

from pathlib import Path

from .base import Benchmark, BenchmarkFilesError

IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


class MME(Benchmark):
    name = "mme"
    splits = ("all",)
    max_new_tokens = 16
    headline = "total"
    columns = (("perception", "perception", 1.0), ("cognition", "cognition", 1.0), ("total", "total", 1.0))
    layout = ("DATA/SUBTASK/{images/NAME.jpg, questions_answers_YES_or_NO/NAME.txt} or DATA/SUBTASK/{NAME.jpg, "
              "NAME.txt}; NAME.txt holds 'question<TAB>Yes|No' lines")

    def read(self, data: Path, split: str) -> list[dict]:
        data = Path(data)
        if not data.is_dir():
            raise self.missing(data, "the release folder")
        items = []
        for sub in sorted(p for p in data.iterdir() if p.is_dir()):
            if (sub / "images").is_dir():
                image_dir, qa_dir = sub / "images", sub / "questions_answers_YES_or_NO"
                if not qa_dir.is_dir():
                    raise self.missing(qa_dir, f"{sub.name}'s question folder")
            else:
                image_dir = qa_dir = sub
            for qa in sorted(qa_dir.glob("*.txt")):
                image = next((image_dir / (qa.stem + s) for s in IMAGE_SUFFIXES if (image_dir / (qa.stem + s)).exists()),
                             None)
                if image is None:
                    raise BenchmarkFilesError(f"mme: {qa} has no image {qa.stem}.jpg / .png in {image_dir}")
                for n, line in enumerate(qa.read_text().splitlines(), 1):
                    if not line.strip():
                        continue
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        raise BenchmarkFilesError(f"mme: {qa} line {n} is not 'question<TAB>Yes|No': {line[:80]!r}")
                    items.append({"question_id": f"{sub.name}/{qa.stem}/{n}", "category": sub.name,
                                  "image_name": image.name, "text": parts[0], "answer": parts[1].strip(),
                                  "images": [image]})
        if not items:
            raise self.missing(data, "subtask folders with question files under")
        return items

    def score(self, items: list[dict], answers: list[dict]) -> dict:
        from ..metrics import mme

        r = mme({"category": it["category"], "image": it["image_name"], "answer": it["answer"], "prediction": a["text"]}
                for it, a in zip(items, answers))
        r["total"] = r["perception"] + r["cognition"]
        return r

    def export(self, items: list[dict], answers: list[dict], folder: Path) -> None:
        """The official eval tool's results layout: SUBTASK.txt, 'image<TAB>question<TAB>answer<TAB>prediction'."""
        folder.mkdir(parents=True, exist_ok=True)
        lines: dict[str, list[str]] = {}
        for it, a in zip(items, answers):
            pred = " ".join(a["text"].split())  # one line per answer, as the tool reads them
            lines.setdefault(it["category"], []).append(f"{it['image_name']}\t{it['text']}\t{it['answer']}\t{pred}")
        for cat, ls in lines.items():
            (folder / f"{cat}.txt").write_text("\n".join(ls) + "\n")

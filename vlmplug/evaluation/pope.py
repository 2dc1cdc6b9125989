"""POPE on disk: the benchmark's own layout (one question file per split, one json per line: question_id, image,
text, label; images in a folder), a generator that writes the embedded world's scenes in that layout, and the run:
answers cached per item (resumable), scored with `vlmplug.metrics.pope`.

POPE's three negative samplings (Li et al., EMNLP 2023) carried to the world's objects (a colour + a shape):
  random       an absent object drawn uniformly from every colour x shape;
  popular      the absent object that is most frequent over the whole generated set;
  adversarial  the absent object that co-occurs most often, over the set, with the objects present.
Each split asks one present and one absent object per scene ("Is there a red circle?"), yes/no balanced.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from .base import Benchmark, BenchmarkFilesError

SPLITS = ("random", "popular", "adversarial")


def question_file(data: Path, split: str) -> Path:
    return Path(data) / f"pope_{split}.jsonl"


def write_world_pope(out: Path, n: int = 100, seed: int = 2024, size: int = 64) -> Path:
    """Draw `n` held-out scenes, save them as PNGs under out/images, write out/pope_{random,popular,adversarial}.jsonl.
    Returns `out`."""
    from ..world.scenes import COLORS, SHAPES, _article, heldout_scenes

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = heldout_scenes(n, seed=seed, size=size, n_objects=(1, 4), kinds=())
    objects = [sorted({(o.color, o.shape) for o in sc.objects}) for sc in scenes]
    freq = Counter(obj for objs in objects for obj in objs)
    co = Counter((a, b) for objs in objects for a in objs for b in objs if a != b)
    every = [(c, s) for s in SHAPES for c in COLORS]
    rng = random.Random(seed)
    files = {split: [] for split in SPLITS}
    qid = 0
    for i, (sc, objs) in enumerate(zip(scenes, objects)):
        name = f"world_{seed}_{i:05d}.png"
        sc.image.save(out / "images" / name)
        absent = [o for o in every if o not in objs]
        negatives = {
            "random": rng.choice(absent),
            # ties broken by the fixed colour x shape order, so the files are reproducible
            "popular": max(absent, key=lambda o: (freq[o], -every.index(o))),
            "adversarial": max(absent, key=lambda o: (sum(co[(p, o)] for p in objs), freq[o], -every.index(o))),
        }
        positive = rng.choice(objs)
        for split in SPLITS:
            for (color, shape), label in ((positive, "yes"), (negatives[split], "no")):
                qid += 1
                files[split].append({"question_id": qid, "image": name,
                                     "text": f"Is there {_article(color)} {color} {shape}?", "label": label})
    for split, rows in files.items():
        with open(question_file(out, split), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return out


class POPE(Benchmark):
    """POPE's own files: data/pope_{random,popular,adversarial}.jsonl (one json per line: question_id, image, text,
    label) and the images under data/images (COCO val2014 for the real benchmark)."""

    name = "pope"
    splits = SPLITS
    max_new_tokens = 8
    headline = "f1"
    columns = (("accuracy", "accuracy", 100.0), ("precision", "precision", 100.0), ("recall", "recall", 100.0),
               ("f1", "F1", 100.0), ("yes_ratio", "yes ratio", 100.0))
    layout = "DATA/pope_{random,popular,adversarial}.jsonl (question_id, image, text, label per line), DATA/images/"

    def read(self, data: Path, split: str) -> list[dict]:
        path = question_file(data, split)
        if not path.exists():
            raise self.missing(path, "its question file")
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkFilesError(f"pope: {path} line {n} is not JSON ({e})") from None
            self.need(r, ("question_id", "image", "text", "label"), f"{path} line {n}")
            items.append({"question_id": r["question_id"], "text": r["text"], "label": r["label"],
                          "images": [self.image(Path(data) / "images" / r["image"], f"{path} line {n}")]})
        return items

    def score(self, items: list[dict], answers: list[dict]) -> dict:
        from ..metrics import pope

        return pope([a["text"] for a in answers], [it["label"] for it in items])


def read_questions(data: Path, split: str) -> list[dict]:
    """The split's items, checked (each needs question_id, image, text, label and its image file)."""
    return POPE().read(data, split)

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


def read_questions(data: Path, split: str) -> list[dict]:
    """The split's questions, checked: each needs question_id, image, text, label and its image file."""
    path = question_file(data, split)
    if not path.exists():
        raise FileNotFoundError(f"POPE expects its question file {path} (one json per line: question_id, image, text, "
                                f"label) and the images under {Path(data) / 'images'}; make world files with "
                                "`vlmplug eval world-pope`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        missing = {"question_id", "image", "text", "label"} - set(r)
        if missing:
            raise ValueError(f"{path}: question {r.get('question_id')} lacks {sorted(missing)}")
        if not (Path(data) / "images" / r["image"]).exists():
            raise FileNotFoundError(f"{path}: question {r['question_id']} names image {r['image']}, not found under "
                                    f"{Path(data) / 'images'}")
    return rows

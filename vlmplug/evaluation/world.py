"""The world suite: benchmark files in the real benchmarks' formats, drawn from the embedded world's held-out scenes
(seeds the trainer never draws), so every reader, runner and scorer runs end to end on real files here.

    write_world_vqa        TextVQA's layout: TextVQA_0.5.1_val.json (ten answers per question, the scene's answer)
                           and train_images/ (PNG: the world is drawn, JPEG would blur its 64-pixel scenes)
    write_world_grounding  ScreenSpot's layout: screenspot_world.json (the instruction names an object whose shape
                           is alone in its scene; bbox [x, y, w, h]; data_type "normal") and screenspot_imgs/
(`vlmplug.evaluation.pope.write_world_pope` writes POPE's.)
"""
from __future__ import annotations

import json
from pathlib import Path

from .screenspot import ScreenSpot
from .textvqa import QUESTION_FILE


def write_world_vqa(out: Path, n: int = 100, seed: int = 2024, size: int = 64) -> Path:
    """`n` scenes, every question they were drawn with (colour, position, existence, count)."""
    from ..world.scenes import heldout_scenes

    out = Path(out)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    data, qid = [], 0
    for i, sc in enumerate(heldout_scenes(n, seed=seed, size=size)):
        image_id = f"world_{seed}_{i:05d}"
        sc.image.save(out / "train_images" / f"{image_id}.png")
        for q in sc.questions:
            qid += 1
            data.append({"question_id": qid, "question": q.text, "image_id": image_id, "answers": [q.answer] * 10,
                         "question_kind": q.kind, "set_name": "val", "image_width": sc.size[0],
                         "image_height": sc.size[1]})
    (out / QUESTION_FILE).write_text(json.dumps({"dataset_type": "val", "dataset_name": "world-vqa",
                                                 "dataset_version": "0.5.1", "data": data}))
    return out


def write_world_grounding(out: Path, n: int = 100, seed: int = 2024, size: int = 64) -> Path:
    """`n` scenes; one sample per object whose shape is alone in its scene, its box as ScreenSpot's [x, y, w, h]."""
    from ..world.scenes import heldout_scenes

    out = Path(out)
    (out / "screenspot_imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sc in enumerate(heldout_scenes(n, seed=seed, size=size, kinds=())):
        name = f"world_{seed}_{i:05d}.png"
        sc.image.save(out / "screenspot_imgs" / name)
        for o in sc.objects:
            if sc.count(o.shape) == 1:
                x0, y0, x1, y1 = o.box  # pixel edges: the box spans x0 <= x <= x1 in continuous coordinates
                rows.append({"id": len(rows), "img_filename": name, "instruction": o.shape,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "data_type": "normal",
                             "data_source": "world"})
    (out / "screenspot_world.json").write_text(json.dumps(rows))
    return out


class WorldGrounding(ScreenSpot):
    """ScreenSpot's reader on the world files; the question asked names the object the way the world model was
    trained to read it ("What color is the circle?"), and its query tokens are the shape's."""

    name = "world-grounding"
    splits = ("world",)
    layout = "DATA/screenspot_world.json and DATA/screenspot_imgs/ (written by `vlmplug eval world-grounding`)"
    text_prompt = "Where is the {}?"
    ground_prompt = "What color is the {query}?"

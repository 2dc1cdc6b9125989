"""ScreenSpot on disk, as SeeClick releases it: DATA/screenspot_{mobile,desktop,web}.json (lists of {img_filename,
instruction, bbox [x, y, w, h] in pixels, data_type "text"/"icon", data_source}) and the screenshots under
DATA/screenspot_imgs/. The answer is a click: from a grounding method (`tag`, `raw`, `relative`, `rollout`: the
centre of `Grounding.box`, TAG's click, or `click=peak` for the map's maximum), or read from generated text with
SeeClick's prompt (`parse_point`). Scored with `vlmplug.metrics.screenspot`, per platform x element type."""
from __future__ import annotations

from pathlib import Path

from .base import Benchmark


class ScreenSpot(Benchmark):
    name = "screenspot"
    kind = "point"
    splits = ("mobile", "desktop", "web")
    max_new_tokens = 32
    layout = "DATA/screenspot_{mobile,desktop,web}.json and DATA/screenspot_imgs/"
    file_pattern = "screenspot_{split}.json"
    image_folder = "screenspot_imgs"
    #: SeeClick's evaluation prompt (models that answer with a point as text)
    text_prompt = 'In this UI screenshot, what is the position of the element corresponding to the command "{}" (with point)?'
    #: TAG's ScreenSpot prompt (HeimingX/TAG eval_mm/screenspot); the instruction's tokens are the query tokens
    ground_prompt = ('In this UI screenshot, I want to perform the command "{query}", which element should I perform? '
                     "Please output in json format ONLY with the following two keys: action_type, "
                     "element_content_or_description. If the element is an icon and there is no text content on this "
                     "element, please output up to three keywords for the element_content_or_description.")

    def read(self, data: Path, split: str) -> list[dict]:
        path = Path(data) / self.file_pattern.format(split=split)
        rows = self.load_json(path, "its annotation file")
        if not isinstance(rows, list):
            raise self.missing(path, "a json list of samples at")
        items = []
        for n, r in enumerate(rows):
            where = f"{path} [{n}]"
            self.need(r, ("img_filename", "instruction", "bbox"), where)
            if len(r["bbox"]) != 4:
                raise self.missing(path, f"bbox [x, y, w, h] in {where}; got {r['bbox']!r}; the file")
            items.append({"question_id": r.get("id", n), "text": r["instruction"], "bbox": list(r["bbox"]),
                          "group": f"{split}/{r.get('data_type', 'unknown')}",
                          "images": [self.image(Path(data) / self.image_folder / r["img_filename"], where)]})
        return items

    def prompt(self, item: dict, suffix: str) -> str:
        return self.text_prompt.format(item["text"]) + suffix

    def score(self, items: list[dict], answers: list[dict]) -> dict:
        from ..metrics import screenspot
        from ..metrics.screenspot import box_from_xywh

        points = [tuple(a["point"]) if a.get("point") is not None else None for a in answers]
        return screenspot(points, [box_from_xywh(it["bbox"]) for it in items], [it["group"] for it in items])

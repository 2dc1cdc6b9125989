"""ScreenSpot (Cheng et al., SeeClick, ACL 2024): click accuracy, a predicted point inside the target element's box
(bounds included, as SeeClick's `pretrain/eval_screenspot.py`), overall and per group (platform x element type).
The benchmark's json stores boxes as [x, y, width, height]: `box_from_xywh`."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence


def box_from_xywh(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + w, y + h


def hit(point, box) -> bool:
    """The point (x, y) lies in the box (x0, y0, x1, y1), bounds included; None (no point parsed) misses."""
    if point is None:
        return False
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def screenspot(points: Sequence, boxes: Sequence, groups: Sequence[str] | None = None) -> dict:
    """{"accuracy": fraction of hits, "n", "per_group": {group: {"accuracy", "n"}}}. points and boxes in the same
    frame (pixels, or both normalised 0..1); groups: e.g. "mobile/text", "web/icon" per item."""
    if len(points) != len(boxes) or (groups is not None and len(groups) != len(points)):
        raise ValueError(f"screenspot: {len(points)} points, {len(boxes)} boxes"
                         + (f", {len(groups)} groups" if groups is not None else ""))
    if not points:
        raise ValueError("screenspot: no predictions")
    hits = [hit(p, b) for p, b in zip(points, boxes)]
    out = {"accuracy": sum(hits) / len(hits), "n": len(hits), "per_group": {}}
    if groups is not None:
        per = defaultdict(list)
        for g, h in zip(groups, hits):
            per[g].append(h)
        out["per_group"] = {g: {"accuracy": sum(v) / len(v), "n": len(v)} for g, v in sorted(per.items())}
    return out

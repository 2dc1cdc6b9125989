"""Where ViCrop's gain is won or lost on the world model: the map's box, or the re-query with two images.

On small-object scenes drawn large (the model sees them downsampled to its 64-px input), colour questions:
  plain                the image alone;
  box hit              the share of ViCrop's boxes (rel-att map, adaptive window) that hold the asked object's centre;
  vicrop               ViCrop: [original, its crop];
  vicrop, crop only    its crop alone;
  oracle               [original, a bbox_size crop centred on the object] (the best box a map could give);
  oracle, crop only    that crop alone.

    python eval/world_crop_oracle.py --n 150 --size 256
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--seed", type=int, default=31)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from vlmplug.grounding import vicrop
    from vlmplug.pipeline import generate_info, normalize_answer
    from vlmplug.world import heldout_scenes, load_world

    model, proc = load_world()
    side = vicrop.encoder_side(model)
    scenes = heldout_scenes(args.n, seed=args.seed, size=args.size, small=True, kinds=("color",))
    items = [(sc, q) for sc in scenes for q in sc.questions if q.target is not None]
    score = {k: 0 for k in ("plain", "box hit", "vicrop", "vicrop, crop only", "oracle", "oracle, crop only")}

    def right(images, q):
        return normalize_answer(generate_info(model, proc, images, q.text)["text"]) == q.answer

    for sc, q in items:
        img, obj = sc.image, sc.objects[q.target]
        cx, cy = obj.center
        cfg = vicrop.ViCrop()
        got = vicrop.run(model, proc, [img], q.text, cfg)
        x0, y0, x1, y1 = got["box"]
        score["box hit"] += x0 <= cx < x1 and y0 <= cy < y1
        score["plain"] += right([img], q)
        score["vicrop"] += right([img, got["crop"]], q)
        score["vicrop, crop only"] += right([got["crop"]], q)
        W, H = img.size
        ox = int(min(max(cx - side / 2, 0), W - side))
        oy = int(min(max(cy - side / 2, 0), H - side))
        oracle = img.crop((ox, oy, ox + side, oy + side))
        score["oracle"] += right([img, oracle], q)
        score["oracle, crop only"] += right([oracle], q)
    n = len(items)
    print(f"{n} colour questions on {args.n} small-object scenes of {args.size} px (model input {side} px)")
    for k, v in score.items():
        print(f"{k:<20} {v:>4}/{n} = {100 * v / n:5.1f}%")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "n": n, "scores": score}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

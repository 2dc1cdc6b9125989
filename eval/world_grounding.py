"""Pointing game on the embedded world model: does the heatmap's peak fall inside the asked object's box?

Fresh seeded scenes (held-out seeds the trainer never draws), questions that name one object ("What color is the
<shape>?", "Where is the <shape>?"); for every grounding method and query-token choice, the share of
questions whose `Grounding.point` lies in the object's box, against the centre of the image as a baseline (the
share of objects that contain the centre).

    python eval/world_grounding.py                         # 300 scenes, 64 x 64
    python eval/world_grounding.py --n 200 --size 96x64    # non-square (the processor squashes it)
    python eval/world_grounding.py --n 200 --small --size 256 --out eval/results/world_grounding_small.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from world import parse_size  # noqa: E402

SETTINGS = [  # (method, tokens)
    ("tag", "query"),
    ("tag", "last"),
    ("raw", "last"),
    ("relative", "last"),
    ("rollout", "last"),
    ("raw", "query"),
    ("rollout", "query"),
]


def inside(point, box) -> bool:
    x, y = point
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300, help="scenes")
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--size", default=None, help="image size: 64 (default), 128, or WxH")
    p.add_argument("--small", action="store_true", help="small objects")
    p.add_argument("--clutter", action="store_true", help="6-10 objects")
    p.add_argument("--only", default=None, help="comma-separated method:tokens settings (default: all)")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)

    from vlmplug.grounding import ground
    from vlmplug.world import heldout_scenes, load_world

    model, processor = load_world()
    scenes = heldout_scenes(args.n, seed=args.seed, size=parse_size(args.size), small=args.small,
                            clutter=args.clutter, kinds=("color", "where"))
    items = [(sc, q) for sc in scenes for q in sc.questions if q.target is not None]
    settings = SETTINGS if not args.only else [tuple(s.split(":")) for s in args.only.split(",")]
    centre = sum(inside((sc.size[0] / 2, sc.size[1] / 2), sc.objects[q.target].box) for sc, q in items)
    rows = {"centre baseline": {"hits": centre, "n": len(items), "rate": centre / len(items)}}
    print(f"{len(items)} questions on {args.n} scenes ({'small' if args.small else 'clutter' if args.clutter else 'normal'}"
          f" objects, {scenes[0].size[0]}x{scenes[0].size[1]})")
    print(f"{'setting':<18} {'hits':>6} {'rate':>7} {'s/query':>8}")
    print(f"{'centre baseline':<18} {centre:>6} {centre / len(items):>7.3f}")
    for method, tokens in settings:
        hits, t0 = 0, time.perf_counter()
        for sc, q in items:
            # the query tokens: the object's name
            g = ground(model, processor, sc.image, q.text, method=method, tokens=tokens,
                       target=q.shape if tokens == "query" else None)
            hits += inside(g.point, sc.objects[q.target].box)
        dt = (time.perf_counter() - t0) / len(items)
        name = f"{method}:{tokens}"
        rows[name] = {"hits": hits, "n": len(items), "rate": hits / len(items), "seconds_per_query": dt}
        print(f"{name:<18} {hits:>6} {hits / len(items):>7.3f} {dt:>8.3f}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the vision-side pruning methods add to the vision tower, on a real-size model with random weights.

Times `get_image_features` (LLaVA-1.5: CLIP ViT-L/14-336 tower + projector, 576 patches; Qwen2-VL-7B: 32-layer
ViT on a 672 px image, 2304 patches, + merger) plainly and with each method
applied, interleaved (plain, method, plain, method, ...) so slow drifts of a shared machine hit both alike, and
reports the median ratio of the pairs. The methods' work in the tower is all here: probes (hiprune, visionzip),
taps and key masks in every layer up to the feature layer (flowcut), the merge hook (visionzip). Their selection
after the tower runs with the LLM and is timed by bench_pruning.py.

    python eval/bench_vision.py                           # fp32, 24 vision layers, 7 pairs per method
    python eval/bench_vision.py --arch qwen2vl --pairs 5  # Qwen2-VL-7B tower, 32 layers
    python eval/bench_vision.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

METHODS = ("hiprune", "visionzip", "flowcut")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("llava15", "qwen2vl"), default="llava15")
    p.add_argument("--vision-layers", type=int, default=None, help="default: 24 (llava15), 32 (qwen2vl)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--keep-tokens", type=int, default=64)
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import vlmplug
    from vlmplug.testing import shapes

    dtype = getattr(torch, args.dtype)
    # text layers are unused (the tower is timed): one keeps the build short
    cfg, prompt, _ = shapes.arch_setup(args.arch, 1, args.vision_layers, device=args.device)
    image_kw = {"pixel_values": prompt["pixel_values"].to(dtype)}
    if args.arch == "llava15":
        args.vision_layers = cfg.vision_config.num_hidden_layers
        tower = "CLIP ViT-L/14-336 shapes, 576 patches"
    else:
        args.vision_layers = cfg.vision_config.depth
        image_kw["image_grid_thw"] = prompt["image_grid_thw"]
        tower = "Qwen2-VL-7B ViT shapes, 2304 patches"
    model = shapes.build_random(cfg, dtype=dtype, device=args.device)
    base = model.base_model

    def once() -> float:
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            base.get_image_features(**image_kw)
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once()  # warm-up
    rows = []
    for method in args.methods:
        params = {"keep_tokens": args.keep_tokens}
        if method == "hiprune":
            params["object_layer"] = min(8, args.vision_layers - 1)
        plain, patched = [], []
        h = vlmplug.apply(model, method, **params)
        h.remove()
        for _ in range(args.pairs):
            plain.append(once())
            h = vlmplug.apply(model, method, **params)
            try:
                patched.append(once())
            finally:
                h.remove()
        ratios = [b / a for a, b in zip(plain, patched)]
        row = dict(method=method, plain_s=statistics.median(plain), method_s=statistics.median(patched),
                   overhead=statistics.median(ratios) - 1.0, min_overhead=min(ratios) - 1.0, max_overhead=max(ratios) - 1.0)
        rows.append(row)
        print(f"  {method}: {row['plain_s']:.3f}s -> {row['method_s']:.3f}s, {100 * row['overhead']:+.1f}% "
              f"(pairs {100 * row['min_overhead']:+.1f}% .. {100 * row['max_overhead']:+.1f}%)", flush=True)
    print(f"\nvision tower + projector, {tower}, {args.vision_layers} layers, {args.device} {args.dtype}, "
          f"median of {args.pairs} interleaved pairs")
    print(f"{'method':<11}{'plain':>9}{'method':>9}{'overhead':>10}{'pair range':>20}")
    for r in rows:
        print(f"{r['method']:<11}{r['plain_s']:>8.3f}s{r['method_s']:>8.3f}s{100 * r['overhead']:>9.1f}%"
              f"{100 * r['min_overhead']:>+9.1f}% .. {100 * r['max_overhead']:+.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

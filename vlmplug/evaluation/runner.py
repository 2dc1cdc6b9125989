"""One harness for every method on a benchmark: identical prompts, greedy decoding, answers cached per item (a rerun
resumes where the last one stopped), scores from `vlmplug.metrics`, output as JSON, a markdown table and a plot.

Several processes (`accelerate launch --num_processes N vlmplug eval ...`, GPUs or CPU processes with gloo) split
the items still to answer, each process writing its own part of the cache; the parts are gathered with accelerate's
`gather_object` and the main process writes one cache and one result, identical to a single-process run (every item
is answered alone, greedily).
"""
from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MethodConfigError
from .base import Benchmark, parse_point

#: grounding methods (`vlmplug.ground`) that answer point benchmarks, and the parameters they take here
GROUND_METHODS = ("tag", "raw", "relative", "rollout")
GROUND_PARAMS = ("tokens", "target", "layers", "heads", "top_k", "threshold", "click")


def parse_pair(text: str) -> tuple[str, Any]:
    """"key=value" -> (key, value): a Python literal where the value parses as one, else the string."""
    if "=" not in text:
        raise MethodConfigError(f"a parameter is key=value, got {text!r}")
    k, v = text.split("=", 1)
    try:
        return k.strip(), ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return k.strip(), v


@dataclass
class MethodSpec:
    """One compared setting: `label` (shown), `name` ("none" = the plain model), `params`."""

    label: str
    name: str
    params: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """"none", "fastv" or "fastv:keep_ratio=0.25,layer=2" (values are Python literals, else strings)."""
        name, _, rest = text.partition(":")
        return cls(label=text, name=name.strip(), params=dict(parse_pair(p) for p in filter(None, rest.split(","))))

    @property
    def grounding(self) -> bool:
        return self.name in GROUND_METHODS

    def check(self, kind: str = "text") -> None:
        """Fail before any work: an unknown name, bad parameters, a grounding method on a text benchmark."""
        if self.name == "none":
            if self.params:
                raise MethodConfigError("--method none takes no parameters")
            return
        if self.grounding:
            if kind != "point":
                raise MethodConfigError(f"{self.name} is a grounding method (vlmplug.ground): it answers point "
                                        "benchmarks (screenspot, world-grounding), not this one")
            from ..grounding.core import check_args

            unknown = set(self.params) - set(GROUND_PARAMS)
            if unknown:
                raise MethodConfigError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; here it takes "
                                        f"{', '.join(GROUND_PARAMS)}")
            if self.params.get("click", "box") not in ("box", "peak"):
                raise MethodConfigError(f"{self.name}: click={self.params['click']!r}; choose box (the centre of the "
                                        "map's most confident region, TAG's click) or peak (the map's maximum)")
            tokens = self.params.get("tokens", "query" if self.name == "tag" else "last")
            check_args(self.name, tokens, self.params.get("top_k", 10), self.params.get("threshold", 0.5))
            return
        from ..pipeline import pipeline_methods
        from ..registry import method_registry

        reg, pipes = method_registry(), pipeline_methods()
        if self.name in reg:
            reg[self.name].from_params(**self.params)
        elif self.name in pipes:
            try:
                pipes[self.name][0](**self.params)
            except TypeError as e:
                raise MethodConfigError(f"{self.name}: {e}") from None
        else:
            extra = f", {', '.join(GROUND_METHODS)} (point benchmarks)" if kind == "point" else ""
            raise MethodConfigError(f"unknown method {self.name!r}; available: none, "
                                    f"{', '.join(sorted([*reg, *pipes]))}{extra}")


# ---------------------------------------------------------------------------------------------- one item


def _kept(info: dict, name: str):
    stats = (info.get("stats") or {}).get(name) or {}
    per = stats.get("tokens_kept_per_image")
    return sum(per[0]) if per else None


def _answer_text(model, processor, bench: Benchmark, item: dict, spec: MethodSpec, suffix: str,
                 max_new_tokens: int) -> dict:
    from ..pipeline import generate_info

    info = generate_info(model, processor, item["images"], bench.prompt(item, suffix),
                         methods=None if spec.name == "none" else spec.name, method_params=spec.params or None,
                         max_new_tokens=max_new_tokens)
    return {"text": info["text"], "seconds": info["seconds"], "prompt_tokens": info["prompt_tokens"],
            "image_tokens": info["image_tokens"], "image_tokens_kept": _kept(info, spec.name)}


def _answer_point(model, processor, bench: Benchmark, item: dict, spec: MethodSpec, suffix: str,
                  max_new_tokens: int) -> dict:
    if not spec.grounding:  # the model says where, as text
        from PIL import Image

        r = _answer_text(model, processor, bench, item, spec, suffix, max_new_tokens)
        with Image.open(item["images"][0]) as im:
            size = im.size
        r["point"] = parse_point(r["text"], size)
        return r
    import time

    from ..grounding import ground

    params = dict(spec.params)
    click = params.pop("click", "box")
    if params.get("tokens", "query" if spec.name == "tag" else "last") == "query":
        params.setdefault("target", item["text"])  # the instruction's own tokens (TAG's prompt side)
    t0 = time.perf_counter()
    g = ground(model, processor, item["images"][0], item["text"], method=spec.name,
               prompt=bench.ground_prompt + suffix, **params)
    seconds = time.perf_counter() - t0
    box = g.box if click == "box" else None
    point = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) if box is not None else g.point
    return {"text": "", "point": [float(point[0]), float(point[1])], "seconds": seconds,
            "prompt_tokens": None, "image_tokens": None, "image_tokens_kept": None}


def _answer_choice(model, processor, bench: Benchmark, item: dict, spec: MethodSpec, suffix: str,
                   max_new_tokens: int) -> dict:
    """Each option's mean log-probability as the answer (its tokens, then end of turn), forced through generate;
    the choice is the most likely option (the official V* rule: lowest mean cross-entropy)."""
    from .likelihood import continuation_ids, score_continuation

    tok = getattr(processor, "tokenizer", processor)
    prompt = bench.prompt(item, suffix)
    means, seconds, info = [], 0.0, {}
    for option in item["options"]:
        ids = continuation_ids(processor, prompt, len(item["images"]), option)
        if tok.eos_token_id is not None:
            ids = [*ids, tok.eos_token_id]
        logp, _, info = score_continuation(model, processor, item["images"], prompt, ids,
                                           methods=None if spec.name == "none" else spec.name,
                                           method_params=spec.params or None)
        means.append(sum(logp) / len(logp))
        seconds += info["seconds"]
    choice = max(range(len(means)), key=lambda i: (means[i], -i))
    return {"text": item["options"][choice], "choice": choice, "option_logprobs": means, "seconds": seconds,
            "prompt_tokens": info["prompt_tokens"], "image_tokens": info["image_tokens"],
            "image_tokens_kept": _kept(info, spec.name)}


ANSWER = {"text": _answer_text, "point": _answer_point, "choice": _answer_choice}


# ---------------------------------------------------------------------------------------------- many items


def distributed():
    """accelerate's PartialState when launched with several processes, else None (no process group is started).
    On a machine without CUDA the processes join with gloo on the CPU: `accelerate launch --multi_gpu
    --num_processes N` starts them (torchrun) and accelerate alone would fall back to N unrelated processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _file_name(label: str) -> str:
    """A setting's label as a file or folder name."""
    return "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in label)


def _answers_file(out: Path, spec: MethodSpec, split: str) -> Path:
    return out / "answers" / f"{_file_name(spec.label)}__{split}.jsonl"


def _read_cache(path: Path) -> dict:
    done = {}
    for p in [path, *sorted(path.parent.glob(path.stem + ".part*.jsonl"))]:
        if p.exists():
            for line in p.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    done[_key(r["question_id"])] = r
    return done


def _key(qid) -> str:
    return json.dumps(qid)


def answer_all(model, processor, bench: Benchmark, items: list[dict], spec: MethodSpec, cache: Path,
               max_new_tokens: int, suffix: str = "", desc: str = "") -> list[dict]:
    """Answers for every item, read from `cache` where present and appended to it one by one otherwise; with several
    processes each answers every N-th item still to do and the main process merges the parts into `cache`."""
    from tqdm.auto import tqdm

    state = distributed()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = _read_cache(cache)
    todo = [it for it in items if _key(it["question_id"]) not in done]
    mine = todo[rank::world]
    if state is not None:
        state.wait_for_everyone()  # every process has read the cache before any writes to it
    part = cache if world == 1 else cache.with_name(f"{cache.stem}.part{rank}.jsonl")
    answer = ANSWER[bench.kind]
    new = []
    with open(part, "a") as f:
        for it in tqdm(mine, desc=desc or spec.label, mininterval=1.0, disable=not mine or rank != 0):
            r = {"question_id": it["question_id"],
                 **answer(model, processor, bench, it, spec, suffix, max_new_tokens)}
            f.write(json.dumps(r) + "\n")
            f.flush()
            new.append(r)
    if world > 1:
        from accelerate.utils import gather_object

        for r in gather_object(new):
            done[_key(r["question_id"])] = r
        state.wait_for_everyone()
        if state.is_main_process:  # one cache again, in item order, as a single process leaves it
            known = {_key(it["question_id"]) for it in items}
            with open(cache, "w") as f:
                for it in items:
                    f.write(json.dumps(done[_key(it["question_id"])]) + "\n")
                for k, r in done.items():
                    if k not in known:
                        f.write(json.dumps(r) + "\n")
            for p in cache.parent.glob(cache.stem + ".part*.jsonl"):
                p.unlink()
        state.wait_for_everyone()
    else:
        for r in new:
            done[_key(r["question_id"])] = r
    return [done[_key(it["question_id"])] for it in items]


def run(bench: Benchmark, model, processor, data: Path, specs: list[MethodSpec], out: Path, splits=None,
        limit: int | None = None, max_new_tokens: int | None = None, suffix: str = "") -> tuple[dict, dict, dict]:
    """Every method on every split. Returns (results, answers, items): results[label][split] = the benchmark's
    scores plus seconds_per_answer, prompt_tokens, image_tokens (placeholders in the prompt) and image_tokens_kept
    (after a pruning method, else None), means over the split; answers[label][split] = the per-item answers;
    items[split] = the items read (after `limit`)."""
    data, out = Path(data), Path(out)
    for s in specs:
        s.check(bench.kind)
    splits = list(splits or bench.splits)
    bench.check(data, splits)
    items = {sp: bench.read(data, sp)[: limit or None] for sp in splits}
    n_new = max_new_tokens or bench.max_new_tokens
    results: dict[str, Any] = {}
    answers: dict[str, Any] = {}
    for spec in specs:
        results[spec.label], answers[spec.label] = {}, {}
        for sp in splits:
            ans = answer_all(model, processor, bench, items[sp], spec, _answers_file(out, spec, sp), n_new, suffix,
                             desc=f"{spec.label} / {sp}")
            r = dict(bench.score(items[sp], ans))
            r["seconds_per_answer"] = sum(a["seconds"] for a in ans) / len(ans)
            for key in ("prompt_tokens", "image_tokens", "image_tokens_kept"):
                vals = [a[key] for a in ans if a.get(key) is not None]
                r[key] = sum(vals) / len(vals) if vals else None
            results[spec.label][sp] = r
            answers[spec.label][sp] = ans
    return results, answers, items


def run_pope(model, processor, data: Path, specs: list[MethodSpec], out: Path, splits=None, limit: int | None = None,
             max_new_tokens: int = 8, suffix: str = "") -> dict:
    """POPE's three splits: {label: {split: pope metrics + seconds / tokens}}."""
    from .pope import POPE

    return run(POPE(), model, processor, data, specs, out, splits, limit, max_new_tokens, suffix)[0]


# ---------------------------------------------------------------------------------------------- outputs


def _tokens(r: dict) -> str:
    if r.get("image_tokens_kept") is not None:
        return f"{r['image_tokens_kept']:.0f}" + (f" / {r['image_tokens']:.0f}" if r.get("image_tokens") else "")
    return "all" if r.get("image_tokens") is None else f"{r['image_tokens']:.0f}"


def markdown_table(results: dict, bench: Benchmark | None = None) -> str:
    if bench is None:
        from .pope import POPE

        bench = POPE()
    heads = [h for _, h, _ in bench.columns]
    lines = ["| method | split | " + " | ".join(heads) + " | ms / answer | image tokens |",
             "|---|---|" + "---|" * len(heads) + "---|---|"]
    for label, per in results.items():
        for sp, r in per.items():
            cells = [f"{scale * r[k]:.1f}" if r.get(k) is not None else "-" for k, _, scale in bench.columns]
            lines.append(f"| {label} | {sp} | " + " | ".join(cells) +
                         f" | {1000 * r['seconds_per_answer']:.1f} | {_tokens(r)} |")
    return "\n".join(lines) + "\n"


def _mean(per: dict, key: str):
    vals = [r[key] for r in per.values() if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def plot(results: dict, path: Path, title: str = "", bench: Benchmark | None = None) -> None:
    """The headline metric (mean over the splits) against ms per answer, and against the image tokens the LLM keeps
    (all of them for methods that keep all), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if bench is None:
        from .pope import POPE

        bench = POPE()
    scale = next((s for k, _, s in bench.columns if k == bench.headline), 1.0)
    header = next((h for k, h, _ in bench.columns if k == bench.headline), bench.headline)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for label, per in results.items():
        y = scale * _mean(per, bench.headline)
        ms = 1000 * _mean(per, "seconds_per_answer")
        kept = _mean(per, "image_tokens_kept")
        tokens = kept if kept is not None else _mean(per, "image_tokens")
        for ax, x in ((axes[0], ms), (axes[1], tokens)):
            if x is None:
                continue
            ax.scatter([x], [y])
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[0].set_xlabel("ms per answer")
    axes[1].set_xlabel("image tokens in the LLM (mean)")
    axes[0].set_ylabel(f"{header} (mean over splits)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out: Path, name: str, meta: dict, bench: Benchmark | None = None,
                  items: dict | None = None, answers: dict | None = None) -> dict:
    """out/NAME.json (meta + results), out/NAME.md (the table), out/NAME.png (the plot) and, where the benchmark
    has one, its official output layout per method under out/exports/LABEL/SPLIT/."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "table": out / f"{name}.md", "plot": out / f"{name}.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    paths["table"].write_text(markdown_table(results, bench))
    plot(results, paths["plot"], title=name, bench=bench)
    if bench is not None and hasattr(bench, "export") and items and answers:
        for label, per in answers.items():
            for sp, ans in per.items():
                bench.export(items[sp], ans, out / "exports" / _file_name(label) / sp)
    return paths

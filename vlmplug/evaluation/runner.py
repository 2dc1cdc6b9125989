"""One harness for every method on a benchmark: identical prompts, greedy decoding, answers cached per item (a rerun
resumes where the last one stopped), scores from `vlmplug.metrics`, output as JSON, a markdown table and a plot."""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MethodConfigError


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

    def check(self) -> None:
        """Fail before any work: an unknown name or bad parameters."""
        if self.name == "none":
            if self.params:
                raise MethodConfigError("--method none takes no parameters")
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
            raise MethodConfigError(f"unknown method {self.name!r}; available: none, "
                                    f"{', '.join(sorted([*reg, *pipes]))}")


def _answers_file(out: Path, spec: MethodSpec, split: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in spec.label)
    return out / "answers" / f"{safe}__{split}.jsonl"


def answer_all(model, processor, items: list[dict], spec: MethodSpec, cache: Path, image_dir: Path,
               max_new_tokens: int = 8, suffix: str = "", desc: str = "") -> list[dict]:
    """Answers for every item, read from `cache` where present and appended to it one by one otherwise."""
    from tqdm.auto import tqdm

    from ..pipeline import generate_info

    cache.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["question_id"]] = r
    todo = [it for it in items if it["question_id"] not in done]
    methods = None if spec.name == "none" else spec.name
    with open(cache, "a") as f:
        for it in tqdm(todo, desc=desc or spec.label, mininterval=1.0, disable=not todo):
            info = generate_info(model, processor, image_dir / it["image"], it["text"] + suffix, methods=methods,
                                 method_params=spec.params or None, max_new_tokens=max_new_tokens)
            kept = None
            stats = (info.get("stats") or {}).get(spec.name) or {}
            if "tokens_kept_per_image" in stats and stats["tokens_kept_per_image"]:
                kept = sum(stats["tokens_kept_per_image"][0])
            r = {"question_id": it["question_id"], "text": info["text"], "seconds": info["seconds"],
                 "prompt_tokens": info["prompt_tokens"], "image_tokens_kept": kept}
            f.write(json.dumps(r) + "\n")
            f.flush()
            done[it["question_id"]] = r
    return [done[it["question_id"]] for it in items]


def run_pope(model, processor, data: Path, specs: list[MethodSpec], out: Path, splits=None, limit: int | None = None,
             max_new_tokens: int = 8, suffix: str = "") -> dict:
    """Every method on every split: {label: {split: pope metrics + seconds / prompt tokens / image tokens kept}}."""
    from ..metrics import pope
    from .pope import SPLITS, read_questions

    data, out = Path(data), Path(out)
    for s in specs:
        s.check()
    splits = list(splits or SPLITS)
    questions = {sp: read_questions(data, sp)[: limit or None] for sp in splits}
    results: dict[str, Any] = {}
    for spec in specs:
        results[spec.label] = {}
        for sp in splits:
            answers = answer_all(model, processor, questions[sp], spec, _answers_file(out, spec, sp), data / "images",
                                 max_new_tokens, suffix, desc=f"{spec.label} / {sp}")
            r = pope([a["text"] for a in answers], [q["label"] for q in questions[sp]])
            kept = [a["image_tokens_kept"] for a in answers if a["image_tokens_kept"] is not None]
            r.update(seconds_per_answer=sum(a["seconds"] for a in answers) / len(answers),
                     prompt_tokens=sum(a["prompt_tokens"] for a in answers) / len(answers),
                     image_tokens_kept=sum(kept) / len(kept) if kept else None)
            results[spec.label][sp] = r
    return results


def markdown_table(results: dict) -> str:
    lines = ["| method | split | accuracy | precision | recall | F1 | yes ratio | ms / answer | image tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, per in results.items():
        for sp, r in per.items():
            kept = "all" if r["image_tokens_kept"] is None else f"{r['image_tokens_kept']:.0f}"
            lines.append(f"| {label} | {sp} | {100 * r['accuracy']:.1f} | {100 * r['precision']:.1f} | "
                         f"{100 * r['recall']:.1f} | {100 * r['f1']:.1f} | {100 * r['yes_ratio']:.1f} | "
                         f"{1000 * r['seconds_per_answer']:.1f} | {kept} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, title: str = "") -> None:
    """F1 (mean over the splits) against milliseconds per answer, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, per in results.items():
        f1 = 100 * sum(r["f1"] for r in per.values()) / len(per)
        ms = 1000 * sum(r["seconds_per_answer"] for r in per.values()) / len(per)
        ax.scatter([ms], [f1])
        ax.annotate(label, (ms, f1), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("ms per answer")
    ax.set_ylabel("F1 (mean over splits)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out: Path, name: str, meta: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "table": out / f"{name}.md", "plot": out / f"{name}.png"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    paths["table"].write_text(markdown_table(results))
    plot(results, paths["plot"], title=name)
    return paths


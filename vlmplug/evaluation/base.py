"""What every benchmark gives the runner: its items read from the benchmark's own files, how an item is answered
(free text, a point on the image, or a choice among options) and how the answers are scored.

An item is a dict: ``question_id`` (unique within the split), ``images`` (paths), ``text`` (the question as the
benchmark words it, before any suffix), plus the gold fields its scorer reads. An answer is a dict with
``question_id``, the answer itself (``text``, ``point`` or ``choice``), ``seconds``, ``prompt_tokens``,
``image_tokens`` (placeholders before any method) and ``image_tokens_kept`` (after a pruning method, else None).
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence


class BenchmarkFilesError(FileNotFoundError):
    """A benchmark's file is missing or malformed; the message names the file and the layout expected."""


class Benchmark(ABC):
    """Subclasses set the class attributes and implement `read` and `score`."""

    name = ""
    #: "text" (generated answer), "point" (a click on the image), "choice" (index of the most likely option)
    kind = "text"
    splits: tuple[str, ...] = ("all",)
    max_new_tokens = 16
    #: the metric the plot shows and `headline` reports (a key of one split's scores)
    headline = "accuracy"
    #: (key, header, scale): the table's columns, each a key of one split's scores multiplied by scale
    columns: tuple[tuple[str, str, float], ...] = (("accuracy", "accuracy", 100.0),)
    #: where the files go, for error messages
    layout = ""

    @abstractmethod
    def read(self, data: Path, split: str) -> list[dict]:
        """The split's items, checked (clear errors naming the file and the layout)."""

    @abstractmethod
    def score(self, items: list[dict], answers: list[dict]) -> dict:
        """The split's scores from the benchmark's official rule."""

    def prompt(self, item: dict, suffix: str) -> str:
        return item["text"] + suffix

    def check(self, data: Path, splits: Sequence[str]) -> None:
        """Fail before a model is loaded: unknown splits, missing or malformed files."""
        unknown = [s for s in splits if s not in self.splits]
        if unknown:
            raise BenchmarkFilesError(f"{self.name}: unknown split(s) {unknown}; available: {', '.join(self.splits)}")
        for s in splits:
            self.read(data, s)

    # ------------------------------------------------------------------ helpers for readers

    def missing(self, path: Path, what: str = "") -> BenchmarkFilesError:
        return BenchmarkFilesError(f"{self.name} expects {what or 'the file'} {path}" +
                                   (f"; layout: {self.layout}" if self.layout else ""))

    def load_json(self, path: Path, what: str = "") -> Any:
        if not Path(path).exists():
            raise self.missing(path, what)
        try:
            return json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise BenchmarkFilesError(f"{self.name}: {path} is not valid JSON ({e})") from None

    def need(self, record: dict, keys: Sequence[str], where: str) -> None:
        lacking = [k for k in keys if k not in record]
        if lacking:
            raise BenchmarkFilesError(f"{self.name}: {where} lacks {lacking}" +
                                      (f"; layout: {self.layout}" if self.layout else ""))

    def image(self, path: Path, where: str) -> Path:
        if not Path(path).exists():
            raise BenchmarkFilesError(f"{self.name}: {where} names image {path}, which does not exist" +
                                      (f"; layout: {self.layout}" if self.layout else ""))
        return Path(path)


def parse_point(text: str, size: tuple[int, int]) -> tuple[float, float] | None:
    """A click read from generated text, as SeeClick's ScreenSpot script reads its model's output: the numbers in the
    text; two are a point, four a box (x0, y0, x1, y1) whose centre is the click. Values all within 0..1 are
    fractions of the image (SeeClick's format) and scaled to pixels; otherwise they are pixels. None: no click."""
    import re

    nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]
    if len(nums) >= 4:
        x, y = (nums[0] + nums[2]) / 2, (nums[1] + nums[3]) / 2
        nums = nums[:4]
    elif len(nums) >= 2:
        x, y = nums[0], nums[1]
        nums = nums[:2]
    else:
        return None
    if all(0.0 <= v <= 1.0 for v in nums):
        return x * size[0], y * size[1]
    return x, y

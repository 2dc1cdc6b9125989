"""The embedded world: drawn scenes with known answers and a tiny trained LLaVA that ships with vlmplug.

>>> from vlmplug.world import load_world, random_scene
>>> model, processor = load_world()
>>> scene = random_scene(seed=0)
>>> scene.questions[0].text, scene.questions[0].answer

Importing this package is cheap: torch and transformers are imported only by :func:`load_world` and the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .scenes import (
    ANSWERS,
    COLORS,
    MAX_COUNT,
    POSITIONS,
    QUESTION_KINDS,
    SHAPES,
    Question,
    Scene,
    SceneObject,
    all_questions,
    ask,
    draw_scene,
    heldout_scenes,
    position_of,
    random_scene,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"


class WorldWeightsMissingError(FileNotFoundError):
    """The packaged weights are not there (run ``python -m vlmplug.world.train`` to create them)."""


def load_world(device: Any = "cpu", dtype: Any = None, path: str | Path | None = None):
    """Load the shipped world model and its processor offline: ``(LlavaForConditionalGeneration, LlavaProcessor)``.

    ``dtype``: a torch dtype or its name ("float32", "bfloat16"); default is the stored fp32. ``path`` overrides the
    packaged weights folder (e.g. a checkpoint written by the trainer).
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(path) if path is not None else WEIGHTS_DIR
    if not (folder / "config.json").exists():
        raise WorldWeightsMissingError(
            f"no world model in {folder}; train one with `python -m vlmplug.world.train` (writes {WEIGHTS_DIR})"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    from ..compat import load_kwargs

    model = LlavaForConditionalGeneration.from_pretrained(
        folder, **load_kwargs(dtype=dtype or torch.float32, local_files_only=True))
    model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


def sample_scene() -> tuple[Any, dict]:
    """The bundled sample image (PIL) and its metadata (``question``, ``answer``, objects)."""
    import json

    from PIL import Image

    meta = json.loads((SAMPLES_DIR / "scene.json").read_text())
    with Image.open(SAMPLES_DIR / "scene.png") as im:
        image = im.convert("RGB")
    return image, meta


__all__ = [
    "ANSWERS", "COLORS", "MAX_COUNT", "POSITIONS", "QUESTION_KINDS", "SHAPES", "Question", "Scene", "SceneObject",
    "all_questions", "ask", "draw_scene", "heldout_scenes", "position_of", "random_scene", "load_world",
    "sample_scene", "WEIGHTS_DIR", "SAMPLES_DIR", "WorldWeightsMissingError",
]

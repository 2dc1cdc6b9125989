"""Benchmarks read from their own files, every method on identical prompts with greedy decoding, resumable answer
caches, one result as JSON + markdown table + plot (`vlmplug eval`); the world suite writes benchmark files in the
real formats from the embedded scenes. Nothing here is imported by `import vlmplug`."""
from __future__ import annotations

from typing import Callable


def benchmarks() -> dict[str, tuple[Callable, Callable | None]]:
    """name -> (benchmark factory taking the seed, writer of world files or None)."""
    from .chair import CHAIR
    from .mme import MME
    from .pope import POPE, write_world_pope
    from .screenspot import ScreenSpot
    from .textvqa import TextVQA
    from .vstar import VStar
    from .world import WorldGrounding, write_world_grounding, write_world_vqa

    return {
        "pope": (lambda seed: POPE(), None),
        "chair": (lambda seed: CHAIR(seed=seed), None),
        "mme": (lambda seed: MME(), None),
        "textvqa": (lambda seed: TextVQA(), None),
        "screenspot": (lambda seed: ScreenSpot(), None),
        "vstar": (lambda seed: VStar(), None),
        "world-pope": (lambda seed: POPE(), write_world_pope),
        "world-vqa": (lambda seed: TextVQA(), write_world_vqa),
        "world-grounding": (lambda seed: WorldGrounding(), write_world_grounding),
    }

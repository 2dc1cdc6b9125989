"""LLaVA-OneVision: anyres like LLaVA-NeXT plus `anyres_max_N` pooling; images of a multi-image
sample are not patched (base grid + one newline)."""
from __future__ import annotations

from ..registry import register_adapter
from .llava_next import AnyresAdapter


@register_adapter("llava_onevision")
class LlavaOnevisionAdapter(AnyresAdapter):
    def _max_patches(self):
        ratio = getattr(self.config, "vision_aspect_ratio", None) or "anyres_max_9"
        return int(str(ratio).replace("anyres_max_", ""))

    def _patched(self, meta, index):
        bni = meta.get("batch_num_images")
        if bni is None:
            return True
        flags = [int(n) == 1 for n in bni for _ in range(int(n))]
        return flags[index]

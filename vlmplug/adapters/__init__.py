"""Per-family adapters: where image tokens are and how they map back onto the picture."""
from .base import Adapter, ImageMeta, get_adapter

__all__ = ["Adapter", "ImageMeta", "get_adapter"]

"""One file per method; each registers its config class under a lowercase name."""
from .base import Method

__all__ = ["Method"]

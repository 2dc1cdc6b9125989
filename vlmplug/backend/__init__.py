"""The only code that does attention math: SDPA plus the edits methods request."""
from .attention import IMPL_NAME, register_backend
from .plan import LayerPlan, Probe, Redistribute

__all__ = ["IMPL_NAME", "register_backend", "LayerPlan", "Probe", "Redistribute"]

"""Functional ops: argument checks, backend dispatch, autograd and the PyTorch fallback.

Each op lives in its own file beside its reference implementation
(``softmax.py`` has ``softmax`` and ``softmax_reference``).
"""
from .softmax import softmax, softmax_reference

__all__ = ["softmax", "softmax_reference"]

"""Functional ops: argument checks, backend dispatch, autograd and the PyTorch fallback.

Each op lives in its own file beside its reference implementation
(``softmax.py`` has ``softmax`` and ``softmax_reference``).
"""
from .softmax import softmax, softmax_reference

__all__ = ["softmax", "softmax_reference"]
from .attention import (attention, attention_reference, banded_attention, normalize_window,  # noqa: E402
                        window_from_flash_attn, window_from_flex_sliding, window_from_num_keys)

__all__ += ["attention", "banded_attention", "attention_reference", "normalize_window",
            "window_from_flex_sliding", "window_from_flash_attn", "window_from_num_keys"]

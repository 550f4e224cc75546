"""Functional ops: argument checks, backend dispatch, autograd and the PyTorch fallback.

Each op lives in its own file beside its reference implementation (``softmax.py`` has
``softmax`` and ``softmax_reference``; ``attention.py`` the dense, causal and banded
attention; ``noising.py`` the diffusion forward process, loss and sampler steps).
Its kernels are in ``leedl_fast.kernels.<same name>``.
"""
from .attention import (attention, attention_reference, banded_attention, normalize_window,
                        window_from_flash_attn, window_from_flex_sliding, window_from_num_keys)
from .noising import (ddim_step, ddim_step_reference, ddpm_step, ddpm_step_reference, fused_step,
                      noise_prediction_loss, noise_prediction_loss_reference, q_sample, q_sample_reference)
from .softmax import softmax, softmax_reference

__all__ = [
    "softmax", "softmax_reference",
    "attention", "banded_attention", "attention_reference", "normalize_window",
    "window_from_flex_sliding", "window_from_flash_attn", "window_from_num_keys",
    "q_sample", "q_sample_reference", "noise_prediction_loss", "noise_prediction_loss_reference",
    "ddpm_step", "ddpm_step_reference", "ddim_step", "ddim_step_reference", "fused_step",
]

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
from .noising import (ddim_step, ddim_step_reference, ddpm_step, ddpm_step_reference, fused_step,  # noqa: E402
                      noise_prediction_loss, noise_prediction_loss_reference, q_sample, q_sample_reference)

__all__ += ["q_sample", "q_sample_reference", "noise_prediction_loss", "noise_prediction_loss_reference",
            "ddpm_step", "ddpm_step_reference", "ddim_step", "ddim_step_reference", "fused_step"]

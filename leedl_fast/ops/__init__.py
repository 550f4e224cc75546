"""Functional ops: argument checks, backend dispatch, autograd and the PyTorch fallback.

Each op lives in its own file beside its reference implementation (``softmax.py`` has
``softmax`` and ``softmax_reference``; ``attention.py`` the dense, causal and banded
attention; ``layer_norm.py`` dropout + residual add + LayerNorm and ``bias_act.py`` bias + activation +
dropout, the Transformer layers' fused elementwise work; ``noising.py`` the diffusion forward process, loss and sampler steps).
Its kernels are in ``leedl_fast.kernels.<same name>``.
"""
from .attention import (attention, attention_reference, banded_attention, normalize_window,
                        window_from_flash_attn, window_from_flex_sliding, window_from_num_keys)
from .bias_act import bias_act_dropout, bias_act_dropout_reference
from .layer_norm import dropout_add_layer_norm, dropout_add_layer_norm_reference
from .noising import (ddim_step, ddim_step_reference, ddpm_step, ddpm_step_reference, fused_step,
                      noise_prediction_loss, noise_prediction_loss_reference, q_sample, q_sample_reference)
from .softmax import softmax, softmax_reference

__all__ = [
    "softmax", "softmax_reference",
    "bias_act_dropout", "bias_act_dropout_reference", "dropout_add_layer_norm", "dropout_add_layer_norm_reference",
    "attention", "banded_attention", "attention_reference", "normalize_window",
    "window_from_flex_sliding", "window_from_flash_attn", "window_from_num_keys",
    "q_sample", "q_sample_reference", "noise_prediction_loss", "noise_prediction_loss_reference",
    "ddpm_step", "ddpm_step_reference", "ddim_step", "ddim_step_reference", "fused_step",
]

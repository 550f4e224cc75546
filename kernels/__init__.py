"""Triton kernels of leedl_fast, installed as ``leedl_fast.kernels``.

Triton only: ``@triton.jit`` kernels and the launchers that size their grids.
No ``nn.Module``, no autograd and no device policy here; ``leedl_fast.ops``
checks arguments, picks the path and wraps these in autograd.  Each file is
one op family: ``softmax.py``, ``attention.py``, ``noising.py``, ``bias_act.py``,
``layer_norm.py``; ``dropout.py`` is the dropout mask the attention, bias_act and
layer_norm kernels share (eight 16-bit decisions per Philox call).

Importing a submodule imports Triton, so ``leedl_fast.ops`` imports them
lazily, only when the Triton path is chosen.
"""

"""leedl_fast: Triton kernels behind drop-in PyTorch modules for the models of LeeDL.

Importing the package neither imports Triton nor looks at devices; see
``leedl_fast.backend`` for how each call picks its path.
"""
from . import backend, ops, random

__version__ = "0.1.0"
__all__ = ["backend", "ops", "random", "__version__"]

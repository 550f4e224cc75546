"""Benchmark cases and the runner shared by ``bench/gpu_suite.py`` and ``leedl-fast bench``.

``leedl_fast.bench.cases.<op>`` modules each define

* ``cases(device: str, quick: bool) -> Iterator[Case]``: every timed problem of
  the op, ours against its peers (built lazily, so inputs are freed between cases);
* ``check(device: str) -> list[CheckResult]`` (GPU suite only): the Triton path
  against the reference on that device, in float16, bfloat16 and float32.

The runner discovers the modules, times them (``triton.testing.do_bench`` on
CUDA, ``torch.utils.benchmark`` on CPU), and writes JSON, markdown and plots.
"""
from .common import Case, CheckResult

__all__ = ["Case", "CheckResult"]

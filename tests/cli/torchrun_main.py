"""``python -m leedl_fast`` for the torchrun test, with the garbage collector off and a check at teardown.

With automatic collection disabled, a ``DistributedDataParallel`` wrapper (which sits in a
reference cycle) stays alive until something collects it.  The trainer must collect it before
``destroy_process_group``: otherwise the process group outlives it and is freed during the
interpreter's teardown, where gloo can abort the process.  The patched ``destroy_process_group``
prints how many wrappers are still alive when it is called; the test expects 0 on every rank.
"""
from __future__ import annotations

import gc
import sys

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import leedl_fast.cli as cli

_destroy = dist.destroy_process_group


def _checked_destroy(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"DDP wrappers alive at destroy_process_group: {alive}", file=sys.stderr, flush=True)
    return _destroy(*args, **kwargs)


if __name__ == "__main__":
    gc.disable()
    dist.destroy_process_group = _checked_destroy
    sys.exit(cli.main(sys.argv[1:]))

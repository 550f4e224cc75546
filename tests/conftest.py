"""Test session set-up.

With no GPU, Triton kernels run under Triton's interpreter: ``TRITON_INTERPRET=1``
must be set before Triton is first imported, so it is set here, at collection.
The ``triton_path`` / ``torch_path`` fixtures force a path through
``LEEDL_FAST_BACKEND`` and name the device to put tensors on; ``any_path`` runs a
test on both.  On a CUDA machine ``triton_path`` runs the real kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests take the PyTorch path unless they ask for the Triton one (``triton_path``):
# with TRITON_INTERPRET=1 the automatic choice would interpret every kernel.
os.environ.setdefault("LEEDL_FAST_BACKEND", "torch")

# Under pytest-xdist each worker takes one core: two workers with two intra-op
# threads each on a 2-core runner spend their time waiting on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest  # noqa: E402

from leedl_fast.training import torch_threads  # noqa: E402
from tests.harness import poison_empty  # noqa: E402

SEED = 20261127


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test, restored after it: CI's two xdist workers share two cores, and the tests'
    small shapes gain nothing from more threads but OpenMP's wake-up latency on every op."""
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same torch generator state."""
    torch.manual_seed(SEED)
    yield


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton path; yields the device (``cuda``, or ``cpu`` under the interpreter).

    ``torch.empty*`` are poisoned with NaN meanwhile, so an unwritten output fails."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "triton")
    with poison_empty():
        yield "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def torch_path(monkeypatch):
    """Force the pure-PyTorch path on the CPU; yields the device ``cpu``."""
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "torch")
    with poison_empty():
        yield "cpu"


@pytest.fixture(params=["torch", "triton"])
def any_path(request):
    """Run the test on each path in turn; yields the device."""
    yield request.getfixturevalue(f"{request.param}_path")

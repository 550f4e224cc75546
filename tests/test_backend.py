"""leedl_fast.backend: the path each call takes, and its errors."""
import subprocess
import sys

import pytest
import torch

from leedl_fast import backend


def test_forced_torch(monkeypatch):
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "torch")
    assert backend.select("softmax", torch.zeros(2)) == "torch"
    assert backend.decide("cuda").path == "torch"


def test_auto_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("LEEDL_FAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend.select("softmax", torch.zeros(2)) == "torch"
    assert "CUDA only" in backend.decide("cpu").reason


def test_auto_cpu_with_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("LEEDL_FAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.select("softmax", torch.zeros(2)) == "triton"


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.select("softmax", torch.zeros(2))


def test_read_at_each_call(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(3)
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "torch")
    assert backend.select("op", x) == "torch"
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "triton")
    assert backend.select("op", x) == "triton"


def test_cuda_path_when_triton_imports(monkeypatch):
    monkeypatch.delenv("LEEDL_FAST_BACKEND", raising=False)
    monkeypatch.setattr(backend, "_triton_import", lambda: (True, "triton 9"))
    assert backend.decide("cuda").path == "triton"
    monkeypatch.setattr(backend, "_triton_import", lambda: (False, "no triton"))
    assert backend.decide("cuda").path == "torch"
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "triton")
    assert backend.decide("cuda").path == "unavailable"


def test_bad_value(monkeypatch):
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="LEEDL_FAST_BACKEND"):
        backend.select("softmax", torch.zeros(1))


def test_import_probes_nothing():
    """Importing the package imports neither triton nor initialises CUDA."""
    code = ("import sys, leedl_fast, leedl_fast.ops, leedl_fast.nn;"
            "import torch; assert 'triton' not in sys.modules, 'triton imported';"
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr

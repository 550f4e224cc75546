"""The benchmark runner and bench/gpu_suite.py, exercised on the CPU (nothing here is timed)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from leedl_fast.bench import runner

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"op", "mode", "dtype", "shape", "causal", "window", "peer", "ours_ms", "peer_ms", "speedup"}


def test_softmax_quick_report(tmp_path, monkeypatch):
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "torch")
    report = runner.run(quick=True, ops=["softmax"], out=tmp_path, checks=False, device="cpu", log=lambda m: None)
    data = json.loads(Path(report["files"][0]).read_text())
    assert {"device", "torch", "triton", "date", "ceilings", "results"} <= set(data)
    assert data["results"], "no result rows"
    for row in data["results"]:
        assert REQUIRED <= set(row), row
        assert row["op"] == "softmax" and row["mode"] in ("fwd", "fwd+bwd") and row["dtype"] == "fp32"
        assert row["ours_ms"] > 0 and row["peer_ms"] > 0
        assert row["speedup"] == pytest.approx(row["peer_ms"] / row["ours_ms"])
        assert row["gbps"] > 0
    assert "| softmax |" in Path(report["files"][1]).read_text()


def test_unknown_op_and_bad_out(tmp_path):
    with pytest.raises(ValueError, match="unknown op"):
        runner.run(quick=True, ops=["nope"], out=tmp_path, checks=False, device="cpu", log=lambda m: None)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        runner.run(quick=True, ops=["softmax"], out=f, checks=False, device="cpu", log=lambda m: None)


def test_gpu_suite_help_and_no_gpu():
    help_ = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--quick" in help_.stdout
    import torch

    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py")], capture_output=True, text=True)
        assert r.returncode == 2 and "no CUDA device" in r.stderr


@pytest.mark.parametrize("op", ["softmax", "transformer", "layer_norm", "noising"])
def test_gpu_suite_checks_pass_on_cpu_interpreter(triton_path, op):
    """The GPU suite's correctness checks, run here on the interpreter (fp32/fp16; bf16 is wrong in the
    interpreter): a check that fails here would fail on the GPU too.  The transformer check failed here
    (its float64 reference took unrounded inputs, and a fixed bound) before a GPU ever ran it.  The
    attention and bias_act checks take minutes on the interpreter; their kernels are covered by
    tests/kernels and tests/ops."""
    import importlib

    case = importlib.import_module(f"leedl_fast.bench.cases.{op}")
    results = [r for r in case.check(triton_path) if r.dtype != "bf16"]
    assert results and all(r.ok for r in results), results


def test_time_budget_skips_but_still_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "torch")
    report = runner.run(quick=True, ops=["softmax"], out=tmp_path, checks=False, device="cpu", log=lambda m: None,
                        time_budget_s=0.0)
    data = json.loads(Path(report["files"][0]).read_text())
    assert data["results"] and all(r["error"].startswith("skipped: this module's share") for r in data["results"])


def test_time_budget_is_shared_so_a_slow_module_cannot_starve_the_next(tmp_path, monkeypatch):
    """Each module gets the budget left divided by the modules still to run: a module whose cases overrun its
    share loses its own later cases, and the module after it still runs."""
    import time
    import types

    import torch

    from leedl_fast.bench.common import Case

    clock = {"now": 1000.0}
    monkeypatch.setattr(time, "time", lambda: clock["now"])

    def slow_ours():
        clock["now"] += 30.0  # each call of the slow module's op "takes" 30 s of the budget

    def module(name, ours, n):
        def cases(device, quick):
            for i in range(n):
                yield Case(op=name, mode="fwd", dtype=torch.float32, shape={"i": i}, ours=ours, peers={})
        return types.SimpleNamespace(__name__=f"fake.{name}", OPS=(name,), cases=cases)

    mods = [module("slow", slow_ours, 5), module("fast", lambda: None, 3)]
    monkeypatch.setattr(runner, "case_modules", lambda ops=None: mods)
    monkeypatch.setattr(runner, "ceilings", lambda device, quick=False: {})
    monkeypatch.setattr(runner, "time_ms", lambda fn, device, quick=False: (fn(), 1.0)[1])
    monkeypatch.setattr(runner, "peak_mb", lambda fn, device: None)
    report = runner.run(quick=True, ops=None, out=tmp_path, checks=False, device="cpu", log=lambda m: None,
                        time_budget_s=100.0)
    rows = json.loads(Path(report["files"][0]).read_text())["results"]
    slow = [r for r in rows if r["op"] == "slow"]
    fast = [r for r in rows if r["op"] == "fast"]
    # share of "slow": 100 s / 2 modules = 50 s; its cases start at t=0 and t=30 (60 s spent), the rest skip
    assert [r.get("error") is None for r in slow] == [True, True, False, False, False]
    assert len(fast) == 3 and all(r.get("error") is None for r in fast)


def test_time_budget_follows_the_modules_weights(tmp_path, monkeypatch):
    """A module's share is proportional to its BUDGET_WEIGHT (attention holds most of the GPU cases); a
    ceilings failure is recorded and the cases still run; the markdown table is written with the JSON."""
    import time
    import types

    import torch

    from leedl_fast.bench.common import Case

    clock = {"now": 1000.0}
    monkeypatch.setattr(time, "time", lambda: clock["now"])

    def tick():
        clock["now"] += 10.0

    def module(name, n, weight):
        def cases(device, quick):
            for i in range(n):
                yield Case(op=name, mode="fwd", dtype=torch.float32, shape={"i": i}, ours=tick, peers={})
        return types.SimpleNamespace(__name__=f"fake.{name}", OPS=(name,), cases=cases, BUDGET_WEIGHT=weight)

    def broken_ceilings(device, quick=False):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    mods = [module("heavy", 10, 3.0), module("light", 10, 1.0)]
    monkeypatch.setattr(runner, "case_modules", lambda ops=None: mods)
    monkeypatch.setattr(runner, "ceilings", broken_ceilings)
    monkeypatch.setattr(runner, "time_ms", lambda fn, device, quick=False: (fn(), 1.0)[1])
    monkeypatch.setattr(runner, "peak_mb", lambda fn, device: None)
    report = runner.run(quick=True, ops=None, out=tmp_path, checks=False, device="cpu", log=lambda m: None,
                        time_budget_s=100.0)
    data = json.loads(Path(report["files"][0]).read_text())
    ran = {op: sum(r.get("error") is None for r in data["results"] if r["op"] == op) for op in ("heavy", "light")}
    # heavy: 3/4 of 100 s = 75 s: cases start at 0, 10, ..., 70 (8 run); light: the 25 s left: 0, 10, 20 (3 run)
    assert ran == {"heavy": 8, "light": 3}
    assert "illegal memory access" in data["ceilings_error"]
    assert Path(report["files"][1]).read_text().count("heavy") >= 8


def test_gpu_suite_runs_from_a_bare_checkout(tmp_path):
    """On a GPU machine the tree arrives without an install: the suite maps kernels/ itself."""
    code = f"""
import sys
# Hide the editable install's finder, as on a machine where leedl_fast was never installed.
sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__name__.lower()
                 and 'editable' not in getattr(f, '__module__', '').lower()]
sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]
try:
    import leedl_fast.kernels  # noqa: F401
    raise SystemExit('leedl_fast.kernels importable before the mapping: the test proves nothing')
except ImportError:
    pass
sys.path.insert(0, {str(ROOT / 'bench')!r})
import gpu_suite
gpu_suite.use_source_checkout()
import leedl_fast.kernels.softmax as k
print(k.__file__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert Path(out.stdout.strip()).resolve() == (ROOT / "kernels" / "softmax.py").resolve()


def test_tile_sweep_is_opt_in():
    names = lambda mods: {m.__name__.rsplit(".", 1)[-1] for m in mods}
    assert "attention_tiles" not in names(runner.case_modules())
    assert names(runner.case_modules(["attention_tiles"])) == {"attention_tiles"}
    assert "attention_tiles" in runner.known_ops()


def test_tile_sweep_plumbing_on_the_interpreter(triton_path, tmp_path, monkeypatch):
    """The sweep's cases launch the kernels with the alternative tiles they name (here through the
    interpreter, tiny): every alternative computes what the shipped tile computes, and the runner
    records a row per alternative without error.  Nothing is timed for its value."""
    import torch

    from leedl_fast.bench.cases import attention_tiles

    cases = list(attention_tiles.cases("cpu", quick=True))
    assert [(c.mode, c.extra["varied"]) for c in cases] == [("fwd", "fwd"), ("fwd+bwd", "dkdv"), ("fwd+bwd", "dq"),
                                                            ("fwd+bwd", "padded")]
    padded = cases[-1]
    assert padded.shape["D"] == 20 and set(padded.peers) == {"dkdv M32 N16 w4 s1", "dq M32 N16 w4 s1",
                                                            attention_tiles._ZERO_PAD}
    banded = list(attention_tiles._banded_case("cpu", 64, 16, (8, 8), torch.float32,
                                               {16: [(32, 16, 4, 1), (16, 32, 4, 1)]}, 64, 32))
    assert [c.window for c in banded] == [(8, 8)]
    for case in cases + banded:
        want = case.ours()
        assert len(case.peers) == (3 if case is padded else 2)
        for name, peer in case.peers.items():
            got = peer()
            for a, b in zip(want, got):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{case.mode} {name}")
    monkeypatch.setattr(runner, "time_ms", lambda fn, device, quick=False: (fn(), 1.0)[1])  # one call, untimed
    report = runner.run(quick=True, ops=["attention_tiles"], out=tmp_path, checks=False, device="cpu",
                        log=lambda m: None)
    rows = report["results"]
    assert len(rows) == 9 and all(r["peer_ms"] and not r.get("error") for r in rows), rows


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gpu_suite_second_order_attention_check_on_cpu_interpreter(triton_path, dtype):
    """The suite's check of a second derivative through attention (the Triton first backward), on the interpreter."""
    import torch

    from leedl_fast.bench.cases.attention import _check_second_order

    result = _check_second_order(triton_path, {"fp32": torch.float32, "fp16": torch.float16}[dtype], dtype, 2e-3)
    assert result.ok, result

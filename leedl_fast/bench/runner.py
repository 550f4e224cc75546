"""Time every benchmark case against its peers; write JSON, markdown and plots.

Shared by ``bench/gpu_suite.py`` (on a CUDA machine: correctness checks, the
card's ceilings, every case) and ``leedl-fast bench`` (on the device at hand).

Timing: on CUDA, ``triton.testing.do_bench`` (median of repeated runs after
warm-up, L2 flushed between runs); on the CPU, the median of repeated
``time.perf_counter`` runs after one warm-up call.  Ours and the peers of a case
run back to back on the same inputs, so their ratio is what to read; an
absolute time alone means little.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import pkgutil
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from .common import Case, CheckResult

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


# --------------------------------------------------------------------------- discovery

def _modules() -> list:
    """Every module of ``leedl_fast.bench.cases``, by name."""
    from . import cases as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{pkg.__name__}.{name}") for name in names]


def _name(mod) -> str:
    return mod.__name__.rsplit(".", 1)[-1]


def case_modules(ops: list[str] | None = None):
    """The modules of ``leedl_fast.bench.cases``, optionally only those whose name or ops match ``ops``.
    A module with ``OPT_IN = True`` (a tile sweep: many compiles) runs only when ``ops`` names it."""
    if ops is None:
        return [m for m in _modules() if not getattr(m, "OPT_IN", False)]
    return [m for m in _modules() if _name(m) in ops or set(getattr(m, "OPS", (_name(m),))) & set(ops)]


def known_ops() -> list[str]:
    """Every op a case module provides, the opt-in ones included."""
    out = []
    for mod in _modules():
        out.extend(getattr(mod, "OPS", (_name(mod),)))
    return sorted(set(out))


# --------------------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable, device: str, *, quick: bool = False) -> float:
    """Median milliseconds of one call of ``fn``."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median"))
    fn()  # warm-up (and first-call set-up)
    budget = 0.15 if quick else 1.0
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_mb(fn: Callable, device: str) -> float | None:
    """Peak memory allocated during one call of ``fn`` on CUDA, above what was allocated before (MiB)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings(device: str, quick: bool = False) -> dict:
    """The device's measured limits: copy bandwidth (bytes read + written) and a large matmul's rate."""
    out = {}
    if device.startswith("cuda"):
        n = (1 << 28) if not quick else (1 << 26)  # bytes per buffer
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device, quick=quick)
        out["copy_gbps"] = 2 * n / (ms * 1e-3) / 1e9
        del src, dst
        m = 8192
        a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
        ms = time_ms(lambda: a @ b, device, quick=quick)
        out["matmul_bf16_tflops"] = 2 * m**3 / (ms * 1e-3) / 1e12
    else:
        n = 1 << 26
        src = torch.empty(n, dtype=torch.uint8)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device, quick=True)
        out["copy_gbps"] = 2 * n / (ms * 1e-3) / 1e9
        m = 1024
        a, b = torch.randn(m, m), torch.randn(m, m)
        ms = time_ms(lambda: a @ b, device, quick=True)
        out["matmul_fp32_tflops"] = 2 * m**3 / (ms * 1e-3) / 1e12
    return out


# --------------------------------------------------------------------------- running

def run_case(case: Case, device: str, ceil: dict, quick: bool) -> list[dict]:
    """Rows of results for one case: one per peer (a case with no peer gives one row)."""
    base = {
        "op": case.op, "mode": case.mode, "dtype": _DTYPE_NAMES.get(case.dtype, str(case.dtype)),
        "shape": case.shape, "causal": case.causal, "window": list(case.window) if case.window else None,
    }
    try:
        ours_ms = time_ms(case.ours, device, quick=quick)
        ours_mem = peak_mb(case.ours, device)
    except Exception as exc:  # recorded, and the suite goes on
        return [{**base, "peer": None, "ours_ms": None, "error": f"ours: {type(exc).__name__}: {exc}"[:500]}]
    rate = {}
    if case.flops:
        rate["tflops"] = case.flops / (ours_ms * 1e-3) / 1e12
        limit = ceil.get("matmul_bf16_tflops") if case.dtype in (torch.bfloat16, torch.float16) else None
        if limit:
            rate["pct_of_limit"] = 100 * rate["tflops"] / limit
    if case.bytes:
        rate["gbps"] = case.bytes / (ours_ms * 1e-3) / 1e9
        if ceil.get("copy_gbps"):
            rate["pct_of_limit"] = 100 * rate["gbps"] / ceil["copy_gbps"]
    rows = []
    for peer, fn in (case.peers or {None: None}).items():
        row = {**base, "peer": peer, "ours_ms": ours_ms, **rate, "ours_peak_mb": ours_mem, **case.extra}
        if fn is not None:
            try:
                peer_ms = time_ms(fn, device, quick=quick)
                row.update(peer_ms=peer_ms, speedup=peer_ms / ours_ms, peer_peak_mb=peak_mb(fn, device))
            except Exception as exc:
                row.update(peer_ms=None, speedup=None, error=f"{peer}: {type(exc).__name__}: {exc}"[:500])
        rows.append(row)
    return rows


def run_checks(mods, device: str, log: Callable[[str], None]) -> list[dict]:
    out = []
    for mod in mods:
        check = getattr(mod, "check", None)
        if check is None:
            continue
        try:
            results: list[CheckResult] = list(check(device))
        except Exception as exc:
            results = [CheckResult(_name(mod), "-", "check() raised", math.nan, 0.0, False,
                                   f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")]
        for r in results:
            out.append(r.__dict__)
            log(f"check {r.op:<12} {r.dtype:<5} {r.case:<40} max_abs_err={r.max_abs_err:.3e} tol={r.tol:.1e} "
                f"{'ok' if r.ok else 'FAIL'} {r.error[:300]}")
    return out


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fmt(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(report: dict) -> str:
    lines = [
        f"# leedl_fast benchmarks on {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, {report['date']}. "
        + ", ".join(f"{k} = {v:.1f}" for k, v in report["ceilings"].items()),
        "",
        "| op | mode | dtype | shape | causal | window | peer | ours ms | peer ms | speedup | TFLOP/s | GB/s | % of limit | ours MiB | peer MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['dtype']} | {shape} | {r.get('causal', False)} | {r.get('window')} | "
            f"{r.get('peer')} | {_fmt(r.get('ours_ms'))} | {_fmt(r.get('peer_ms'))} | {_fmt(r.get('speedup'), '.2f')} | "
            f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('gbps'), '.0f')} | {_fmt(r.get('pct_of_limit'), '.0f')} | "
            f"{_fmt(r.get('ours_peak_mb'), '.0f')} | {_fmt(r.get('peer_peak_mb'), '.0f')} |"
            + (f" error: {r['error'][:120]}" if r.get("error") else ""))
    if report.get("checks"):
        bad = [c for c in report["checks"] if not c["ok"]]
        lines += ["", f"Correctness checks on the device: {len(report['checks']) - len(bad)}/{len(report['checks'])} passed."]
        for c in bad:
            lines.append(f"- FAILED {c['op']} {c['dtype']} {c['case']}: max abs err {c['max_abs_err']:.3e} "
                         f"(tol {c['tol']:.1e}) {c['error'][:200]}")
    return "\n".join(lines) + "\n"


def plot(report: dict, out_dir: Path) -> list[Path]:
    """Time against sequence length, one PNG per (op, mode, dtype) with an ``N`` axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in report["results"]:
        n = r["shape"].get("N")
        if n is None or r.get("ours_ms") is None:
            continue
        rest = {k: v for k, v in r["shape"].items() if k not in ("N", "B")}
        key = (r["op"], r["mode"], r["dtype"], json.dumps(rest, sort_keys=True), bool(r.get("causal")),
               str(r.get("window")))
        series = groups.setdefault(key, {})
        series.setdefault("leedl_fast", {})[n] = r["ours_ms"]
        if r.get("peer") and r.get("peer_ms"):
            series.setdefault(r["peer"], {})[n] = r["peer_ms"]
    paths = []
    for key, series in groups.items():
        if len(series.get("leedl_fast", {})) < 2:
            continue
        op, mode, dtype, rest, causal, window = key
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in sorted(series.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{op} {mode} {dtype} {rest} causal={causal} window={window}", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        path = out_dir / f"{_slug('-'.join([op, mode, dtype, rest, str(causal), window]))}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def run(*, quick: bool, ops: list[str] | None, out: Path, checks: bool, device: str | None = None,
        log: Callable[[str], None] = print, time_budget_s: float | None = None) -> dict:
    """Run the checks (if asked), the ceilings and every case; write the report files.

    The JSON is rewritten after every case, so an interrupted run still leaves its
    results.  With ``time_budget_s``, cases that would start after the budget is spent
    are recorded as skipped instead of run (the files are always written).
    """
    t_start = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if ops:
        unknown = sorted(set(ops) - set(known_ops()) - {_name(m) for m in _modules()})
        if unknown:
            raise ValueError(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(known_ops())}")
    mods = case_modules(ops)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    report = {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
        "date": _dt.date.today().isoformat(), "quick": quick, "ceilings": {}, "checks": [], "results": [],
    }
    stem = f"{_slug(report['device'])}-{report['date']}" + ("-quick" if quick else "")
    json_path = out / f"{stem}.json"

    def save() -> None:
        # Both files after every step: a run killed by a time limit still leaves a readable table.
        json_path.write_text(json.dumps(report, indent=1, default=str))
        (out / f"{stem}.md").write_text(markdown_table(report))

    log(f"device: {report['device']}; torch {report['torch']}; triton {triton_version}")
    if checks:
        report["checks"] = run_checks(mods, device, log)
        save()
    try:
        report["ceilings"] = ceilings(device, quick=quick)
    except Exception as exc:  # recorded; the cases run without the fractions of the limits
        log(f"ceilings failed: {type(exc).__name__}: {exc}")
        report["ceilings_error"] = f"{type(exc).__name__}: {exc}"[:500]
    save()
    log("ceilings: " + ", ".join(f"{k}={v:.1f}" for k, v in report["ceilings"].items()))
    _allow_recompiles()
    weights = [float(getattr(m, "BUDGET_WEIGHT", 1.0)) for m in mods]
    for i, mod in enumerate(mods):
        # The budget left is shared among the modules still to run in proportion to their BUDGET_WEIGHT, so a
        # module with many cases cannot starve the ones after it; what a module leaves unused passes on.
        deadline = None
        if time_budget_s is not None:
            left = time_budget_s - (time.time() - t_start)
            deadline = time.time() + max(0.0, left) * weights[i] / sum(weights[i:])
        gen = mod.cases(device, quick)
        while True:
            try:
                case = next(gen)
            except StopIteration:
                break
            except Exception as exc:
                log(f"{mod.__name__}: building a case failed: {type(exc).__name__}: {exc}")
                report["results"].append({"op": _name(mod), "mode": "-", "dtype": "-",
                                          "shape": {}, "peer": None, "ours_ms": None,
                                          "error": f"case construction: {type(exc).__name__}: {exc}"[:500]})
                break
            if ops and case.op not in ops and _name(mod) not in ops:
                continue
            if deadline is not None and time.time() > deadline:
                report["results"].append({
                    "op": case.op, "mode": case.mode, "dtype": _DTYPE_NAMES.get(case.dtype, str(case.dtype)),
                    "shape": case.shape, "causal": case.causal, "window": list(case.window) if case.window else None,
                    "peer": None, "ours_ms": None,
                    "error": f"skipped: this module's share of the {time_budget_s:.0f} s time budget spent"})
                log(f"{case.op} {case.mode} {case.shape}: skipped (time budget spent)")
                continue
            for row in run_case(case, device, report["ceilings"], quick):
                report["results"].append(row)
                shape = " ".join(f"{k}={v}" for k, v in row["shape"].items())
                log(f"{row['op']:<10} {row['mode']:<7} {row['dtype']:<4} {shape:<32} "
                    f"causal={row.get('causal')!s:<5} window={row.get('window')!s:<12} vs {row.get('peer')!s:<16} "
                    f"ours {_fmt(row.get('ours_ms'))} ms  peer {_fmt(row.get('peer_ms'))} ms  "
                    f"speedup {_fmt(row.get('speedup'), '.2f')}"
                    + (f"  {row['error'][:200]}" if row.get("error") else ""))
            save()
            del case
            if device.startswith("cuda"):
                try:
                    torch.cuda.empty_cache()
                except Exception as exc:  # a sticky CUDA error: the files must still be written
                    log(f"empty_cache failed: {type(exc).__name__}: {exc}")
    save()
    report["files"] = [str(json_path), str(out / f"{stem}.md")] + [str(p) for p in plot(report, out)]
    log("wrote " + ", ".join(report["files"]))
    return report


def _allow_recompiles() -> None:
    """Let torch.compile keep a graph per case shape: the compiled peers (FlexAttention, the unfused
    expressions) recompile per shape and grad mode, and past dynamo's default limit of 8 a peer would
    fall back to eager (FlexAttention's eager path materialises the scores) or to dynamic shapes."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
            break


def cli(args) -> int:
    """Entry for ``leedl-fast bench``: ``args`` has ``quick``, ``ops`` (list or None) and ``out``."""
    out = Path(args.out) if getattr(args, "out", None) else Path("bench_out")
    run(quick=bool(args.quick), ops=getattr(args, "ops", None) or None, out=out, checks=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="leedl_fast.bench.runner", description="Benchmark every op against its peers.")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ops", type=lambda s: [x for x in s.split(",") if x], default=None)
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    return cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

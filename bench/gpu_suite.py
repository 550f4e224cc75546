#!/usr/bin/env python
"""The one-shot GPU suite: correctness of every Triton op on the card, its ceilings, every benchmark.

    python bench/gpu_suite.py [--quick] [--ops attention,banded,...] [--out DIR]

On a CUDA machine it (a) checks every Triton op against its reference on the
GPU in fp16, bf16 and fp32, (b) measures the card's ceilings in the same run (a
device-to-device copy in GB/s, bytes read plus written; an 8192^3 bf16 matmul in
TFLOP/s), (c) times every op against its peers with triton.testing.do_bench
(median) and (d) writes <out>/<gpu>-<yyyy-mm-dd>.json, a markdown table, PNG
plots and the log.  --out defaults to $OUT when set (the device tool's output
folder), else bench/results.  Exit status 1 when any correctness check fails.
It runs from a plain checkout too (no install needed): ``python bench/gpu_suite.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def use_source_checkout() -> None:
    """Make ``leedl_fast`` (and ``kernels/`` as ``leedl_fast.kernels``) importable from this
    checkout when the package is not installed, e.g. on a GPU machine that got a bare copy of
    the tree: what ``setup.py``'s package_dir mapping does for an install."""
    import importlib.util

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        importlib.import_module("leedl_fast.kernels")
        return
    except ImportError:
        pass
    import leedl_fast

    spec = importlib.util.spec_from_file_location(
        "leedl_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["leedl_fast.kernels"] = module
    spec.loader.exec_module(module)
    leedl_fast.kernels = module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a subset of the cases (minutes less)")
    p.add_argument("--ops", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated ops or case modules (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT or bench/results)")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds after which no new case starts (the rest are recorded as skipped); default 420")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the whole pipeline on the CPU (torch paths, quick) to check the script itself")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("gpu_suite: no CUDA device; use --cpu-dry-run to exercise the script on the CPU", file=sys.stderr)
        return 2
    out = args.out or Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / f"gpu_suite-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_file = open(log_path, "w", buffering=1)

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")

    use_source_checkout()
    from leedl_fast.bench.runner import run

    t0 = time.time()
    device = "cpu" if args.cpu_dry_run else "cuda"
    report = run(quick=args.quick or args.cpu_dry_run, ops=args.ops, out=out, checks=not args.cpu_dry_run,
                 device=device, log=log, time_budget_s=args.time_budget)
    failed = [c for c in report["checks"] if not c["ok"]]
    errors = [r for r in report["results"] if r.get("error")]
    log(f"done in {time.time() - t0:.0f} s: {len(report['results'])} results ({len(errors)} with errors), "
        f"{len(report['checks']) - len(failed)}/{len(report['checks'])} checks passed; log {log_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""``leedl-fast info``: versions, devices, and the path each op takes on each device and why.

Everything is looked up when ``collect()`` runs, never when this module is
imported: Triton is imported and devices are counted only then.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import types

# (label shown, where the op may live: (module, function name), in order of preference)
OPS: list[tuple[str, tuple[tuple[str, str], ...]]] = [
    ("softmax", (("leedl_fast.ops", "softmax"),)),
    ("attention", (("leedl_fast.ops", "attention"), ("leedl_fast.ops.attention", "attention"))),
    ("banded attention", (("leedl_fast.ops", "banded_attention"), ("leedl_fast.ops.attention", "banded_attention"))),
    ("q_sample", (("leedl_fast.ops", "q_sample"), ("leedl_fast.ops.noising", "q_sample"))),
    ("noise loss", (("leedl_fast.ops", "noise_prediction_loss"), ("leedl_fast.ops.noising", "noise_prediction_loss"))),
    ("sampler step", (("leedl_fast.ops", "ddpm_step"), ("leedl_fast.ops.noising", "ddpm_step"),
                      ("leedl_fast.ops", "ddim_step"), ("leedl_fast.ops.noising", "ddim_step"))),
]


def _find(candidates) -> str | None:
    """``module.function`` of the first candidate that imports and is a function, else None."""
    for modname, attr in candidates:
        try:
            mod = importlib.import_module(modname)
        except Exception:
            continue
        fn = getattr(mod, attr, None)
        if callable(fn) and not isinstance(fn, types.ModuleType):
            return f"{modname}.{attr}"
    return None


def _triton() -> dict:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install raising anything
        return {"version": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return {"version": getattr(triton, "__version__", "unknown"), "error": None}


def collect() -> dict:
    """Everything ``info`` prints, as a JSON-able dict."""
    import torch

    from .. import __version__, backend

    cuda = torch.cuda.is_available()
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}]
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"device": f"cuda:{i}", "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "memory_gib": round(p.total_memory / 2**30, 1)})
    op_rows = []
    for label, candidates in OPS:
        found = _find(candidates)
        paths = {}
        for dev in (["cpu", "cuda"] if cuda else ["cpu"]):
            if found is None:
                paths[dev] = {"path": "-", "reason": "not in this build of leedl_fast"}
                continue
            try:
                d = backend.decide(dev)
                paths[dev] = {"path": d.path, "reason": d.reason}
            except RuntimeError as exc:  # e.g. a malformed LEEDL_FAST_BACKEND
                paths[dev] = {"path": "error", "reason": str(exc)}
        op_rows.append({"op": label, "function": found, "paths": paths})
    return {
        "leedl_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "triton": _triton(),
        "env": {k: os.environ.get(k) for k in (backend.ENV_VAR, "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")},
        "devices": devices,
        "ops": op_rows,
    }


def render(report: dict) -> str:
    t = report["triton"]
    lines = [
        f"leedl_fast {report['leedl_fast']}",
        f"python     {report['python']} ({report['platform']})",
        f"torch      {report['torch']} (CUDA build: {report['torch_cuda'] or 'none, CPU only'})",
        f"triton     {t['version']}" if t["version"] else f"triton     not importable: {t['error']}",
        f"CUDA       {'available' if report['cuda_available'] else 'not available'}",
        "env        " + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in report["env"].items()),
        "",
        "devices:",
    ]
    for d in report["devices"]:
        extra = (f"{d['threads']} threads" if d["device"] == "cpu"
                 else f"compute capability {d['capability']}, {d['memory_gib']} GiB")
        lines.append(f"  {d['device']:<8} {d['name']} ({extra})")
    lines += ["", "op paths (path: reason):"]
    width = max(len(r["op"]) for r in report["ops"])
    for r in report["ops"]:
        for i, (dev, p) in enumerate(r["paths"].items()):
            head = r["op"] if i == 0 else ""
            lines.append(f"  {head:<{width}}  {dev:<5} {p['path']:<7} {p['reason']}")
    return "\n".join(lines) + "\n"


def run(as_json: bool = False, out=None) -> str:
    report = collect()
    text = json.dumps(report, indent=1) + "\n" if as_json else render(report)
    (out or sys.stdout).write(text)
    return text

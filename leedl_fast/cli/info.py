"""``leedl-fast info``: versions, devices, and the path each op takes on each device and why.

Everything is looked up when ``collect()`` runs, never when this module is
imported: Triton is imported and devices are counted only then.
"""
from __future__ import annotations

import json
import os
import platform
import sys

# (label shown, the functions of ``leedl_fast.ops`` behind it); every op with a kernel is listed (tested).
OPS: list[tuple[str, tuple[str, ...]]] = [
    ("softmax", ("softmax",)),
    ("attention", ("attention", "banded_attention")),
    ("bias+act+dropout", ("bias_act_dropout",)),
    ("dropout+add+LN", ("dropout_add_layer_norm",)),
    ("q_sample", ("q_sample",)),
    ("noise loss", ("noise_prediction_loss",)),
    ("sampler step", ("ddpm_step", "ddim_step", "fused_step")),
]


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
    paths = {}
    for dev in (["cpu", "cuda"] if cuda else ["cpu"]):
        try:
            d = backend.decide(dev)
            paths[dev] = {"path": d.path, "reason": d.reason}
        except RuntimeError as exc:  # e.g. a malformed LEEDL_FAST_BACKEND
            paths[dev] = {"path": "error", "reason": str(exc)}
    op_rows = [{"op": label, "functions": [f"leedl_fast.ops.{name}" for name in names], "paths": paths}
               for label, names in OPS]
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
    dev_w = max((len(dev) for r in report["ops"] for dev in r["paths"]), default=0)
    path_w = max((len(p["path"]) for r in report["ops"] for p in r["paths"].values()), default=0)
    for r in report["ops"]:
        for i, (dev, p) in enumerate(r["paths"].items()):
            head = r["op"] if i == 0 else ""
            lines.append(f"  {head:<{width}}  {dev:<{dev_w}} {p['path']:<{path_w}} {p['reason']}")
    return "\n".join(lines) + "\n"


def run(as_json: bool = False, out=None) -> str:
    report = collect()
    text = json.dumps(report, indent=1) + "\n" if as_json else render(report)
    (out or sys.stdout).write(text)
    return text

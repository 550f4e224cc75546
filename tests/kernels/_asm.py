"""The compiler's text for a kernel configuration: Triton IR (``ttir``, ``ttgir``) and ``ptx``.

tests/aot.py reports what a compile cost (registers, spills, shared memory); some properties are
only visible in the code itself, such as which float max/min a ``tl.maximum`` became: the
interpreter runs every one as ``np.maximum`` (NaN propagates), the GPU runs ``arith.maxnumf`` as
PTX ``max.f32``, which returns the operand that is not NaN.  As tests/aot.py, the compilation
runs in a subprocess with the interpreter off (this module's ``main``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.aot import ROOT, KernelConfig

STAGES = ("ttir", "ttgir", "ptx")


def compile_asm(cfg: KernelConfig, cc: int = 90, timeout: float = 600) -> dict:
    """{stage: text} of ``cfg`` compiled for sm_<cc>."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    payload = json.dumps({"config": cfg.to_json(), "cc": cc})
    proc = subprocess.run([sys.executable, "-m", "tests.kernels._asm"], input=payload, capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"asm worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = json.loads(sys.stdin.read())
    cfg, cc = job["config"], job["cc"]
    fn = getattr(importlib.import_module(cfg["module"]), cfg["kernel"])
    attrs = {(fn.arg_names.index(name),): a for name, a in cfg.get("attrs", {}).items()}
    signature, constexprs = dict(cfg["signature"]), dict(cfg["constexprs"])
    for name in cfg.get("ones", ()):
        signature[name], constexprs[name] = "constexpr", 1
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                                **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {})})
    print(json.dumps({s: k.asm[s] for s in STAGES}))


if __name__ == "__main__":
    main()

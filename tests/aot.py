"""Ahead-of-time compilation of shipped kernel configurations for real GPUs.

Triton compiles for a named target with no GPU present, and its wheel carries
``cuobjdump``; this helper compiles a kernel for sm_80 (A100) and sm_90
(H100/H200) and reads from the cubin what matters: registers, spills to local
memory (``LDL``/``STL`` in the SASS), shared memory and tensor-core
instructions (``HMMA`` on sm_80, ``HGMMA`` on sm_90).

The test session runs with ``TRITON_INTERPRET=1``, under which ``@triton.jit``
makes interpreter objects that cannot be compiled, so the compilation runs in a
subprocess with the interpreter off: ``compile_many`` starts one for a whole
batch of configurations.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class KernelConfig:
    """One shipped configuration: ``module:kernel`` with its signature and launch options."""

    module: str  # e.g. "leedl_fast.kernels.softmax"
    kernel: str  # e.g. "_softmax_fwd_kernel"
    signature: dict  # argument name -> "*fp16", "i32", "i64", "fp32", "constexpr"
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    # argument name -> attributes, as Triton's launcher specializes them at run time, e.g.
    # {"q_ptr": [["tt.divisibility", 16]]} for a 16-byte aligned pointer or a stride that is a
    # multiple of 16; without it every argument compiles as if it had no such property.
    attrs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("module", "kernel", "signature", "constexprs", "num_warps", "num_stages",
                                              "label", "attrs")}


@dataclass
class Report:
    label: str
    cc: int
    ok: bool
    error: str = ""
    registers: int = -1
    shared: int = -1
    local_ld_st: int = -1  # LDL + STL instructions in the SASS: register spills
    hmma: int = 0
    hgmma: int = 0
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.ok:
            return f"{self.label} sm_{self.cc}: FAILED {self.error}"
        return (f"{self.label} sm_{self.cc}: {self.registers} regs, {self.shared} B shared, "
                f"{self.local_ld_st} LDL/STL, {self.hmma} HMMA, {self.hgmma} HGMMA")


def compile_many(configs: list[KernelConfig], ccs=(80, 90), timeout: float = 900) -> list[Report]:
    """Compile every configuration for every compute capability in one subprocess."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    payload = json.dumps({"configs": [c.to_json() for c in configs], "ccs": list(ccs)})
    proc = subprocess.run(
        [sys.executable, "-m", "tests._aot_worker"], input=payload, capture_output=True, text=True,
        env=env, cwd=str(ROOT), timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [Report(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]

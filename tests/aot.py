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
from dataclasses import dataclass, field, replace
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
    maxnreg: int | None = None  # the launch's register cap (Triton's maxnreg option), None for ptxas's own
    # int arguments compiled as the constant 1, as Triton's launcher specialises an int equal to 1 (a row
    # stride of width-1 rows, a sample of one element); see ones()
    ones: tuple = ()
    label: str = ""
    # argument name -> attributes, as Triton's launcher specializes them at run time, e.g.
    # {"q_ptr": [["tt.divisibility", 16]]} for a 16-byte aligned pointer or a stride that is a
    # multiple of 16; without it every argument compiles as if it had no such property.
    attrs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("module", "kernel", "signature", "constexprs", "num_warps", "num_stages", "maxnreg", "ones",
                                              "label", "attrs")}


# Shared memory one block may use (opt-in maximum), by the compile target's GPU class: sm_80 code also runs
# on sm_86 and sm_89 (RTX 30xx/40xx, A10, L4, L40), whose 99 KiB is the binding limit (A100: 163 KiB);
# sm_90 (H100/H200): 227 KiB.  A configuration over it fails to launch with OutOfResources on those GPUs.
SHARED_LIMIT = {80: 99 * 1024, 90: 227 * 1024}


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


# ----------------------------------------------------------------------------------------------
# What a launch would compile
# ----------------------------------------------------------------------------------------------
# Triton's launcher compiles one variant per specialisation of a kernel's arguments: an int is
# i32 or i64 by its value, an int divisible by 16 or a 16-byte aligned pointer gets
# tt.divisibility 16, an int equal to 1 becomes a constant (unless the kernel lists it in
# do_not_specialize).  A compile check covers the code that runs only if it compiles these
# variants, so the tests record the launchers' arguments (the kernels do not run) and compute
# their specialisation with Triton's own binder, as a GPU launch would.
def record_launches(monkeypatch, module, kernels) -> list:
    """Replace ``module.<name>`` for each name in ``kernels`` by a recorder: ``kernel[grid](...)``
    appends ``(interpreted_fn, args, kwargs)`` to the returned list instead of running."""
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    for name in kernels:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    return launches


def runtime_specialization(fn, args, kwargs) -> dict:
    """name -> (type, attribute) of every non-constexpr argument of a recorded launch: ``("*fp16",
    "D")`` for a 16-byte aligned fp16 pointer, ``("i32", "D")`` for an int divisible by 16,
    ``("i32", None)`` for an unspecialised one, ``("constexpr", 1)`` for an int 1 made a constant."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    options = {k: fn.kwargs.get(k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    jit = JITFunction(fn.fn, **options)
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    _, spec, _ = binder(*args, **kwargs)
    return {p.name: s for p, s in zip(jit.params, spec) if not p.is_constexpr}


def specialized(cfg: KernelConfig, *, strides_aligned: bool = True, extra=()) -> KernelConfig:
    """``cfg`` compiled as Triton's launcher specialises a launch whose pointers are all 16-byte
    aligned and, with ``strides_aligned``, whose ``stride_*`` arguments and the ints named in
    ``extra`` are multiples of 16 (tt.divisibility 16); otherwise those compile unspecialised."""
    attrs = {n: [["tt.divisibility", 16]] for n, t in cfg.signature.items()
             if t.startswith("*") or (strides_aligned and (n.startswith("stride_") or n in extra))}
    return replace(cfg, attrs=attrs, label=cfg.label + ("" if strides_aligned else " unaligned-strides"))


def ones(cfg: KernelConfig, names) -> KernelConfig:
    """``cfg`` with the int arguments ``names`` equal to 1, which Triton's launcher turns into constants
    (a launch on rows of width 1 has row strides of 1): the variant those launches compile."""
    names = tuple(names)
    return replace(cfg, ones=names, attrs={k: v for k, v in cfg.attrs.items() if k not in names},
                   label=f"{cfg.label} ones={','.join(names)}")


def variants(cfg: KernelConfig, unaligned: bool) -> list[KernelConfig]:
    """``cfg`` specialized with aligned strides, and with unaligned ones too when ``unaligned``."""
    return [specialized(cfg)] + ([specialized(cfg, strides_aligned=False)] if unaligned else [])


def _key(spec: dict) -> tuple:
    # (name, type, 16-aligned) per argument; a pointer's element type is left out: the compile
    # checks cover the dtypes by their own lists, this compares the specialisation.
    return tuple(sorted((n, "*" if t.startswith("*") else t, bool(a)) for n, (t, a) in spec.items()))


def assert_launches_compiled(launches: list, configs: list[KernelConfig]) -> None:
    """Every launch recorded by record_launches specialises as one of ``configs`` of its kernel."""
    compiled = {}
    for c in configs:
        compiled.setdefault(c.kernel, set()).add(
            _key({n: ("constexpr", False) if n in c.ones else (t, n in c.attrs)
                  for n, t in c.signature.items() if t != "constexpr"}))
    assert launches
    for fn, args, kwargs in launches:
        runtime = _key({n: (t, a == "D") for n, (t, a) in runtime_specialization(fn, args, kwargs).items()})
        options = compiled.get(fn.fn.__name__, set())
        assert runtime in options, (f"{fn.fn.__name__} launches a variant no compile check covers:\n  {runtime}\n"
                                    f"compiled:\n  " + "\n  ".join(map(str, options)))

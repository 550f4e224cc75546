"""Subprocess half of tests/aot.py: compile configurations, print one JSON line of reports."""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def _one(cfg: dict, cc: int) -> dict:
    label = cfg["label"] or f"{cfg['kernel']}{cfg['constexprs']}"
    rep = {"label": label, "cc": cc, "ok": False}
    try:
        fn = getattr(importlib.import_module(cfg["module"]), cfg["kernel"])
        attrs = {(fn.arg_names.index(name),): a for name, a in cfg.get("attrs", {}).items()}
        signature, constexprs = dict(cfg["signature"]), dict(cfg["constexprs"])
        for name in cfg.get("ones", ()):  # an int the launcher specialised to the constant 1
            signature[name], constexprs[name] = "constexpr", 1
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                                    **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {})})
    except Exception as exc:  # the report carries the compiler's message
        rep["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        return rep
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)", usage)
    rep.update(
        ok=True,
        registers=int(m.group(1)) if m else -1,
        shared=int(k.metadata.shared),
        local_ld_st=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
    )
    return rep


def main() -> None:
    job = json.loads(sys.stdin.read())
    reports = [_one(cfg, cc) for cfg in job["configs"] for cc in job["ccs"]]
    print(json.dumps(reports))


if __name__ == "__main__":
    main()

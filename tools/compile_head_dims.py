"""Compile every shipped attention configuration at every head dim it serves below its tile width.

tests/kernels/test_attention_compile.py compiles each entry at a full and at one padded head dim (40, 96,
160) to keep CI short; this sweep covers the rest, as a check before changing the kernels or the tile
tables: every padded multiple of 8 of each 16-bit entry's head-dim group (fp16 and bf16 alternating) and
the fp32 entries at 24, 40, 72, 104, 136, 200 and 248 (head dims that are not a multiple of 8 run as the
next one: kernels/attention.py, kernel_head_dim).  Same variant and specialization as the test (band, key
padding and dropout; aligned pointers and strides).  About 10 minutes per target on two cores.

    python tools/compile_head_dims.py [sm80|sm90 ...]

Prints one line per configuration; exits 1 if any fails to compile, spills registers or needs more
shared memory than its target class allows.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leedl_fast.kernels.attention import _head_dim_group, block_d_for, kernel_head_dim, launch_configs  # noqa: E402
from tests.aot import SHARED_LIMIT, compile_many  # noqa: E402
from tests.kernels.test_attention_compile import _kernel_config  # noqa: E402

FP32_HEAD_DIMS = (24, 40, 72, 104, 136, 200, 248)


def configs(arch: str) -> list:
    out = []
    for c in launch_configs():
        if c["arch"] != arch or c["serves"] == "full":
            continue
        if c["dtype"] == "32":
            dims = FP32_HEAD_DIMS
        else:
            dims = [d for d in range(24, 257, 8) if kernel_head_dim(d) < block_d_for(d)
                    and _head_dim_group(block_d_for(d)) == c["block_d"]]
        for i, d in enumerate(dims):
            dt = "fp32" if c["dtype"] == "32" else ("fp16", "bf16")[i % 2]
            variant = "dense" if "preprocess" in c["kernel"] else "dropout"
            k = _kernel_config(dict(c, block_d=block_d_for(d)), dt, d, variant)
            out.append(k)
    return out


def main(archs) -> int:
    bad = 0
    for arch in archs:
        cfgs = configs(arch)
        cc = int(arch[2:])
        print(f"{arch}: {len(cfgs)} configurations", flush=True)
        for cfg, r in zip(cfgs, compile_many(cfgs, ccs=(cc,), timeout=5000)):
            ok = r.ok and r.local_ld_st == 0 and r.shared <= SHARED_LIMIT[cc] and 0 < r.registers <= 255
            bad += not ok
            print(("ok   " if ok else "FAIL ") + str(r), flush=True)
    print(f"{bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["sm80", "sm90"]))

"""Every shipped softmax configuration compiles for sm_80 and sm_90 without spilling."""
import pytest

from tests.aot import KernelConfig, compile_many

pytest.importorskip("triton")

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _configs():
    from leedl_fast.kernels.softmax import MAX_FUSED_COLS, launch_config

    out = []
    for n_cols in (64, 1000, 4096, MAX_FUSED_COLS, MAX_FUSED_COLS + 1):
        for dt in ("fp32", "bf16"):
            fwd = launch_config(n_cols)
            out.append(KernelConfig(
                "leedl_fast.kernels.softmax", "_softmax_fwd_kernel",
                {"x_ptr": _DT[dt], "y_ptr": _DT[dt], "stride_xm": "i32", "stride_ym": "i32", "n_cols": "i32",
                 "BLOCK_N": "constexpr", "ONE_PASS": "constexpr"},
                {"BLOCK_N": fwd["BLOCK_N"], "ONE_PASS": fwd["ONE_PASS"]}, num_warps=fwd["num_warps"],
                label=f"fwd n={n_cols} {dt}"))
            bwd = launch_config(n_cols, backward=True)
            out.append(KernelConfig(
                "leedl_fast.kernels.softmax", "_softmax_bwd_kernel",
                {"y_ptr": _DT[dt], "dy_ptr": _DT[dt], "dx_ptr": _DT[dt], "stride_ym": "i32", "stride_dym": "i32",
                 "stride_dxm": "i32", "n_cols": "i32", "BLOCK_N": "constexpr", "ONE_PASS": "constexpr"},
                {"BLOCK_N": bwd["BLOCK_N"], "ONE_PASS": bwd["ONE_PASS"]}, num_warps=bwd["num_warps"],
                label=f"bwd n={n_cols} {dt}"))
    return out


@pytest.fixture(scope="module")
def reports():
    return compile_many(_configs())


def test_compiles_without_spills(reports):
    assert len(reports) == 2 * len(_configs())
    for r in reports:
        assert r.ok, str(r)
        assert r.local_ld_st == 0, f"register spills: {r}"
        assert 0 < r.registers <= 255, str(r)

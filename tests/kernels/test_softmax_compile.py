"""Every shipped softmax configuration compiles for sm_80 and sm_90 without spilling.

Each is compiled as Triton specialises a launch on rows whose width is a multiple of 16 (every
pointer and stride 16-aligned); the widest one-pass rows and the looped rows, which hold the most
registers, are compiled with unaligned strides (other widths) too, and rows of width 1 with their
row strides the constant 1 (Triton specialises an int equal to 1).  The last test checks, with
Triton's own binder, that the launchers' arguments specialise as one of these.
"""
import pytest

from tests.aot import (SHARED_LIMIT, KernelConfig, assert_launches_compiled, compile_many, ones, record_launches,
                       specialized, variants)

pytest.importorskip("triton")

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _fwd(n_cols, dt):
    from leedl_fast.kernels.softmax import launch_config

    fwd = launch_config(n_cols)
    return KernelConfig(
        "leedl_fast.kernels.softmax", "_softmax_fwd_kernel",
        {"x_ptr": _DT[dt], "y_ptr": _DT[dt], "stride_xm": "i32", "stride_ym": "i32", "n_cols": "i32",
         "BLOCK_N": "constexpr", "ONE_PASS": "constexpr"},
        {"BLOCK_N": fwd["BLOCK_N"], "ONE_PASS": fwd["ONE_PASS"]}, num_warps=fwd["num_warps"],
        label=f"fwd n={n_cols} {dt}")


def _bwd(n_cols, dt):
    from leedl_fast.kernels.softmax import launch_config

    bwd = launch_config(n_cols, backward=True)
    return KernelConfig(
        "leedl_fast.kernels.softmax", "_softmax_bwd_kernel",
        {"y_ptr": _DT[dt], "dy_ptr": _DT[dt], "dx_ptr": _DT[dt], "stride_ym": "i32", "stride_dym": "i32",
         "stride_dxm": "i32", "n_cols": "i32", "BLOCK_N": "constexpr", "ONE_PASS": "constexpr"},
        {"BLOCK_N": bwd["BLOCK_N"], "ONE_PASS": bwd["ONE_PASS"]}, num_warps=bwd["num_warps"],
        label=f"bwd n={n_cols} {dt}")


def _configs():
    from leedl_fast.kernels.softmax import MAX_FUSED_COLS

    out = []
    odd_widths = (MAX_FUSED_COLS, MAX_FUSED_COLS + 1)  # the most registers: the widest one-pass rows; looped
    for n_cols in (64, 1000, 4096, MAX_FUSED_COLS, MAX_FUSED_COLS + 1):
        for dt in ("fp32", "bf16"):
            odd = n_cols in odd_widths
            out += variants(_fwd(n_cols, dt), unaligned=odd)
            out += variants(_bwd(n_cols, dt), unaligned=odd)
    # Rows of width 1, contiguous: every row stride is 1, which the launcher makes a constant.
    out.append(ones(specialized(_fwd(1, "fp32")), ("stride_xm", "stride_ym")))
    out.append(ones(specialized(_bwd(1, "fp32")), ("stride_ym", "stride_dym", "stride_dxm")))
    return out


@pytest.fixture(scope="module")
def reports():
    return compile_many(_configs())


def test_compiles_without_spills(reports):
    assert len(reports) == 2 * len(_configs())
    for r in reports:
        assert r.ok, str(r)
        assert r.local_ld_st == 0, f"register spills: {r}"
        assert r.shared <= SHARED_LIMIT[r.cc], f"shared memory over {SHARED_LIMIT[r.cc]} B: {r}"
        assert 0 < r.registers <= 255, str(r)


@pytest.mark.parametrize("shape,dtype", [((3, 1000), "float32"), ((1, 1024), "bfloat16"), ((2, 16385), "float32"),
                                         ((5, 2, 48), "float16"), ((7, 1), "float32")])
def test_launches_use_a_compiled_specialization(monkeypatch, triton_path, shape, dtype):
    """Through the op, forward and backward, on contiguous rows and on views at odd offsets into
    wider rows (which ``as_rows`` copies)."""
    import torch

    import leedl_fast.kernels.softmax as S
    from leedl_fast.ops import softmax

    launches = record_launches(monkeypatch, S, ("_softmax_fwd_kernel", "_softmax_bwd_kernel"))
    wide = torch.randn(*shape[:-1], shape[-1] + 7, device=triton_path).to(getattr(torch, dtype))
    for x in (wide[..., :shape[-1]].contiguous(), wide[..., 3:3 + shape[-1]], wide[..., :shape[-1]]):
        x.requires_grad_(True)
        softmax(x, dim=-1).backward(torch.ones_like(x))
    assert len(launches) == 6
    assert_launches_compiled(launches, _configs())

"""Every shipped dropout_add_layer_norm configuration compiles for sm_80 and sm_90 without spilling.

The configurations with every option on (residual, weight, bias, dropout, stored h / incoming h
gradient) carry the most live registers; the all-off ones are the smallest.  Row widths from one
small block to the 8192-wide forward and the looped backward, fp16,
bf16 and fp32.  Each is compiled as Triton specialises a launch on rows whose width is a multiple of
16 (every pointer and stride 16-aligned), some also with unaligned strides (other widths), and rows
of width 1 with their row strides the constant 1 (Triton specialises an int equal to 1); the last
test checks with Triton's own binder that the op's launches specialise as one of these.
"""
import pytest

from tests.aot import (SHARED_LIMIT, KernelConfig, assert_launches_compiled, compile_many, ones, record_launches,
                       specialized, variants)

pytest.importorskip("triton")

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_MOD = "leedl_fast.kernels.layer_norm"
_WIDTHS = (80, 1024, 4096, 8192)


def _fwd(n_cols, dt, on):
    from leedl_fast.kernels.layer_norm import launch_config

    cfg = launch_config(n_cols)
    sig = {k: _DT[dt] for k in ("x_ptr", "res_ptr", "w_ptr", "b_ptr", "y_ptr", "h_ptr")}
    sig.update(mean_ptr="*fp32", rstd_ptr="*fp32", stride_xm="i32", stride_rm="i32", stride_ym="i32",
               stride_hm="i32", n_cols="i32", eps="fp32", dropout_threshold="i32", dropout_scale="fp32", seed="i64")
    ce = {"BLOCK_C": cfg["BLOCK_C"], "HAS_RESIDUAL": on, "HAS_WEIGHT": on, "HAS_BIAS": on, "HAS_DROPOUT": on,
          "STORE_H": on}
    sig.update({k: "constexpr" for k in ce})
    return KernelConfig(_MOD, "_dropout_add_layer_norm_fwd_kernel", sig, ce, num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"],
                        label=f"fwd C={n_cols} {dt} options={'on' if on else 'off'}")


def _bwd(n_cols, dt, on):
    from leedl_fast.kernels.layer_norm import launch_config

    cfg = launch_config(n_cols, backward=True)
    sig = {k: _DT[dt] for k in ("dy_ptr", "dhin_ptr", "h_ptr", "w_ptr", "dx_ptr", "dres_ptr")}
    sig.update(mean_ptr="*fp32", rstd_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", stride_dym="i32",
               stride_dhm="i32", stride_hm="i32", stride_dxm="i32", stride_drm="i32", n_rows="i32", n_cols="i32",
               rows_per_program="i32", dropout_threshold="i32", dropout_scale="fp32", seed="i64")
    ce = {"BLOCK_C": cfg["BLOCK_C"], "LOOPED": cfg["LOOPED"], "HAS_DH_IN": on, "HAS_RESIDUAL": on,
          "HAS_WEIGHT": on, "HAS_BIAS": on, "HAS_DROPOUT": on}
    sig.update({k: "constexpr" for k in ce})
    return KernelConfig(_MOD, "_dropout_add_layer_norm_bwd_kernel", sig, ce, num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"],
                        label=f"bwd C={n_cols} {dt} options={'on' if on else 'off'}")


def _configs():
    # fp16 has bf16's register profile; it is compiled at two widths to keep this test short.
    specs = []  # (n_cols, dtype, every option on)
    for n_cols in _WIDTHS:
        for dt in ("fp32", "bf16") + (("fp16",) if n_cols in (1024, 8192) else ()):
            specs.append((n_cols, dt, True))
    specs += [(80, "bf16", False), (8192, "bf16", False)]  # every option off: the smallest variants
    out = []
    for n_cols, dt, on in specs:
        # Rows whose width is not a multiple of 16 have unaligned strides: compiled at the widest rows,
        # every option on (the most live registers).
        odd = on and n_cols == 8192 and dt != "fp16"
        out += variants(_fwd(n_cols, dt, on), unaligned=odd)
        out += variants(_bwd(n_cols, dt, on), unaligned=odd)
    # Rows of width 1 (contiguous, as_rows makes them so): the row strides are 1, constants to Triton;
    # an absent tensor's stride is 0 (the forward without h stored, the backward without dh_in).
    fwd_ones = ("stride_xm", "stride_rm", "stride_ym")
    out.append(ones(specialized(_fwd(1, "fp32", True)), fwd_ones + ("stride_hm",)))
    out.append(ones(specialized(_fwd(1, "fp32", True)), fwd_ones))
    bwd_ones = ("stride_dym", "stride_hm", "stride_dxm", "stride_drm")
    out.append(ones(specialized(_bwd(1, "fp32", True)), bwd_ones))
    out.append(ones(specialized(_bwd(1, "fp32", True)), bwd_ones + ("stride_dhm",)))  # with an h gradient in
    return out


@pytest.fixture(scope="module")
def reports():
    return compile_many(_configs())


def test_launch_table():
    from leedl_fast.kernels.layer_norm import BWD_MAX_BLOCK, MAX_COLS, launch_config

    assert launch_config(MAX_COLS)["BLOCK_C"] == MAX_COLS
    big = launch_config(MAX_COLS, backward=True)
    assert big["LOOPED"] and big["BLOCK_C"] <= BWD_MAX_BLOCK
    assert not launch_config(BWD_MAX_BLOCK, backward=True)["LOOPED"]
    assert launch_config(257)["BLOCK_C"] == 512


def test_compiles_without_spills(reports):
    assert len(reports) == 2 * len(_configs())
    for r in reports:
        assert r.ok, str(r)
        assert r.local_ld_st == 0, f"register spills: {r}"
        assert r.shared <= SHARED_LIMIT[r.cc], f"shared memory over {SHARED_LIMIT[r.cc]} B: {r}"
        assert 0 < r.registers <= 255, str(r)


@pytest.mark.parametrize("shape,dtype", [((3, 5, 1000), "float32"), ((2, 1024), "bfloat16"), ((4, 80), "float16"),
                                         ((6, 1), "float32")])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_launches_use_a_compiled_specialization(monkeypatch, triton_path, shape, dtype, dropout_p):
    """Through the op, forward and backward, with the residual, weight and bias as contiguous rows and
    as views at odd offsets (which ``as_rows`` copies); small and large seeds."""
    import torch

    import leedl_fast.kernels.layer_norm as L
    from leedl_fast.ops import dropout_add_layer_norm

    launches = record_launches(monkeypatch, L, ("_dropout_add_layer_norm_fwd_kernel",
                                                "_dropout_add_layer_norm_bwd_kernel"))
    dt, c = getattr(torch, dtype), shape[-1]
    wide = torch.randn(*shape[:-1], c + 7, device=triton_path).to(dt)
    params = torch.randn(2 * c + 3, device=triton_path).to(dt)
    for offset, seed in ((0, 1), (3, 2**40)):
        x = wide[..., offset:offset + c].detach().requires_grad_(True)
        res = wide[..., offset:offset + c].detach().requires_grad_(True)
        w = params[offset:offset + c].detach().requires_grad_(True)
        b = params[offset + c:offset + 2 * c].detach().requires_grad_(True)
        y = dropout_add_layer_norm(x, res, w, b, dropout_p=dropout_p, seed=seed)
        y.backward(torch.ones_like(y))
    assert len(launches) == 4
    assert_launches_compiled(launches, _configs())

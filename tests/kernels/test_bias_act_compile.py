"""The bias + activation + dropout kernels compile for sm_80 and sm_90 without register spills.

Shipped configurations: one tile shape per row width (launch_config: BLOCK_N = 16, 32, 64 or 128
columns) times each activation, bias or not, dropout or not, fp16 / bf16 / fp32 storage: 240
combinations, too many to compile in CI.  Compiled here, forward and backward: every activation
with bias and dropout in bf16 at the Transformer's width (the heaviest variants: Philox plus the
activation and its derivative), and a sample in which every tile shape, flag value and dtype
appears at least once.  Each is compiled as Triton specialises a launch on rows whose width is a
multiple of 16 (every pointer and stride 16-aligned), and three (odd widths 5 and 30, and gelu_tanh,
the most registers, at 4096) also with unaligned strides, and rows of width 1 with their row strides
the constant 1 (Triton specialises an int equal to 1); the last test checks with Triton's own
binder that the op's launches specialise as one of these.
"""
import pytest

from tests.aot import (SHARED_LIMIT, KernelConfig, assert_launches_compiled, compile_many, ones, record_launches,
                       specialized, variants)

pytest.importorskip("triton")

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _fwd_signature(dt: str) -> dict:
    p = _DT[dt]
    return {"x_ptr": p, "b_ptr": p, "y_ptr": p, "stride_xm": "i32", "stride_ym": "i32",
            "n_rows": "i32", "n_cols": "i32", "n_col_blocks": "i32", "seed": "i64", "threshold": "i32", "keep_scale": "fp32",
            "ACT": "constexpr", "HAS_BIAS": "constexpr", "HAS_DROPOUT": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}


def _bwd_signature(dt: str) -> dict:
    p = _DT[dt]
    return {"dy_ptr": p, "x_ptr": p, "b_ptr": p, "dx_ptr": p, "dbias_partial_ptr": "*fp32",
            "stride_dym": "i32", "stride_xm": "i32", "stride_dxm": "i32",
            "n_rows": "i32", "n_cols": "i32", "n_col_blocks": "i32", "seed": "i64", "threshold": "i32", "keep_scale": "fp32",
            "ACT": "constexpr", "HAS_BIAS": "constexpr", "HAS_DROPOUT": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}


def _variants():
    from leedl_fast.kernels.bias_act import ACTIVATIONS

    out = []  # (n_cols, activation, has_bias, has_dropout, dtype)
    for act in ACTIVATIONS:
        out.append((4096, act, True, True, "bf16"))
    out += [
        (4096, "gelu", True, True, "fp32"),
        (5, "relu", True, True, "fp32"),
        (30, "gelu", False, True, "bf16"),
        (64, "relu", False, False, "fp16"),
    ]
    return out


def _configs():
    from leedl_fast.kernels.bias_act import ACTIVATIONS, launch_config

    out = []
    for n_cols, act, has_bias, has_dropout, dt in _variants():
        cfg = launch_config(n_cols)
        const = {"ACT": ACTIVATIONS[act], "HAS_BIAS": has_bias, "HAS_DROPOUT": has_dropout,
                 "BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
        tag = f"C={n_cols} {act} bias={has_bias} dropout={has_dropout} {dt}"
        odd = (n_cols, act) in ((5, "relu"), (30, "gelu"), (4096, "gelu_tanh"))
        out += variants(KernelConfig("leedl_fast.kernels.bias_act", "_bias_act_fwd_kernel", _fwd_signature(dt), const,
                                     num_warps=cfg["num_warps"], label=f"fwd {tag}"), unaligned=odd)
        out += variants(KernelConfig("leedl_fast.kernels.bias_act", "_bias_act_bwd_kernel", _bwd_signature(dt), const,
                                     num_warps=cfg["num_warps"], label=f"bwd {tag}"), unaligned=odd)
    # Rows of width 1 (contiguous, as_rows makes them so): every row stride is 1, a constant to Triton.
    cfg = launch_config(1)
    const = {"ACT": ACTIVATIONS["gelu"], "HAS_BIAS": True, "HAS_DROPOUT": True, "BLOCK_M": cfg["BLOCK_M"],
             "BLOCK_N": cfg["BLOCK_N"]}
    out.append(ones(specialized(KernelConfig("leedl_fast.kernels.bias_act", "_bias_act_fwd_kernel",
                                             _fwd_signature("fp32"), const, num_warps=cfg["num_warps"],
                                             label="fwd C=1 gelu fp32")), ("stride_xm", "stride_ym")))
    out.append(ones(specialized(KernelConfig("leedl_fast.kernels.bias_act", "_bias_act_bwd_kernel",
                                             _bwd_signature("fp32"), const, num_warps=cfg["num_warps"],
                                             label="bwd C=1 gelu fp32")), ("stride_dym", "stride_xm", "stride_dxm")))
    return out


def test_every_tile_shape_is_covered():
    from leedl_fast.kernels.bias_act import launch_config

    shipped = {(launch_config(n)["BLOCK_M"], launch_config(n)["BLOCK_N"]) for n in range(1, 5000)}
    covered = {(launch_config(n)["BLOCK_M"], launch_config(n)["BLOCK_N"]) for n, *_ in _variants()}
    assert shipped == covered


@pytest.fixture(scope="module")
def reports():
    return compile_many(_configs())


def test_compiles_without_spills(reports):
    assert len(reports) == 2 * len(_configs())
    for r in reports:
        assert r.ok, str(r)
        assert r.local_ld_st == 0, f"register spills: {r}"
        assert r.shared <= SHARED_LIMIT[r.cc], f"shared memory over {SHARED_LIMIT[r.cc]} B: {r}"
        assert 0 < r.registers <= 128, str(r)  # an elementwise kernel: leave room for occupancy


@pytest.mark.parametrize("shape,dtype", [((3, 5, 1000), "float32"), ((2, 4096), "bfloat16"), ((4, 30), "float16"),
                                         ((9, 1), "float32")])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_launches_use_a_compiled_specialization(monkeypatch, triton_path, shape, dtype, dropout_p):
    """Through the op, forward and backward, on contiguous rows and on views at odd offsets (which
    ``as_rows`` copies), with and without bias; small and large seeds."""
    import torch

    import leedl_fast.kernels.bias_act as K
    from leedl_fast.ops import bias_act_dropout

    launches = record_launches(monkeypatch, K, ("_bias_act_fwd_kernel", "_bias_act_bwd_kernel"))
    dt, c = getattr(torch, dtype), shape[-1]
    wide = torch.randn(*shape[:-1], c + 7, device=triton_path).to(dt)
    params = torch.randn(c + 3, device=triton_path).to(dt)
    for offset, seed, with_bias in ((0, 1, True), (3, 2**40, True), (0, 16, False)):
        x = wide[..., offset:offset + c].detach().requires_grad_(True)
        b = params[offset:offset + c].detach().requires_grad_(True) if with_bias else None
        y = bias_act_dropout(x, b, activation="gelu", dropout_p=dropout_p, seed=seed)
        y.backward(torch.ones_like(y))
    assert len(launches) == 6
    assert_launches_compiled(launches, _configs())

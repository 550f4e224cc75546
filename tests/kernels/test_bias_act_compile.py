"""The bias + activation + dropout kernels compile for sm_80 and sm_90 without register spills.

Shipped configurations: one tile shape per row width (launch_config: BLOCK_N = 16, 32, 64 or 128
columns) times each activation, bias or not, dropout or not, fp16 / bf16 / fp32 storage: 240
combinations, too many to compile in CI.  Compiled here, forward and backward: every activation
with bias and dropout in bf16 at the Transformer's width (the heaviest variants: Philox plus the
activation and its derivative), and a sample in which every tile shape, flag value and dtype
appears at least once.
"""
import pytest

from tests.aot import KernelConfig, compile_many

pytest.importorskip("triton")

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _fwd_signature(dt: str) -> dict:
    p = _DT[dt]
    return {"x_ptr": p, "b_ptr": p, "y_ptr": p, "stride_xm": "i32", "stride_ym": "i32",
            "n_rows": "i32", "n_cols": "i32", "n_col_blocks": "i32", "seed": "i64", "p": "fp32", "keep_scale": "fp32",
            "ACT": "constexpr", "HAS_BIAS": "constexpr", "HAS_DROPOUT": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}


def _bwd_signature(dt: str) -> dict:
    p = _DT[dt]
    return {"dy_ptr": p, "x_ptr": p, "b_ptr": p, "dx_ptr": p, "dbias_partial_ptr": "*fp32",
            "stride_dym": "i32", "stride_xm": "i32", "stride_dxm": "i32",
            "n_rows": "i32", "n_cols": "i32", "n_col_blocks": "i32", "seed": "i64", "p": "fp32", "keep_scale": "fp32",
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
        out.append(KernelConfig("leedl_fast.kernels.bias_act", "_bias_act_fwd_kernel", _fwd_signature(dt), const,
                                num_warps=cfg["num_warps"], label=f"fwd {tag}"))
        out.append(KernelConfig("leedl_fast.kernels.bias_act", "_bias_act_bwd_kernel", _bwd_signature(dt), const,
                                num_warps=cfg["num_warps"], label=f"bwd {tag}"))
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
        assert 0 < r.registers <= 128, str(r)  # an elementwise kernel: leave room for occupancy

"""The noising kernel compiles for sm_80 and sm_90 in every mode, noise source, target, clip flag and
storage dtype (each value of each flag at least once), without register spills.

The noise's Box-Muller takes libdevice's cosf and sinf, whose slow path (Payne-Hanek reduction of huge
arguments, never taken for Box-Muller's angles in [0, 2 pi)) keeps a 28-byte array in local memory: a
kernel that only stores the noise helper's normals (``_normals``), compiled in the same batch, measures
those LDL/STL, and a variant that draws noise may have exactly that many, any other variant none.

Each variant is compiled as Triton specialises a launch on samples whose size is a multiple of 16
(every pointer 16-byte aligned and per_sample divisible by 16: aligned vector loads), and the
variants that draw noise also on samples of other sizes (per_sample unspecialised) and on samples of one
element (per_sample the constant 1, as Triton specialises an int equal to 1); the last test checks with
Triton's own binder that the
ops' launches specialise as one of these.
"""
from dataclasses import replace

import pytest
import triton
import triton.language as tl

from leedl_fast.kernels.noising import _normals
from tests.aot import (SHARED_LIMIT, KernelConfig, assert_launches_compiled, compile_many, ones, record_launches,
                       specialized)

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


@triton.jit
def _normals_only_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _normals(seed, tl.program_id(0).to(tl.int64) * (BLOCK // 4), 0, BLOCK), mask=offs < n)


def _signature(dt: str, out_dt: str | None = None) -> dict:
    p, o = _DT[dt], _DT[out_dt or dt]
    return {"x_ptr": p, "m_ptr": p, "noise_ptr": p, "out_ptr": o, "eps_out_ptr": o,
            "t_ptr": "*i64", "ac_ptr": "*fp32", "coef_ptr": "*fp32", "grad_ptr": "*fp32",
            "per_sample": "i32", "n_chunks": "i32", "n_timesteps": "i32", "seed": "i64", "clip_range": "fp32", "grad_scale": "fp32",
            "MODE": "constexpr", "NOISE": "constexpr", "TARGET": "constexpr", "CLIP": "constexpr",
            "BLOCK": "constexpr"}


def _variants():
    from leedl_fast.kernels import noising as K

    D, L, N0 = K.NOISE_DRAW, K.NOISE_LOAD, K.NOISE_NONE
    T = K.TARGETS
    # (label, MODE, NOISE, TARGET, CLIP, dtype)
    return [
        ("q_sample draw", K.MODE_Q_SAMPLE, D, 0, False, "fp32"),
        ("q_sample draw", K.MODE_Q_SAMPLE, D, 0, False, "bf16"),
        ("q_sample load", K.MODE_Q_SAMPLE, L, 0, False, "fp16"),
        ("loss fwd v draw", K.MODE_LOSS_FWD, D, T["v_prediction"], False, "fp32"),
        ("loss fwd eps load", K.MODE_LOSS_FWD, L, T["epsilon"], False, "bf16"),
        ("loss fwd sample", K.MODE_LOSS_FWD, N0, T["sample"], False, "fp32"),
        ("loss bwd eps draw", K.MODE_LOSS_BWD, D, T["epsilon"], False, "bf16"),
        ("loss bwd v load", K.MODE_LOSS_BWD, L, T["v_prediction"], False, "fp32"),
        ("step clip draw", K.MODE_STEP, D, 0, True, "fp32"),
        ("step noclip none", K.MODE_STEP, N0, 0, False, "bf16"),
        ("step clip load", K.MODE_STEP, L, 0, True, "fp16"),
    ]


def _configs():
    from leedl_fast.kernels import noising as K

    out = [KernelConfig("tests.kernels.test_noising_compile", "_normals_only_kernel",
                        {"out_ptr": "*fp32", "seed": "i64", "n": "i64", "BLOCK": "constexpr"}, {"BLOCK": K.BLOCK},
                        num_warps=K.NUM_WARPS, maxnreg=K.MAXNREG, label="normals only")]
    for label, mode, noise, target, clip, dt in _variants():
        cfg = KernelConfig(
            "leedl_fast.kernels.noising", "_noising_kernel",
            _signature(dt, "fp32" if mode == K.MODE_LOSS_FWD else None),
            {"MODE": mode, "NOISE": noise, "TARGET": target, "CLIP": clip, "BLOCK": K.BLOCK},
            num_warps=K.NUM_WARPS, maxnreg=K.MAXNREG, label=f"{label} {dt}")
        out.append(specialized(cfg, extra=("per_sample",)))
        if noise == K.NOISE_DRAW:  # the most registers (Philox, Box-Muller)
            out.append(replace(specialized(cfg, strides_aligned=False), label=f"{label} {dt} odd per_sample"))
            # samples of one element: Triton makes per_sample == 1 a constant
            out.append(ones(specialized(cfg), ("per_sample",)))
    return out


@pytest.fixture(scope="module")
def reports():
    return compile_many(_configs())


def test_compiles_without_spills(reports):
    from leedl_fast.kernels import noising as K

    configs = _configs()
    assert len(reports) == 2 * len(configs)
    for r in reports:
        assert r.ok, str(r)
    baseline = {r.cc: r.local_ld_st for r in reports if r.label == "normals only"}
    draws = {f"{label} {dt}" for label, _, noise, *_, dt in _variants() if noise == K.NOISE_DRAW}
    for r in reports:
        if r.label == "normals only":
            continue
        allowed = baseline[r.cc] if r.label.split(" odd per_sample")[0].split(" ones=")[0] in draws else 0
        assert r.local_ld_st == allowed, f"local memory beyond the normals' own ({allowed}): {r}"
        assert 0 < r.registers <= 128, str(r)  # an elementwise kernel: leave room for occupancy
        assert r.shared <= SHARED_LIMIT[r.cc], f"shared memory over {SHARED_LIMIT[r.cc]} B: {r}"


@pytest.mark.parametrize("shape,dtype", [((3, 3, 5, 7), "float32"), ((2, 1, 8, 8), "bfloat16"), ((4, 48), "float16"),
                                         ((5,), "float32")])
def test_launches_use_a_compiled_specialization(monkeypatch, triton_path, shape, dtype):
    """Through the ops: q_sample drawing and given noise, the loss forward and backward, a DDPM step;
    on contiguous tensors and on views at an odd offset (which ``as_dense`` copies); small and large
    seeds."""
    import torch

    import leedl_fast.kernels.noising as K
    from leedl_fast.diffusion import NoiseSchedule
    from leedl_fast.ops import ddpm_step, noise_prediction_loss, q_sample

    launches = record_launches(monkeypatch, K, ("_noising_kernel",))
    dt = getattr(torch, dtype)
    ac = NoiseSchedule(num_train_timesteps=50).alphas_cumprod.to(triton_path)
    n = torch.Size(shape).numel()
    buf = torch.randn(2 * n + 1, device=triton_path).to(dt)
    t = torch.randint(0, 50, (shape[0],), device=triton_path)
    for x0, noise, seed in ((buf[:n].view(shape), buf[n:2 * n].view(shape), 1), (buf[1:n + 1].view(shape), None, 2**40)):
        q_sample(x0, t, ac, noise)
        q_sample(x0, t, ac, seed=seed)
        pred = x0.detach().clone().requires_grad_(True)
        noise_prediction_loss(pred, x0, t, ac, seed=seed, target="v_prediction").backward()
        ddpm_step(x0, 10, x0, ac, noise=noise, seed=None if noise is not None else seed)
    assert len(launches) == 10
    assert_launches_compiled(launches, _configs())


def test_clip_propagates_nan_in_compiled_code():
    """The reverse step's clip of x0 keeps a NaN NaN, as the torch path's ``clamp`` (and diffusers')
    does.  ``tl.maximum``/``tl.minimum`` default to ``arith.maxnumf``/``minnumf``, which the GPU runs
    as PTX ``max.f32``/``min.f32``: they return the operand that is not NaN, so a NaN prediction came
    out as -clip_range, a finite sample hiding a diverged model.  The interpreter runs both as
    ``np.maximum``, NaN-propagating, so only the compiled code shows it: here the clip variant must use
    the NaN-propagating forms (``arith.maximumf``/``minimumf``, PTX ``max.NaN.f32``/``min.NaN.f32``)."""
    from leedl_fast.kernels import noising as K
    from tests.kernels._asm import compile_asm

    cfg = specialized(KernelConfig(
        "leedl_fast.kernels.noising", "_noising_kernel", _signature("fp32"),
        {"MODE": K.MODE_STEP, "NOISE": K.NOISE_NONE, "TARGET": 0, "CLIP": True, "BLOCK": K.BLOCK},
        num_warps=K.NUM_WARPS, maxnreg=K.MAXNREG, label="step clip none fp32"), extra=("per_sample",))
    asm = compile_asm(cfg, cc=90)
    assert "arith.maxnumf" not in asm["ttgir"] and "arith.minnumf" not in asm["ttgir"], "a NaN-dropping clip"
    assert "arith.maximumf" in asm["ttgir"] and "arith.minimumf" in asm["ttgir"]
    assert "max.NaN.f32" in asm["ptx"] and "min.NaN.f32" in asm["ptx"]


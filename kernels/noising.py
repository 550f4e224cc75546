"""Fused diffusion noising: forward process, noise-prediction loss (forward and backward), reverse steps.

One elementwise kernel, ``_noising_kernel``, with the variant chosen by constexpr
flags.  Every variant walks the same index space: ``B`` samples of ``per_sample``
contiguous elements; element ``j`` of sample ``b`` draws its noise from Philox
(``_normals``: four normals per call, the numbers ``leedl_fast.random.normal_rows`` gives
on the torch path), so the noise is made in registers and, in the loss, regenerated
rather than stored.

MODE_Q_SAMPLE   (Ho et al. 2020, eq. 4)   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  writes x_t (and eps if drawn)
MODE_LOSS_FWD   partial sums of (pred - target)^2 per program, target = cx x0 + ce eps:
                    epsilon: (0, 1);  v_prediction (Salimans & Ho 2022): (-sqrt(1-abar), sqrt(abar));  sample: (1, 0)
MODE_LOSS_BWD   dpred = g * scale * (pred - target), with g read from memory (no host sync) and scale = 2 / N
MODE_STEP       x_prev = c2 clip(c0 x + c1 m) + c3 x + c4 m + c5 z: one reverse step of DDPM (Ho et al. 2020,
                eqs. 7 and 15) or DDIM (Song et al. 2021, eq. 12) with the step's six coefficients precomputed
                (``leedl_fast.ops.noising`` folds prediction type, posterior mean and variance into them).

Per-sample coefficients (q_sample, loss) are computed in the kernel from ``t`` and
``alphas_cumprod`` with correctly rounded fp32 square roots, so no extra launch
precedes the kernel and the values equal diffusers' ``alphas_cumprod[t] ** 0.5``.
All math is fp32 whatever the storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE_Q_SAMPLE = 0
MODE_LOSS_FWD = 1
MODE_LOSS_BWD = 2
MODE_STEP = 3

NOISE_NONE = 0  # the variant uses no noise
NOISE_LOAD = 1  # noise read from noise_ptr
NOISE_DRAW = 2  # noise drawn in registers: _normals

TARGETS = {"epsilon": 0, "v_prediction": 1, "sample": 2}

BLOCK = 1024
NUM_WARPS = 4  # 8 elements per thread: two 16-byte fp32 vectors
# The register cap passed to ptxas.  Left to itself (no .maxnreg) it kept the bf16 q_sample on samples
# whose size is not a multiple of 16 at 32 registers and spilled (sm_80); with the cap stated it takes 40.
MAXNREG = 255
# Ints that Triton's launcher must not specialise: they only bound loops and index the schedule, or
# key Philox (the seed is always i64).  per_sample stays specialised: divisible by 16 it makes every
# sample's start aligned and the loads 16-byte vectors; tests/kernels compile-checks both variants.
RUNTIME_INTS = ["n_chunks", "n_timesteps", "seed"]


@triton.jit
def _normals(seed, row_counter, start, BLOCK: tl.constexpr):
    """Standard normals [BLOCK] of columns ``start + arange(BLOCK)`` (start % 4 == 0) of the row whose
    first counter is ``row_counter`` (r * ceil(n_cols / 4)): column j is normal j % 4 of
    ``tl.randn4x`` at counter row_counter + j // 4 (its words (w0, w1) and (w2, w3) make two
    Box-Muller pairs, cos then sin).  One Philox call per four normals: a call per element (tl.randn)
    costs about sixty integer instructions per element, more than these kernels' memory traffic at
    H100/H200 bandwidth."""
    tl.static_assert(BLOCK % 4 == 0, "_normals covers whole groups of 4 columns")
    n0, n1, n2, n3 = tl.randn4x(seed, row_counter + start // 4 + tl.arange(0, BLOCK // 4))  # [BLOCK / 4] each
    n = tl.join(tl.join(n0, n2), tl.join(n1, n3))                                    # [BLOCK / 4, 2, 2]: 2a + b
    return tl.reshape(n, [BLOCK])                                                    # [BLOCK]


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _noising_kernel(
    x_ptr, m_ptr, noise_ptr, out_ptr, eps_out_ptr,
    t_ptr, ac_ptr, coef_ptr, grad_ptr,
    per_sample, n_chunks, n_timesteps, seed: tl.int64, clip_range, grad_scale,
    MODE: tl.constexpr,
    NOISE: tl.constexpr,
    TARGET: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = pid // n_chunks                        # sample
    pid_c = pid % n_chunks                         # chunk within the sample
    offs_in = pid_c * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] index within the sample (per_sample < 2**31)
    mask = offs_in < per_sample
    offs = pid_b.to(tl.int64) * per_sample + offs_in  # [BLOCK] int64 flat index

    if NOISE == 2:
        # ceil(per_sample / 4) counters a sample, written so that it cannot overflow int32 near 2**31.
        eps = _normals(seed, pid_b.to(tl.int64) * ((per_sample - 1) // 4 + 1), pid_c * BLOCK, BLOCK)  # [BLOCK] fp32
    elif NOISE == 1:
        eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        eps = tl.zeros([BLOCK], tl.float32)

    if MODE == 3:
        # One reverse step: the six coefficients are shared by every element.
        c0 = tl.load(coef_ptr + 0)
        c1 = tl.load(coef_ptr + 1)
        c2 = tl.load(coef_ptr + 2)
        c3 = tl.load(coef_ptr + 3)
        c4 = tl.load(coef_ptr + 4)
        c5 = tl.load(coef_ptr + 5)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] x_t
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] model output
        x0 = c0 * x + c1 * m                                           # predicted x0
        if CLIP:
            # NaN stays NaN, as torch's clamp: the default (PropagateNan.NONE) compiles to PTX max.f32 /
            # min.f32, which return the operand that is not NaN (a NaN x0 became -clip_range on the GPU;
            # the interpreter's np.maximum propagates it either way).
            x0 = tl.minimum(tl.maximum(x0, -clip_range, propagate_nan=tl.PropagateNan.ALL), clip_range,
                            propagate_nan=tl.PropagateNan.ALL)
        y = c2 * x0 + c3 * x + c4 * m
        if NOISE != 0:
            y += c5 * eps
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # A timestep outside the schedule (checked on the host for CPU tensors; for CUDA tensors the check
        # would cost a sync) makes the sample's outputs NaN instead of reading out of bounds.
        t_b = tl.load(t_ptr + pid_b)
        valid = (t_b >= 0) & (t_b < n_timesteps)
        abar = tl.load(ac_ptr + tl.where(valid, t_b, 0)).to(tl.float32)  # scalar
        abar = tl.where(valid, abar, float("nan"))
        sa = tl.sqrt_rn(abar)
        sb = tl.sqrt_rn(1.0 - abar)
        if MODE == 0:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] x0
            y = sa * x + sb * eps
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
            if NOISE == 2:
                tl.store(eps_out_ptr + offs, eps.to(eps_out_ptr.dtype.element_ty), mask=mask)
        else:
            p = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK] prediction
            if TARGET == 0:
                target = eps
            elif TARGET == 1:
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                target = sa * eps - sb * x
            else:
                target = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, p - target, 0.0)                                # [BLOCK]
            if MODE == 1:
                tl.store(out_ptr + pid, tl.sum(d * d, axis=0))
            else:
                g = tl.load(grad_ptr).to(tl.float32) * grad_scale
                tl.store(out_ptr + offs, (g * d).to(out_ptr.dtype.element_ty), mask=mask)


def _grid(batch: int, per_sample: int) -> tuple[int, int]:
    n_chunks = triton.cdiv(per_sample, BLOCK)
    return batch * n_chunks, n_chunks


def _check_sizes(batch: int, per_sample: int) -> None:
    # per-sample indices are int32 in the kernel; the flat index is int64.
    assert per_sample < 2**31, "each sample must have fewer than 2**31 elements"


def q_sample_fwd(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None,
                 seed: int, out: torch.Tensor, eps_out: torch.Tensor | None) -> None:
    """x_t into ``out`` (and the drawn noise into ``eps_out`` when ``noise`` is None); contiguous tensors."""
    batch = x0.shape[0]
    per_sample = x0.numel() // batch
    _check_sizes(batch, per_sample)
    n_prog, n_chunks = _grid(batch, per_sample)
    draw = noise is None
    _noising_kernel[(n_prog,)](
        x0, x0, x0 if draw else noise, out, eps_out if draw else out,
        t, alphas_cumprod, alphas_cumprod, alphas_cumprod,
        per_sample, n_chunks, alphas_cumprod.shape[0], seed, 0.0, 0.0,
        MODE=MODE_Q_SAMPLE, NOISE=NOISE_DRAW if draw else NOISE_LOAD, TARGET=0, CLIP=False,
        BLOCK=BLOCK, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )


def _loss_noise(target: str, noise: torch.Tensor | None) -> int:
    if target == "sample":
        return NOISE_NONE
    return NOISE_DRAW if noise is None else NOISE_LOAD


def loss_fwd(pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
             noise: torch.Tensor | None, seed: int, target: str) -> torch.Tensor:
    """Sum over all elements of (pred - target)^2 as a float32 0-d tensor (partial sums per program, then summed)."""
    batch = x0.shape[0]
    per_sample = x0.numel() // batch
    _check_sizes(batch, per_sample)
    n_prog, n_chunks = _grid(batch, per_sample)
    partial = torch.empty(n_prog, dtype=torch.float32, device=x0.device)
    _noising_kernel[(n_prog,)](
        x0, pred, x0 if noise is None else noise, partial, partial,
        t, alphas_cumprod, alphas_cumprod, alphas_cumprod,
        per_sample, n_chunks, alphas_cumprod.shape[0], seed, 0.0, 0.0,
        MODE=MODE_LOSS_FWD, NOISE=_loss_noise(target, noise), TARGET=TARGETS[target], CLIP=False,
        BLOCK=BLOCK, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
    return partial.sum()


def loss_bwd(grad: torch.Tensor, pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             alphas_cumprod: torch.Tensor, noise: torch.Tensor | None, seed: int, target: str,
             scale: float, out: torch.Tensor) -> None:
    """out = grad * scale * (pred - target), grad a 1-element tensor read by the kernel."""
    batch = x0.shape[0]
    per_sample = x0.numel() // batch
    _check_sizes(batch, per_sample)
    n_prog, n_chunks = _grid(batch, per_sample)
    _noising_kernel[(n_prog,)](
        x0, pred, x0 if noise is None else noise, out, out,
        t, alphas_cumprod, alphas_cumprod, grad,
        per_sample, n_chunks, alphas_cumprod.shape[0], seed, 0.0, scale,
        MODE=MODE_LOSS_BWD, NOISE=_loss_noise(target, noise), TARGET=TARGETS[target], CLIP=False,
        BLOCK=BLOCK, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )


def step_fwd(model_output: torch.Tensor, x_t: torch.Tensor, coef: torch.Tensor, noise: torch.Tensor | None,
             seed: int, add_noise: bool, clip_range: float | None, out: torch.Tensor) -> None:
    """One reverse step into ``out``: c2 clip(c0 x + c1 m) + c3 x + c4 m + c5 z, ``coef`` six fp32 values."""
    batch = x_t.shape[0] if x_t.dim() > 0 else 1
    per_sample = x_t.numel() // batch
    _check_sizes(batch, per_sample)
    n_prog, n_chunks = _grid(batch, per_sample)
    if not add_noise:
        mode_noise = NOISE_NONE
    else:
        mode_noise = NOISE_DRAW if noise is None else NOISE_LOAD
    _noising_kernel[(n_prog,)](
        x_t, model_output, x_t if noise is None else noise, out, out,
        coef, coef, coef, coef,
        per_sample, n_chunks, 0, seed, 0.0 if clip_range is None else float(clip_range), 0.0,
        MODE=MODE_STEP, NOISE=mode_noise, TARGET=0, CLIP=clip_range is not None,
        BLOCK=BLOCK, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )

"""Diffusion noising ops: forward process, noise-prediction loss, DDPM / DDIM reverse steps.

    q_sample:  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                     (Ho et al. 2020, eq. 4)
    loss:      mean((pred - target)^2), target = eps | v | x0,
               v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0                      (Salimans & Ho 2022, sec. 4)
    DDPM step: x_{t'} = mu(x0_hat, x_t) + sigma z                               (Ho et al. 2020, eqs. 7, 15)
    DDIM step: x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - s^2) eps_hat + s z   (Song et al. 2021, eq. 12)

The noise of a tensor of shape (B, ...) for a seed ``s`` is ``leedl_fast.random.normal_noise(s, shape)``
on the torch path and the same numbers in the kernel: one row of the Philox stream per sample,
four normals per Philox call (two Box-Muller pairs).  ``q_sample(x0, ..., seed=s)`` and
``noise_prediction_loss(pred, x0, ..., seed=s)`` read the same stream, so the loss
regenerates the noise instead of storing it.  ``seed=None`` draws a seed from
torch's default generator.

Structure as in ``softmax.py``: ``*_reference`` functions are the spec (plain
PyTorch, float64 in tests; the step references follow diffusers' DDPMScheduler /
DDIMScheduler formulas), ``_*_torch`` the fallback, ``leedl_fast.kernels.noising``
the Triton path, custom ops with fake and autograd implementations, and public
functions that check their arguments first.

Argument checks: ``t`` outside ``[0, len(alphas_cumprod))`` raises ValueError when
``t`` is a CPU tensor or an int.  For a CUDA ``t`` (and inside torch.compile) that
check would need a host sync, so instead the kernel writes NaN for a sample whose
t is out of range (the torch path raises an asynchronous device assertion).
"""
from __future__ import annotations

import math

import torch

from .. import backend
from .._checks import check_int, check_number, check_seed
from ..random import MAX_SEED, normal_noise
from ._common import as_dense, check_tensor

__all__ = [
    "q_sample", "q_sample_reference",
    "noise_prediction_loss", "noise_prediction_loss_reference",
    "ddpm_step", "ddpm_step_reference", "ddim_step", "ddim_step_reference",
    "fused_step", "ddpm_step_coefficients", "ddim_step_coefficients", "draw_seed",
    "PREDICTION_TYPES", "VARIANCE_TYPES",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


# ----------------------------------------------------------------------------- helpers

def draw_seed() -> int:
    """A seed in [0, 2**63 - 2] from torch's default generator (what ``seed=None`` uses)."""
    return int(torch.randint(0, MAX_SEED, (), dtype=torch.int64))


def _noise_torch(seed: int, shape, device) -> torch.Tensor:
    """The kernel's noise for a contiguous tensor of ``shape`` (B, ...), float32: ``normal_noise``."""
    return normal_noise(seed, shape, device)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(v.shape + (1,) * (ndim - 1))


def _sqrt_coefs(t: torch.Tensor, alphas_cumprod: torch.Tensor, acc: torch.dtype, ndim: int):
    """sqrt(abar_t), sqrt(1 - abar_t) per sample, shaped to broadcast against an ndim-D batch (t already
    range-checked by the op's body: ``_q_sample_torch``, ``_loss_diff_torch``)."""
    abar = alphas_cumprod.to(acc)[t.long()]
    return _per_sample(torch.sqrt(abar), ndim), _per_sample(torch.sqrt(1.0 - abar), ndim)


def _use_triton(*tensors: torch.Tensor) -> bool:
    if any(x.dtype == torch.float64 for x in tensors if x is not None and x.is_floating_point()):
        return False
    return backend.select("noising", *[x for x in tensors if x is not None]) == "triton"


def _check_schedule(alphas_cumprod, device) -> None:
    check_tensor("alphas_cumprod", alphas_cumprod, ndim=1)
    if alphas_cumprod.numel() == 0:
        raise ValueError("alphas_cumprod must not be empty")
    if alphas_cumprod.device != device:
        raise ValueError(f"alphas_cumprod is on {alphas_cumprod.device} but x0 is on {device}")


def _check_t(t, batch: int, num_timesteps: int, device) -> torch.Tensor:
    """t as a (batch,) int64 tensor on ``device``; ValueError for a wrong type, length, device or range."""
    if isinstance(t, int) and not isinstance(t, bool):
        if not 0 <= t < num_timesteps:
            raise ValueError(f"t={t} is outside [0, {num_timesteps})")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"t must be an integer tensor of shape ({batch},) or an int, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"t must be an integer tensor, got dtype {t.dtype}")
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):   # few ops take these (min and max do not)
        t = t.to(torch.int64)                                   # a uint64 past 2**63 turns negative: refused
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"t must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"t is on {t.device} but x0 is on {device}")
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        if batch and (int(t.min()) < 0 or int(t.max()) >= num_timesteps):
            raise ValueError(f"t must lie in [0, {num_timesteps}), got values in [{int(t.min())}, {int(t.max())}]")
    # Otherwise (CUDA t, or tracing) the kernel turns a sample with an out-of-range t into NaN and the
    # torch path asserts asynchronously (_check_t_async): no host sync, no extra launch on the fast path.
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int64)


def _check_t_async(t: torch.Tensor, num_timesteps: int) -> None:
    """The range check where ``_check_t`` could not make it (CUDA t, or inside torch.compile, where the op's
    body runs with a CPU t that was never checked); on the CPU it is immediate and costs a reduction."""
    if t.numel():
        torch._assert_async(((t >= 0) & (t < num_timesteps)).all(), f"t must lie in [0, {num_timesteps})")


def _check_like(name: str, x, ref: torch.Tensor, ref_name: str, *, same_dtype: bool) -> None:
    check_tensor(name, x)
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has {tuple(ref.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if same_dtype and x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")


def _check_batch(name: str, x) -> None:
    check_tensor(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-D tensor")


# ----------------------------------------------------------------------------- q_sample

def q_sample_reference(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """The definition (diffusers' ``add_noise``), in x0's dtype: use float64 inputs for a reference."""
    abar = alphas_cumprod.to(x0.dtype)[t.long()]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return abar.sqrt().view(shape) * x0 + (1 - abar).sqrt().view(shape) * noise


def _q_sample_torch(x0, t, alphas_cumprod, eps) -> torch.Tensor:
    _check_t_async(t, alphas_cumprod.shape[0])
    acc = _acc(x0.dtype)
    sa, sb = _sqrt_coefs(t, alphas_cumprod, acc, x0.dim())
    return (sa * x0.to(acc) + sb * eps.to(acc)).to(x0.dtype).contiguous()


@torch.library.custom_op("leedl_fast::q_sample", mutates_args=())
def _q_sample_op(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
    if x0.numel() == 0 or not _use_triton(x0, noise):
        return _q_sample_torch(x0, t, alphas_cumprod, noise)
    from leedl_fast.kernels.noising import q_sample_fwd

    out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    q_sample_fwd(as_dense(x0), as_dense(t), as_dense(alphas_cumprod), as_dense(noise), 0, out, None)
    return out


@_q_sample_op.register_fake
def _(x0, t, alphas_cumprod, noise):
    return x0.new_empty(x0.shape)


@torch.library.custom_op("leedl_fast::q_sample_seeded", mutates_args=())
def _q_sample_seeded_op(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x0.numel() == 0 or not _use_triton(x0):
        eps = _noise_torch(seed, x0.shape, x0.device)
        return _q_sample_torch(x0, t, alphas_cumprod, eps), eps.to(x0.dtype)
    from leedl_fast.kernels.noising import q_sample_fwd

    out = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    eps = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    q_sample_fwd(as_dense(x0), as_dense(t), as_dense(alphas_cumprod), None, seed, out, eps)
    return out, eps


@_q_sample_seeded_op.register_fake
def _(x0, t, alphas_cumprod, seed):
    return x0.new_empty(x0.shape), x0.new_empty(x0.shape)


def _q_sample_grads(ctx, g):
    t, alphas_cumprod = ctx.saved_tensors
    sa, sb = _sqrt_coefs(t, alphas_cumprod, _acc(g.dtype), g.dim())
    dx0 = (g.to(sa.dtype) * sa).to(ctx.x0_dtype) if ctx.needs_x0 else None
    dnoise = (g.to(sb.dtype) * sb).to(ctx.noise_dtype) if ctx.needs_noise else None
    return dx0, dnoise


def _q_sample_setup(ctx, inputs, output):
    x0, t, alphas_cumprod, noise = inputs
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.x0_dtype, ctx.noise_dtype = x0.dtype, noise.dtype
    ctx.needs_x0, ctx.needs_noise = ctx.needs_input_grad[0], ctx.needs_input_grad[3]


def _q_sample_backward(ctx, g):
    dx0, dnoise = _q_sample_grads(ctx, g)
    return dx0, None, None, dnoise


torch.library.register_autograd("leedl_fast::q_sample", _q_sample_backward, setup_context=_q_sample_setup)


def _q_sample_seeded_setup(ctx, inputs, output):
    x0, t, alphas_cumprod, _ = inputs
    ctx.save_for_backward(t, alphas_cumprod)
    ctx.x0_dtype, ctx.noise_dtype = x0.dtype, x0.dtype
    ctx.needs_x0, ctx.needs_noise = ctx.needs_input_grad[0], False
    ctx.mark_non_differentiable(output[1])   # eps depends on the seed alone


def _q_sample_seeded_backward(ctx, g, g_eps):
    dx0, _ = _q_sample_grads(ctx, g)
    return dx0, None, None, None


torch.library.register_autograd("leedl_fast::q_sample_seeded", _q_sample_seeded_backward,
                                setup_context=_q_sample_seeded_setup)


def q_sample(x0: torch.Tensor, t, alphas_cumprod: torch.Tensor, noise: torch.Tensor | None = None, *,
             seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward (noising) process: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and ``eps``.

    ``x0``: (B, ...) any float dtype (math in float32, float64 stays float64);
    ``t``: (B,) integer tensor (one timestep per sample) or an int for all;
    ``alphas_cumprod``: (T,) float tensor (e.g. ``NoiseSchedule.alphas_cumprod``),
    on x0's device.  With ``noise`` given (x0's shape and dtype) it is used and
    returned; otherwise eps is ``leedl_fast.random.normal_noise(seed, x0.shape)`` (drawn
    in registers on the Triton path) and returned in x0's
    dtype; x_t is computed from the float32 draw.  Equal to diffusers'
    ``DDPMScheduler.add_noise`` given the same noise.  Differentiable in x0 and
    ``noise``.
    """
    _check_batch("x0", x0)
    _check_schedule(alphas_cumprod, x0.device)
    t = _check_t(t, x0.shape[0], alphas_cumprod.shape[0], x0.device)
    if noise is not None:
        if seed is not None:
            raise ValueError("seed must be None when noise is given")
        _check_like("noise", noise, x0, "x0", same_dtype=True)
        return _q_sample_op(x0, t, alphas_cumprod, noise), noise
    seed = draw_seed() if seed is None else check_seed(seed)
    return _q_sample_seeded_op(x0, t, alphas_cumprod, seed)


# ----------------------------------------------------------------------------- loss

def _target_reference(x0, t, alphas_cumprod, noise, target):
    if target == "epsilon":
        return noise
    if target == "sample":
        return x0
    abar = alphas_cumprod.to(x0.dtype)[t.long()]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return abar.sqrt().view(shape) * noise - (1 - abar).sqrt().view(shape) * x0


def noise_prediction_loss_reference(pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                                    alphas_cumprod: torch.Tensor, noise: torch.Tensor,
                                    target: str = "epsilon") -> torch.Tensor:
    """mean((pred - target)^2) with target = noise, v = sqrt(abar) noise - sqrt(1 - abar) x0, or x0."""
    return ((pred - _target_reference(x0, t, alphas_cumprod, noise, target)) ** 2).mean()


def _loss_diff_torch(pred, x0, t, alphas_cumprod, noise, seed, target):
    acc = _acc(pred.dtype if pred.dtype == torch.float64 else x0.dtype)
    _check_t_async(t, alphas_cumprod.shape[0])      # for every target, also those that do not read abar_t
    if target == "sample":
        tgt = x0.to(acc)
    else:
        eps = (_noise_torch(seed, x0.shape, x0.device) if noise is None else noise).to(acc)
        if target == "epsilon":
            tgt = eps
        else:
            sa, sb = _sqrt_coefs(t, alphas_cumprod, acc, x0.dim())
            tgt = sa * eps - sb * x0.to(acc)
    return pred.to(acc) - tgt


def _loss_grad_torch(grad, pred, x0, t, alphas_cumprod, noise, seed, target):
    """d loss / d pred in PyTorch ops (differentiable): grad * 2 (pred - target) / N, in pred's dtype."""
    d = _loss_diff_torch(pred, x0, t, alphas_cumprod, noise, seed, target)
    return (grad.to(d.dtype) * (2.0 / max(d.numel(), 1)) * d).to(pred.dtype)


def _loss_dtype(pred: torch.Tensor, x0: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (pred.dtype, x0.dtype) else torch.float32


@torch.library.custom_op("leedl_fast::noise_prediction_loss", mutates_args=())
def _loss_op(pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
             noise: torch.Tensor | None, seed: int, target: str) -> torch.Tensor:
    if x0.numel() == 0 or not _use_triton(pred, x0, noise):
        d = _loss_diff_torch(pred, x0, t, alphas_cumprod, noise, seed, target)
        return ((d * d).sum() / d.numel()).to(_loss_dtype(pred, x0))
    from leedl_fast.kernels.noising import loss_fwd

    total = loss_fwd(as_dense(pred), as_dense(x0), as_dense(t), as_dense(alphas_cumprod),
                     as_dense(noise), seed, target)
    return total / x0.numel()


@_loss_op.register_fake
def _(pred, x0, t, alphas_cumprod, noise, seed, target):
    return pred.new_empty((), dtype=_loss_dtype(pred, x0))


@torch.library.custom_op("leedl_fast::noise_prediction_loss_backward", mutates_args=())
def _loss_backward_op(grad: torch.Tensor, pred: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                      alphas_cumprod: torch.Tensor, noise: torch.Tensor | None, seed: int,
                      target: str) -> torch.Tensor:
    if x0.numel() == 0 or not _use_triton(pred, x0, noise):
        return _loss_grad_torch(grad, pred, x0, t, alphas_cumprod, noise, seed, target).contiguous()
    from leedl_fast.kernels.noising import loss_bwd

    out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    loss_bwd(as_dense(grad.reshape(1).to(torch.float32)), as_dense(pred), as_dense(x0), as_dense(t),
             as_dense(alphas_cumprod), as_dense(noise), seed, target,
             2.0 / x0.numel(), out)
    return out


@_loss_backward_op.register_fake
def _(grad, pred, x0, t, alphas_cumprod, noise, seed, target):
    return pred.new_empty(pred.shape)


def _loss_setup(ctx, inputs, output):
    pred, x0, t, alphas_cumprod, noise, seed, target = inputs
    ctx.save_for_backward(pred, x0, t, alphas_cumprod, noise)
    ctx.seed, ctx.target = seed, target


def _loss_backward(ctx, grad):
    pred, x0, t, alphas_cumprod, noise = ctx.saved_tensors
    need_x0 = ctx.needs_input_grad[1] and ctx.target != "epsilon"
    need_noise = noise is not None and ctx.needs_input_grad[4] and ctx.target != "sample"
    # dx0 and dnoise scale d loss / d pred: take it in the loss's own dtype, not rounded to a pred of lower
    # precision (an fp16 / bf16 model output, or float32 with a float64 x0), whose rounding they would carry,
    # and whose underflow (2 (pred - target) / N is below fp16's 6e-8 for a close prediction) made them zero.
    # Both gradients below come out in the dtype of the pred they are given.
    wide = pred.to(_loss_dtype(pred, x0)) if need_x0 or need_noise else pred
    if torch.is_grad_enabled():
        # A backward with create_graph=True: the gradient in differentiable PyTorch ops (the noise from
        # the same Philox stream), so that second derivatives (a gradient penalty, a Hessian-vector
        # product) exist.  The fused backward kernel has no derivative of its own.
        g = _loss_grad_torch(grad, wide, x0, t, alphas_cumprod, noise, ctx.seed, ctx.target)
    else:
        g = _loss_backward_op(grad, wide, x0, t, alphas_cumprod, noise, ctx.seed, ctx.target)
    dpred = g.to(pred.dtype)
    dx0 = dnoise = None
    if need_x0 or need_noise:
        # d loss / d target = -d loss / d pred; target = cx x0 + ce eps with per-sample cx, ce.
        acc = _acc(g.dtype)
        sa, sb = _sqrt_coefs(t, alphas_cumprod, acc, x0.dim())
        g = g.to(acc)
        if need_x0:
            dx0 = (-g if ctx.target == "sample" else g * sb).to(x0.dtype)
        if need_noise:
            dnoise = (-g if ctx.target == "epsilon" else -g * sa).to(noise.dtype)
    if ctx.needs_input_grad[1] and dx0 is None:
        dx0 = torch.zeros_like(x0)
    if noise is not None and ctx.needs_input_grad[4] and dnoise is None:
        dnoise = torch.zeros_like(noise)
    return dpred, dx0, None, None, dnoise, None, None


torch.library.register_autograd("leedl_fast::noise_prediction_loss", _loss_backward, setup_context=_loss_setup)


def noise_prediction_loss(pred: torch.Tensor, x0: torch.Tensor, t, alphas_cumprod: torch.Tensor, *,
                          seed: int | None = None, noise: torch.Tensor | None = None,
                          target: str = "epsilon") -> torch.Tensor:
    """Mean squared error between ``pred`` and the training target of ``q_sample(x0, t, ..., seed=seed)``.

    ``target``: "epsilon" (the noise), "v_prediction" (v = sqrt(abar) eps -
    sqrt(1 - abar) x0) or "sample" (x0).  The noise is regenerated from the same
    Philox stream ``q_sample`` drew it from (``normal_noise(seed, x0.shape)``), inside the
    kernel, so it is never stored; or pass the ``noise`` tensor instead of a
    seed.  ``pred`` and ``x0``: same shape (B, ...), float dtypes (may differ);
    math in float32.  Returns a 0-d float32 tensor (float64 if an input is
    float64).  Differentiable in ``pred`` (fused backward kernel), ``x0`` and
    ``noise``, any number of times (a backward with ``create_graph=True`` computes the
    gradient in PyTorch ops instead of the kernel).
    """
    if target not in PREDICTION_TYPES:
        raise ValueError(f"target must be one of {', '.join(PREDICTION_TYPES)}, got {target!r}")
    _check_batch("x0", x0)
    _check_like("pred", pred, x0, "x0", same_dtype=False)
    _check_schedule(alphas_cumprod, x0.device)
    t = _check_t(t, x0.shape[0], alphas_cumprod.shape[0], x0.device)
    if noise is not None:
        if seed is not None:
            raise ValueError("give either seed or noise, not both")
        _check_like("noise", noise, x0, "x0", same_dtype=True)
        seed = 0
    elif seed is None:
        raise ValueError("seed is required (the seed q_sample drew the noise with), or pass noise")
    else:
        seed = check_seed(seed)
    return _loss_op(pred, x0, t, alphas_cumprod, noise, seed, target)


# ----------------------------------------------------------------------------- reverse steps

def _div(a: float, b: float) -> float:
    """a / b with IEEE semantics (x / 0 is +-inf, 0 / 0 NaN), as diffusers' tensors divide, where Python floats
    raise ZeroDivisionError: a schedule whose abar_t is exactly 1 (1 - beta rounds to 1 in float32) or 0 (the
    float32 product underflows) gives the NaN / inf steps diffusers gives instead of a sampler that cannot be
    built."""
    if b != 0:
        return a / b
    if a == 0 or a != a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _x0_coefs(a_t: float, prediction_type: str) -> tuple[float, float]:
    """x0_hat = A x_t + B m for model output m."""
    if prediction_type == "epsilon":
        return _div(1.0, math.sqrt(a_t)), _div(-math.sqrt(1.0 - a_t), math.sqrt(a_t))
    if prediction_type == "v_prediction":
        return math.sqrt(a_t), -math.sqrt(1.0 - a_t)
    return 0.0, 1.0


def ddpm_step_coefficients(a_t: float, a_prev: float, t: int, prediction_type: str,
                           variance_type: str) -> tuple[tuple[float, ...], bool]:
    """The six coefficients of ``x_prev = c2 clip(c0 x + c1 m) + c3 x + c4 m + c5 z`` for a DDPM step
    from abar_t = ``a_t`` to abar_prev = ``a_prev`` (1.0 past the first step), in float64, and whether
    noise is added (t > 0, as diffusers)."""
    b_t, b_p = 1.0 - a_t, 1.0 - a_prev
    alpha = _div(a_t, a_prev)
    beta = 1.0 - alpha
    c0, c1 = _x0_coefs(a_t, prediction_type)
    c2 = _div(math.sqrt(a_prev) * beta, b_t)     # posterior mean, x0 term (Ho et al. eq. 7)
    c3 = _div(math.sqrt(alpha) * b_p, b_t)       # posterior mean, x_t term
    if variance_type == "fixed_small":
        sigma = math.sqrt(max(_div(b_p, b_t) * beta, 1e-20))   # max(NaN, .) is NaN, as torch.clamp
    else:
        sigma = math.sqrt(beta)
    add_noise = t > 0
    return (c0, c1, c2, c3, 0.0, sigma if add_noise else 0.0), add_noise


def ddim_step_coefficients(a_t: float, a_prev: float, prediction_type: str,
                           eta: float) -> tuple[tuple[float, ...], bool]:
    """The six coefficients of a DDIM step (Song et al. 2021, eq. 12) and whether noise is added (eta > 0)."""
    b_t, b_p = 1.0 - a_t, 1.0 - a_prev
    variance = _div(b_p, b_t) * (1.0 - _div(a_t, a_prev))
    std = eta * math.sqrt(max(variance, 0.0))    # NaN stays NaN (and eta = 0 times NaN too, as diffusers)
    c0, c1 = _x0_coefs(a_t, prediction_type)
    if prediction_type == "epsilon":
        e_x, e_m = 0.0, 1.0
    elif prediction_type == "v_prediction":
        e_x, e_m = math.sqrt(b_t), math.sqrt(a_t)
    else:  # eps_hat from the unclipped x0_hat = m, as diffusers
        e_x, e_m = _div(1.0, math.sqrt(b_t)), _div(-math.sqrt(a_t), math.sqrt(b_t))
    direction = math.sqrt(max(1.0 - a_prev - std * std, 0.0))
    return (c0, c1, math.sqrt(a_prev), direction * e_x, direction * e_m, std), eta > 0


def _step_torch(model_output, x_t, coef, noise, seed, add_noise, clip_range):
    acc = _acc(x_t.dtype)
    c = coef.to(acc)
    x, m = x_t.to(acc), model_output.to(acc)
    x0 = c[0] * x + c[1] * m
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    y = c[2] * x0 + c[3] * x + c[4] * m
    if add_noise:
        z = _noise_torch(seed, x_t.shape, x_t.device) if noise is None else noise
        y = y + c[5] * z.to(acc)
    return y.to(x_t.dtype).contiguous()


@torch.library.custom_op("leedl_fast::sampler_step", mutates_args=())
def _step_op(model_output: torch.Tensor, x_t: torch.Tensor, coef: torch.Tensor, noise: torch.Tensor | None,
             seed: int, add_noise: bool, clip_range: float | None) -> torch.Tensor:
    if x_t.numel() == 0 or not _use_triton(model_output, x_t, noise):
        return _step_torch(model_output, x_t, coef, noise, seed, add_noise, clip_range)
    from leedl_fast.kernels.noising import step_fwd

    out = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    step_fwd(as_dense(model_output), as_dense(x_t), as_dense(coef.to(torch.float32)),
             as_dense(noise), seed, add_noise, clip_range, out)
    return out


@_step_op.register_fake
def _(model_output, x_t, coef, noise, seed, add_noise, clip_range):
    return x_t.new_empty(x_t.shape)


def _step_setup(ctx, inputs, output):
    model_output, x_t, coef, noise, seed, add_noise, clip_range = inputs
    ctx.save_for_backward(model_output, x_t, coef)
    ctx.clip_range = clip_range
    ctx.noise_dtype = noise.dtype if noise is not None and add_noise else None


def _step_backward(ctx, g):
    # y = c2 clip(c0 x + c1 m) + c3 x + c4 m + c5 z: linear but for the clip, whose gradient is 1 inside
    # [-r, r] (ends included, as torch.clamp's) and 0 outside.
    m, x, coef = ctx.saved_tensors
    acc = _acc(x.dtype)
    c, g = coef.to(acc), g.to(acc)
    gc = g * c[2]
    if ctx.clip_range is not None:
        x0 = c[0] * x.to(acc) + c[1] * m.to(acc)
        gc = gc * ((x0 >= -ctx.clip_range) & (x0 <= ctx.clip_range))
    dm = (gc * c[1] + g * c[4]).to(m.dtype)
    dx = (gc * c[0] + g * c[3]).to(x.dtype)
    dz = None if ctx.noise_dtype is None else (g * c[5]).to(ctx.noise_dtype)
    return dm, dx, None, dz, None, None, None


torch.library.register_autograd("leedl_fast::sampler_step", _step_backward, setup_context=_step_setup)


def _check_clip_range(clip_range) -> float | None:
    if clip_range is None:
        return None
    return check_number("clip_sample_range", clip_range, 0, lo_open=True)


def _check_clip(clip_sample, clip_sample_range) -> float | None:
    """The clipping range of a step (None: no clipping); ValueError for a non-bool ``clip_sample`` or a
    range that is not a finite positive number."""
    if not isinstance(clip_sample, bool):
        raise ValueError(f"clip_sample must be a bool, got {clip_sample!r}")
    clip_range = _check_clip_range(clip_sample_range)
    return clip_range if clip_sample else None


def _check_eta(eta) -> float:
    """DDIM's eta in [0, 1] (Song et al. 2021: 0 is DDIM, 1 the DDPM-like variance); above 1 the noise's
    variance exceeds 1 - abar_prev and the step is undefined (diffusers returns NaN)."""
    return check_number("eta", eta, 0, 1)


def fused_step(model_output: torch.Tensor, x_t: torch.Tensor, coef: torch.Tensor, *, add_noise: bool,
               clip_range: float | None = None, noise: torch.Tensor | None = None,
               seed: int | None = None) -> torch.Tensor:
    """``x_prev = c2 clip(c0 x_t + c1 m) + c3 x_t + c4 m + c5 z`` in one kernel (``coef``: the six values
    from ``ddpm_step_coefficients`` / ``ddim_step_coefficients`` on x_t's device, float32, or float64 for a
    float64 step on the torch path; the kernel reads them as float32).  z is ``noise`` or the Philox stream
    of ``seed`` (drawn from torch's generator when None); only used when ``add_noise``.  Differentiable
    with respect to model_output, x_t and noise (elementwise PyTorch in the backward)."""
    check_tensor("x_t", x_t)
    _check_like("model_output", model_output, x_t, "x_t", same_dtype=False)
    check_tensor("coef", coef, ndim=1)
    if coef.shape[0] != 6 or coef.device != x_t.device:
        raise ValueError(f"coef must be 6 values on {x_t.device}, got shape {tuple(coef.shape)} on {coef.device}")
    if noise is not None:
        if seed is not None:
            raise ValueError("give either seed or noise, not both")
        _check_like("noise", noise, x_t, "x_t", same_dtype=False)
        seed = 0
    elif add_noise:
        seed = draw_seed() if seed is None else check_seed(seed)
    else:
        seed = 0 if seed is None else check_seed(seed)
    clip_range = _check_clip_range(clip_range)
    return _step_op(model_output, x_t, coef, noise if add_noise else None, seed, bool(add_noise), clip_range)


def _as_int(t):
    """A one-element integer tensor as its int (a float tensor stays a tensor, and is refused: it is not a step)."""
    if isinstance(t, torch.Tensor) and t.numel() == 1 and not (t.is_floating_point() or t.dtype == torch.bool):
        return int(t)
    return t


def _check_step_args(model_output, t, x_t, alphas_cumprod, prev_t, prediction_type):
    """Checks of a sampler step's arguments; returns (t, prev_t) as ints, ``prev_t`` None meaning t - 1."""
    check_tensor("x_t", x_t)
    _check_like("model_output", model_output, x_t, "x_t", same_dtype=False)
    _check_schedule(alphas_cumprod, x_t.device)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
    n = alphas_cumprod.shape[0]
    t, prev_t = _as_int(t), _as_int(prev_t)
    t = check_int("t", t, 0, n, hi_open=True)
    prev_t = check_int(f"prev_t (t = {t})", t - 1 if prev_t is None else prev_t, -1, t, hi_open=True)
    return t, prev_t


def ddpm_step_reference(model_output, t: int, x_t, alphas_cumprod, *, prev_t: int | None = None,
                        prediction_type: str = "epsilon", clip_sample: bool = True, clip_sample_range: float = 1.0,
                        variance_type: str = "fixed_small", noise=None) -> torch.Tensor:
    """One DDPM reverse step, written like the published formulas (diffusers' DDPMScheduler.step), in
    model_output's dtype.  ``prev_t`` defaults to t - 1; ``noise`` is used when t > 0."""
    prev_t = t - 1 if prev_t is None else prev_t
    ac = alphas_cumprod.to(model_output.dtype)
    a_t = ac[t]
    a_p = ac[prev_t] if prev_t >= 0 else torch.ones((), dtype=ac.dtype)
    b_t, b_p = 1 - a_t, 1 - a_p
    alpha_t = a_t / a_p
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        x0 = (x_t - b_t.sqrt() * model_output) / a_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - b_t.sqrt() * model_output
    else:
        x0 = model_output
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    mean = (a_p.sqrt() * beta_t / b_t) * x0 + (alpha_t.sqrt() * b_p / b_t) * x_t
    if t > 0:
        var = (b_p / b_t * beta_t).clamp(min=1e-20) if variance_type == "fixed_small" else beta_t
        mean = mean + var.sqrt() * noise
    return mean


def ddim_step_reference(model_output, t: int, x_t, alphas_cumprod, *, prev_t: int, eta: float = 0.0,
                        prediction_type: str = "epsilon", clip_sample: bool = True, clip_sample_range: float = 1.0,
                        final_alpha_cumprod: float = 1.0, noise=None) -> torch.Tensor:
    """One DDIM step (Song et al. 2021, eq. 12; diffusers' DDIMScheduler.step with
    use_clipped_model_output=False), in model_output's dtype.  ``noise`` is used when eta > 0."""
    ac = alphas_cumprod.to(model_output.dtype)
    a_t = ac[t]
    a_p = ac[prev_t] if prev_t >= 0 else torch.tensor(final_alpha_cumprod, dtype=ac.dtype)
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0 = (x_t - b_t.sqrt() * model_output) / a_t.sqrt()
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - b_t.sqrt() * model_output
        eps = a_t.sqrt() * model_output + b_t.sqrt() * x_t
    else:
        x0 = model_output
        eps = (x_t - a_t.sqrt() * x0) / b_t.sqrt()
    if clip_sample:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    var = ((1 - a_p) / b_t) * (1 - a_t / a_p)
    std = eta * var.sqrt()
    out = a_p.sqrt() * x0 + (1 - a_p - std**2).sqrt() * eps
    if eta > 0:
        out = out + std * noise
    return out


def _coef_tensor(coefs, x_t: torch.Tensor) -> torch.Tensor:
    """The six float64 coefficients in x_t's accumulation dtype (float64 for float64 steps) on its device."""
    return torch.tensor(coefs, dtype=torch.float64).to(_acc(x_t.dtype)).to(x_t.device)


def _table_entries(alphas_cumprod: torch.Tensor, t: int, prev_t: int, after_last: float,
                   monotone: bool) -> tuple[float, float]:
    """(abar_t, abar_prev) read from the table (``after_last`` past its start), as floats; ValueError naming
    alphas_cumprod for entries outside [0, 1] (or NaN) and, with ``monotone``, for abar_t > abar_prev (DDPM's
    beta_t = 1 - abar_t / abar_prev must be a probability), where a step would be NaN or a math domain error."""
    a_t = float(alphas_cumprod[t])
    a_p = float(alphas_cumprod[prev_t]) if prev_t >= 0 else float(after_last)
    for i, a in ((t, a_t), (prev_t, a_p))[: 2 if prev_t >= 0 else 1]:   # after_last is the caller's to check
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alphas_cumprod[{i}] = {a} is not in [0, 1]")
    if monotone and a_t > a_p:
        raise ValueError(f"alphas_cumprod must not increase with t: alphas_cumprod[{t}] = {a_t} > "
                         f"alphas_cumprod[{prev_t}] = {a_p}")
    return a_t, a_p


def ddpm_step(model_output: torch.Tensor, t: int, x_t: torch.Tensor, alphas_cumprod: torch.Tensor, *,
              prev_t: int | None = None, prediction_type: str = "epsilon", clip_sample: bool = True,
              clip_sample_range: float = 1.0, variance_type: str = "fixed_small",
              noise: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
    """One DDPM reverse step from timestep ``t`` to ``prev_t`` (default t - 1; -1 ends the chain) in one
    elementwise kernel: x0_hat from the model output (epsilon / v_prediction / sample), optional clipping
    to +-clip_sample_range, the posterior mean and, for t > 0, sigma z with sigma^2 the posterior variance
    ("fixed_small") or beta_t ("fixed_large").  z is ``noise`` or the Philox stream of ``seed``.  Equal to
    diffusers' DDPMScheduler.step given the same noise.  (``DDPMSampler`` precomputes the coefficients;
    this function reads two alphas_cumprod entries on the host per call.)"""
    t, prev_t = _check_step_args(model_output, t, x_t, alphas_cumprod, prev_t, prediction_type)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {', '.join(VARIANCE_TYPES)}, got {variance_type!r}")
    clip = _check_clip(clip_sample, clip_sample_range)
    a_t, a_p = _table_entries(alphas_cumprod, t, prev_t, 1.0, monotone=True)
    coefs, add_noise = ddpm_step_coefficients(a_t, a_p, t, prediction_type, variance_type)
    return fused_step(model_output, x_t, _coef_tensor(coefs, x_t), add_noise=add_noise,
                      clip_range=clip, noise=noise, seed=seed)


def ddim_step(model_output: torch.Tensor, t: int, x_t: torch.Tensor, alphas_cumprod: torch.Tensor, *,
              prev_t: int, eta: float = 0.0, prediction_type: str = "epsilon", clip_sample: bool = True,
              clip_sample_range: float = 1.0, final_alpha_cumprod: float = 1.0,
              noise: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
    """One DDIM step from ``t`` to ``prev_t`` (-1: to abar = ``final_alpha_cumprod``) in one elementwise
    kernel; noise (``noise`` or Philox of ``seed``) scaled by eta * sigma when eta > 0.  Equal to diffusers'
    DDIMScheduler.step (use_clipped_model_output=False) given the same noise."""
    if prev_t is None:
        raise ValueError("prev_t must be an int in [-1, t), got None (DDIM steps skip timesteps: say which)")
    t, prev_t = _check_step_args(model_output, t, x_t, alphas_cumprod, prev_t, prediction_type)
    _check_eta(eta)
    clip = _check_clip(clip_sample, clip_sample_range)
    if prev_t < 0:
        check_number("final_alpha_cumprod", final_alpha_cumprod, 0, 1, lo_open=True)
    a_t, a_p = _table_entries(alphas_cumprod, t, prev_t, final_alpha_cumprod, monotone=False)
    coefs, add_noise = ddim_step_coefficients(a_t, a_p, prediction_type, float(eta))
    return fused_step(model_output, x_t, _coef_tensor(coefs, x_t), add_noise=add_noise,
                      clip_range=clip, noise=noise, seed=seed)

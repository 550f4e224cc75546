"""Property-based fuzzing of the diffusion code against diffusers and float64 math.

Hypothesis draws

* schedules: ``num_train_timesteps`` 1..1000 (1, 2, 3 and other tiny ones often), "linear",
  "scaled_linear" or "cosine" (sometimes under diffusers' name "squaredcos_cap_v2"), beta_start in
  [1e-5, 1e-2] and beta_end from beta_start up to 0.05 (the ranges models use), and now and then wide
  ranges (beta_start down to 1e-9, where 1 - beta rounds to 1 in float32 and abar_t is exactly 1;
  beta_end up to 0.999, where abar_t underflows to 0).  ``NoiseSchedule``'s betas, alphas and
  alphas_cumprod must *equal* diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` tables and agree with
  float64 formulas (test_schedule_fuzz);
* sampler configurations: ``DDPMSampler`` (num_inference_steps None or 1..T, dividers of T or not,
  variance_type fixed_small / fixed_large) and ``DDIMSampler`` (eta 0, 1 or between, set_alpha_to_one
  on / off), prediction_type epsilon / v_prediction / sample, clip_sample on / off with a drawn
  clip_sample_range, sample shapes (B, ...) of 1..4 dims with odd sizes, float32 / float16 / bfloat16 /
  float64 and mixed model-output dtypes, contiguous, transposed and strided inputs, a timestep given as an
  int, a 0-d tensor or a numpy int, the noise given or drawn from the Philox stream of a seed.

  ``.timesteps`` must equal diffusers' ``set_timesteps`` (test_timesteps_fuzz, many (T, n) pairs).
  test_sampler_fuzz_torch runs whole sampling chains (the first and last steps of long ones) with a
  synthetic model ``m = a_t x + W``: our float64 chain against diffusers' float64 chain given the same
  injected noise, and at *every* step of the chain our step in the drawn dtype against diffusers' float64
  step from the same dtype-rounded inputs; for short chains also ``generate`` (its initial noise and
  per-step Philox seeds reproduced) against diffusers.  test_sampler_fuzz_triton checks the first, the
  last and a random step on the Triton path (Triton's interpreter on a CPU machine: float32 / float16,
  small shapes);
* q_sample and noise_prediction_loss (test_noising_fuzz_torch / _triton): random shapes (sizes around the
  kernel's 1024-element block included), timesteps (both ends of the schedule included) as an int or an
  int32 / int64 tensor, the noise given or from a seed, every target, against diffusers' ``add_noise`` /
  ``get_velocity`` in float64; the loss's gradients in pred, x0 and a given noise against float64
  autograd; ``training_loss`` against its documented composition.

Reference and tolerances.  diffusers computes its step coefficients in float32 from float32
alphas_cumprod; for short steps (num_inference_steps near T) 1 - abar_t / abar_prev then loses most of
its digits (relative error up to ~1e-7 / beta_t: some elements of its steps came out 25% off float64's),
while ours computes them in float64 (the documented design).  The diffusers reference therefore runs on
the same float32 tables promoted to float64 (``alphas_cumprod.double()``): exactly diffusers' formulas,
in float64 math.  A result in dtype d is compared with
``|ours - ref| <= atol_d + rtol_d |ref| + rtol_m * mag``: (atol_d, rtol_d) the table of tests/harness.py
for the final rounding to d, rtol_m the table's rtol for the dtype the math runs in (float32, or
float64 for float64 inputs) and ``mag`` the sum of the absolute values of the terms the step (or op)
adds up, in float64: the scale of its rounding error where terms cancel (x0_hat = (x_t - sqrt(1-abar) eps)
/ sqrt(abar) multiplies x_t by up to 2e4 on a cosine schedule).

CI runs a small fixed (derandomized) set of examples.  To hunt bugs, raise the counts, e.g.
``LEEDL_FUZZ_EXAMPLES=500 python -m pytest -q tests/diffusion/test_diffusion_fuzz.py``: the torch tests
run that many (the schedule and timestep tests twice as many), the Triton tests a tenth; each count can be
set on its own with ``LEEDL_FUZZ_EXAMPLES_{SCHEDULE,TIMESTEPS,SAMPLER,SAMPLER_TRITON,NOISING,NOISING_TRITON}``.
With any of them set the examples are random rather than derandomized.

Failures the fuzzing found are kept at the end as small regular tests (regressions of fixed bugs).
"""
from __future__ import annotations

import math
import os
from unittest import mock

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("hypothesis")
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402
from hypothesis import given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from leedl_fast.diffusion import DDIMSampler, DDPMSampler, NoiseSchedule, training_loss  # noqa: E402
from leedl_fast.ops.noising import PREDICTION_TYPES, noise_prediction_loss, q_sample  # noqa: E402
from leedl_fast.random import normal_noise  # noqa: E402
from tests.harness import FUZZ_HUNTING, fuzz_count, fuzz_settings, tolerance  # noqa: E402

F64 = torch.float64
NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}

# ------------------------------------------------------------------------------ example counts


N_SCHEDULE = fuzz_count("SCHEDULE", 30, 0.5)
N_TIMESTEPS = fuzz_count("TIMESTEPS", 40, 0.5)
N_SAMPLER = fuzz_count("SAMPLER", 20, 1)
N_SAMPLER_TRITON = fuzz_count("SAMPLER_TRITON", 3, 10)
N_NOISING = fuzz_count("NOISING", 30, 1)
N_NOISING_TRITON = fuzz_count("NOISING_TRITON", 3, 10)
# Chains of up to CHAIN_FULL steps run whole; longer ones their first and last CHAIN_PART steps (and 4 more)
CHAIN_FULL, CHAIN_PART = (40, 12) if FUZZ_HUNTING else (24, 6)

_SETTINGS = fuzz_settings("data_too_large")


# ------------------------------------------------------------------------------ strategies

def _log_uniform(lo_exp: float, hi_exp: float):
    return st.floats(lo_exp, hi_exp, allow_nan=False).map(lambda e: 10.0 ** e)


@st.composite
def schedule_configs(draw) -> dict:
    """A NoiseSchedule's arguments: mostly the beta ranges models use, one in eight a wide one."""
    T = draw(st.one_of(st.integers(1, 3), st.integers(1, 40), st.integers(1, 1000), st.sampled_from([1000, 999, 500])))
    name = draw(st.sampled_from(sorted(NAMES)))
    if draw(st.integers(0, 7)) == 0:
        beta_start = draw(_log_uniform(-9, -1))
        beta_end = beta_start + (0.999 - beta_start) * draw(st.one_of(st.just(0.0), st.floats(0, 1)))
    else:
        beta_start = draw(st.one_of(st.sampled_from([1e-4, 8.5e-4, 1e-3]), _log_uniform(-5, -2)))
        beta_end = draw(st.one_of(st.sampled_from([0.012, 0.02]).filter(lambda b: b >= beta_start),
                                  st.floats(0, 1).map(lambda f: beta_start + (0.05 - beta_start) * f)))
    beta_end = min(max(beta_end, beta_start), 0.999)
    alias = name == "cosine" and draw(st.booleans())
    return dict(T=T, name=name, beta_start=beta_start, beta_end=beta_end, alias=alias)


def _schedule(cfg: dict) -> NoiseSchedule:
    name = NAMES[cfg["name"]] if cfg["alias"] else cfg["name"]
    return NoiseSchedule(cfg["T"], name, beta_start=cfg["beta_start"], beta_end=cfg["beta_end"])


def _diffusers_config(cfg: dict) -> dict:
    return dict(num_train_timesteps=cfg["T"], beta_start=cfg["beta_start"], beta_end=cfg["beta_end"],
                beta_schedule=NAMES[cfg["name"]])


def _steps_counts(draw, T: int):
    """num_inference_steps in 1..T: small, any, T, and values that do not divide T."""
    non_dividers = [n for n in range(2, min(T, 60)) if T % n] or [1]
    return draw(st.one_of(st.integers(1, min(T, 8)), st.integers(1, T), st.just(T), st.sampled_from(non_dividers)))


def _bounded_dims(draw, n_dims: int, max_product: int) -> list:
    dims = []
    for _ in range(n_dims):
        room = max(1, max_product // max(1, math.prod(dims)))
        dims.append(draw(st.integers(1, max(1, min(room, 13)))))
    return dims


def _shape(draw, max_batch: int, max_per_sample: int, boundary=(1023, 1024, 1025)) -> tuple:
    batch = draw(st.integers(1, max_batch))
    if boundary and draw(st.integers(0, 5)) == 0:
        per = [draw(st.sampled_from(boundary))]
    else:
        per = _bounded_dims(draw, draw(st.integers(0, 3)), max_per_sample)
    return (batch, *per)


def _dtypes(path: str):
    # bf16 is wrong under Triton's interpreter (README, Tests); float64 always takes the torch path.
    if path == "torch":
        return [torch.float32, torch.float16, torch.bfloat16, F64]
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------ comparison

def _within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, name: str, *,
            nan_ok: bool = False) -> None:
    """|actual - expected| <= bound elementwise (equal infinities pass); NaN exactly where expected has NaN
    (``nan_ok``: also NaN where expected is not, the documented difference of _x0_undefined)."""
    a = actual.detach().to("cpu", F64)
    e = expected.detach().to("cpu", F64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    bound = torch.as_tensor(bound, dtype=F64).expand(e.shape)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if nan_ok:
        nan_e = nan_e | nan_a
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN positions differ (ours {int(nan_a.sum())}, expected {int(nan_e.sum())}, "
                             f"first at {idx})")
    err = torch.where(a == e, torch.zeros_like(a), (a - e).abs())
    bad = ~nan_e & ~(err <= bound)
    if bad.any():
        ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err))
        i = int(ratio.flatten().argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off; worst at flat index {i}: ours "
            f"{a.flatten()[i].item():.9g}, expected {e.flatten()[i].item():.9g}, error {err.flatten()[i].item():.3g} "
            f"> bound {bound.flatten()[i].item():.3g} (x{ratio.flatten()[i].item():.3g})")


def _bound(expected: torch.Tensor, mag: torch.Tensor, out_dtype: torch.dtype, math_dtype: torch.dtype):
    """atol_d + rtol_d |expected| + rtol_m * mag (see the module docstring)."""
    atol, rtol = tolerance(out_dtype)
    return atol + rtol * expected.abs() + tolerance(math_dtype)[1] * mag


def _math_dtype(*dtypes) -> torch.dtype:
    return F64 if F64 in dtypes else torch.float32


def _rounded(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).to(F64)


def _layout(v: torch.Tensor, layout: str) -> torch.Tensor:
    """v's values (and dtype) in another memory layout."""
    if layout == "transposed" and v.dim() >= 2:
        return v.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":
        big = torch.zeros(v.shape[:-1] + (2 * v.shape[-1],), dtype=v.dtype, device=v.device) if v.dim() else None
        if big is not None:
            view = big[..., ::2]
            view.copy_(v)
            return view
    return v.clone()


# ------------------------------------------------------------------------------ schedules

def _check_tables(cfg: dict) -> None:
    T, bs, be = cfg["T"], cfg["beta_start"], cfg["beta_end"]
    ours = _schedule(cfg)
    assert len(ours) == T and ours.beta_schedule == cfg["name"]
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        ref = cls(**_diffusers_config(cfg))
        for attr in ("betas", "alphas", "alphas_cumprod"):
            got, want = getattr(ours, attr), getattr(ref, attr)
            assert got.dtype == torch.float32 and got.shape == (T,), attr
            assert torch.equal(got, want), f"{attr} != {cls.__name__}'s: max diff {float((got - want).abs().max())}"
    # float64 formulas
    i = torch.arange(T, dtype=F64)
    frac = i / (T - 1) if T > 1 else torch.zeros(1, dtype=F64)
    u = 2.0 ** -24
    if cfg["name"] == "linear":
        betas = bs + (be - bs) * frac
        _within(ours.betas, betas, 4 * u * max(bs, be) + 2 * u * betas, "linear betas")
    elif cfg["name"] == "scaled_linear":
        betas = (bs ** 0.5 + (be ** 0.5 - bs ** 0.5) * frac) ** 2
        _within(ours.betas, betas, 10 * u * max(bs, be) + 4 * u * betas, "scaled_linear betas")
    else:   # Nichol & Dhariwal 2021, eq. 17, capped at 0.999: the float64 value rounded to float32
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((k + 1) / T) / f(k / T), 0.999) for k in range(T)], dtype=F64)
        assert torch.equal(ours.betas, betas.float()), "cosine betas"
    assert torch.equal(ours.alphas, 1 - ours.betas)
    # the float32 running product: T roundings of relative size u (and absolute 2**-150 past the normal range)
    ac64 = torch.cumprod(ours.alphas.double(), 0)
    _within(ours.alphas_cumprod, ac64, ((1 + u) ** (i + 1) - 1) * ac64 + (i + 1) * 2.0 ** -149, "alphas_cumprod")
    assert bool((ours.alphas_cumprod[1:] <= ours.alphas_cumprod[:-1]).all())


@settings(max_examples=N_SCHEDULE, **_SETTINGS)
@given(cfg=schedule_configs())
def test_schedule_fuzz(cfg):
    note(repr(cfg))
    _check_tables(cfg)


@st.composite
def timestep_cases(draw):
    T = draw(st.one_of(st.integers(1, 12), st.integers(1, 1000)))
    n = None if draw(st.integers(0, 9)) == 0 else _steps_counts(draw, T)
    return T, n


@settings(max_examples=N_TIMESTEPS, **_SETTINGS)
@given(case=timestep_cases())
def test_timesteps_fuzz(case):
    """DDPMSampler / DDIMSampler timesteps against diffusers' set_timesteps (leading spacing, steps_offset 0);
    DDPMSampler(num_inference_steps=None) against diffusers' schedulers without set_timesteps (every step)."""
    T, n = case
    s = NoiseSchedule(T)
    ref = diffusers.DDPMScheduler(T)
    if n is None:
        assert torch.equal(DDPMSampler(s).timesteps, ref.timesteps)
        return
    ref.set_timesteps(n)
    assert torch.equal(DDPMSampler(s, n).timesteps, ref.timesteps)
    ref = diffusers.DDIMScheduler(T)
    ref.set_timesteps(n)
    ours = DDIMSampler(s, n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.timesteps.dtype == torch.int64 and len(ours.timesteps) == n


# ------------------------------------------------------------------------------ samplers

@st.composite
def sampler_cases(draw, path: str = "torch") -> dict:
    triton = path == "triton"
    cfg = draw(schedule_configs())
    T = cfg["T"]
    kind = draw(st.sampled_from(["ddpm", "ddim"]))
    n = _steps_counts(draw, T)
    if kind == "ddpm" and draw(st.integers(0, 7)) == 0:
        n = None
    dtypes = _dtypes(path)
    x_dtype = draw(st.sampled_from(dtypes))
    mixed = draw(st.integers(0, 3)) == 0
    c = dict(schedule=cfg, kind=kind, n=n, prediction_type=draw(st.sampled_from(PREDICTION_TYPES)),
             clip=draw(st.booleans()),
             clip_range=draw(st.one_of(st.sampled_from([1.0, 1.0, 0.5, 2.0]), st.floats(0.05, 5.0))),
             shape=_shape(draw, 2 if triton else 3, 64 if triton else 300, (1023, 1024, 1025) if not triton else ()),
             x_dtype=x_dtype, m_dtype=draw(st.sampled_from(dtypes)) if mixed else x_dtype,
             z_dtype=draw(st.sampled_from(dtypes)) if mixed else x_dtype,
             m_scale=draw(st.sampled_from([0.3, 1.0, 3.0, 30.0])), x_scale=draw(st.sampled_from([1.0, 1.0, 0.1, 10.0])),
             layout=draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided"])),
             t_kind=draw(st.sampled_from(["int", "tensor", "numpy"])),
             seeded=draw(st.integers(0, 3)) == 0, philox_seed=draw(st.integers(0, 2**63 - 1)),
             generate=draw(st.booleans()) and not triton, seed=draw(st.integers(0, 2**31)))
    if kind == "ddpm":
        c["variance_type"] = draw(st.sampled_from(["fixed_small", "fixed_large"]))
    else:
        c["eta"] = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
        c["set_alpha_to_one"] = draw(st.booleans())
    return c


def _samplers(c: dict):
    """(ours, diffusers' scheduler on float64 tables, the schedule)."""
    cfg = c["schedule"]
    sched = _schedule(cfg)
    common = dict(prediction_type=c["prediction_type"], clip_sample=c["clip"], clip_sample_range=c["clip_range"])
    if c["kind"] == "ddpm":
        ours = DDPMSampler(sched, c["n"], variance_type=c["variance_type"], **common)
        ref = diffusers.DDPMScheduler(**_diffusers_config(cfg), variance_type=c["variance_type"], **common)
        ref.one = ref.one.double()
    else:
        ours = DDIMSampler(sched, c["n"], eta=c["eta"], set_alpha_to_one=c["set_alpha_to_one"], **common)
        ref = diffusers.DDIMScheduler(**_diffusers_config(cfg), set_alpha_to_one=c["set_alpha_to_one"], **common)
        ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
    assert torch.equal(ref.alphas_cumprod, sched.alphas_cumprod)
    # diffusers' formulas in float64 on the same float32 table (module docstring: its float32 coefficients)
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    if c["n"] is not None:
        ref.set_timesteps(c["n"])
    assert torch.equal(ours.timesteps, ref.timesteps)
    return ours, ref, sched


def _prev_abar(c: dict, ref, ts: list, i: int) -> tuple[int, float]:
    t = ts[i]
    T = c["schedule"]["T"]
    if c["kind"] == "ddpm":
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        return prev, float(ref.alphas_cumprod[prev]) if prev >= 0 else 1.0
    prev = t - T // c["n"]
    return prev, float(ref.alphas_cumprod[prev]) if prev >= 0 else float(ref.final_alpha_cumprod)


def _ref_step(c: dict, ref, m: torch.Tensor, t: int, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """diffusers' step in float64 (on (B, N) views: DDPMScheduler.step reads shape[1]) with noise z."""
    shape = x.shape
    m2, x2, z2 = (v.to(F64).reshape(shape[0], -1) for v in (m, x, z))
    if c["kind"] == "ddpm":
        with mock.patch.object(ddpm_module, "randn_tensor", lambda *a, **k: z2):
            out = ref.step(m2, t, x2).prev_sample
    else:
        out = ref.step(m2, t, x2, eta=c["eta"], variance_noise=z2).prev_sample
    return out.reshape(shape)


def _step_magnitude(c: dict, t: int, a_t: float, a_p: float, x, m, z) -> torch.Tensor:
    """Sum of |terms| of the step's result (float64, elementwise): the scale of its rounding error.  x0_hat's own
    terms count where x0_hat is not clipped (or within rounding of the clip bound)."""
    a_t, a_p = torch.tensor(a_t, dtype=F64), torch.tensor(a_p, dtype=F64)
    b_t, b_p = 1 - a_t, 1 - a_p
    sa, sb = a_t.sqrt(), b_t.sqrt()
    ax, am, az = x.abs(), m.abs(), z.abs()
    pred = c["prediction_type"]
    if pred == "epsilon":
        x0, x0_terms = (x - sb * m) / sa, (ax + sb * am) / sa
    elif pred == "v_prediction":
        x0, x0_terms = sa * x - sb * m, sa * ax + sb * am
    else:
        x0, x0_terms = m, am
    if c["clip"]:
        r = c["clip_range"]
        x0_terms = torch.where(x0.abs() <= r + 1e-4 * x0_terms, x0_terms, torch.zeros_like(x0_terms))
        x0 = x0.clamp(-r, r)
    if c["kind"] == "ddpm":
        alpha = a_t / a_p
        beta = 1 - alpha
        c2, c3 = a_p.sqrt() * beta / b_t, alpha.sqrt() * b_p / b_t
        if t == 0:
            sigma = torch.zeros((), dtype=F64)
        elif c["variance_type"] == "fixed_small":
            sigma = (b_p / b_t * beta).clamp_min(1e-20).sqrt()
        else:
            sigma = beta.sqrt()
        return c2.abs() * (x0_terms + x0.abs()) + c3.abs() * ax + sigma * az
    var = b_p / b_t * (1 - a_t / a_p)
    std = c["eta"] * var.clamp_min(0).sqrt()
    d = (1 - a_p - std * std).clamp_min(0).sqrt()
    eps_terms = {"epsilon": am, "v_prediction": sa * am + sb * ax, "sample": (ax + sa * am) / sb}[pred]
    return a_p.sqrt() * (x0_terms + x0.abs()) + d * eps_terms + std * az


def _x0_undefined(c: dict, a_t: float) -> bool:
    """An epsilon prediction at abar_t = 0 (a float32 schedule that underflowed): x0_hat = (x_t - eps_hat) / 0.
    diffusers gets +-inf (+-clip_sample_range once clipped); our step folds x0_hat into c0 x_t + c1 eps_hat
    with c0 = inf, c1 = -inf (the kernel's form), which is NaN where x_t and eps_hat have the same sign.  A
    documented difference: such steps may be NaN where diffusers' are not (never the other way round)."""
    return c["prediction_type"] == "epsilon" and a_t == 0.0


def _rounding_nan_in_diffusers(c: dict, a_t: float, a_p: float) -> bool:
    """A DDIM step with eta > 0 where diffusers' sqrt(1 - abar_prev - std^2) takes a negative argument: it is
    (1 - eta^2) (1 - abar_prev) + eta^2 (1 - abar_prev)^2 abar_t / (abar_prev (1 - abar_t)) >= 0, computed as a
    difference that rounding makes negative when abar_t / abar_prev is below float64's resolution (a schedule
    whose float32 product runs into the subnormals).  diffusers' step is then NaN; ours clamps the argument at 0
    (ddim_step_coefficients), a step that is finite and off the exact one by a direction coefficient of ~1e-8.
    A documented difference: nothing to compare."""
    if c["kind"] != "ddim" or c["eta"] == 0:
        return False
    a_t, a_p = torch.tensor(a_t, dtype=F64), torch.tensor(a_p, dtype=F64)   # diffusers' expression, float64
    std = c["eta"] * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
    return bool(1 - a_p - std ** 2 < 0)


def _model(c: dict, shape, t: int, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """A synthetic model: a t-dependent multiple of x plus a fixed pattern (float64)."""
    return (0.5 * math.cos(0.37 * t + c["seed"] % 7)) * x + W


def _as_t(c: dict, t: int):
    return {"int": t, "tensor": torch.tensor(t), "numpy": np.int64(t)}[c["t_kind"]]


def _check_dtype_step(c, ours, ref, ts, i, x64, W, z64, device):
    """Our step at ts[i] in the drawn dtypes (layouts, t kind, noise or seed) against diffusers' float64 step
    from the same rounded inputs."""
    t = ts[i]
    prev, a_p = _prev_abar(c, ref, ts, i)
    a_t = float(ref.alphas_cumprod[t])
    if _rounding_nan_in_diffusers(c, a_t, a_p):
        return
    xd = _rounded(x64, c["x_dtype"])
    md = _rounded(_model(c, c["shape"], t, xd, W), c["m_dtype"])
    if c["seeded"]:
        zd = normal_noise(c["philox_seed"], c["shape"]).double()
    else:
        zd = _rounded(z64, c["z_dtype"])
    if not all(bool(torch.isfinite(v).all()) for v in (xd, md, zd)):
        # an input beyond its dtype's range (fp16 past 65504: the chain of a wide schedule, unclipped) is inf: our
        # folded step multiplies it by its zero coefficients too (c4 = 0 for DDPM), NaN where diffusers' formulas,
        # which never read it there, give +-inf.  Out of scope: nothing to compare
        return
    want = _ref_step(c, ref, md, t, xd, zd)
    x_in = _layout(xd.to(device=device, dtype=c["x_dtype"]), c["layout"])
    m_in = _layout(md.to(device=device, dtype=c["m_dtype"]), c["layout"])
    if c["seeded"]:
        got = ours.step(m_in, _as_t(c, t), x_in, seed=c["philox_seed"])
    else:
        got = ours.step(m_in, _as_t(c, t), x_in, noise=zd.to(device=device, dtype=c["z_dtype"]))
    assert got.dtype == c["x_dtype"] and got.shape == tuple(c["shape"]) and got.device.type == torch.device(device).type
    mag = _step_magnitude(c, t, a_t, a_p, xd, md, zd)
    math_dtype = _math_dtype(c["x_dtype"])
    # a result beyond the dtype's range is +-inf in it (fp16: |x| >= 65520, an unclipped x0_hat on a wide schedule)
    want = torch.where(torch.isinf(want.to(c["x_dtype"])), want.to(c["x_dtype"]).to(F64), want)
    _within(got, want, _bound(want, mag, c["x_dtype"], math_dtype),
            f"step {i}/{len(ts)} (t={t}, prev={prev}) in {c['x_dtype']}", nan_ok=_x0_undefined(c, a_t))


def _windows(n: int, full: int, part: int, pick: int) -> list:
    """Index ranges of the chain to run: all of it when short, else its first and last ``part`` steps and a few
    from a random place (``pick``)."""
    if n <= full:
        return [(0, n)]
    k = pick % (n - 4)
    return [(0, part), (k, k + 4), (n - part, n)]


def _check_sampler(c: dict, device: str) -> None:
    ours, ref, sched = _samplers(c)
    ts = ours.timesteps.tolist()
    shape = tuple(c["shape"])
    g = torch.Generator().manual_seed(c["seed"])
    W = torch.randn(shape, generator=g, dtype=F64) * c["m_scale"]
    for lo, hi in _windows(len(ts), CHAIN_FULL, CHAIN_PART, c["seed"]):
        restart = True
        for i in range(lo, hi):
            if restart:
                x_ref = torch.randn(shape, generator=g, dtype=F64) * c["x_scale"]     # diffusers' float64 chain
                x_ours = x_ref.clone()                                  # ours, float64, run on its own
                run_mag = torch.zeros(shape, dtype=F64)
            t = ts[i]
            z = torch.randn(shape, generator=g, dtype=F64)
            _check_dtype_step(c, ours, ref, ts, i, x_ref, W, z, device)
            prev, a_p = _prev_abar(c, ref, ts, i)
            a_t = float(ref.alphas_cumprod[t])
            mag = _step_magnitude(c, t, a_t, a_p, x_ref, _model(c, shape, t, x_ref, W), z)
            run_mag = torch.maximum(run_mag, torch.nan_to_num(mag, nan=0.0))
            x_next = _ref_step(c, ref, _model(c, shape, t, x_ref, W), t, x_ref, z)
            x_ours = ours.step(_model(c, shape, t, x_ours, W), t, x_ours, noise=z)
            # the float64 chains: rounding at 1e-16 of every step's terms, carried through the chain
            skip = _rounding_nan_in_diffusers(c, a_t, a_p)
            if not skip:
                _within(x_ours, x_next, _bound(x_next, run_mag, F64, F64), f"float64 chain at step {i} (t={t})",
                        nan_ok=_x0_undefined(c, a_t))
            x_ref = x_next
            # a NaN step (diffusers' too: abar_t = abar_prev = 0 is 0 / 0) or an overflow would leave nothing to
            # compare: go on from fresh values
            restart = skip or _x0_undefined(c, a_t) or not bool(torch.isfinite(x_next).all())
    if c["generate"] and len(ts) <= CHAIN_FULL:
        _check_generate(c, ours, ref, shape, W)


def _check_generate(c, ours, ref, shape, W):
    """sampler.generate in float64 against diffusers' chain with generate's noise: x_T from torch's generator
    seeded with ``seed``, each step's noise the Philox stream of a seed drawn from the same generator."""
    seed = c["seed"]
    model_fn = lambda x, tt: _model(c, shape, int(tt[0]), x, W)  # noqa: E731
    got = ours.generate(model_fn, shape, seed=seed, dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32).double()
    run_mag = torch.zeros(shape, dtype=F64)
    ts = ours.timesteps.tolist()
    undefined = False
    for i, t in enumerate(ts):
        undefined = undefined or _x0_undefined(c, float(ref.alphas_cumprod[t]))
        if _rounding_nan_in_diffusers(c, float(ref.alphas_cumprod[t]), _prev_abar(c, ref, ts, i)[1]):
            return
        step_seed = int(torch.randint(0, 2**62, (), generator=gen))
        z = normal_noise(step_seed, shape).double()
        m = _model(c, shape, t, x, W)
        _, a_p = _prev_abar(c, ref, ts, i)
        run_mag = torch.maximum(run_mag, torch.nan_to_num(_step_magnitude(c, t, float(ref.alphas_cumprod[t]), a_p,
                                                                           x, m, z), nan=0.0))
        x = _ref_step(c, ref, m, t, x, z)
    assert got.dtype == F64
    _within(got, x, _bound(x, run_mag, F64, F64), "generate (float64)", nan_ok=undefined)


@settings(max_examples=N_SAMPLER, **_SETTINGS)
@given(c=sampler_cases("torch"))
def test_sampler_fuzz_torch(torch_path, c):
    note(repr(c))
    _check_sampler(c, torch_path)


@settings(max_examples=N_SAMPLER_TRITON, **_SETTINGS)
@given(c=sampler_cases("triton"), pick=st.integers(0, 2**31))
def test_sampler_fuzz_triton(triton_path, c, pick):
    """The first, the last and one random step of the chain on the Triton path (interpreter on a CPU machine)."""
    note(repr(c))
    ours, ref, _ = _samplers(c)
    ts = ours.timesteps.tolist()
    g = torch.Generator().manual_seed(c["seed"])
    shape = tuple(c["shape"])
    W = torch.randn(shape, generator=g, dtype=F64) * c["m_scale"]
    for i in sorted({0, len(ts) - 1, pick % len(ts)}):
        x = torch.randn(shape, generator=g, dtype=F64) * c["x_scale"]
        z = torch.randn(shape, generator=g, dtype=F64)
        _check_dtype_step(c, ours, ref, ts, i, x, W, z, triton_path)


# ------------------------------------------------------------------------------ q_sample and the loss

@st.composite
def noising_cases(draw, path: str = "torch") -> dict:
    triton = path == "triton"
    dtypes = _dtypes(path)
    x_dtype = draw(st.sampled_from(dtypes))
    return dict(schedule=draw(schedule_configs()),
                shape=_shape(draw, 2 if triton else 5, 1100 if triton else 2100,
                             (1023, 1024, 1025) if triton else (1023, 1024, 1025, 2049)),
                x_dtype=x_dtype,
                pred_dtype=draw(st.sampled_from(dtypes)) if draw(st.integers(0, 3)) == 0 else x_dtype,
                t_kind=draw(st.sampled_from(["int", "int64", "int32"])),
                given=draw(st.booleans()), philox_seed=draw(st.integers(0, 2**63 - 1)),
                target=draw(st.sampled_from(PREDICTION_TYPES)), pred_scale=draw(st.sampled_from([0.0, 0.1, 1.0])),
                x_scale=draw(st.sampled_from([1.0, 1.0, 0.01, 30.0])),
                ac_dtype=draw(st.sampled_from([torch.float32, torch.float32, F64])),
                layouts=tuple(draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided"]))
                              for _ in range(3)),
                training_loss=draw(st.booleans()) and not triton, seed=draw(st.integers(0, 2**31)))


def _leaf(v: torch.Tensor, device, dtype, layout: str = "contiguous") -> torch.Tensor:
    """A copy of v in dtype on device, in ``layout``, that requires grad (a copy even where .to would return v)."""
    return _layout(v.to(device=device, dtype=dtype, copy=True), layout).detach().requires_grad_()


def _check_noising(c: dict, device: str) -> None:
    cfg, shape, xt, pt = c["schedule"], tuple(c["shape"]), c["x_dtype"], c["pred_dtype"]
    sched = _schedule(cfg)
    ac = sched.alphas_cumprod.to(c["ac_dtype"])    # a float64 table holds the same (float32) values
    T, B = cfg["T"], shape[0]
    ref = diffusers.DDPMScheduler(**_diffusers_config(cfg))
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    g = torch.Generator().manual_seed(c["seed"])
    if c["t_kind"] == "int":
        t_long = torch.full((B,), int(torch.randint(0, T, (), generator=g)))
        t_arg = int(t_long[0])
    else:
        t_long = torch.randint(0, T, (B,), generator=g)
        t_long[0] = T - 1
        if B > 1:
            t_long[1] = 0
        t_arg = t_long.to(torch.int32 if c["t_kind"] == "int32" else torch.int64).to(device)
    x0_64 = _rounded(torch.randn(shape, generator=g, dtype=F64) * c["x_scale"], xt)
    n64 = _rounded(torch.randn(shape, generator=g, dtype=F64), xt) if c["given"] else \
        normal_noise(c["philox_seed"], shape).double()
    x0 = _leaf(x0_64, device, xt, c["layouts"][0])
    noise = _leaf(n64, device, xt, c["layouts"][1]) if c["given"] else None
    kw = dict(noise=noise) if c["given"] else dict(seed=c["philox_seed"])

    # q_sample against diffusers' add_noise
    x_t, eps = q_sample(x0, t_arg, ac.to(device), **kw)
    want = ref.add_noise(x0_64, n64, t_long)
    abar = ref.alphas_cumprod[t_long].view((-1,) + (1,) * (len(shape) - 1))
    sa, sb = abar.sqrt(), (1 - abar).sqrt()
    assert x_t.dtype == xt and x_t.shape == shape
    _within(x_t, want, _bound(want, sa * x0_64.abs() + sb * n64.abs(), xt, _math_dtype(xt)), "q_sample x_t")
    if c["given"]:
        assert eps is noise
    else:
        assert eps.dtype == xt and eps.shape == shape
        # the documented stream, rounded to x0's dtype: exactly on the torch path; the kernel's within 1e-6 (a
        # compiled kernel's libdevice rounds log / cos / sin its own way; the interpreter uses numpy's)
        triton = os.environ.get("LEEDL_FAST_BACKEND") == "triton"
        _within(eps, normal_noise(c["philox_seed"], shape).to(xt).double(), 1e-6 if triton else 0.0, "eps")

    # the loss against the float64 target (diffusers' get_velocity for v_prediction) and autograd
    target = c["target"]
    leaves = [v.clone().requires_grad_() for v in (x0_64, n64)]
    if target == "epsilon":
        tgt, tgt_mag = leaves[1], n64.abs()
    elif target == "sample":
        tgt, tgt_mag = leaves[0], x0_64.abs()
    else:
        tgt, tgt_mag = ref.get_velocity(leaves[0], leaves[1], t_long), sa * n64.abs() + sb * x0_64.abs()
    # pred: a guess of the target (exact, close or not), rounded to its dtype
    p64 = _rounded(tgt.detach() + c["pred_scale"] * torch.randn(shape, generator=g, dtype=F64), pt)
    p64_leaf = p64.clone().requires_grad_()
    want_loss = ((p64_leaf - tgt) ** 2).mean()
    want_loss.backward()
    pred = _leaf(p64, device, pt, c["layouts"][2])
    loss = noise_prediction_loss(pred, x0, t_arg, ac.to(device), target=target, **kw)
    math_dtype = _math_dtype(xt, pt)
    assert loss.dtype == math_dtype and loss.shape == ()
    N = p64.numel()
    diff_terms = p64.abs() + tgt_mag                               # |terms| of pred - target
    d = (p64 - tgt.detach()).abs()
    rtol_m = tolerance(math_dtype)[1]
    _within(loss, want_loss.detach(), rtol_m * (want_loss.detach() + 2 * (d * diff_terms).mean()) + 1e-30, "loss")
    loss.backward()
    gmag = 2.0 / N * diff_terms
    for name, got, leaf, dt in (("dpred", pred.grad, p64_leaf, pt), ("dx0", x0.grad, leaves[0], xt),
                                ("dnoise", None if noise is None else noise.grad, leaves[1], xt)):
        if name == "dnoise" and noise is None:
            continue
        want_g = leaf.grad if leaf.grad is not None else torch.zeros(shape, dtype=F64)
        got = got if got is not None else torch.zeros(shape, dtype=dt)
        assert got.dtype == dt and got.shape == shape, name
        atol, rtol = tolerance(dt)
        _within(got, want_g, atol * 2.0 / N + rtol * want_g.abs() + rtol_m * gmag, name)

    if c["training_loss"]:
        _check_training_loss(c, sched, x0_64.to(device, xt), t_long.to(device), device)


def _check_training_loss(c, sched, x0, t, device):
    """training_loss = noise_prediction_loss(model(q_sample(x0, t, seed).x_t, t), x0, t, seed) (its docstring)."""
    W = torch.linspace(-1, 1, x0[0].numel(), dtype=x0.dtype, device=device).reshape(x0.shape[1:])
    model = lambda x, tt, y=None: 0.5 * x + W + (0 if y is None else y.view((-1,) + (1,) * (x.dim() - 1)))  # noqa: E731
    labels = torch.arange(x0.shape[0], device=device) % 3 if c["seed"] % 2 else None
    got = training_loss(model, x0, sched, seed=c["philox_seed"], t=t, prediction_type=c["target"],
                        class_labels=labels)
    ac = sched.alphas_cumprod
    x_t, _ = q_sample(x0, t, ac, seed=c["philox_seed"])
    pred = model(x_t, t) if labels is None else model(x_t, t, labels)
    want = noise_prediction_loss(pred, x0, t, ac, seed=c["philox_seed"], target=c["target"])
    assert torch.equal(got, want)


@settings(max_examples=N_NOISING, **_SETTINGS)
@given(c=noising_cases("torch"))
def test_noising_fuzz_torch(torch_path, c):
    note(repr(c))
    _check_noising(c, torch_path)


@settings(max_examples=N_NOISING_TRITON, **_SETTINGS)
@given(c=noising_cases("triton"))
def test_noising_fuzz_triton(triton_path, c):
    note(repr(c))
    _check_noising(c, triton_path)


# ------------------------------------------------------------------------------ failures found by the fuzzing


def _case(**kw) -> dict:
    """A sampler case as sampler_cases draws them."""
    c = dict(schedule=dict(T=1000, name="linear", beta_start=1e-4, beta_end=0.02, alias=False), kind="ddpm", n=10,
             prediction_type="epsilon", clip=True, clip_range=1.0, shape=(2, 7), x_dtype=torch.float32,
             m_dtype=torch.float32, z_dtype=torch.float32, m_scale=1.0, x_scale=1.0, layout="contiguous", t_kind="int",
             seeded=False, philox_seed=0, generate=False, seed=0, variance_type="fixed_small", eta=0.5,
             set_alpha_to_one=True)
    c.update(kw)
    return c


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("beta_start,beta_end,seed", [(1e-9, 1e-3, 0), (1e-4, 0.2, 13)], ids=["abar_one", "abar_zero"])
def test_samplers_where_abar_is_exactly_one_or_zero(torch_path, kind, prediction_type, beta_start, beta_end, seed):
    """A schedule whose float32 alphas_cumprod is exactly 1 (beta_start 1e-9: 1 - beta_0 rounds to 1, and the last
    step divides by 1 - abar_0 = 0) or reaches 0 (linear up to beta_end 0.2: the product underflows from t = 984
    on) -- both accepted by NoiseSchedule and diffusers -- made DDPMSampler / DDIMSampler raise ZeroDivisionError
    while computing their coefficients (Python float division by abar_t, 1 - abar_t or abar_prev), whatever the
    prediction type.  The coefficients now follow IEEE arithmetic, as diffusers' tensors: every step equals
    diffusers' float64 step, NaN where it is NaN (0 / 0), finite where it is finite (v_prediction and sample from
    the first abar_t = 0), but for the documented difference of _x0_undefined (epsilon at abar_t = 0).  The chain
    check runs the first and last CHAIN_PART of the 1000 steps and steps 13..16 (``seed`` 13: t = 986..983)."""
    c = _case(schedule=dict(T=1000, name="linear", beta_start=beta_start, beta_end=beta_end, alias=False), kind=kind,
              n=1000, prediction_type=prediction_type, eta=1.0, seed=seed)
    _check_sampler(c, torch_path)


# bf16 on the Triton path only where it is compiled (a GPU): the interpreter's bf16 is wrong (TRITON_ON_CPU.md).
_PRECISION_CASES = [(path, x0, pred) for path in ("torch", "triton")
                    for x0, pred in ((torch.float32, torch.float16), (torch.float32, torch.bfloat16), (F64, torch.float32))
                    if not (path == "triton" and pred == torch.bfloat16 and not torch.cuda.is_available())]


@pytest.mark.parametrize("path,x0_dtype,pred_dtype", _PRECISION_CASES, ids=str)
@pytest.mark.parametrize("target", ["v_prediction", "sample"])
@pytest.mark.parametrize("create_graph", [False, True], ids=["fused", "create_graph"])
def test_loss_gradients_in_x0_and_noise_keep_their_precision(request, path, x0_dtype, pred_dtype, target, create_graph):
    """noise_prediction_loss's gradients in x0 and in a given noise were computed from d loss / d pred rounded
    to pred's dtype: with an fp16 / bf16 model output (autocast) and a float32 x0 they carried pred's rounding,
    and where 2 (pred - target) / N is below fp16's subnormal steps (a close prediction, a large batch) they
    came out as 0 or a few bits; a float64 x0 got float32 gradients from a float32 pred.  They are now taken
    from the gradient in the loss's own dtype (float32, float64 with a float64 input), as the unfused
    expression's autograd does."""
    device = request.getfixturevalue(f"{path}_path")
    shape = (2, 3, 16, 16)
    N = math.prod(shape)
    ac = NoiseSchedule(1000, "cosine").alphas_cumprod
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([10, 999])
    x0_64, n64 = (torch.randn(shape, generator=g, dtype=F64).to(x0_dtype).double() for _ in range(2))
    abar = ac.double()[t].view(-1, 1, 1, 1)
    tgt = abar.sqrt() * n64 - (1 - abar).sqrt() * x0_64 if target == "v_prediction" else x0_64
    p64 = (tgt + 0.01 * torch.randn(shape, generator=g, dtype=F64)).to(pred_dtype).double()   # a close prediction
    leaves = [v.clone().requires_grad_() for v in (p64, x0_64, n64)]
    tgt_ref = abar.sqrt() * leaves[2] - (1 - abar).sqrt() * leaves[1] if target == "v_prediction" else leaves[1]
    want = torch.autograd.grad(((leaves[0] - tgt_ref) ** 2).mean(), leaves, allow_unused=True)
    want = [torch.zeros(shape, dtype=F64) if w is None else w for w in want]
    ins = [_leaf(p64, device, pred_dtype), _leaf(x0_64, device, x0_dtype), _leaf(n64, device, x0_dtype)]
    loss = noise_prediction_loss(ins[0], ins[1], t.to(device), ac.to(device), noise=ins[2], target=target)
    got = torch.autograd.grad(loss, ins, create_graph=create_graph)
    rtol = tolerance(_math_dtype(x0_dtype, pred_dtype))[1]
    mag = 2.0 / N * (p64.abs() + tgt.abs() + x0_64.abs() + n64.abs())      # |terms| of 2 (pred - target) / N
    for name, a, w, dt in zip(("dpred", "dx0", "dnoise"), got, want, (pred_dtype, x0_dtype, x0_dtype)):
        assert a.dtype == dt, name
        # the dtype's rounding (its subnormal steps included: dpred of fp16 is 2 (pred - target) / N in fp16) and
        # the math dtype's rounding of the terms
        sub = torch.finfo(dt).tiny * torch.finfo(dt).eps
        _within(a, w, sub + tolerance(dt)[1] * w.abs() + rtol * mag, name)

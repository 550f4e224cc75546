"""Fused diffusion noising against the unfused PyTorch expressions (and torch.compile of them) and
diffusers' DDPMScheduler.step.

Memory-bound; bytes counted per call of ours:
* q_sample drawing its noise: read x0, write x_t and eps (3 tensors);
* noising + loss, forward and backward: q_sample (3) + loss forward reading pred (1) + backward reading
  pred and writing its gradient (2) = 6 tensors (the epsilon target needs no x0 read in the loss);
* a DDPM step: read the model output and x_t, write x_prev (3 tensors).
"""
from __future__ import annotations

import torch

from leedl_fast.bench.common import Case, CheckResult
from leedl_fast.ops.noising import (_noise_torch, ddim_step, ddim_step_reference, ddpm_step_reference,
                                    noise_prediction_loss, noise_prediction_loss_reference, q_sample,
                                    q_sample_reference)

OPS = ("q_sample", "noise_prediction_loss", "ddpm_step")

_GPU_SHAPE = (64, 3, 256, 256)
_CPU_SHAPE = (8, 3, 32, 32)
_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _schedule(device):
    from leedl_fast.diffusion import NoiseSchedule

    return NoiseSchedule(1000, "linear").to(device)


def _unfused_q_sample(x0, t, ac):
    eps = torch.randn_like(x0)
    abar = ac.to(x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps, eps


def _unfused_noising_loss(x0, t, ac, pred):
    x_t, eps = _unfused_q_sample(x0, t, ac)
    loss = torch.nn.functional.mse_loss(pred.float(), eps.float())
    loss.backward()
    return x_t


def cases(device: str, quick: bool):
    gpu = device.startswith("cuda")
    shape = _GPU_SHAPE if gpu else _CPU_SHAPE
    dtypes = [torch.float32, torch.bfloat16] if gpu else [torch.float32]
    sched = _schedule(device)
    ac = sched.alphas_cumprod
    n = 1
    for s in shape:
        n *= s
    dims = dict(zip("BCHW", shape))
    for dtype in dtypes:
        elt = torch.empty((), dtype=dtype).element_size()
        x0 = torch.randn(shape, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (shape[0],), device=device)

        peers = {"unfused": lambda x0=x0, t=t: _unfused_q_sample(x0, t, ac)}
        if gpu:
            peers["unfused_compiled"] = torch.compile(_unfused_q_sample, dynamic=False)
            peers["unfused_compiled"] = (lambda f=peers["unfused_compiled"], x0=x0, t=t: f(x0, t, ac))
        yield Case("q_sample", "fwd", dtype, dims, lambda x0=x0, t=t: q_sample(x0, t, ac, seed=1234), peers,
                   bytes=3 * n * elt)

        pred = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)

        def ours(x0=x0, t=t, pred=pred):
            x_t, _ = q_sample(x0, t, ac, seed=99)
            noise_prediction_loss(pred, x0, t, ac, seed=99).backward()
            pred.grad = None
            return x_t

        def unfused(x0=x0, t=t, pred=pred):
            x_t = _unfused_noising_loss(x0, t, ac, pred)
            pred.grad = None
            return x_t

        peers = {"unfused": unfused}
        if gpu:
            compiled = torch.compile(_unfused_noising_loss, dynamic=False)

            def unfused_compiled(x0=x0, t=t, pred=pred, f=compiled):
                x_t = f(x0, t, ac, pred)
                pred.grad = None
                return x_t

            peers["unfused_compiled"] = unfused_compiled
        yield Case("noise_prediction_loss", "fwd+bwd", dtype, dims, ours, peers, bytes=6 * n * elt,
                   extra={"includes": "q_sample + loss forward + backward"})

        from leedl_fast.diffusion import DDPMSampler

        sampler = DDPMSampler(sched)
        m = torch.randn(shape, device=device, dtype=dtype)
        x_t = torch.randn(shape, device=device, dtype=dtype)
        peers = {}
        try:
            from diffusers import DDPMScheduler

            ref = DDPMScheduler(1000, beta_schedule="linear")
            ref.alphas_cumprod = ref.alphas_cumprod.to(device)
            peers["diffusers"] = lambda m=m, x_t=x_t: ref.step(m, 500, x_t).prev_sample
        except Exception:  # not installed, or an install that does not import with this torch
            pass
        yield Case("ddpm_step", "fwd", dtype, dims, lambda m=m, x_t=x_t: sampler.step(m, 500, x_t, seed=5), peers,
                   bytes=3 * n * elt)
        if not gpu and quick:
            break


def check(device: str):
    """The Triton path against the float64 references, the noise from the Philox stream of the seed."""
    out = []
    sched = _schedule(device)
    ac = sched.alphas_cumprod
    ac64 = ac.double().cpu()
    shape = (3, 5, 77)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float32, 2e-5)):
        name = _NAMES[dtype]
        try:
            x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
            pred = torch.randn(shape, dtype=torch.float64).to(dtype)
            t = torch.tensor([0, 500, 999])
            noise = _noise_torch(7, shape, "cpu").double()

            def rel(a, e):
                a, e = a.detach().double().cpu(), e.detach().double().cpu()
                return ((a - e).abs() / (1 + e.abs())).max().item()

            x_t, eps = q_sample(x0.to(device), t.to(device), ac, seed=7)
            err = max(rel(x_t, q_sample_reference(x0.double(), t, ac64, noise)), rel(eps, noise))
            out.append(CheckResult("q_sample", name, f"{shape} seeded", err, tol, bool(err <= tol)))

            for target in ("epsilon", "v_prediction", "sample"):
                pd = pred.to(device).clone().requires_grad_()
                loss = noise_prediction_loss(pd, x0.to(device), t.to(device), ac, seed=7, target=target)
                loss.backward()
                pr = pred.detach().double().requires_grad_()
                ref = noise_prediction_loss_reference(pr, x0.double(), t, ac64, noise, target)
                ref.backward()
                # the gradient is 2 (pred - target) / N: compare relative to its scale
                gscale = pr.grad.abs().max().item()
                err = max(rel(loss, ref), (pd.grad.double().cpu() - pr.grad).abs().max().item() / gscale)
                out.append(CheckResult("noise_prediction_loss", name, f"{shape} {target} fwd+bwd", err, tol,
                                       bool(err <= tol)))

            from leedl_fast.diffusion import DDPMSampler

            m, x = pred.detach(), x0
            sampler = DDPMSampler(sched, 50, clip_sample=True)
            tt = int(sampler.timesteps[10])
            prev = int(sampler.timesteps[11])
            y = sampler.step(m.to(device), tt, x.to(device), seed=7)
            ref = ddpm_step_reference(m.double(), tt, x.double(), ac64, prev_t=prev, noise=noise)
            err = rel(y, ref)
            out.append(CheckResult("ddpm_step", name, f"{shape} t={tt} clip", err, tol, bool(err <= tol)))
            y = ddim_step(m.to(device), 600, x.to(device), ac, prev_t=580, eta=0.5, prediction_type="v_prediction",
                          seed=7)
            ref = ddim_step_reference(m.double(), 600, x.double(), ac64, prev_t=580, eta=0.5,
                                      prediction_type="v_prediction", noise=noise)
            err = rel(y, ref)
            out.append(CheckResult("ddim_step", name, f"{shape} v eta=0.5", err, tol, bool(err <= tol)))
        except Exception as exc:  # the report carries the failure
            out.append(CheckResult("noising", name, "check", float("nan"), tol, False, f"{type(exc).__name__}: {exc}"))
    return out

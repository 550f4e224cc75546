"""ops.noising on both paths: q_sample, the noise-prediction loss and the reverse steps against float64
references (and diffusers' add_noise), the Philox noise, gradients, errors, custom-op registration."""
import numpy as np
import pytest
import torch

from leedl_fast.ops import noising as N
from leedl_fast.ops.noising import (ddim_step, ddim_step_reference, ddpm_step, ddpm_step_reference,
                                    noise_prediction_loss, noise_prediction_loss_reference, q_sample,
                                    q_sample_reference)
from leedl_fast.random import MAX_SEED, _uint_to_uniform, philox_normal, philox_randint4x
from tests.harness import assert_close

# (B, ...) shapes: a single element, odd sizes, a sample spanning two kernel blocks (1024).
SHAPES = [(1, 1), (2, 17), (3, 5, 7), (2, 1, 33, 33)]
DTYPES = [torch.float32, torch.float16]
TARGETS = ["epsilon", "v_prediction", "sample"]


def _schedule(kind="linear", n=1000):
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float32) if kind == "linear" else \
        torch.linspace(0.0085**0.5, 0.012**0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0)


def _t(batch, n=1000):
    # the ends of the schedule first, then random steps
    t = torch.randint(0, n, (batch,))
    t[0] = n - 1
    if batch > 1:
        t[1] = 0
    return t


def _noise(seed, shape):
    return N._noise_torch(seed, shape, "cpu").double()


# ----------------------------------------------------------------------------- q_sample

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given", [False, True])
def test_q_sample(any_path, shape, dtype, given):
    ac = _schedule()
    x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
    t = _t(shape[0])
    seed = 1234 + shape[-1]
    noise = torch.randn(shape, dtype=torch.float64).to(dtype) if given else None
    noise_dev = None if noise is None else noise.to(any_path)
    x_t, eps = q_sample(x0.to(any_path), t.to(any_path), ac.to(any_path), noise_dev, seed=None if given else seed)
    assert x_t.dtype == dtype and eps.dtype == dtype and x_t.shape == shape
    ref_noise = noise.double() if given else _noise(seed, shape)
    assert_close(x_t, q_sample_reference(x0.double(), t, ac.double(), ref_noise), dtype=dtype, name="x_t")
    assert_close(eps, ref_noise, dtype=dtype, atol=1e-6 if dtype == torch.float32 else None, name="eps")
    if given:
        assert eps is noise_dev  # the given noise is returned, not copied


def test_q_sample_equals_diffusers_add_noise(any_path):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(1000, beta_schedule="squaredcos_cap_v2")
    x0, noise = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    t = torch.tensor([0, 10, 500, 999])
    ref = sched.add_noise(x0, noise, t)
    out, _ = q_sample(x0.to(any_path), t.to(any_path), sched.alphas_cumprod.to(any_path), noise.to(any_path))
    assert_close(out, ref.double(), dtype=torch.float32)


def test_q_sample_int_t_and_noncontiguous(any_path):
    ac = _schedule()
    base = torch.randn(5, 6, 4, dtype=torch.float64)
    x0 = base.transpose(1, 2)  # (5, 4, 6), not contiguous
    x_t, eps = q_sample(x0.float().to(any_path), 321, ac.to(any_path), seed=9)
    ref = q_sample_reference(x0, torch.full((5,), 321), ac.double(), _noise(9, (5, 4, 6)))
    assert_close(x_t, ref, dtype=torch.float32)


def test_q_sample_gradients(any_path):
    ac = _schedule()
    x0 = torch.randn(3, 2, 5, dtype=torch.float64)
    noise = torch.randn(3, 2, 5, dtype=torch.float64)
    g = torch.randn(3, 2, 5, dtype=torch.float64)
    t = _t(3)
    xr, nr = x0.clone().requires_grad_(), noise.clone().requires_grad_()
    q_sample_reference(xr, t, ac.double(), nr).backward(g)
    xd = x0.float().to(any_path).requires_grad_()
    nd = noise.float().to(any_path).requires_grad_()
    out, _ = q_sample(xd, t.to(any_path), ac.to(any_path), nd)
    out.backward(g.float().to(any_path))
    assert_close(xd.grad, xr.grad, dtype=torch.float32, name="dx0")
    # sample: the target does not involve the noise, the gradient is zero
    assert_close(nd.grad, torch.zeros_like(nr) if nr.grad is None else nr.grad, dtype=torch.float32, name="dnoise")
    # seeded: the gradient reaches x0 only
    xs = x0.float().to(any_path).requires_grad_()
    out, eps = q_sample(xs, t.to(any_path), ac.to(any_path), seed=3)
    assert not eps.requires_grad                     # the drawn noise does not depend on x0
    out.backward(g.float().to(any_path))
    assert_close(xs.grad, xr.grad, dtype=torch.float32, name="dx0 seeded")


# ----------------------------------------------------------------------------- the noise

@pytest.mark.parametrize("seed", [0, 77, 2**31 + 7, MAX_SEED])
def test_noise_same_on_torch_path_and_kernel(seed, triton_path, monkeypatch):
    """Interpreter (or GPU) kernel vs the torch path, same seed.  Under the interpreter the noise is
    bit-identical (the CPU port evaluates Box-Muller's log and cos with numpy, as the interpreter does); a
    compiled GPU kernel's libdevice rounds the last bit its own way, so there it agrees to 1e-6."""
    shape = (3, 2, 700)  # 1400 elements per sample: two blocks each, ragged
    ac = _schedule()
    x0 = torch.zeros(shape)
    t = torch.full((3,), 999)
    _, eps_kernel = q_sample(x0.to(triton_path), t.to(triton_path), ac.to(triton_path), seed=seed)
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "torch")
    _, eps_torch = q_sample(x0, t, ac, seed=seed)
    eps_kernel = eps_kernel.cpu()
    if triton_path == "cpu":
        assert torch.equal(eps_kernel, eps_torch)
        # and both are the stream's definition, element by element in numpy float32: sample b, element j
        # takes Box-Muller pair (j % 4) // 2 of the Philox call at counter b * ceil(C / 4) + j // 4,
        # cosine for even j, sine for odd; the cosine of the first pair is tl.randn's number
        per = eps_torch[0].numel()
        j = torch.arange(per)
        ctr = torch.arange(3)[:, None] * ((per + 3) // 4) + j[None, :] // 4
        words = torch.stack(philox_randint4x(seed, ctr), -1)                       # [3, per, 4]
        a = ((j % 4) // 2).expand_as(ctr)[..., None]
        wa, wb = words.gather(-1, 2 * a)[..., 0], words.gather(-1, 2 * a + 1)[..., 0]
        u1 = np.maximum(np.float32(1e-7), _uint_to_uniform(wa).numpy())
        th = np.float32(6.283185307179586) * _uint_to_uniform(wb).numpy()
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        expect = np.where((j % 2 == 0).numpy(), r * np.cos(th), r * np.sin(th)).astype(np.float32)
        assert np.array_equal(eps_kernel.reshape(3, -1).numpy(), expect)
        assert torch.equal(eps_torch.reshape(3, -1)[:, 0], philox_normal(seed, torch.arange(3) * ((per + 3) // 4)))
    else:
        assert (eps_kernel - eps_torch).abs().max().item() <= 1e-6


def test_noise_statistics(any_path):
    n = 100_000 if N.backend.select("noising", torch.empty(1, device=any_path)) == "torch" else 16_384
    x0 = torch.zeros(4, n // 4)
    _, eps = q_sample(x0.to(any_path), torch.zeros(4, dtype=torch.int64, device=any_path),
                      _schedule().to(any_path), seed=11)
    eps = eps.cpu().double()
    tol = 5 / n**0.5  # five standard errors
    assert abs(eps.mean().item()) < tol and abs(eps.std().item() - 1) < tol
    assert abs(((eps**3).mean()).item()) < 3 * 15**0.5 / n**0.5  # no skew (var of x^3 is 15)
    # different seeds: unrelated noise
    _, other = q_sample(x0.to(any_path), torch.zeros(4, dtype=torch.int64, device=any_path),
                        _schedule().to(any_path), seed=12)
    assert abs(torch.corrcoef(torch.stack([eps.flatten(), other.cpu().double().flatten()]))[0, 1]) < tol


def test_seed_none_draws_from_torch_generator(any_path):
    ac, x0, t = _schedule().to(any_path), torch.zeros(2, 50, device=any_path), torch.tensor([5, 6], device=any_path)
    torch.manual_seed(3)
    a = q_sample(x0, t, ac)[1]
    b = q_sample(x0, t, ac)[1]
    torch.manual_seed(3)
    c = q_sample(x0, t, ac)[1]
    assert torch.equal(a, c) and not torch.equal(a, b)


# ----------------------------------------------------------------------------- loss

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_value_and_grads(any_path, shape, target, dtype):
    ac = _schedule("scaled_linear")
    x0 = torch.randn(shape, dtype=torch.float64).to(dtype)
    pred = torch.randn(shape, dtype=torch.float64).to(dtype)
    t = _t(shape[0])
    seed = 99
    pr, xr = pred.double().requires_grad_(), x0.double().requires_grad_()
    ref = noise_prediction_loss_reference(pr, xr, t, ac.double(), _noise(seed, shape), target)
    ref.backward()
    pd, xd = pred.to(any_path).requires_grad_(), x0.to(any_path).requires_grad_()
    loss = noise_prediction_loss(pd, xd, t.to(any_path), ac.to(any_path), seed=seed, target=target)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # the loss sums N float32-rounded squares: relative error grows like sqrt(N) eps_fp32 at worst
    assert_close(loss, ref, dtype=torch.float32, scale=4, name="loss")
    assert_close(pd.grad, pr.grad, dtype=dtype, name="dpred")
    # epsilon: the target does not involve x0, the gradient is zero
    assert_close(xd.grad, torch.zeros_like(xr) if xr.grad is None else xr.grad, dtype=dtype, name="dx0")


@pytest.mark.parametrize("target", TARGETS)
def test_loss_with_noise_tensor_and_its_grad(any_path, target):
    ac = _schedule()
    shape = (3, 4, 9)
    x0, pred, noise = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    t = _t(3)
    pr, nr = pred.clone().requires_grad_(), noise.clone().requires_grad_()
    noise_prediction_loss_reference(pr, x0, t, ac.double(), nr, target).backward()
    pd = pred.float().to(any_path).requires_grad_()
    nd = noise.float().to(any_path).requires_grad_()
    loss = noise_prediction_loss(pd, x0.float().to(any_path), t.to(any_path), ac.to(any_path), noise=nd, target=target)
    loss.backward()
    assert_close(loss, noise_prediction_loss_reference(pred, x0, t, ac.double(), noise, target), dtype=torch.float32)
    assert_close(pd.grad, pr.grad, dtype=torch.float32, name="dpred")
    # sample: the target does not involve the noise, the gradient is zero
    assert_close(nd.grad, torch.zeros_like(nr) if nr.grad is None else nr.grad, dtype=torch.float32, name="dnoise")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("given_noise", [False, True], ids=["seed", "noise"])
def test_loss_second_derivatives(any_path, target, given_noise):
    """A Hessian-vector product through the loss (backward with create_graph=True, then differentiated
    again): d<w, dL/dpred>/d(pred, x0, noise) against the float64 reference's, the noise drawn from the
    seed or given."""
    ac = _schedule()
    shape, seed = (3, 4, 9), 7
    pred, x0, w = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    noise = torch.randn(shape, dtype=torch.float64) if given_noise else _noise(seed, shape)
    t = _t(3)

    def hvp(loss_fn, cast):
        p, x, n = (cast(z).requires_grad_() for z in (pred, x0, noise))
        (dp,) = torch.autograd.grad(loss_fn(p, x, n), p, create_graph=True)
        grads = torch.autograd.grad((dp * cast(w)).sum(), (p, x, n) if given_noise else (p, x), allow_unused=True)
        return [torch.zeros_like(z) if g is None else g for g, z in zip(grads, (p, x, n))]

    want = hvp(lambda p, x, n: noise_prediction_loss_reference(p, x, t, ac.double(), n, target), lambda z: z.clone())
    kw = {"noise": None, "seed": seed}
    got = hvp(lambda p, x, n: noise_prediction_loss(p, x, t.to(any_path), ac.to(any_path), target=target,
                                                    **({"noise": n} if given_noise else kw)),
              lambda z: z.float().to(any_path))
    for name, a, b in zip(("pred", "x0", "noise"), got, want):
        assert_close(a, b, dtype=torch.float32, name=f"d2/d{name}")
    assert bool(got[0].abs().sum() > 0)  # d2L/dpred2 = 2/N: the product is not trivially zero


@pytest.mark.parametrize("target", TARGETS)
def test_loss_gradgradcheck(torch_path, target):
    """Second derivatives in every differentiable input (pred, x0, noise) by finite differences, float64."""
    ac = _schedule().double()
    t = _t(2)
    pred, x0, noise = (torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fn = lambda p, x, n: noise_prediction_loss(p, x, t, ac, noise=n, target=target)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (pred, x0, noise))


def test_loss_regenerates_the_q_sample_noise(any_path):
    """Predicting exactly the noise q_sample drew for a seed gives zero loss: the kernel regenerated it."""
    ac = _schedule().to(any_path)
    x0 = torch.randn(4, 3, 5, 5, device=any_path)
    t = torch.tensor([1, 100, 600, 999], device=any_path)
    x_t, eps = q_sample(x0, t, ac, seed=2024)
    assert noise_prediction_loss(eps, x0, t, ac, seed=2024).item() == 0.0
    assert noise_prediction_loss(eps, x0, t, ac, seed=2025).item() > 1.0
    v = ac[t].sqrt().view(-1, 1, 1, 1) * eps - (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * x0
    assert noise_prediction_loss(v, x0, t, ac, seed=2024, target="v_prediction").item() < 1e-12


def test_loss_mixed_dtypes(any_path):
    ac = _schedule()
    x0 = torch.randn(2, 40, dtype=torch.float64)
    pred = torch.randn(2, 40, dtype=torch.float64)
    t = _t(2)
    loss = noise_prediction_loss(pred.half().to(any_path), x0.float().to(any_path), t.to(any_path), ac.to(any_path),
                                 seed=5)
    ref = noise_prediction_loss_reference(pred.half().double(), x0.float().double(), t, ac.double(), _noise(5, (2, 40)))
    assert_close(loss, ref, dtype=torch.float32, scale=4)


# ----------------------------------------------------------------------------- reverse steps

STEP_CASES = [(999, 949), (20, 0), (0, -1)]


@pytest.mark.parametrize("t,prev_t", STEP_CASES)
@pytest.mark.parametrize("prediction_type", TARGETS)
@pytest.mark.parametrize("variance_type,clip", [("fixed_small", True), ("fixed_large", False)])
def test_ddpm_step(any_path, t, prev_t, prediction_type, variance_type, clip):
    ac = _schedule()
    shape = (2, 3, 7, 5)
    x, m, z = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    kw = dict(prev_t=prev_t, prediction_type=prediction_type, clip_sample=clip, variance_type=variance_type)
    ref = ddpm_step_reference(m, t, x, ac.double(), noise=z, **kw)
    out = ddpm_step(m.float().to(any_path), t, x.float().to(any_path), ac.to(any_path), noise=z.float().to(any_path),
                    **kw)
    # 1/sqrt(abar_t) reaches ~160 at t = 999: the float32 inputs' rounding is amplified that much
    assert_close(out, ref, dtype=torch.float32, scale=1 if clip or prediction_type != "epsilon" else 200)
    seeded = ddpm_step(m.float().to(any_path), t, x.float().to(any_path), ac.to(any_path), seed=7, **kw)
    ref_seeded = ddpm_step_reference(m, t, x, ac.double(), noise=_noise(7, shape), **kw)
    assert_close(seeded, ref_seeded, dtype=torch.float32, scale=1 if clip or prediction_type != "epsilon" else 200)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ddpm_step_dtypes_and_default_prev(any_path, dtype):
    ac = _schedule()
    x, m, z = (torch.randn(3, 33, dtype=torch.float64).to(dtype) for _ in range(3))
    out = ddpm_step(m.to(any_path), 400, x.to(any_path), ac.to(any_path), noise=z.to(any_path))
    assert out.dtype == dtype
    assert_close(out, ddpm_step_reference(m.double(), 400, x.double(), ac.double(), noise=z.double()), dtype=dtype)


@pytest.mark.parametrize("t,prev_t", [(980, 960), (40, 20), (0, -1)])
@pytest.mark.parametrize("prediction_type", TARGETS)
@pytest.mark.parametrize("eta,dtype", [(0.0, torch.float32), (0.5, torch.float16), (1.0, torch.float32)])
def test_ddim_step(any_path, t, prev_t, prediction_type, eta, dtype):
    ac = _schedule()
    shape = (2, 4, 5, 3)
    x, m, z = (torch.randn(shape, dtype=torch.float64).to(dtype).double() for _ in range(3))
    kw = dict(prev_t=prev_t, eta=eta, prediction_type=prediction_type)
    ref = ddim_step_reference(m, t, x, ac.double(), noise=z, **kw)
    out = ddim_step(m.to(dtype).to(any_path), t, x.to(dtype).to(any_path), ac.to(any_path),
                    noise=z.to(dtype).to(any_path), **kw)
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype)
    unclipped = ddim_step(m.to(dtype).to(any_path), t, x.to(dtype).to(any_path), ac.to(any_path), seed=4,
                          clip_sample=False, **kw)
    ref2 = ddim_step_reference(m, t, x, ac.double(), noise=_noise(4, shape), clip_sample=False, **kw)
    # sample prediction divides by sqrt(1 - abar_t), ~0.01 at t = 0: inputs' rounding amplified ~100x
    amp = 100 if prediction_type == "sample" and t == 0 else (200 if prediction_type == "epsilon" and t > 900 else 1)
    assert_close(unclipped, ref2, dtype=dtype, scale=amp)


def test_step_draws_noise_only_when_needed(any_path):
    ac = _schedule().to(any_path)
    x, m = torch.randn(2, 20, device=any_path), torch.randn(2, 20, device=any_path)
    # t = 0 adds no noise, DDIM with eta 0 neither: the seed does not matter
    assert torch.equal(ddpm_step(m, 0, x, ac, seed=1), ddpm_step(m, 0, x, ac, seed=2))
    assert torch.equal(ddim_step(m, 500, x, ac, prev_t=480, seed=1), ddim_step(m, 500, x, ac, prev_t=480, seed=2))
    assert not torch.equal(ddpm_step(m, 5, x, ac, seed=1), ddpm_step(m, 5, x, ac, seed=2))


# ----------------------------------------------------------------------------- errors, registration

def test_errors():
    ac = _schedule()
    x0 = torch.randn(3, 4)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="t must lie"):
        q_sample(x0, torch.tensor([0, 1, 1000]), ac, seed=0)
    with pytest.raises(ValueError, match="t must lie"):
        q_sample(x0, torch.tensor([0, -1, 3]), ac, seed=0)
    with pytest.raises(ValueError, match="outside"):
        q_sample(x0, 1000, ac, seed=0)
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        q_sample(x0, torch.tensor([0, 1]), ac, seed=0)
    with pytest.raises(ValueError, match="integer"):
        q_sample(x0, t.float(), ac, seed=0)
    with pytest.raises(ValueError, match="noise has shape"):
        q_sample(x0, t, ac, torch.randn(3, 5))
    with pytest.raises(ValueError, match="noise has dtype"):
        q_sample(x0, t, ac, torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="x0 must be"):
        q_sample(x0.long(), t, ac, seed=0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        q_sample(x0, t, ac[None], seed=0)
    with pytest.raises(ValueError, match="seed"):
        q_sample(x0, t, ac, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        q_sample(x0, t, ac, torch.randn(3, 4), seed=1)
    with pytest.raises(ValueError, match="target"):
        noise_prediction_loss(x0, x0, t, ac, seed=0, target="x0")
    with pytest.raises(ValueError, match="seed is required"):
        noise_prediction_loss(x0, x0, t, ac)
    with pytest.raises(ValueError, match="pred has shape"):
        noise_prediction_loss(x0[:, :2], x0, t, ac, seed=0)
    with pytest.raises(ValueError, match="t must lie"):
        noise_prediction_loss(x0, x0, torch.tensor([0, 1, 5000]), ac, seed=0)
    with pytest.raises(ValueError, match="prediction_type"):
        ddpm_step(x0, 5, x0, ac, prediction_type="eps")
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_step(x0, 5, x0, ac, variance_type="learned")
    with pytest.raises(ValueError, match="t must be"):
        ddpm_step(x0, 1000, x0, ac)
    with pytest.raises(ValueError, match="prev_t"):
        ddim_step(x0, 5, x0, ac, prev_t=7)
    with pytest.raises(ValueError, match="prev_t"):
        ddim_step(x0, 5, x0, ac, prev_t=None)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(x0, 5, x0, ac, prev_t=3, eta=-0.1)
    with pytest.raises(ValueError, match="model_output has shape"):
        ddpm_step(x0[:2], 5, x0, ac)
    # t is checked before the default prev_t (t - 1) is formed from it; a float tensor is not a step
    for bad in ("5", None, torch.tensor([5, 5, 5]), torch.tensor(5.7), 5.0):
        with pytest.raises(ValueError, match="t must be an int"):
            ddpm_step(x0, bad, x0, ac)
        with pytest.raises(ValueError, match="t must be an int"):
            ddim_step(x0, bad, x0, ac, prev_t=3)
    assert torch.equal(ddpm_step(x0, torch.tensor(5), x0, ac, seed=1), ddpm_step(x0, 5, x0, ac, seed=1))
    for eta in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eta"):
            ddim_step(x0, 5, x0, ac, prev_t=3, eta=eta)
    for final in (0.0, 1.5, "1"):
        with pytest.raises(ValueError, match="final_alpha_cumprod"):
            ddim_step(x0, 5, x0, ac, prev_t=-1, final_alpha_cumprod=final)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="t is on"):
            q_sample(x0.cuda(), t, ac.cuda(), seed=0)
        with pytest.raises(ValueError, match="alphas_cumprod is on"):
            q_sample(x0.cuda(), t.cuda(), ac, seed=0)
    else:
        with pytest.raises(ValueError, match="t is on"):
            q_sample(x0, t.to("meta"), ac, seed=0)
        with pytest.raises(ValueError, match="alphas_cumprod is on"):
            q_sample(x0, t, ac.to("meta"), seed=0)


def test_empty_batch(any_path):
    ac = _schedule().to(any_path)
    x_t, eps = q_sample(torch.empty(0, 3, device=any_path), torch.empty(0, dtype=torch.int64, device=any_path), ac,
                        seed=1)
    assert x_t.shape == (0, 3) and eps.shape == (0, 3)


def test_opcheck(torch_path):
    ac = _schedule()
    x0, pred, noise = torch.randn(3, 5, 2), torch.randn(3, 5, 2, requires_grad=True), torch.randn(3, 5, 2)
    t = torch.tensor([3, 500, 999])
    ops = torch.ops.leedl_fast
    torch.library.opcheck(ops.q_sample.default, (x0.clone().requires_grad_(), t, ac, noise.clone().requires_grad_()))
    torch.library.opcheck(ops.q_sample_seeded.default, (x0.clone().requires_grad_(), t, ac, 17))
    torch.library.opcheck(ops.noise_prediction_loss.default, (pred, x0, t, ac, None, 17, "v_prediction"))
    torch.library.opcheck(ops.noise_prediction_loss.default, (pred, x0, t, ac, noise, 0, "epsilon"))
    torch.library.opcheck(ops.noise_prediction_loss_backward.default,
                          (torch.tensor(1.5), pred.detach(), x0, t, ac, None, 17, "sample"))
    torch.library.opcheck(ops.sampler_step.default, (pred.detach(), x0, torch.randn(6), None, 3, True, 1.0))


def test_torch_compile_fullgraph(torch_path):
    ac = _schedule()
    lin = torch.nn.Linear(6, 6)

    def f(x0, t):
        x_t, _ = q_sample(x0, t, ac, seed=123)
        return noise_prediction_loss(lin(x_t), x0, t, ac, seed=123, target="v_prediction")

    x0, t = torch.randn(4, 6), torch.tensor([1, 2, 3, 999])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x0, t)
    out.backward()
    g = lin.weight.grad.clone()
    lin.weight.grad = None
    expect = f(x0, t)
    expect.backward()
    assert_close(out, expect.detach(), dtype=torch.float32)
    assert_close(g, lin.weight.grad, dtype=torch.float32)


def test_kernel_turns_out_of_range_t_into_nan(triton_path):
    """A CUDA t is not range-checked on the host (a sync): the kernel writes NaN for that sample instead of
    reading outside alphas_cumprod.  The op is called directly here, past the host check."""
    ac = _schedule().to(triton_path)
    x0 = torch.randn(3, 40, device=triton_path)
    t = torch.tensor([5, 1000, -1], device=triton_path)
    x_t, _ = N._q_sample_seeded_op(x0, t, ac, 3)
    assert torch.isfinite(x_t[0]).all() and torch.isnan(x_t[1:]).all()
    loss = N._loss_op(x0, x0, t, ac, None, 3, "v_prediction")
    assert torch.isnan(loss)


# ----------------------------------------------------------------------------- steps: gradients, float64, checks

@pytest.mark.parametrize("step", ["ddpm", "ddim"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("prediction_type", TARGETS)
def test_step_gradients(any_path, step, clip, prediction_type):
    """d x_prev / d (model_output, x_t, noise) against autograd through the float64 reference (guidance on x_t
    and fine-tuning through the sampler need them)."""
    ac = _schedule()
    g = torch.Generator().manual_seed(5)
    x, m, z, w = (torch.randn(2, 3, 17, dtype=torch.float64, generator=g) for _ in range(4))
    kw = dict(prediction_type=prediction_type, clip_sample=clip)
    if step == "ddpm":
        op, ref_op, kw = ddpm_step, ddpm_step_reference, dict(kw, prev_t=380)
    else:
        op, ref_op, kw = ddim_step, ddim_step_reference, dict(kw, prev_t=380, eta=0.7)
    dtype = torch.float32 if _on_triton() else torch.float64      # the kernel takes no float64
    leaves = [t.clone().requires_grad_() for t in (m, x, z)]
    (ref_op(leaves[0], 400, leaves[1], ac.double(), noise=leaves[2], **kw) * w).sum().backward()
    ours = [t.to(any_path, dtype).requires_grad_() for t in (m, x, z)]
    out = op(ours[0], 400, ours[1], ac.to(any_path), noise=ours[2], **kw)
    (out * w.to(any_path, dtype)).sum().backward()
    if clip:   # the clip is active somewhere, or the test would not cover its gradient mask
        c0, c1 = N._x0_coefs(float(ac[400]), prediction_type)
        assert ((c0 * x + c1 * m).abs() > 1).any()
    for a, b, name in zip(ours, leaves, ("model_output", "x_t", "noise")):
        assert_close(a.grad, b.grad, dtype=dtype, name=name)


def _on_triton() -> bool:
    import os

    return os.environ.get("LEEDL_FAST_BACKEND") == "triton"


@pytest.mark.parametrize("prediction_type", TARGETS)
def test_float64_steps_keep_float64(torch_path, prediction_type):
    """A float64 step uses float64 coefficients: equal to the float64 reference to rounding, at t = 999 too."""
    ac = _schedule().double()
    x, m, z = (torch.randn(2, 40, dtype=torch.float64) for _ in range(3))
    for t, prev in ((999, 998), (500, 480), (1, 0)):
        kw = dict(prev_t=prev, prediction_type=prediction_type, clip_sample=False)
        assert_close(ddpm_step(m, t, x, ac, noise=z, **kw), ddpm_step_reference(m, t, x, ac, noise=z, **kw),
                     dtype=torch.float64, scale=10)
        assert_close(ddim_step(m, t, x, ac, noise=z, eta=0.3, **kw),
                     ddim_step_reference(m, t, x, ac, noise=z, eta=0.3, **kw), dtype=torch.float64, scale=10)


def test_compiled_ops_refuse_an_out_of_range_cpu_t(torch_path):
    """Inside torch.compile the host check is skipped; the op's body still refuses a CPU t outside the
    schedule instead of indexing alphas_cumprod from the end (t = -1 read abar_999)."""
    ac = _schedule()
    x0 = torch.ones(2, 4)
    f = torch.compile(lambda x0, t: q_sample(x0, t, ac, seed=0)[0], fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x0, torch.tensor([3, 5])), q_sample(x0, torch.tensor([3, 5]), ac, seed=0)[0])
    for bad in ([-1, 5], [1000, 5]):
        with pytest.raises(RuntimeError, match="t must lie"):
            f(x0, torch.tensor(bad))
    g = torch.compile(lambda p, x0, t: noise_prediction_loss(p, x0, t, ac, seed=0), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="t must lie"):
        g(torch.zeros(2, 4), x0, torch.tensor([-1, -1]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64])
def test_q_sample_t_of_any_integer_dtype(torch_path, dtype):
    ac = _schedule()
    x0 = torch.randn(3, 5)
    t = torch.tensor([0, 7, 200])
    assert torch.equal(q_sample(x0, t.to(dtype), ac, seed=1)[0], q_sample(x0, t, ac, seed=1)[0])


def test_uint64_t_past_int64_is_refused(torch_path):
    t = torch.tensor([2**63 + 5, 1], dtype=torch.uint64)
    with pytest.raises(ValueError, match="t must lie"):
        q_sample(torch.randn(2, 3), t, _schedule(), seed=1)


@pytest.mark.parametrize("kw,match", [
    (dict(clip_sample_range=-1.0), "clip_sample_range"),
    (dict(clip_sample_range=float("nan")), "clip_sample_range"),
    (dict(clip_sample_range="a"), "clip_sample_range"),
    (dict(clip_sample="yes"), "clip_sample"),
    (dict(eta=1.5), "eta"),
    (dict(eta=-0.1), "eta"),
], ids=str)
def test_step_argument_errors(kw, match):
    ac = _schedule()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        ddim_step(x, 500, x, ac, prev_t=480, **kw)
    if "eta" not in kw:
        with pytest.raises(ValueError, match=match):
            ddpm_step(x, 0, x, ac, **kw)


@pytest.mark.parametrize("table,match", [
    ([0.9, 0.95, 0.5], "must not increase"),          # abar_1 > abar_0: DDPM's beta_1 < 0 (sqrt of it: math domain error)
    ([0.9, 0.8, 1.5], r"alphas_cumprod\[2\] = 1.5"),
    ([0.9, -0.1, 0.5], r"alphas_cumprod\[1\] = -0.1"),
    ([0.9, float("nan"), 0.5], r"alphas_cumprod\[1\] = nan"),
], ids=["increasing", "above_one", "negative", "nan"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_step_refuses_an_invalid_table(torch_path, table, match, variance_type):
    """A custom alphas_cumprod whose entries at t and prev_t are not probabilities (or, for DDPM, increase with
    t) is a ValueError naming it, not a math domain error or a NaN step."""
    ac = torch.tensor(table)
    x = torch.randn(2, 3)
    t = 2 if "increase" not in match else 1
    with pytest.raises(ValueError, match=match):
        ddpm_step(x, t, x, ac, prev_t=t - 1, variance_type=variance_type, noise=x)
    if "increase" not in match:
        with pytest.raises(ValueError, match=match):
            ddim_step(x, t, x, ac, prev_t=t - 1, eta=0.5, noise=x)


def test_step_opcheck_with_gradients(torch_path):
    x, m, z = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    coef = torch.tensor([1.2, -0.4, 0.9, 0.3, 0.1, 0.05], dtype=torch.float64)
    torch.library.opcheck(torch.ops.leedl_fast.sampler_step.default, (m, x, coef, z, 0, True, 0.8))
    torch.library.opcheck(torch.ops.leedl_fast.sampler_step.default, (m, x, coef, None, 3, False, None))

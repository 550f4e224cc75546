"""GANLoss against hand-computed values; gradient_penalty against a hand-written autograd computation."""
import math

import pytest
import torch

from leedl_fast.gan import GAN_MODES, GANLoss, gradient_penalty
from tests.harness import assert_close

P = [0.3, -1.2, 2.0, 0.5, -0.05, 3.5]


def _mean(values):
    return sum(values) / len(values)


def _softplus(v):
    return math.log1p(math.exp(v))


# (mode, target_is_real, for_discriminator) -> the value written out from the formula, element by element
HAND = {
    ("lsgan", True, True): _mean([(p - 1) ** 2 for p in P]),
    ("lsgan", False, True): _mean([p ** 2 for p in P]),
    ("vanilla", True, True): _mean([_softplus(-p) for p in P]),   # -log(sigmoid(p))
    ("vanilla", False, True): _mean([_softplus(p) for p in P]),   # -log(1 - sigmoid(p))
    ("hinge", True, True): _mean([max(0.0, 1 - p) for p in P]),
    ("hinge", False, True): _mean([max(0.0, 1 + p) for p in P]),
    ("hinge", True, False): -_mean(P),
    ("wgangp", True, True): -_mean(P),
    ("wgangp", False, True): _mean(P),
}


@pytest.mark.parametrize("key", sorted(HAND), ids=lambda k: f"{k[0]}-{'real' if k[1] else 'fake'}-{'D' if k[2] else 'G'}")
@pytest.mark.parametrize("shape", [(6,), (2, 1, 1, 3)])
def test_gan_loss_values(key, shape):
    mode, target, for_d = key
    p = torch.tensor(P, dtype=torch.float64).reshape(shape)
    got = GANLoss(mode)(p, target, for_discriminator=for_d)
    assert got.shape == ()
    assert_close(got, torch.tensor(HAND[key], dtype=torch.float64), name=str(key))


@pytest.mark.parametrize("mode", ["lsgan", "vanilla", "wgangp"])
@pytest.mark.parametrize("target", [True, False])
def test_non_hinge_modes_ignore_for_discriminator(mode, target):
    p = torch.tensor(P)
    loss = GANLoss(mode)
    assert torch.equal(loss(p, target), loss(p, target, for_discriminator=False))


def test_gan_loss_gradient_lsgan():
    p = torch.tensor(P, dtype=torch.float64, requires_grad=True)
    GANLoss("lsgan")(p, True).backward()
    assert_close(p.grad, torch.tensor([2 * (v - 1) / len(P) for v in P], dtype=torch.float64), name="d lsgan / dp")


def test_gan_loss_half_precision_is_computed_in_float32():
    p = torch.tensor(P, dtype=torch.float16)
    got = GANLoss("vanilla")(p, True)
    assert got.dtype == torch.float32
    expected = _mean([_softplus(-float(v)) for v in p.tolist()])
    assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), dtype=torch.float32, name="vanilla fp16")


def test_gan_loss_errors():
    with pytest.raises(ValueError, match="gan_mode"):
        GANLoss("wgan")
    with pytest.raises(ValueError, match="prediction"):
        GANLoss("lsgan")(torch.tensor([1, 2]), True)
    with pytest.raises(ValueError, match="prediction"):
        GANLoss("lsgan")(torch.empty(0), True)
    with pytest.raises(ValueError, match="real_label"):
        GANLoss("lsgan", real_label="a")
    with pytest.raises(ValueError, match="fake_label"):
        GANLoss("vanilla", fake_label=float("nan"))
    assert set(GAN_MODES) == {"lsgan", "vanilla", "hinge", "wgangp"}


class _Critic(torch.nn.Module):
    def __init__(self, conditional=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.lin = torch.nn.Linear(3 * 5 * 4, 1)
        self.emb = torch.nn.Embedding(4, 3 * 5 * 4) if conditional else None

    def forward(self, x, y=None):
        h = torch.tanh(self.conv(x)).flatten(1)
        out = self.lin(h).squeeze(1)
        return out if y is None else out + (self.emb(y) * h).sum(1)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("lambda_gp", [10.0, 0.5])
def test_gradient_penalty_matches_hand_written_autograd(conditional, lambda_gp):
    D = _Critic(conditional).double()
    real, fake = torch.randn(5, 2, 5, 4, dtype=torch.float64), torch.randn(5, 2, 5, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2]) if conditional else None
    alpha = torch.rand(5, dtype=torch.float64)

    got = gradient_penalty(D, real, fake, lambda_gp, condition=y, alpha=alpha)
    g_got = torch.autograd.grad(got, list(D.parameters()), allow_unused=True, materialize_grads=True)

    # by hand: interpolate, differentiate D's output sum with respect to the input, penalise |grad| - 1
    x = (alpha[:, None, None, None] * real + (1 - alpha[:, None, None, None]) * fake).requires_grad_(True)
    out = D(x) if y is None else D(x, y)
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    norms = torch.sqrt((gx ** 2).sum(dim=(1, 2, 3)))
    expected = lambda_gp * ((norms - 1) ** 2).mean()
    g_expected = torch.autograd.grad(expected, list(D.parameters()), allow_unused=True, materialize_grads=True)

    assert_close(got, expected, name="penalty", scale=10)  # eps=1e-12 inside the square root
    for (name, _), a, e in zip(D.named_parameters(), g_got, g_expected):
        assert_close(a, e, name=f"d penalty / d {name}", scale=10)


def test_gradient_penalty_linear_critic_closed_form():
    # D(x) = <w, x>: the input gradient is w for every sample, so the penalty is lambda (|w| - 1)^2
    w = torch.randn(3, 4, dtype=torch.float64)
    got = gradient_penalty(lambda x: (x * w).sum(dim=(1, 2)), torch.randn(7, 3, 4, dtype=torch.float64),
                           torch.randn(7, 3, 4, dtype=torch.float64), 10.0)
    assert_close(got, 10.0 * (w.norm() - 1) ** 2, name="linear critic penalty")


def test_gradient_penalty_alpha_from_generator_is_reproducible():
    D = _Critic().double()
    real, fake = torch.randn(4, 2, 5, 4, dtype=torch.float64), torch.randn(4, 2, 5, 4, dtype=torch.float64)
    a = gradient_penalty(D, real, fake, generator=torch.Generator().manual_seed(3))
    b = gradient_penalty(D, real, fake, generator=torch.Generator().manual_seed(3))
    alpha = torch.rand(4, generator=torch.Generator().manual_seed(3)).double()
    assert torch.equal(a, b)
    assert_close(a, gradient_penalty(D, real, fake, alpha=alpha), name="same alpha")


def test_gradient_penalty_errors():
    D = _Critic()
    with pytest.raises(ValueError, match="fake"):
        gradient_penalty(D, torch.randn(2, 2, 5, 4), torch.randn(3, 2, 5, 4))
    with pytest.raises(ValueError, match="alpha"):
        gradient_penalty(D, torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), alpha=torch.rand(3))
    with pytest.raises(ValueError, match="lambda_gp"):
        gradient_penalty(D, torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), -1.0)

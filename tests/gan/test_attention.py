"""SelfAttention2d (SAGAN) on both paths against a dense float64 reference; gamma = 0 is the identity."""
import math

import pytest
import torch

from leedl_fast.gan import Discriminator, GANTrainer, Generator, SelfAttention2d, gradient_penalty
from tests.harness import assert_close

# (B, C, H, W): head dims padded 1->16, 2->16 / v 20->32, and C=264 split into two 132-channel heads of 256
SHAPES = [(2, 16, 4, 4), (1, 8, 5, 3), (2, 20, 3, 3), (1, 16, 1, 1), (1, 8, 1, 17), (1, 264, 2, 2)]


def _reference(module: SelfAttention2d, x: torch.Tensor) -> torch.Tensor:
    """out_j = gamma * sum_i softmax_i(q_j . k_i) v_i + x_j, dense, in float64, no score scaling."""
    def proj(conv, t):
        return torch.einsum("oc,bcn->bon", conv.weight.double()[:, :, 0, 0], t) + conv.bias.double()[None, :, None]

    b, c, h, w = x.shape
    t = x.double().flatten(2)                                   # (B, C, N)
    q, k, v = proj(module.query, t), proj(module.key, t), proj(module.value, t)
    p = torch.softmax(torch.einsum("bcj,bci->bji", q, k), dim=-1)  # (B, N_query, N_key)
    o = torch.einsum("bji,bci->bcj", p, v)
    return (module.gamma.double() * o + t).view(b, c, h, w)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_self_attention_matches_dense_reference(any_path, shape, dtype):
    device = any_path
    b, c, h, w = shape
    m = SelfAttention2d(c)
    with torch.no_grad():
        m.gamma.fill_(0.75)  # gamma starts at 0; a nonzero value exercises the attention output
        # a sharper softmax than the default init gives; q.k grows like sqrt(C/8), so wide blocks get less
        for conv in (m.query, m.key):
            conv.weight.mul_(3.0 * min(1.0, 16 / c) ** 0.25)
    ref_m = SelfAttention2d(c)
    ref_m.load_state_dict(m.state_dict())
    m = m.to(device, dtype)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    # the reference sees the same rounded inputs and weights, in float64
    ref_m = ref_m.double()
    with torch.no_grad():
        for p_ref, p in zip(ref_m.parameters(), m.parameters()):
            p_ref.copy_(p.double())
    x_ref = x.detach().double().requires_grad_(True)

    out = m(x)
    expected = _reference(ref_m, x_ref)
    assert out.dtype == dtype and out.shape == shape
    # Why wider than the table: in float16 q, k, v and o are each rounded to float16 before the next
    # product (three rounded stages), and gradients chain back through the same rounded stages; parameter
    # gradients also sum over the batch and every position.  float32 output needs no widening.
    half = dtype == torch.float16
    tf32 = device == "cuda"
    assert_close(out, expected, dtype=dtype, name="output", tf32=tf32, scale=4.0 if half else 1.0)

    g = torch.randn(shape, dtype=torch.float64)
    out.backward(g.to(device, dtype))
    expected.backward(g)
    assert_close(x.grad, x_ref.grad, dtype=dtype, name="dx", tf32=tf32, scale=8.0 if half else 2.0)
    for (name, p), p_ref in zip(m.named_parameters(), ref_m.parameters()):
        assert_close(p.grad, p_ref.grad, dtype=dtype, name=f"d{name}", tf32=tf32, scale=8.0 if half else 4.0)


@pytest.mark.parametrize("shape", [(2, 16, 4, 4), (1, 8, 5, 3)], ids=lambda s: "x".join(map(str, s)))
def test_gamma_zero_is_the_identity(any_path, shape):
    m = SelfAttention2d(shape[1]).to(any_path)
    assert float(m.gamma.detach()) == 0.0
    x = torch.randn(shape, device=any_path, requires_grad=True)
    out = m(x)
    assert torch.equal(out, x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert m.gamma.grad is not None and float(m.gamma.grad.abs()) > 0  # gamma learns from the first step


def test_self_attention_layout():
    m = SelfAttention2d(64)
    assert (m.qk_channels, m.groups, m.head_dim) == (8, 1, 64)
    assert m.query.out_channels == m.key.out_channels == 8 and m.value.out_channels == 64
    m = SelfAttention2d(600)
    assert (m.qk_channels, m.groups, m.group_channels, m.head_dim) == (75, 3, 200, 256)


def test_self_attention_in_generator_and_discriminator(torch_path):
    G = Generator(8, 8, 1, 8, attention=True)
    D = Discriminator(8, 1, 8, attention=True)
    assert sum(isinstance(m, SelfAttention2d) for m in G.modules()) == 1
    assert sum(isinstance(m, SelfAttention2d) for m in D.modules()) == 1
    for m in list(G.modules()) + list(D.modules()):
        if isinstance(m, SelfAttention2d):
            with torch.no_grad():
                m.gamma.fill_(0.5)
    D(G(torch.randn(3, 8))).sum().backward()
    for net in (G, D):
        att = next(m for m in net.modules() if isinstance(m, SelfAttention2d))
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in att.parameters())


def test_self_attention_errors():
    with pytest.raises(ValueError, match="channels"):
        SelfAttention2d(0)
    with pytest.raises(ValueError, match="channels"):
        SelfAttention2d(4096)
    with pytest.raises(ValueError, match="qk_channels"):
        SelfAttention2d(16, qk_channels=300)
    m = SelfAttention2d(16)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(16, 4, 4))


@pytest.mark.parametrize("shape", [(2, 16, 3, 5), (3, 8, 4, 4)], ids=lambda s: "x".join(map(str, s)))
def test_gradient_penalty_through_self_attention(torch_path, shape):
    """WGAN-GP differentiates D's input gradient: the attention op's backward is differentiated once more
    (``create_graph=True``).  Penalty and its gradient with respect to every parameter of the block, against
    the dense float64 reference's."""
    b, c, h, w = shape
    m = SelfAttention2d(c).double()
    with torch.no_grad():
        m.gamma.fill_(0.75)
    g = torch.Generator().manual_seed(3)
    real, fake = (torch.randn(shape, dtype=torch.float64, generator=g) for _ in range(2))
    alpha = torch.rand(b, dtype=torch.float64, generator=g)
    results = []
    for net in (m, lambda x: _reference(m, x)):
        m.zero_grad()
        gp = gradient_penalty(lambda x: net(x).square().sum((1, 2, 3)), real, fake, alpha=alpha)
        gp.backward()
        results.append((gp.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (gp, grads), (gp_ref, grads_ref) = results
    assert_close(gp, gp_ref, dtype=torch.float64, name="penalty")
    for n in grads_ref:
        assert grads_ref[n].abs().max() > 0, n      # every parameter is reached through the second derivative
        assert_close(grads[n], grads_ref[n], dtype=torch.float64, name=n)


def test_wgangp_trainer_with_attention_discriminator(torch_path):
    G, D = Generator(8, 8, 1, 8, attention=True), Discriminator(8, 1, 8, attention=True)
    tr = GANTrainer(G, D, latent_dim=8, gan_mode="wgangp")
    att = next(m for m in D.modules() if isinstance(m, SelfAttention2d))
    before = {n: p.detach().clone() for n, p in att.named_parameters()}
    for _ in range(2):
        out = tr.step(torch.rand(4, 1, 8, 8) * 2 - 1)
    assert all(math.isfinite(out[key]) for key in ("loss_D", "loss_G"))
    assert all(not torch.equal(p, before[n]) for n, p in att.named_parameters()), "D's attention block did not train"

"""The alternating trainer: n_critic, separate learning rates, spectral norm, mismatched pairs, gradient penalty;
text conditioning through leedl_fast.nn.TransformerEncoder."""
import copy

import pytest
import torch

from leedl_fast.gan import (ConditionalGenerator, Discriminator, GANLoss, GANTrainer, Generator,
                            ProjectionDiscriminator, TextEncoder, discriminator_step, generator_step,
                            mismatched_condition, sample_latent)
from leedl_fast.gan.trainer import frozen


def _uncond():
    return Generator(4, 8, 1, 4), Discriminator(8, 1, 4)


def _cond():
    return (ConditionalGenerator(4, (7, 5), 1, 4, num_classes=3, embed_dim=2),
            ProjectionDiscriminator((7, 5), 1, 4, num_classes=3))


def _snapshot(net):
    """The parameters only (batch-norm running statistics also change in G's forward of the D step)."""
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _moved(net, snap):
    return any(not torch.equal(v, snap[k]) for k, v in net.named_parameters())


@pytest.mark.parametrize("n_critic", [1, 2, 3])
def test_n_critic_updates_g_every_nth_call(n_critic):
    G, D = _uncond()
    tr = GANTrainer(G, D, latent_dim=4, n_critic=n_critic)
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    for call in range(1, 2 * n_critic + 1):
        g0, d0 = _snapshot(G), _snapshot(D)
        out = tr.step(real)
        assert _moved(D, d0)
        assert _moved(G, g0) == (call % n_critic == 0), call
        assert torch.isfinite(torch.tensor(out["loss_D"]))
    assert torch.isfinite(torch.tensor(out["loss_G"]))


def test_separate_learning_rates_and_options():
    G, D = _uncond()
    tr = GANTrainer(G, D, latent_dim=4, lr_g=1e-4, lr_d=4e-4, betas=(0.0, 0.9))
    assert tr.opt_G.param_groups[0]["lr"] == 1e-4 and tr.opt_D.param_groups[0]["lr"] == 4e-4
    assert tr.opt_D.param_groups[0]["betas"] == (0.0, 0.9)
    assert {id(p) for p in G.parameters()} == {id(p) for g in tr.opt_G.param_groups for p in g["params"]}
    assert tr.lambda_gp == 0.0 and GANTrainer(*_uncond(), latent_dim=4, gan_mode="wgangp").lambda_gp == 10.0


def test_spectral_norm_bounds_d_weights():
    G, D = _cond()
    tr = GANTrainer(G, D, latent_dim=4, spectral_norm=True, num_classes=3)
    layers = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding))]
    assert layers and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    real, y = torch.rand(6, 1, 7, 5) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(3):
        tr.step(real, y)
    for _ in range(30):  # power iterations run at each training-mode forward
        D(real, y)
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1) < 0.05, (m, float(sigma))


def test_conditional_d_step_is_the_gan_cls_objective():
    G, D = _cond()
    opt = torch.optim.SGD(D.parameters(), lr=0.0)  # look at the loss only
    real, y = torch.rand(5, 1, 7, 5) * 2 - 1, torch.tensor([0, 2, 1, 1, 0])
    G_copy, D_copy = copy.deepcopy(G), copy.deepcopy(D)
    torch.manual_seed(7)
    out = discriminator_step(G, D, opt, real, y, criterion=GANLoss("hinge"), latent_dim=4, num_classes=3,
                             mismatch_weight=0.5)
    torch.manual_seed(7)  # the same draws: z first, then the mismatched labels
    with torch.no_grad():
        fake = G_copy(sample_latent(5, 4), y)
        wrong = mismatched_condition(y, 3)
        relu = torch.relu
        want = (relu(1 - D_copy(real, y)).mean() + relu(1 + D_copy(fake, y)).mean()
                + 0.5 * relu(1 + D_copy(real, wrong)).mean())
    assert abs(out["loss_D"] - float(want)) < 1e-6
    assert "loss_D_mismatch" in out


def test_mismatch_and_penalty_terms_appear_when_asked():
    G, D = _cond()
    real, y = torch.rand(4, 1, 7, 5) * 2 - 1, torch.tensor([0, 1, 2, 0])
    out = GANTrainer(G, D, latent_dim=4, num_classes=3, gan_mode="wgangp").step(real, y)
    assert {"loss_D_mismatch", "gp"} <= set(out)
    out = GANTrainer(*_cond(), latent_dim=4, num_classes=3, mismatch_weight=0.0).step(real, y)
    assert "loss_D_mismatch" not in out and "gp" not in out
    out = GANTrainer(*_uncond(), latent_dim=4).step(torch.rand(4, 1, 8, 8))
    assert "loss_D_mismatch" not in out


def test_generator_step_freezes_d():
    G, D = _uncond()
    opt = torch.optim.Adam(G.parameters())
    d0 = _snapshot(D)
    generator_step(G, D, opt, 3, criterion=GANLoss("hinge"), latent_dim=4)
    assert all(p.grad is None for p in D.parameters())
    assert all(p.grad is not None for p in G.parameters())
    assert all(p.requires_grad for p in D.parameters()) and not _moved(D, d0)
    with frozen(D):
        assert not any(p.requires_grad for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())


@pytest.mark.parametrize("name,value", [
    ("lr_g", float("inf")), ("lr_d", float("nan")), ("lr_g", -1e-3),
    ("lambda_gp", -1.0), ("lambda_gp", float("nan")), ("lambda_gp", float("inf")),
    ("mismatch_weight", -0.5), ("mismatch_weight", float("nan")), ("mismatch_weight", True),
])
def test_trainer_weights_must_be_finite(name, value):
    with pytest.raises(ValueError, match=name):
        GANTrainer(*_uncond(), latent_dim=4, gan_mode="wgangp", **{name: value})


@pytest.mark.parametrize("num_classes", [1, 0, -3, "10", True, 3.0])
def test_trainer_num_classes_is_checked_up_front(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        GANTrainer(*_cond(), latent_dim=4, num_classes=num_classes)


def test_batch_of_one_leaves_out_only_the_mismatch_it_cannot_form():
    """Rolled conditions (vectors, or labels without num_classes) have no mismatched partner in a batch of one:
    the step runs without that term.  Labels with num_classes always have a wrong class, so the term stays."""
    real = torch.rand(1, 1, 7, 5) * 2 - 1
    G = ConditionalGenerator(4, (7, 5), 1, 4, cond_dim=3)
    D = ProjectionDiscriminator((7, 5), 1, 4, cond_dim=3)
    for tr, cond, mismatch in ((GANTrainer(G, D, latent_dim=4), torch.randn(1, 3), False),
                               (GANTrainer(*_cond(), latent_dim=4), torch.tensor([2]), False),
                               (GANTrainer(*_cond(), latent_dim=4, num_classes=3), torch.tensor([2]), True)):
        g0, d0 = _snapshot(tr.G), _snapshot(tr.D)
        out = tr.step(real, cond)
        assert ("loss_D_mismatch" in out) == mismatch
        assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
        assert _moved(tr.G, g0) and _moved(tr.D, d0)


def test_refused_mismatch_stops_the_step_before_g_runs():
    """num_classes with a vector condition: the mismatched labels are refused before G's forward moved its
    batch-norm statistics."""
    G = ConditionalGenerator(4, (7, 5), 1, 4, cond_dim=3)
    tr = GANTrainer(G, ProjectionDiscriminator((7, 5), 1, 4, cond_dim=3), latent_dim=4, num_classes=3)
    before = {k: v.clone() for k, v in G.state_dict().items()}
    with pytest.raises(ValueError, match="num_classes"):
        tr.step(torch.rand(2, 1, 7, 5), torch.randn(2, 3))
    assert all(torch.equal(v, before[k]) for k, v in G.state_dict().items())


def test_trainer_errors():
    with pytest.raises(ValueError, match="n_critic"):
        GANTrainer(*_uncond(), latent_dim=4, n_critic=0)
    with pytest.raises(ValueError, match="lr_d"):
        GANTrainer(*_uncond(), latent_dim=4, lr_d=0.0)
    with pytest.raises(ValueError, match="gan_mode"):
        GANTrainer(*_uncond(), latent_dim=4, gan_mode="least_squares")
    with pytest.raises(ValueError, match="distribution"):
        GANTrainer(*_uncond(), latent_dim=4, latent_distribution="gamma")
    tr = GANTrainer(*_cond(), latent_dim=4, num_classes=3)
    with pytest.raises(ValueError, match="condition"):
        tr.step(torch.rand(4, 1, 7, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="condition"):
        tr.step(torch.rand(4, 1, 7, 5), torch.tensor([0, 1, 2, 3]))


# ------------------------------------------------------------------------------------------ text conditioning

def _text_encoder(**kw):
    return TextEncoder(vocab_size=11, d_model=16, nhead=2, num_layers=2, dim_feedforward=32, max_len=9, out_dim=6, **kw)


def test_text_encoder_is_a_transformer_encoder_with_masked_mean(torch_path):
    from leedl_fast.nn.transformer import TransformerEncoder

    enc = _text_encoder().double().eval()
    assert isinstance(enc.encoder, TransformerEncoder)
    tokens = torch.tensor([[3, 4, 5, 0, 0], [7, 1, 2, 9, 10], [0, 0, 0, 0, 0]])
    mask = tokens == 0
    # the same computation with torch.nn's encoder, loaded from ours (same state_dict keys)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True)
    ref = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    ref.load_state_dict(enc.encoder.state_dict())
    h = enc.token(tokens) + enc.position(torch.arange(5))[None]
    hr = ref(h[:2], src_key_padding_mask=mask[:2])  # torch.nn gives NaN for the all-padding row; leave it out
    keep = (~mask[:2]).double().unsqueeze(-1)
    want = enc.proj((hr * keep).sum(1) / keep.sum(1))
    got = enc(tokens)
    assert torch.allclose(got[:2], want, atol=1e-10)
    assert torch.allclose(got[2], enc.proj.bias)  # an all-padding row pools to zero
    # tokens at padded positions do not matter
    other = tokens.clone()
    other[0, 3:] = 6
    assert torch.allclose(enc(other, key_padding_mask=mask)[0], got[0], atol=1e-10)


def test_text_conditional_gan_step(torch_path):
    G = ConditionalGenerator(4, 8, 1, 4, text_encoder=_text_encoder())
    D = ProjectionDiscriminator(8, 1, 4, text_encoder=_text_encoder())
    tokens = torch.randint(1, 11, (4, 7))
    tokens[1, 5:] = 0
    cond = (tokens, tokens == 0)
    tr = GANTrainer(G, D, latent_dim=4)
    g0, d0 = _snapshot(G), _snapshot(D)
    out = tr.step(torch.rand(4, 1, 8, 8) * 2 - 1, cond)
    assert "loss_D_mismatch" in out and all(torch.isfinite(torch.tensor(v)) for v in out.values())
    assert _moved(G, g0) and _moved(D, d0)
    enc_g0 = {k[len("condition.text_encoder."):]: v for k, v in g0.items() if k.startswith("condition.text_encoder.")}
    assert _moved(G.condition.text_encoder, enc_g0)  # the text encoder learns with G
    x = G(torch.randn(4, 4), tokens)  # tokens alone: padding = token 0
    assert x.shape == (4, 1, 8, 8) and D(x, tokens).shape == (4,)


def test_text_condition_errors(torch_path):
    G = ConditionalGenerator(4, 8, 1, 4, text_encoder=_text_encoder())
    z = torch.randn(3, 4)
    for bad in (torch.randint(1, 11, (2, 5)), torch.randint(1, 11, (3,)), torch.rand(3, 5),
                torch.randint(1, 11, (3, 10)), torch.full((3, 4), 11)):
        with pytest.raises(ValueError):
            G(z, bad)
    with pytest.raises(ValueError, match="key_padding_mask"):
        G(z, (torch.randint(1, 11, (3, 5)), torch.zeros(3, 5)))
    with pytest.raises(ValueError, match="text_encoder"):
        ConditionalGenerator(4, 8, 1, 4, text_encoder=torch.nn.Linear(2, 2))


def test_text_encoder_takes_any_integer_dtype(torch_path):
    enc = _text_encoder().eval()
    tokens = torch.tensor([[3, 4, 5, 0], [7, 1, 2, 9]])
    want = enc(tokens)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(enc(tokens.to(dtype)), want), dtype


def test_text_conditional_batch_of_one(torch_path):
    G = ConditionalGenerator(4, 8, 1, 4, text_encoder=_text_encoder())
    D = ProjectionDiscriminator(8, 1, 4, text_encoder=_text_encoder())
    out = GANTrainer(G, D, latent_dim=4).step(torch.rand(1, 1, 8, 8) * 2 - 1, torch.randint(1, 11, (1, 5)))
    assert "loss_D_mismatch" not in out and all(torch.isfinite(torch.tensor(v)) for v in out.values())

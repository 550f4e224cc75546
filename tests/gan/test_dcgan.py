"""DCGAN Generator/Discriminator, sample_latent, class/vector/text conditioning and the projection discriminator."""
import math

import pytest
import torch

from leedl_fast.gan import (LATENT_DISTRIBUTIONS, ConditionalGenerator, Discriminator, Generator,
                            ProjectionDiscriminator, apply_spectral_norm, init_weights, mismatched_condition,
                            sample_latent)

SIZES = [1, 5, 8, (7, 5), (13, 17), 28]


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("channels", [1, 3])
def test_generator_and_discriminator_shapes(size, channels):
    G = Generator(latent_dim=7, image_size=size, channels=channels, ngf=4)
    D = Discriminator(image_size=size, channels=channels, ndf=4)
    x = G(torch.randn(3, 7))
    h, w = (size, size) if isinstance(size, int) else size
    assert x.shape == (3, channels, h, w)
    assert x.abs().max() <= 1  # tanh output
    logits = D(x)
    assert logits.shape == (3,)
    logits.sum().backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("attention", [False, True])
def test_empty_batch(attention):
    """A batch of 0 gives empty results and gradients, as torch.nn's layers do."""
    G = Generator(latent_dim=7, image_size=(7, 5), channels=2, ngf=4, attention=attention)
    D = Discriminator(image_size=(7, 5), channels=2, ndf=4, attention=attention)
    z = torch.randn(0, 7, requires_grad=True)
    x = G(z)
    assert x.shape == (0, 2, 7, 5)
    logits = D(x)
    assert logits.shape == (0,)
    logits.sum().backward()
    assert z.grad.shape == (0, 7)


def test_generator_layout_for_8x8():
    G = Generator(latent_dim=16, image_size=8, channels=1, ngf=8)
    assert (G.n_up, G.base) == (1, (4, 4))
    assert G(torch.randn(2, 16, 1, 1)).shape == (2, 1, 8, 8)  # (B, latent, 1, 1) is accepted too
    D = Discriminator(image_size=64, channels=3, ndf=8)
    assert D.n_down == 4 and D.feature_dim == 64


def test_generator_and_discriminator_errors():
    G = Generator(latent_dim=7, image_size=8, channels=1, ngf=4)
    with pytest.raises(ValueError, match="z"):
        G(torch.randn(3, 6))
    with pytest.raises(ValueError, match="z"):
        G(torch.zeros(3, 7, dtype=torch.long))
    D = Discriminator(image_size=8, channels=1, ndf=4)
    with pytest.raises(ValueError, match="x"):
        D(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="x"):
        D(torch.randn(2, 1, 7, 8))
    with pytest.raises(ValueError, match="image_size"):
        Generator(image_size=0)
    with pytest.raises(ValueError, match="image_size"):
        Discriminator(image_size=(8, 8, 8))
    with pytest.raises(ValueError, match="latent_dim"):
        Generator(latent_dim=0)
    with pytest.raises(ValueError, match="n_down"):
        Discriminator(image_size=4, n_down=3)
    # the attention block takes at most 2048 channels: refused up front, naming the width the caller gave
    with pytest.raises(ValueError, match="ndf=1100"):
        Discriminator(8, 3, ndf=1100, attention=True)  # 2 * ndf channels after the first downsampling
    with pytest.raises(ValueError, match="ngf=1100"):
        Generator(8, 8, 1, ngf=1100, attention=True)
    assert Discriminator(8, 1, ndf=1100).feature_dim == 2200  # without attention the width is not limited
    with pytest.raises(ValueError, match="gain"):
        init_weights(Generator(4, 8, 1, 4), gain=-1.0)


def test_init_weights_initialises_the_original_of_spectral_normed_layers():
    """A spectral-normed layer's stored weight (``parametrizations.weight.original``) gets the init, drawn as the
    plain layer's weight is (the layers are visited in the same order, so the same seed gives the same values)."""
    plain, normed = Discriminator(8, 1, 64), apply_spectral_norm(Discriminator(8, 1, 64))
    torch.manual_seed(3)
    init_weights(plain, gain=0.02)
    torch.manual_seed(3)
    init_weights(normed, gain=0.02)
    kinds = (torch.nn.Conv2d, torch.nn.Linear)
    layers = list(zip(*([m for m in net.modules() if isinstance(m, kinds)] for net in (plain, normed))))
    assert len(layers) == 3  # stem, one downsampling, head
    for p, n in layers:
        assert torch.equal(n.parametrizations.weight.original, p.weight)
        assert not n.bias.detach().any()
    w = torch.cat([n.parametrizations.weight.original.detach().flatten() for _, n in layers])
    assert abs(float(w.std()) - 0.02) < 0.001


@pytest.mark.parametrize("distribution", LATENT_DISTRIBUTIONS)
def test_sample_latent_distributions(distribution):
    z = sample_latent(4000, 17, distribution, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4000, 17) and z.dtype == torch.float32
    again = sample_latent(4000, 17, distribution, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    n = z.numel()
    if distribution == "normal":
        assert abs(float(z.mean())) < 5 / math.sqrt(n) and abs(float(z.std()) - 1) < 0.02
    elif distribution == "uniform":
        assert float(z.min()) >= -1 and float(z.max()) <= 1
        assert abs(float(z.mean())) < 5 * 0.58 / math.sqrt(n) and abs(float(z.var()) - 1 / 3) < 0.01
    elif distribution == "truncated_normal":
        assert float(z.abs().max()) <= 2.0
        # variance of N(0,1) truncated to [-2, 2]: 1 - 2*2*phi(2)/(2*Phi(2)-1) = 0.7737
        phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
        var = 1 - 4 * phi2 / math.erf(2 / math.sqrt(2))
        assert abs(float(z.var()) - var) < 0.02
    else:
        assert torch.allclose(z.norm(dim=1), torch.full((4000,), math.sqrt(17)))


@pytest.mark.parametrize("distribution", LATENT_DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sample_latent_half_precision_is_the_float32_draw_rounded(distribution, dtype):
    z = sample_latent(2000, 1000, distribution, dtype=dtype, generator=torch.Generator().manual_seed(0))
    z32 = sample_latent(2000, 1000, distribution, generator=torch.Generator().manual_seed(0))
    assert z.dtype == dtype and torch.equal(z, z32.to(dtype))
    if distribution in ("uniform", "truncated_normal"):  # symmetric about 0: unbiased within 5 standard errors
        zd = z.double()
        assert abs(float(zd.mean())) < 5 * float(zd.std()) / math.sqrt(zd.numel())


def test_sample_latent_errors_and_options():
    with pytest.raises(ValueError, match="distribution"):
        sample_latent(3, 4, "cauchy")
    with pytest.raises(ValueError, match="dim"):
        sample_latent(3, 0)
    with pytest.raises(ValueError, match="n"):
        sample_latent(-1, 4)
    assert sample_latent(0, 4).shape == (0, 4)
    assert sample_latent(2, 3, dtype=torch.float64).dtype == torch.float64
    assert float(sample_latent(500, 3, "truncated_normal", truncation=0.5).abs().max()) <= 0.5
    with pytest.raises(ValueError, match="dtype"):
        sample_latent(2, 3, dtype=torch.int64)


def _class_models():
    G = ConditionalGenerator(6, (7, 5), 2, 4, num_classes=4, embed_dim=3)
    D = ProjectionDiscriminator((7, 5), 2, 4, num_classes=4)
    return G, D


def test_class_conditional_generator_concatenates_embedding_to_z():
    G, _ = _class_models()
    G.eval()
    z = torch.randn(3, 6)
    y = torch.tensor([0, 3, 1])
    expected = G.net(torch.cat([z, G.condition.embedding(y)], 1))
    assert torch.equal(G(z, y), expected)
    assert not torch.equal(G(z, y), G(z, torch.tensor([1, 3, 1])))  # the class changes the sample


def test_projection_discriminator_is_linear_head_plus_projection():
    _, D = _class_models()
    x = torch.randn(3, 2, 7, 5, dtype=torch.float64)
    D = D.double()
    y = torch.tensor([2, 0, 2])
    phi = D.features(x)
    expected = D.head(phi).squeeze(1) + (D.condition.embedding(y) * phi).sum(1)
    assert torch.allclose(D(x, y), expected, rtol=1e-12, atol=1e-12)
    # the same image scored under another class differs exactly by the projection difference
    y2 = torch.tensor([1, 0, 3])
    diff = ((D.condition.embedding(y2) - D.condition.embedding(y)) * phi).sum(1)
    assert torch.allclose(D(x, y2) - D(x, y), diff, rtol=1e-10, atol=1e-12)


def test_vector_condition():
    G = ConditionalGenerator(5, 8, 1, 4, cond_dim=3)
    D = ProjectionDiscriminator(8, 1, 4, cond_dim=3)
    c = torch.randn(4, 3)
    x = G(torch.randn(4, 5), c)
    assert x.shape == (4, 1, 8, 8)
    phi = D.features(x)
    assert torch.allclose(D(x, c), D.head(phi).squeeze(1) + (D.project(c) * phi).sum(1), atol=1e-6)


def test_condition_errors():
    G, D = _class_models()
    z, x = torch.randn(3, 6), torch.randn(3, 2, 7, 5)
    for bad in (torch.tensor([0, 1]), torch.tensor([[0, 1, 2]]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0, 4, 1]),
                torch.tensor([-1, 0, 1]), [0, 1, 2]):
        with pytest.raises(ValueError, match="condition"):
            G(z, bad)
        with pytest.raises(ValueError, match="condition"):
            D(x, bad)
    Gv = ConditionalGenerator(5, 8, 1, 4, cond_dim=3)
    for bad in (torch.randn(4, 3), torch.randn(3, 2), torch.zeros(3, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match="condition"):
            Gv(torch.randn(3, 5), bad)
    with pytest.raises(ValueError, match="exactly one"):
        ConditionalGenerator(5, 8, 1, 4)
    with pytest.raises(ValueError, match="exactly one"):
        ProjectionDiscriminator(8, 1, 4, num_classes=3, cond_dim=2)
    with pytest.raises(ValueError, match="num_classes"):
        ConditionalGenerator(5, 8, 1, 4, num_classes=0)


def test_any_integer_label_dtype():
    """Labels of any integer dtype give what int64 labels give (nn.Embedding itself takes int64/int32 only)."""
    G, D = _class_models()
    G.eval()
    z, x, y = torch.randn(3, 6), torch.randn(3, 2, 7, 5), torch.tensor([0, 3, 1])
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(G(z, y.to(dtype)), G(z, y)), dtype
        assert torch.equal(D(x, y.to(dtype)), D(x, y)), dtype


def test_projection_discriminator_checks_the_condition_before_its_body():
    """A refused condition leaves D as it was: the training-mode forward of a spectral-normed body would have
    advanced its power iteration."""
    _, D = _class_models()
    apply_spectral_norm(D)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    with pytest.raises(ValueError, match="condition"):
        D(torch.randn(3, 2, 7, 5), torch.tensor([0, 4, 1]))
    assert all(torch.equal(v, before[k]) for k, v in D.state_dict().items())


def test_mismatched_condition():
    y = torch.randint(0, 10, (257,))
    wrong = mismatched_condition(y, 10)
    assert wrong.shape == y.shape and (wrong != y).all() and wrong.min() >= 0 and wrong.max() < 10
    assert set(((wrong - y) % 10).tolist()) == set(range(1, 10))  # every nonzero shift is used
    c = torch.randn(5, 3)
    rolled = mismatched_condition(c)
    shift = next(s for s in range(1, 5) if torch.equal(rolled, torch.roll(c, s, 0)))
    assert 1 <= shift <= 4
    tokens, mask = torch.randint(1, 9, (4, 6)), torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 3:] = True
    t2, m2 = mismatched_condition((tokens, mask))
    s = next(s for s in range(1, 4) if torch.equal(t2, torch.roll(tokens, s, 0)))
    assert torch.equal(m2, torch.roll(mask, s, 0))
    with pytest.raises(ValueError, match="condition"):
        mismatched_condition(torch.randn(1, 3))
    with pytest.raises(ValueError, match="num_classes"):
        mismatched_condition(torch.tensor([0, 0]), 1)

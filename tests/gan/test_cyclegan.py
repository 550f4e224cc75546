"""CycleGAN pieces: ResnetGenerator (any size), the 70x70 PatchGAN, and a training step."""
import copy

import pytest
import torch

from leedl_fast.gan import CycleGAN, NLayerDiscriminator, ResnetGenerator, patchgan_output_size


def test_patchgan_256_gives_30x30():
    D = NLayerDiscriminator(3, ndf=8)  # the map size does not depend on ndf
    assert D(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert patchgan_output_size(256) == 30


def test_patchgan_receptive_field_is_70x70():
    # batch norm in eval mode keeps the map local (instance norm mixes every pixel through its statistics)
    D = NLayerDiscriminator(1, ndf=2, norm="batch").eval().double()
    x = torch.randn(1, 1, 96, 96, dtype=torch.float64, requires_grad=True)
    out = D(x)
    out[0, 0, 3, 4].backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero()
    cols = x.grad[0, 0].abs().sum(0).nonzero()
    assert (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1) == (70, 70)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("size", [(17, 31), (40, 33), (64, 64)])
def test_patchgan_output_size_formula(n_layers, size):
    h, w = size
    D = NLayerDiscriminator(2, ndf=4, n_layers=n_layers)
    if min(patchgan_output_size(h, n_layers), patchgan_output_size(w, n_layers)) < 1:
        with pytest.raises(ValueError, match="x"):
            D(torch.randn(1, 2, h, w))
        return
    assert D(torch.randn(2, 2, h, w)).shape == (2, 1, patchgan_output_size(h, n_layers), patchgan_output_size(w, n_layers))


def test_patchgan_too_small_input():
    with pytest.raises(ValueError, match="too small"):
        NLayerDiscriminator(1, ndf=4)(torch.randn(1, 1, 16, 16))


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (7, 7), (8, 8), (13, 17), (12, 20)], ids=str)
def test_resnet_generator_keeps_any_size(size):
    G = ResnetGenerator(3, 2, ngf=4, n_blocks=1)
    x = torch.randn(2, 3, *size)
    y = G(x)
    assert y.shape == (2, 2, *size) and y.abs().max() <= 1
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in G.parameters())


def test_resnet_generator_layout_defaults():
    G = ResnetGenerator(3, 3)
    mods = list(G.modules())
    convs = [m for m in mods if isinstance(m, torch.nn.Conv2d)]
    assert sum(isinstance(m, torch.nn.ReflectionPad2d) for m in mods) == 2 + 2 * 9
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) and not m.affine for m in mods) == 1 + 2 + 2 * 9 + 2
    assert [m.stride for m in convs if m.stride != (1, 1)] == [(2, 2), (2, 2)]
    ups = [m for m in mods if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in ups] == [(256, 128, (2, 2)), (128, 64, (2, 2))]
    assert convs[0].kernel_size == convs[-1].kernel_size == (7, 7) and convs[-1].out_channels == 3
    assert isinstance(mods[-1], torch.nn.Tanh)
    # weights ~ N(0, 0.02), biases 0
    w = torch.cat([m.weight.flatten() for m in convs])
    assert abs(float(w.std()) - 0.02) < 0.001 and all(float(m.bias.abs().max()) == 0 for m in convs if m.bias is not None)


def _nets(model):
    return {n: getattr(model, n) for n in ("netG_A", "netG_B", "netD_A", "netD_B")}


@pytest.mark.parametrize("gan_mode", ["lsgan", "vanilla", "hinge", "wgangp"])
def test_cyclegan_step_moves_all_four_networks(gan_mode):
    model = CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=1, gan_mode=gan_mode, n_layers_D=1, pool_size=3)
    before = {n: copy.deepcopy(net.state_dict()) for n, net in _nets(model).items()}
    real_A, real_B = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    for _ in range(2):
        losses = model.train_step(real_A, real_B)
    expected_keys = {"loss_G_A", "loss_G_B", "loss_cycle_A", "loss_cycle_B", "loss_idt_A", "loss_idt_B", "loss_G",
                     "loss_D_A", "loss_D_B"} | ({"gp_A", "gp_B"} if gan_mode == "wgangp" else set())
    assert set(losses) == expected_keys
    assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    for name, net in _nets(model).items():
        changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[name][k])]
        assert changed, f"{name} did not move"
        assert all(p.requires_grad for p in net.parameters()), f"{name} left frozen"
    assert len(model.fake_A_pool) == len(model.fake_B_pool) == 3


def test_cyclegan_losses_are_the_published_terms():
    torch.manual_seed(0)
    model = CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=1, n_layers_D=1, lambda_A=3.0, lambda_B=5.0, lambda_identity=0.25)
    nets = {n: copy.deepcopy(net) for n, net in _nets(model).items()}  # the weights the step starts from
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    losses = model.train_step(a, b)
    G_A, G_B, D_A, D_B = nets["netG_A"], nets["netG_B"], nets["netD_A"], nets["netD_B"]
    mse = lambda p, t: float(((p - t) ** 2).mean())  # noqa: E731  (lsgan)
    with torch.no_grad():
        fake_B, fake_A = G_A(a), G_B(b)
        want = {
            "loss_G_A": mse(D_A(fake_B), 1.0), "loss_G_B": mse(D_B(fake_A), 1.0),
            "loss_cycle_A": 3.0 * float((G_B(fake_B) - a).abs().mean()),
            "loss_cycle_B": 5.0 * float((G_A(fake_A) - b).abs().mean()),
            "loss_idt_A": 5.0 * 0.25 * float((G_A(b) - b).abs().mean()),
            "loss_idt_B": 3.0 * 0.25 * float((G_B(a) - a).abs().mean()),
            # the pools are filling, so D sees this step's fakes; D's weights are still the starting ones
            "loss_D_A": 0.5 * (mse(D_A(b), 1.0) + mse(D_A(fake_B), 0.0)),
            "loss_D_B": 0.5 * (mse(D_B(a), 1.0) + mse(D_B(fake_A), 0.0)),
        }
    want["loss_G"] = sum(want[k] for k in ("loss_G_A", "loss_G_B", "loss_cycle_A", "loss_cycle_B", "loss_idt_A",
                                          "loss_idt_B"))
    for k, v in want.items():
        assert abs(losses[k] - v) <= 1e-5 * (1 + abs(v)), (k, losses[k], v)


def test_cyclegan_generator_step_leaves_discriminators_untouched():
    model = CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=1, n_layers_D=1)
    model.optimizer_D.step = lambda *a, **k: None  # skip the D update: only the G step may change D (it must not)
    before = copy.deepcopy(model.netD_A.state_dict())
    model.train_step(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    assert all(torch.equal(v, before[k]) for k, v in model.netD_A.state_dict().items())


def test_cyclegan_errors():
    with pytest.raises(ValueError, match="gan_mode"):
        CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=1, gan_mode="wgan")
    with pytest.raises(ValueError, match="lambda_identity"):
        CycleGAN(1, 3, ngf=4, ndf=4, n_blocks=1)
    model = CycleGAN(1, 3, ngf=4, ndf=4, n_blocks=1, n_layers_D=1, lambda_identity=0.0)
    with pytest.raises(ValueError, match="real_B"):
        model.train_step(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="real_A"):
        model.train_step(torch.rand(1, 8, 8), torch.rand(2, 3, 8, 8))
    losses = model.train_step(torch.rand(2, 1, 9, 7), torch.rand(2, 3, 9, 7))  # odd sizes, different channels
    assert "loss_idt_A" not in losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    with pytest.raises(ValueError, match="norm"):
        ResnetGenerator(1, 1, norm="layer")
    with pytest.raises(ValueError, match="init_gain"):
        ResnetGenerator(1, 1, 4, 1, init_gain=-1)
    with pytest.raises(ValueError, match="init_gain"):
        NLayerDiscriminator(1, 4, 1, init_gain=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        CycleGAN(1, 1, 2, 2, 0, seed="a")


@pytest.mark.parametrize("name,value", [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0), ("lambda_A", float("inf")), ("lambda_B", float("nan")),
    ("lambda_identity", float("inf")), ("lambda_A", -1.0), ("lambda_B", True),
])
def test_cyclegan_weights_must_be_finite(name, value):
    with pytest.raises(ValueError, match=name):
        CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=0, **{name: value})


def _state(model):
    """Every tensor a step could change: weights, both optimisers' moments, the pooled images."""
    opt = [v for o in (model.optimizer_G, model.optimizer_D) for st in o.state.values() for v in st.values()]
    return [t.detach().clone() for t in [*model.state_dict().values(), *opt, *model.fake_A_pool.images,
                                         *model.fake_B_pool.images]]


def _same_state(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("shape_B", [(3, 1, 8, 8), (2, 1, 9, 8)], ids=["batch", "size"])
def test_cyclegan_refused_step_changes_nothing(shape_B):
    """wgangp penalises D_A between real_B and G_A(real_A), so the two must match in batch and image size; the
    refusal comes before the generators' update and before the pools are filled.  Other modes take them."""
    real_A = torch.rand(2, 1, 8, 8)
    model = CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=1, n_layers_D=1, gan_mode="wgangp", pool_size=3)
    before = _state(model)
    with pytest.raises(ValueError, match="real_A and real_B"):
        model.train_step(real_A, torch.rand(*shape_B))
    assert _same_state(_state(model), before)
    assert not model.fake_A_pool.images and not model.fake_B_pool.images
    lsgan = CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=1, n_layers_D=1, pool_size=3)
    losses = lsgan.train_step(real_A, torch.rand(*shape_B))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # the pools now hold 8x8 fakes of B and shape_B-sized fakes of A: another image size is refused up front
    before = _state(lsgan)
    with pytest.raises(ValueError, match="real_A"):
        lsgan.train_step(torch.rand(2, 1, 12, 12), torch.rand(*shape_B))
    assert _same_state(_state(lsgan), before)



def test_cyclegan_criterion_follows_gan_mode():
    assert CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=1).criterion.gan_mode == "lsgan"  # the original's default
    assert CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=1, gan_mode="vanilla").criterion.gan_mode == "vanilla"

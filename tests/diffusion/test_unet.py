"""UNet: shapes, the timestep embedding against diffusers' convention, class conditioning, gradients,
attention through leedl_fast.ops.attention on both paths."""
import pytest
import torch

import leedl_fast.diffusion.unet as unet_module
from leedl_fast.diffusion import UNet, timestep_embedding
from tests.harness import assert_close


def _small(**kw):
    args = dict(in_channels=1, base_channels=16, channel_mults=(1, 2), head_dim=16, groups=4)
    args.update(kw)
    return UNet(**args)


@pytest.mark.parametrize("dim", [16, 33, 128])
def test_timestep_embedding_matches_diffusers(dim):
    emb = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 1, 17, 500, 999])
    ref = emb.get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert_close(timestep_embedding(t, dim), ref.double(), dtype=torch.float32, atol=1e-4)  # sin/cos of ~1e3


def test_shapes_and_conditioning(torch_path):
    torch.manual_seed(0)
    m = _small(num_classes=3, channel_mults=(1, 2, 2), attention_levels=(False, True, True))
    for p in m.parameters():  # a trained-looking net: the zero-initialised output conv would hide everything
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 12, 8)
    t = torch.tensor([3, 700])
    y = m(x, t, torch.tensor([0, 2]))
    assert y.shape == x.shape
    assert not torch.allclose(y, m(x, t, torch.tensor([1, 2])))  # the label matters
    assert not torch.allclose(y, m(x, torch.tensor([4, 700]), torch.tensor([0, 2])))  # and the timestep
    assert m(x, 5, torch.tensor([0, 0])).shape == x.shape  # scalar t
    with pytest.raises(ValueError, match="class_labels are required"):
        m(x, t)
    with pytest.raises(ValueError, match="multiples of 4"):
        m(torch.randn(1, 1, 6, 8), 3, torch.tensor([0]))
    with pytest.raises(ValueError, match="no num_classes"):
        _small()(x[:, :, :8], t, torch.tensor([0, 1]))
    assert torch.equal(m(x, t, torch.tensor([0, 2], dtype=torch.uint8)), y)   # any integer dtype
    for bad in (torch.tensor([0, 3]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), torch.tensor([0])):
        with pytest.raises(ValueError, match="class_labels"):
            m(x, t, bad)
    with pytest.raises(ValueError, match=r"t must be a number or have shape \(2,\)"):
        m(x, torch.tensor([1, 2, 3]), torch.tensor([0, 2]))


@pytest.mark.parametrize("kw,match", [(dict(head_dim=8), "head_dim"), (dict(head_dim=300), "head_dim"),
                                      (dict(num_classes=0), "num_classes")], ids=str)
def test_constructor_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        UNet(1, base_channels=16, **kw)


def test_zero_init_output_and_gradients(torch_path):
    m = _small(in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    out = m(x, torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised last conv: predicts 0 at init
    (out * torch.randn_like(out)).sum().backward()
    assert m.conv_out.weight.grad.abs().sum() > 0
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
        p.grad = None
    m(x, torch.tensor([1, 2])).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_attention_runs_on_leedl_fast_ops(any_path, monkeypatch):
    calls = []
    real = unet_module.attention

    def spy(q, k, v, **kw):
        calls.append(q.shape)
        return real(q, k, v, **kw)

    monkeypatch.setattr(unet_module, "attention", spy)
    torch.manual_seed(1)
    m = _small(num_classes=2)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([5, 600]), torch.tensor([1, 0])
    out = m(x.to(any_path), t.to(any_path), y.to(any_path))
    # down level 2, middle, two up blocks of level 2: (B, heads, 4*4 positions, head_dim)
    assert calls == [(2, 2, 16, 16)] * 4
    with torch.no_grad():
        ref = m.double()(x.double(), t, y)
    assert_close(out, ref, dtype=torch.float32, scale=10)  # ~40 layers of float32 rounding

"""training_loss: the Monte-Carlo denoising objective built from q_sample and the fused loss."""
import pytest
import torch

from leedl_fast.diffusion import NoiseSchedule, training_loss
from leedl_fast.ops.noising import _noise_torch, noise_prediction_loss_reference, q_sample_reference
from tests.harness import assert_close


class Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(6, 6) * 0.3)
        self.emb = torch.nn.Embedding(3, 6)

    def forward(self, x, t, y=None):
        h = x @ self.w + t[:, None].to(x.dtype) / 1000
        return h if y is None else h + self.emb(y)


@pytest.mark.parametrize("target", ["epsilon", "v_prediction", "sample"])
def test_training_loss_equals_reference(any_path, target):
    s = NoiseSchedule(1000, "cosine").to(any_path)
    model = Lin().to(any_path)
    x0 = torch.randn(4, 6)
    t = torch.tensor([0, 5, 500, 999])
    y = torch.tensor([0, 1, 2, 1])
    loss = training_loss(model, x0.to(any_path), s, seed=77, class_labels=y.to(any_path), prediction_type=target,
                         t=t.to(any_path))
    loss.backward()
    g = model.w.grad.clone()

    ref_model = Lin().double()
    ref_model.load_state_dict({k: v.double().cpu() for k, v in model.state_dict().items()})
    ac = s.alphas_cumprod.cpu().double()
    eps = _noise_torch(77, (4, 6), "cpu").double()
    x_t = q_sample_reference(x0.double(), t, ac, eps)
    ref = noise_prediction_loss_reference(ref_model(x_t, t, y), x0.double(), t, ac, eps, target)
    ref.backward()
    assert_close(loss, ref, dtype=torch.float32, scale=2)
    assert_close(g, ref_model.w.grad, dtype=torch.float32, scale=2)


def test_draws_t_and_seed(torch_path):
    s = NoiseSchedule(100)
    model = Lin()
    x0 = torch.randn(4, 6)
    torch.manual_seed(0)
    a = training_loss(model, x0, s)
    torch.manual_seed(0)
    b = training_loss(model, x0, s)
    c = training_loss(model, x0, s)
    assert a.item() == b.item() != c.item()
    with pytest.raises(ValueError, match="prediction_type"):
        training_loss(model, x0, s, prediction_type="score")
    with pytest.raises(ValueError, match="schedule"):
        training_loss(model, x0, s.alphas_cumprod)

"""TransformerEncoderLayer training step (forward + backward) against torch.nn's, same weights, same run.

d_model 256, 4 heads, dim_feedforward 1024, dropout 0.1, N 512, batch 8, (seq, batch, d_model) layout: the
issue's CPU target is <= 1.05x torch.nn.TransformerEncoderLayer's time.  FLOPs of one step are counted in
``leedl_fast.bench.cases.transformer.encoder_layer_flops`` (3x the forward's).
"""
import pytest
import torch

from leedl_fast.bench.cases.transformer import encoder_layer_flops
from leedl_fast.nn import TransformerEncoderLayer

E, H, FF, N, B, P = 256, 4, 1024, 512, 8, 0.1


def _layers():
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(E, H, FF, P).train()
    ref = torch.nn.TransformerEncoderLayer(E, H, FF, P).train()
    ref.load_state_dict(ours.state_dict())
    return {"leedl_fast": ours, "torch": ref}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["leedl_fast", "torch"])
def test_encoder_layer_train_step(benchmark, impl, causal):
    benchmark.group = f"TransformerEncoderLayer train step E={E} H={H} FF={FF} N={N} B={B}" + (
        " causal" if causal else "")
    benchmark.extra_info["gflop"] = encoder_layer_flops(B, N, E, FF, causal) / 1e9
    layer = _layers()[impl]
    x = torch.randn(N, B, E, requires_grad=True)
    dy = torch.randn(N, B, E)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(N) if causal else None

    def step():
        layer(x, src_mask=mask, is_causal=causal).backward(dy)
        for p in layer.parameters():
            p.grad = None
        x.grad = None

    # One step is ~0.5 s on 2 cores and this machine's load drifts: 20 rounds after 3 warm-up steps so the
    # medians of the two layers are comparable (pytest-benchmark's default of 5 rounds swung by +-15%).
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)

"""The three task-shape heads: per token, per sequence (mean / [CLS]), sequence to sequence."""
import math

import pytest
import torch

from leedl_fast.nn.heads import Seq2SeqHead, SequenceClassificationHead, TokenClassificationHead
from leedl_fast.nn.positional import sinusoidal_table
from tests.harness import assert_close


def test_token_head():
    head = TokenClassificationHead(8, 5)
    h = torch.randn(17, 3, 8)
    out = head(h)
    assert out.shape == (17, 3, 5)
    assert_close(out, h.double() @ head.proj.weight.double().T + head.proj.bias.double(), dtype=torch.float32)


@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_head_mean_pooling_with_padding(batch_first):
    head = SequenceClassificationHead(8, 3, pooling="mean", batch_first=batch_first)
    h = torch.randn((2, 7, 8) if batch_first else (7, 2, 8))
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    hb = h if batch_first else h.transpose(0, 1)
    pooled = torch.stack([hb[0].double().mean(0), hb[1, :4].double().mean(0)])
    assert_close(head.pool(h, kpm), pooled, dtype=torch.float32)
    assert_close(head.pool(h), hb.double().mean(1), dtype=torch.float32)
    out = head(h, kpm)
    assert out.shape == (2, 3)
    assert_close(out, pooled @ head.proj.weight.double().T + head.proj.bias.double(), dtype=torch.float32)
    kpm[0] = True  # an all-padding sequence pools to zeros, not NaN
    assert torch.equal(head.pool(h, kpm)[0], torch.zeros(8))


@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_head_empty_sequence_pools_to_zeros(batch_first):
    """A length-0 sequence has no position to average: zeros, as for an all-padding mask, not 0/0."""
    head = SequenceClassificationHead(4, 3, batch_first=batch_first)
    h = torch.randn((2, 0, 4) if batch_first else (0, 2, 4))
    assert torch.equal(head.pool(h), torch.zeros(2, 4))
    assert torch.equal(head.pool(h, torch.zeros(2, 0, dtype=torch.bool)), torch.zeros(2, 4))
    assert torch.equal(head(h), head.proj.bias.detach().expand(2, 3))


def test_sequence_head_cls():
    head = SequenceClassificationHead(8, 2, pooling="cls", cls_index=0)
    h = torch.randn(5, 3, 8)
    assert torch.equal(head.pool(h), h[0])
    assert head(h).shape == (3, 2)
    with pytest.raises(ValueError, match="pooling"):
        SequenceClassificationHead(8, 2, pooling="max")
    with pytest.raises(ValueError, match="cls_index"):
        SequenceClassificationHead(8, 2, pooling="cls", cls_index=9).pool(h)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_seq2seq_head(tie, batch_first):
    head = Seq2SeqHead(11, 6, max_len=20, padding_idx=0, tie_weights=tie, batch_first=batch_first)
    ids = torch.tensor([[3, 4, 0], [1, 2, 5]])
    x = head.embed(ids, offset=2)
    emb = head.token_embedding.weight.double()[ids] * math.sqrt(6) + sinusoidal_table(20, 6, torch.float64)[2:5]
    assert_close(x, emb if batch_first else emb.transpose(0, 1), dtype=torch.float32)
    assert torch.equal(head.token_embedding.weight[0], torch.zeros(6))
    logits = head(x)
    assert logits.shape == x.shape[:2] + (11,)
    if tie:
        assert_close(logits, x.double() @ head.token_embedding.weight.double().T + head.bias.double(),
                     dtype=torch.float32)
    with pytest.raises(ValueError, match="ids"):
        head.embed(torch.zeros(3, dtype=torch.long))
    for bad in (11, -12, 1.0):
        with pytest.raises(ValueError, match="padding_idx"):
            Seq2SeqHead(11, 6, padding_idx=bad)


@pytest.mark.parametrize("device,dtype", [("meta", None), ("cpu", torch.float64)])
def test_seq2seq_head_device_and_dtype_reach_the_positional_table(device, dtype):
    head = Seq2SeqHead(11, 6, max_len=20, device=device, dtype=dtype)
    assert head.positional.pe.device.type == device
    assert head.positional.pe.dtype == (dtype or torch.float32)
    x = head.embed(torch.zeros(2, 3, dtype=torch.long, device=device))
    assert x.shape == (3, 2, 6) and x.device.type == device     # ids (batch, seq) -> (seq, batch, d_model)
    if dtype == torch.float64:     # the table itself in float64, not a float32 one cast up
        assert torch.equal(head.positional.pe, sinusoidal_table(20, 6, torch.float64))

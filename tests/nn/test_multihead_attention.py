"""leedl_fast.nn.MultiheadAttention / TruncatedSelfAttention against torch.nn.MultiheadAttention.

Same state_dict both ways, float64: outputs, returned weights and every parameter and input
gradient, for every constructor option and mask form torch accepts.
"""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import leedl_fast.nn.multihead_attention as mha_mod
from leedl_fast.nn import MultiheadAttention, TruncatedSelfAttention
from tests.harness import assert_close

F64 = torch.float64
E, H = 64, 4                          # head dim 16: the fused op's smallest


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach the fused op, on the Triton backend, where the module routes every call
    it can fuse to the op (which runs its PyTorch path for these float64 tensors).  On the PyTorch backend
    plain and causal attention go to torch's SDPA instead: test_torch_backend_dropout_is_torch_nn."""
    monkeypatch.setenv("LEEDL_FAST_BACKEND", "triton")
    calls = []
    real = mha_mod.attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(mha_mod, "attention", counting)
    return calls


def _pair(**kw):
    ref = nn.MultiheadAttention(E, H, dtype=F64, **kw)
    ours = MultiheadAttention(E, H, dtype=F64, **kw)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref, ours


def _data(L, S, B, kw, unbatched=False, self_attn=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    bf = kw.get("batch_first", False)
    kd, vd = kw.get("kdim") or E, kw.get("vdim") or E

    def t(n, dim):
        shape = (n, dim) if unbatched else ((B, n, dim) if bf else (n, B, dim))
        return torch.randn(shape, dtype=F64, generator=g).requires_grad_()

    q = t(L, E)
    if self_attn:
        return q, q, q
    return q, t(S, kd), t(S, vd)


def _compare(ref, ours, q, k, v, *, atol=1e-9, **fw):
    """Forward both with the same arguments; compare output, weights, parameter and input grads."""
    outs = []
    for m in (ref, ours):
        for p in m.parameters():
            p.grad = None
        inputs = [t for t in {id(x): x for x in (q, k, v)}.values()]
        for x in inputs:
            x.grad = None
        o, w = m(q, k, v, **fw)
        gen = torch.Generator().manual_seed(1)
        o.backward(torch.randn(o.shape, dtype=F64, generator=gen))
        outs.append((o.detach(), None if w is None else w.detach(), {n: p.grad.clone() for n, p in m.named_parameters()},
                     [x.grad.clone() for x in inputs]))
    (o1, w1, g1, x1), (o2, w2, g2, x2) = outs
    assert_close(o2, o1, atol=atol, rtol=1e-7, name="output")
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        assert_close(w2, w1, atol=atol, rtol=1e-7, name="weights")
    assert g1.keys() == g2.keys()
    for n in g1:
        assert_close(g2[n], g1[n], atol=atol, rtol=1e-7, name=f"grad {n}")
    for a, b in zip(x2, x1):
        assert_close(a, b, atol=atol, rtol=1e-7, name="input grad")
    return o2, w2


CTOR = [
    {}, {"batch_first": True}, {"kdim": 32, "vdim": 48}, {"bias": False},
    {"add_bias_kv": True}, {"add_zero_attn": True}, {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
]


@pytest.mark.parametrize("kw", CTOR, ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
def test_constructor_options(kw, need_weights):
    ref, ours = _pair(**kw)
    q, k, v = _data(7, 11, 3, kw)
    _compare(ref, ours, q, k, v, need_weights=need_weights)


@pytest.mark.parametrize("average", [True, False])
def test_self_attention_packed_and_weights(average):
    ref, ours = _pair()
    q, k, v = _data(9, 9, 2, {}, self_attn=True)
    _compare(ref, ours, q, k, v, need_weights=True, average_attn_weights=average)


def _causal(L, S):
    return torch.ones(L, S, dtype=torch.bool).triu(1 + S - L)


def _float(mask):
    return torch.zeros(mask.shape, dtype=F64).masked_fill(mask, float("-inf"))


@pytest.mark.parametrize("kw", [{}, {"batch_first": True}], ids=str)
@pytest.mark.parametrize("form", ["bool", "float", "bool+is_causal", "float+is_causal", "3d-bool"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_mask_forms_map_to_causal_flag(kw, form, pad, need_weights, fused_calls):
    L, B = 10, 3
    ref, ours = _pair(**kw)
    q, k, v = _data(L, L, B, kw, self_attn=True)
    mask = _causal(L, L)
    if form.startswith("float"):
        mask = _float(mask)
    if form == "3d-bool":
        mask = mask.expand(B * H, L, L)
    kpm = None
    if pad:
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[1, 6:] = True
        kpm[2, 1:] = True
    _compare(ref, ours, q, k, v, attn_mask=mask, is_causal="is_causal" in form, key_padding_mask=kpm,
             need_weights=need_weights)
    if not need_weights:
        assert fused_calls and all(c["causal"] for c in fused_calls)
    else:
        assert not fused_calls


@pytest.mark.parametrize("L, S, aligned", [(13, 6, "top-left"), (5, 12, "top-left"), (5, 12, "bottom-right")])
@pytest.mark.parametrize("hint", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_non_square_causal_masks_are_read_not_hinted(L, S, aligned, hint, need_weights, pad, fused_calls):
    """Cross-attention (L != S) with a causal-looking mask.  torch.nn computes the given mask, except that
    with ``is_causal=True``, ``need_weights=False`` and no padding it calls SDPA's top-left causal mask, so
    the hint agrees with the mask only for the top-left one: for it, every path equals torch's; for the
    bottom-right one, ours computes the mask on every path, as torch does where it reads the mask.  Both patterns reach the fused op without a
    mask tensor (a band for L > S, the first L keys for L < S).  (Bottom-right with L > S hides every key
    from the first L - S rows: NaN in torch, zeros here, tested with the other empty rows.)"""
    ref, ours = _pair()
    B = 3
    q, k, v = _data(L, S, B, {})
    mask = torch.ones(L, S, dtype=torch.bool).triu(1) if aligned == "top-left" else _causal(L, S)
    kpm = None
    if pad:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[1, -2:] = True
    if aligned == "bottom-right" and hint and not need_weights and not pad:
        # torch computes SDPA's top-left mask here, not the one it was given; ours computes the given
        # one, which is torch's result without the hint.
        o, _ = ours(q, k, v, attn_mask=mask, is_causal=True, need_weights=False)
        assert_close(o, ref(q, k, v, attn_mask=mask, need_weights=False)[0], atol=1e-9, rtol=1e-7)
    else:
        _compare(ref, ours, q, k, v, attn_mask=mask, is_causal=hint, key_padding_mask=kpm,
                 need_weights=need_weights)
    assert len(fused_calls) == (0 if need_weights else 1)
    if fused_calls and aligned == "top-left" and L > S:
        assert fused_calls[0]["window"] == (-1, L - S) and not fused_calls[0]["causal"]
    elif fused_calls:
        assert fused_calls[0]["causal"] and fused_calls[0]["window"] is None


@pytest.mark.parametrize("form", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_key_padding_mask_forms(form, need_weights, fused_calls):
    ref, ours = _pair()
    q, k, v = _data(7, 12, 3, {})
    kpm = torch.zeros(3, 12, dtype=torch.bool)
    kpm[0, 5:] = True
    kpm[2, ::2] = True
    mask = kpm if form == "bool" else _float(kpm)
    _compare(ref, ours, q, k, v, key_padding_mask=mask, need_weights=need_weights)
    assert len(fused_calls) == (0 if need_weights else 1)


@pytest.mark.parametrize("form", ["bool-2d", "float-2d", "float-3d"])
def test_arbitrary_attn_mask_takes_dense_path(form, fused_calls, monkeypatch):
    monkeypatch.setattr(mha_mod, "_warned", set())
    ref, ours = _pair()
    L, S, B = 6, 9, 2
    q, k, v = _data(L, S, B, {})
    g = torch.Generator().manual_seed(3)
    if form == "bool-2d":
        mask = torch.rand(L, S, generator=g) < 0.3
        mask[:, 0] = False
    elif form == "float-2d":
        mask = torch.randn(L, S, dtype=F64, generator=g)
    else:
        mask = torch.randn(B * H, L, S, dtype=F64, generator=g)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, -3:] = True
    with pytest.warns(UserWarning, match="dense"):
        _compare(ref, ours, q, k, v, attn_mask=mask, key_padding_mask=kpm, need_weights=False)
    assert not fused_calls


@pytest.mark.parametrize("kw", [{}, {"batch_first": True}], ids=str)
def test_unbatched(kw):
    ref, ours = _pair(**kw)
    q, k, v = _data(5, 8, 1, kw, unbatched=True)
    kpm = torch.zeros(8, dtype=torch.bool)
    kpm[2] = True
    for nw in (False, True):
        o, w = _compare(ref, ours, q, k, v, key_padding_mask=kpm, need_weights=nw)
        assert o.shape == (5, E) and (w is None or w.shape == (5, 8))
    mask3 = torch.zeros(H, 5, 8, dtype=torch.bool)
    mask3[1, :, 3] = True
    _compare(ref, ours, q, k, v, attn_mask=mask3, need_weights=True, average_attn_weights=False)


def test_train_mode_dropout_zero_and_is_causal_without_mask():
    ref, ours = _pair(dropout=0.0)
    ref.train()
    ours.train()
    q, k, v = _data(8, 8, 2, {}, self_attn=True)
    _compare(ref, ours, q, k, v, need_weights=False)
    # torch requires the mask with is_causal; ours also takes is_causal alone
    o_flag, _ = ours(q, q, q, is_causal=True, need_weights=False)
    o_ref, _ = ref(q, q, q, attn_mask=_causal(8, 8), need_weights=False)
    assert_close(o_flag, o_ref, atol=1e-9, rtol=1e-7)


def test_dropout_stays_fused_and_matches_weights_path(fused_calls):
    """Training with dropout runs the fused op; the weights path draws the same Philox mask."""
    torch.manual_seed(0)
    ours = MultiheadAttention(E, H, dropout=0.3, dtype=F64).train()
    q, k, v = _data(9, 9, 2, {}, self_attn=True)
    torch.manual_seed(5)
    fused, _ = ours(q, k, v, need_weights=False)
    assert len(fused_calls) == 1 and fused_calls[0]["dropout_p"] == 0.3
    torch.manual_seed(5)
    dense, w = ours(q, k, v, need_weights=True, average_attn_weights=False)
    assert_close(fused, dense, atol=1e-9, rtol=1e-7)
    assert (w == 0).float().mean() > 0.1                     # the returned weights are the dropped ones
    ours.eval()
    assert_close(ours(q, k, v, need_weights=False)[0], ours(q, k, v)[0], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask", ["none", "causal", "padding"])
def test_torch_backend_dropout_is_torch_nn(torch_path, monkeypatch, need_weights, mask):
    """On the PyTorch backend the module's dropout is torch's own, drawn as torch.nn draws it: training with
    dropout, the same torch seed gives torch.nn.MultiheadAttention's output and gradients, on both paths
    (plain, causal and padded self-attention go to SDPA, not the op, whose PyTorch path reproduces the
    kernel's Philox mask)."""
    ref, ours = _pair(dropout=0.3)
    ref.train()
    ours.train()
    q, _, _ = _data(9, 9, 2, {}, self_attn=True)
    monkeypatch.setattr(mha_mod, "attention", None)  # the op is not called
    kw = {"none": {}, "causal": dict(attn_mask=_causal(9, 9), is_causal=True),
          "padding": dict(key_padding_mask=torch.arange(9)[None, :] >= torch.tensor([[9], [5]]))}[mask]
    outs = []
    for m in (ours, ref):
        torch.manual_seed(7)
        x = q.detach().clone().requires_grad_(True)
        o, w = m(x, x, x, need_weights=need_weights, **kw)
        o.sum().backward()
        outs.append((o, w, x.grad, [p.grad for p in m.parameters()]))
    (o, w, gx, gp), (o_ref, w_ref, gx_ref, gp_ref) = outs
    assert_close(o, o_ref, atol=1e-10, rtol=1e-8)
    assert_close(gx, gx_ref, atol=1e-10, rtol=1e-8)
    for g, g_ref in zip(gp, gp_ref):
        assert_close(g, g_ref, atol=1e-10, rtol=1e-8)
    if need_weights:
        assert_close(w, w_ref, atol=1e-10, rtol=1e-8)
    ours.eval()
    assert not torch.allclose(o, ours(q, q, q, need_weights=need_weights, **kw)[0])  # dropout did act


@pytest.mark.parametrize("form", ["none", "float mask with a dead row", "bool padding with a dead row", "causal",
                                  "float padding"])
def test_weights_path_in_place_without_autograd(form):
    """Without autograd the weights path overwrites its score buffer in place; it computes what the path
    with autograd computes (outputs and weights), masks and rows with no visible key included."""
    _, ours = _pair()
    ours.eval()
    q, k, v = _data(6, 6, 3, {}, self_attn=True)
    kw = {}
    if form == "float mask with a dead row":
        kw["attn_mask"] = torch.randn(6, 6, dtype=F64).masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
        kw["attn_mask"][4] = float("-inf")
    elif form == "bool padding with a dead row":
        kw["key_padding_mask"] = torch.tensor([[False] * 6, [False] * 3 + [True] * 3, [True] * 6])
    elif form == "causal":
        kw.update(attn_mask=_causal(6, 6), is_causal=True)
    elif form == "float padding":
        kw["key_padding_mask"] = torch.randn(3, 6, dtype=F64)
    qg = q.detach().clone().requires_grad_(True)
    o_grad, w_grad = ours(qg, qg, qg, need_weights=True, average_attn_weights=False, **kw)
    with torch.no_grad():
        o, w = ours(q, q, q, need_weights=True, average_attn_weights=False, **kw)
    assert_close(o, o_grad.detach(), atol=1e-12, rtol=1e-10)
    assert_close(w, w_grad.detach(), atol=1e-12, rtol=1e-10)
    assert not torch.isnan(o).any() and not torch.isnan(w).any()


def test_fully_padded_row_gives_zeros_not_nan():
    _, ours = _pair()
    q, k, v = _data(4, 6, 2, {})
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1] = True
    for nw in (False, True):
        o, w = ours(q, k, v, key_padding_mask=kpm, need_weights=nw)
        o.sum().backward()
        assert not torch.isnan(o).any() and not torch.isnan(q.grad).any()
        assert_close(o[:, 1], ours.out_proj.bias.detach().expand(4, E), atol=1e-12, rtol=0)


def test_float_mask_hiding_a_row_gives_zeros_not_nan():
    """An arbitrary float attn_mask (the dense path) whose row 2 is all -inf: that query's attention output
    is zero (output = out_proj's bias), the weights row is zero, and no gradient is NaN; other rows match
    torch.nn with the row's mask cleared (torch gives NaN for such a row)."""
    ref, ours = _pair()
    q, k, v = _data(4, 6, 2, {})
    mask = torch.randn(4, 6, dtype=torch.float64)
    mask[2] = float("-inf")
    mask[0, 3] = float("-inf")
    for nw in (False, True):
        o, w = ours(q, k, v, attn_mask=mask, need_weights=nw)
        o.sum().backward()
        grads = [q.grad, k.grad, v.grad] + [p.grad for p in ours.parameters()]
        assert all(not torch.isnan(g).any() for g in grads)
        assert_close(o[2], ours.out_proj.bias.detach().expand(2, E), atol=1e-12, rtol=0)
        cleared = mask.clone()
        cleared[2] = 0.0
        o_ref, w_ref = ref(q, k, v, attn_mask=cleared, need_weights=True)
        rows = [0, 1, 3]
        assert_close(o[rows], o_ref[rows], atol=1e-10, rtol=1e-8)
        if nw:
            assert (w[:, 2] == 0).all()
            assert_close(w[:, rows], w_ref[:, rows], atol=1e-10, rtol=1e-8)
        for t in [q, k, v] + list(ours.parameters()):
            t.grad = None


# ------------------------------------------------------------------------------ windows

def _band_mask(L, S, left, right):
    i = torch.arange(L)[:, None] + (S - L)
    j = torch.arange(S)[None, :]
    hidden = torch.zeros(L, S, dtype=torch.bool)
    if left >= 0:
        hidden |= j < i - left
    if right >= 0:
        hidden |= j > i + right
    return hidden


@pytest.mark.parametrize("window", [(0, 0), (2, 3), (4, 0), (-1, 2), (30, 30)], ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_truncated_self_attention_vs_band_mask(window, need_weights, batch_first, fused_calls):
    L, B = 13, 2
    ref = nn.MultiheadAttention(E, H, dtype=F64, batch_first=batch_first)
    ours = TruncatedSelfAttention(E, H, window, dtype=F64, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict(), strict=True)
    q, _, _ = _data(L, L, B, {"batch_first": batch_first}, self_attn=True)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    if window != (0, 0):       # with (0, 0) a padded key empties its row: torch gives NaN there, we give 0
        kpm[1, 2:5:2] = True
    band = _band_mask(L, L, *window)
    outs = []
    for m, kw in ((ref, {"attn_mask": band}), (ours, {})):
        o, w = m(q, q, q, key_padding_mask=kpm, need_weights=need_weights, **kw)
        outs.append((o, w))
        o.sum().backward()
    assert_close(outs[1][0], outs[0][0], atol=1e-9, rtol=1e-7, name="output")
    if need_weights:
        assert_close(outs[1][1], outs[0][1], atol=1e-9, rtol=1e-7, name="weights")
    assert len(fused_calls) == (0 if need_weights else 1)
    if fused_calls:
        assert fused_calls[0]["window"] == window
    # key/value default to the query
    assert_close(ours(q, need_weights=False, key_padding_mask=kpm)[0], outs[1][0], atol=1e-12, rtol=0)


def test_window_with_causal_and_cross_lengths():
    L, S, B = 7, 12, 2
    ref, _ = _pair()
    ours = MultiheadAttention(E, H, dtype=F64, window=(3, 2))
    ours.load_state_dict(ref.state_dict(), strict=True)
    q, k, v = _data(L, S, B, {})
    mask = _causal(L, S)
    o_ref, _ = ref(q, k, v, attn_mask=mask | _band_mask(L, S, 3, 2), need_weights=False)
    o, _ = ours(q, k, v, attn_mask=mask, need_weights=False)
    assert_close(o, o_ref, atol=1e-9, rtol=1e-7)
    o2, _ = ours(q, k, v, attn_mask=mask, need_weights=True)
    assert_close(o2, o_ref, atol=1e-9, rtol=1e-7)


def test_state_dict_and_errors():
    ref = nn.MultiheadAttention(E, H, add_bias_kv=True, kdim=20, vdim=24)
    ours = TruncatedSelfAttention(E, H, (4, 4), add_bias_kv=True, kdim=20, vdim=24)
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    with pytest.raises(ValueError, match="window"):
        TruncatedSelfAttention(E, H, None)
    with pytest.raises(ValueError, match="window"):
        MultiheadAttention(E, H, window=(1, -3))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(E, 5)
    m = MultiheadAttention(E, H)
    x = torch.randn(5, 2, E)
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(5, 2, E + 1), x, x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    # integer masks are refused on every path (torch.nn refuses them too); added to the scores they would be a bias
    for need_weights in (True, False):
        with pytest.raises(ValueError, match="key_padding_mask must be a bool or floating"):
            m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long), need_weights=need_weights)
        with pytest.raises(ValueError, match="attn_mask must be a bool or floating"):
            m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int32), need_weights=need_weights)


def test_initialisation_matches_torch():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, add_bias_kv=True)
    torch.manual_seed(0)
    ours = MultiheadAttention(E, H, add_bias_kv=True)
    for (n1, p1), (n2, p2) in zip(sorted(ref.named_parameters()), sorted(ours.named_parameters())):
        assert n1 == n2 and p1.shape == p2.shape
    assert ours.in_proj_bias.abs().max() == 0 and ours.out_proj.bias.abs().max() == 0
    bound = (6 / (E + 3 * E)) ** 0.5
    assert ours.in_proj_weight.abs().max() <= bound


def test_small_head_dim_takes_dense_path(fused_calls):
    ref = nn.MultiheadAttention(16, 4, dtype=F64)         # head dim 4 < 16
    ours = MultiheadAttention(16, 4, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 16, dtype=F64)
    assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0], atol=1e-9, rtol=1e-7)
    assert not fused_calls


def test_triton_path_module(triton_path):
    """The module on the Triton path (interpreter here): fp32, key padding, causal, need_weights=False."""
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    ours = MultiheadAttention(E, H, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 12, E)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, 8:] = True
    o_ref, _ = ref(x, x, x, key_padding_mask=kpm, attn_mask=_causal(12, 12), need_weights=False)
    o, _ = ours(x.to(triton_path), x.to(triton_path), x.to(triton_path), key_padding_mask=kpm.to(triton_path),
                is_causal=True, attn_mask=_causal(12, 12).to(triton_path), need_weights=False)
    assert_close(o, o_ref, dtype=torch.float32, tf32=True)


# ----------------------------------------------------------------------------- random configurations

_MASK_FORMS = ["none", "kpm-bool", "kpm-float", "causal-bool", "causal-float", "causal-hint", "top-left",
               "top-left-hint", "arbitrary-bool", "arbitrary-float", "3d-bool", "kpm+causal"]


@st.composite
def _configurations(draw, form, need_weights):
    """A module and its inputs for a mask form, drawn over everything else the parity depends on."""
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([16, 24, 8]))          # 8: below the op's range, the dense path
    e = heads * head_dim
    kw = {"bias": draw(st.booleans()), "add_bias_kv": draw(st.booleans()), "add_zero_attn": draw(st.booleans()),
          "batch_first": draw(st.booleans()),
          "kdim": draw(st.sampled_from([None, e + 3])), "vdim": draw(st.sampled_from([None, e - 1]))}
    if form.endswith("hint") and not need_weights:
        kw["add_bias_kv"] = kw["add_zero_attn"] = False   # torch's SDPA path hides extra keys there (docstring)
    b, n_q = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    self_attn = kw["kdim"] is None and kw["vdim"] is None and draw(st.booleans())
    square = self_attn or form.startswith("causal") or form == "kpm+causal"   # bottom-right: every row sees a key
    n_k = n_q if square else draw(st.integers(1, 24))
    return heads, e, kw, b, n_q, n_k, self_attn, form, need_weights, draw(st.booleans()), draw(st.integers(0, 2**16))


@pytest.mark.parametrize("form", _MASK_FORMS)
@pytest.mark.parametrize("need_weights", [False, True])
@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_random_configurations_match_torch(form, need_weights, data):
    """torch.nn.MultiheadAttention and ours with one state_dict, over random constructor options, lengths
    and mask forms: outputs, weights and every gradient.  Every row sees a key (torch gives NaN where none
    does; those rows are compared in the tests of empty rows)."""
    heads, e, kw, b, n_q, n_k, self_attn, form, need_weights, average, seed = data.draw(
        _configurations(form, need_weights))
    ref = nn.MultiheadAttention(e, heads, dtype=F64, **kw)
    ours = MultiheadAttention(e, heads, dtype=F64, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(seed)

    def t(n, dim):
        return torch.randn((b, n, dim) if kw["batch_first"] else (n, b, dim), dtype=F64, generator=g).requires_grad_()

    q = t(n_q, e)
    k, v = (q, q) if self_attn else (t(n_k, kw["kdim"] or e), t(n_k, kw["vdim"] or e))
    fw = {"need_weights": need_weights, "average_attn_weights": average}
    some = torch.rand(n_q, n_k, generator=g) < 0.3
    some[:, 0] = False
    if form.startswith("kpm"):
        pad = torch.rand(b, n_k, generator=g) < 0.3
        pad[:, 0] = False
        fw["key_padding_mask"] = _float(pad) if form == "kpm-float" else pad
    if form.startswith("causal") or form == "kpm+causal":
        fw["attn_mask"] = _float(_causal(n_q, n_k)) if form == "causal-float" else _causal(n_q, n_k)
        fw["is_causal"] = form == "causal-hint"
    elif form.startswith("top-left"):
        fw["attn_mask"] = torch.ones(n_q, n_k, dtype=torch.bool).triu(1)
        fw["is_causal"] = form.endswith("hint")
    elif form == "arbitrary-bool":
        fw["attn_mask"] = some
    elif form == "arbitrary-float":
        fw["attn_mask"] = torch.randn(n_q, n_k, dtype=F64, generator=g)
    elif form == "3d-bool":
        fw["attn_mask"] = some.expand(b * heads, n_q, n_k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # the dense-path notices
        _compare(ref, ours, q, k, v, **fw)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("which", ["attn_mask 2-D", "attn_mask 3-D", "key_padding_mask"])
def test_learned_float_mask_gets_gradient_with_frozen_weights(which, need_weights):
    """A learned float mask (a relative-position bias) trains through a frozen module: the scores need no
    gradient but the mask does, so the weights path must keep autograd (torch.nn gives the mask its gradient)."""
    ref, ours = _pair()
    ref.requires_grad_(False)
    ours.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 3, E, dtype=F64, generator=g)
    shape = {"attn_mask 2-D": (5, 5), "attn_mask 3-D": (3 * H, 5, 5), "key_padding_mask": (3, 5)}[which]
    name = which.split()[0]
    base = torch.randn(shape, dtype=F64, generator=g)
    dy = torch.randn(5, 3, E, dtype=F64, generator=g)
    grads, outs = [], []
    for m in (ref, ours):
        mask = base.clone().requires_grad_()
        o, _ = m(q, q, q, need_weights=need_weights, **{name: mask})
        o.backward(dy)
        outs.append(o.detach())
        grads.append(mask.grad)
    assert_close(outs[1], outs[0], atol=1e-9, rtol=1e-7, name="output")
    assert_close(grads[1], grads[0], atol=1e-9, rtol=1e-7, name=f"grad {name}")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_query_key_batch_mismatch_is_a_value_error(batch_first, need_weights):
    """query and key/value of different batch sizes are refused up front with a ValueError naming them, on every
    path (not a shape error from inside the attention)."""
    m = MultiheadAttention(E, H, batch_first=batch_first)
    q = torch.randn((3, 5, E) if batch_first else (5, 3, E))
    kv = torch.randn((2, 4, E) if batch_first else (4, 2, E))
    with pytest.raises(ValueError, match="batch"):
        m(q, kv, kv, need_weights=need_weights)


@pytest.mark.parametrize("which", ["attn_mask zeros", "attn_mask 3-D zeros", "attn_mask causal", "key_padding_mask zeros",
                                   "key_padding_mask 0/-inf"])
def test_learned_float_mask_of_zeros_and_infs_gets_gradient(which):
    """A learned float mask that happens to hold only 0 and -inf (a zero-initialised bias, on its own or added to
    the causal mask) is still a differentiable input: on the fused path (need_weights=False) it must not be
    replaced by "no mask", the causal flag or a bool padding mask, which would drop its gradient (torch.nn
    gives it one)."""
    ref, ours = _pair()
    g = torch.Generator().manual_seed(4)
    q = torch.randn(5, 3, E, dtype=F64, generator=g)
    dy = torch.randn(5, 3, E, dtype=F64, generator=g)
    if which.startswith("attn_mask 3-D"):
        base = torch.zeros(3 * H, 5, 5, dtype=F64)
    elif which.startswith("attn_mask"):
        base = torch.zeros(5, 5, dtype=F64)
        if which.endswith("causal"):
            base = base.masked_fill(_causal(5, 5), float("-inf"))
    else:
        base = torch.zeros(3, 5, dtype=F64)
        if which.endswith("-inf"):
            base[1, 3:] = float("-inf")
    name = which.split()[0]
    grads, outs = [], []
    for m in (ref, ours):
        bias = torch.zeros_like(base, requires_grad=True)    # the learned part, initialised to zero
        o, _ = m(q, q, q, need_weights=False, **{name: base + bias})
        o.backward(dy)
        outs.append(o.detach())
        grads.append(bias.grad)
    assert grads[0] is not None and grads[0].abs().max() > 0
    assert grads[1] is not None, "the mask's gradient was dropped"
    assert_close(outs[1], outs[0], atol=1e-9, rtol=1e-7, name="output")
    assert_close(grads[1], grads[0], atol=1e-9, rtol=1e-7, name=f"grad {name}")


@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "unbatched"])
def test_self_attention_projects_q_k_v_in_one_packed_product(monkeypatch, layout):
    """query is key is value: one product with the whole in_proj_weight, whatever the layout (the re-layout
    to (B, L, E) used to make three views, and so three products); the same numbers as torch.nn."""
    import torch.nn.functional as F

    from leedl_fast.nn import MultiheadAttention

    torch.manual_seed(0)
    ours = MultiheadAttention(24, 4, batch_first=layout == "batch_first")
    ref = torch.nn.MultiheadAttention(24, 4, batch_first=layout == "batch_first")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(*((5,) if layout == "unbatched" else (2, 5)), 24)
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda inp, w, b=None: (calls.append(w.shape), linear(inp, w, b))[1])
    out, _ = ours(x, x, x, need_weights=False)
    monkeypatch.setattr(F, "linear", linear)
    assert calls.count(torch.Size([72, 24])) == 1 and calls.count(torch.Size([24, 24])) == 1, calls
    torch.testing.assert_close(out, ref(x, x, x, need_weights=False)[0])

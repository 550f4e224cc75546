"""leedl_fast.nn Transformer modules against their torch.nn twins (float64) with the same state_dict.

Outputs, input gradients and every parameter gradient are compared; masks in every form; norm_first,
activation, batch_first both ways; train and eval mode (dropout 0).  The Triton path runs under the
interpreter on tiny shapes.  Then: causal masks reach the attention op as its flag, windows, incremental
decoding with the cache, ``generate``, errors, and torch.compile.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import leedl_fast.nn.transformer as T
from leedl_fast.nn.transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                                       TransformerEncoderLayer)
from tests.harness import assert_close

# A layer chains ~10 rounded operations (projections, softmax, layer norms, residuals) and its parameter
# gradients sum batch * seq rounded products: 8x the single-op tolerance.
LAYER_SCALE = 8.0
# fp16 on the CPU: every matmul and layer norm rounds to 11 bits, and the gradients of the 2-layer models chain
# twice as many of them.
FP16_SCALE = 20.0


E, H, FF = 32, 2, 24  # head dim 16: the smallest the attention op takes


def _x(shape, dtype=torch.float64):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def _layout(n, b, batch_first):
    return (b, n, E) if batch_first else (n, b, E)


def _pair(ours, ref_cls, *args, **kw):
    """The torch.nn twin, in float64, loaded (strict) from ``ours``'s state_dict."""
    ref = ref_cls(*args, **kw).double()
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()}, strict=True)
    ref.train(ours.training)
    return ref


def _compare(ours, ref, inputs_ours, inputs_ref, kwargs_ours, kwargs_ref, dtype, scale=LAYER_SCALE):
    out = ours(*inputs_ours, **kwargs_ours)
    exp = ref(*inputs_ref, **kwargs_ref)
    assert out.dtype == dtype and out.shape == exp.shape
    assert_close(out, exp, dtype=dtype, scale=scale, name="output")
    dy = torch.randn(exp.shape, dtype=torch.float64)
    out.backward(dy.to(out.device, dtype))
    exp.backward(dy)
    for a, e, name in zip(inputs_ours, inputs_ref, ("input0", "input1")):
        if e.requires_grad:
            assert_close(a.grad, e.grad, dtype=dtype, scale=scale, name=f"d{name}")
    ref_params = dict(ref.named_parameters())
    n_checked = 0
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_params[name].grad, dtype=dtype, scale=scale, name=f"grad {name}")
        n_checked += 1
    assert n_checked == len(ref_params)


def _masks(form, n, b, device, dtype):
    """(kwargs for ours, kwargs for torch.nn) for one mask form of a (n, n) self-attention."""
    causal_float = torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)
    causal_bool = torch.ones(n, n, dtype=torch.bool).triu(1)
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[0, n // 2 + 1:] = True  # sequence 0 padded after its first half (never fully)
    g = torch.Generator().manual_seed(n)
    arbitrary = torch.rand(n, n, generator=g) > 0.6
    arbitrary.fill_diagonal_(False)  # every row keeps a key: torch.nn gives NaN for empty rows
    if form == "none":
        return {}, {}
    if form == "causal_float":
        return {"mask": causal_float.to(dtype)}, {"mask": causal_float}
    if form == "causal_bool":
        return {"mask": causal_bool}, {"mask": causal_bool}
    if form == "causal_hint":
        return {"mask": causal_bool, "is_causal": True}, {"mask": causal_bool, "is_causal": True}
    if form == "arbitrary_bool":
        return {"mask": arbitrary}, {"mask": arbitrary}
    if form == "arbitrary_float":
        m = torch.randn(n, n, dtype=torch.float64, generator=g).masked_fill(arbitrary, float("-inf"))
        return {"mask": m.to(dtype)}, {"mask": m}
    if form == "mask_3d":
        m = torch.rand(b * H, n, n, generator=g) > 0.6
        m[:, torch.arange(n), torch.arange(n)] = False
        return {"mask": m}, {"mask": m}
    if form == "padding_bool":
        return {"kpm": kpm}, {"kpm": kpm}
    if form == "padding_float":
        f = torch.zeros(b, n, dtype=torch.float64).masked_fill(kpm, float("-inf"))
        return {"kpm": f.to(dtype)}, {"kpm": f}
    if form == "padding_causal":
        return ({"kpm": kpm, "mask": causal_bool}, {"kpm": kpm, "mask": causal_bool})
    raise AssertionError(form)


MASK_FORMS = ["none", "causal_float", "causal_bool", "causal_hint", "arbitrary_bool", "arbitrary_float", "mask_3d",
              "padding_bool", "padding_float", "padding_causal"]


def _to(d, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def _encoder_kwargs(m):
    out = {}
    if "mask" in m:
        out["src_mask"] = m["mask"]
    if "kpm" in m:
        out["src_key_padding_mask"] = m["kpm"]
    if "is_causal" in m:
        out["is_causal"] = m["is_causal"]
    return out


def _run_encoder_layer(device, dtype, *, form, norm_first, activation, batch_first, n, b, train, scale=LAYER_SCALE):
    ours = TransformerEncoderLayer(E, H, FF, dropout=0.0, activation=activation, batch_first=batch_first,
                                   norm_first=norm_first).to(device, dtype).train(train)
    ref = _pair(ours, torch.nn.TransformerEncoderLayer, E, H, FF, dropout=0.0, activation=activation,
                batch_first=batch_first, norm_first=norm_first)
    x = _x(_layout(n, b, batch_first))
    mo, mr = _masks(form, n, b, device, dtype)
    xo = x.to(device, dtype).requires_grad_()
    xr = x.clone().requires_grad_()
    _compare(ours, ref, (xo,), (xr,), _to(_encoder_kwargs(mo), device), _encoder_kwargs(mr), dtype, scale)


@pytest.mark.parametrize("form", MASK_FORMS)
@pytest.mark.parametrize("norm_first,activation,batch_first", [
    (False, "relu", False), (True, "gelu", False), (False, "gelu", True), (True, "relu", True)])
def test_encoder_layer_masks(torch_path, form, norm_first, activation, batch_first):
    _run_encoder_layer(torch_path, torch.float32, form=form, norm_first=norm_first, activation=activation,
                       batch_first=batch_first, n=17, b=3, train=True)


@pytest.mark.parametrize("n", [1, 63, 77])
@pytest.mark.parametrize("train", [True, False])
def test_encoder_layer_lengths_and_modes(torch_path, n, train):
    _run_encoder_layer(torch_path, torch.float32, form="padding_causal" if n > 1 else "causal_bool",
                       norm_first=False, activation=F.gelu, batch_first=False, n=n, b=2, train=train)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("form,norm_first,activation,batch_first", [
    ("causal_float", False, "relu", False), ("padding_bool", True, "gelu", True), ("none", True, "relu", False),
    ("arbitrary_float", False, "gelu", True)])
def test_encoder_layer_triton(triton_path, dtype, form, norm_first, activation, batch_first):
    _run_encoder_layer(triton_path, dtype, form=form, norm_first=norm_first, activation=activation,
                       batch_first=batch_first, n=9, b=2, train=True,
                       scale=FP16_SCALE if dtype == torch.float16 else LAYER_SCALE)


def test_encoder_layer_eval_no_grad_matches_torch_fast_path(torch_path):
    """In eval mode without autograd torch.nn takes its fused encoder kernel; the results still agree."""
    ours = TransformerEncoderLayer(E, H, FF, dropout=0.1, batch_first=True).eval()
    ref = copy.deepcopy(ours)
    ref = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, batch_first=True).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 11, E)
    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[1, 7:] = True
    with torch.no_grad():
        a, e = ours(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm)
    # padded rows included: the layer's fused path computes them as the unfused one does (only
    # TransformerEncoder's nested-tensor path zeroes them, see test_encoder_padded_outputs_...)
    assert_close(a, e, dtype=torch.float32, scale=LAYER_SCALE)


# (name, layer kwargs, encoder kwargs, eval, no_grad, padding, float mask, attn mask given, torch zeroes padding)
NESTED_CASES = [
    ("nested path", {}, {}, True, True, "end", False, False, True),
    ("nested path, float mask", {}, {}, True, True, "end", True, False, True),
    ("nested path, gelu", {"activation": "gelu"}, {}, True, True, "end", False, False, True),
    ("padding not at the end", {}, {}, True, True, "middle", False, False, False),
    ("mask_check off", {}, {"mask_check": False}, True, True, "end", False, False, True),
    ("autograd on", {}, {}, True, False, "end", False, False, False),
    ("train mode", {"dropout": 0.0}, {}, False, True, "end", False, False, False),
    ("attn mask given", {}, {}, True, True, "end", False, True, False),
    ("enable_nested_tensor off", {}, {"enable_nested_tensor": False}, True, True, "end", False, False, False),
    ("norm_first", {"norm_first": True}, {}, True, True, "end", False, False, False),
    ("odd head count", {"nhead": 1}, {}, True, True, "end", False, False, False),
    ("batch_first off", {"batch_first": False}, {}, True, True, "end", False, False, False),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", NESTED_CASES, ids=[c[0] for c in NESTED_CASES])
def test_encoder_padded_outputs_as_torch_nested_tensor_path(torch_path, case):
    """torch.nn.TransformerEncoder returns zeros at padded positions (before its norm) when it runs its
    nested-tensor path: eval mode, no autograd, padding at the end of each row (with mask_check), no mask,
    a layer of the shape that path takes.  Ours decides the same way (use_nested_tensor included) and
    gives the same full output, padded positions included, in every case."""
    _, layer_kw, enc_kw, eval_mode, no_grad, padding, float_mask, attn_mask, zeroes = case
    kw = {**dict(d_model=E, nhead=H, dim_feedforward=FF, dropout=0.1, batch_first=True), **layer_kw}
    ours = TransformerEncoder(TransformerEncoderLayer(**kw), 2, norm=torch.nn.LayerNorm(E), **enc_kw).double()
    ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(**kw), 2, norm=torch.nn.LayerNorm(E),
                                      **enc_kw).double()
    ref.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours.norm.bias.uniform_(-1, 1)
        ref.norm.bias.copy_(ours.norm.bias)
    ours.train(not eval_mode)
    ref.train(not eval_mode)
    assert ours.use_nested_tensor == ref.use_nested_tensor
    b, n = 3, 9
    x = _x(_layout(n, b, kw["batch_first"]))
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[1, 6:] = True
    kpm[2, 2:] = True
    if padding == "middle":
        kpm[0, 3] = True
    mask_kw = {"src_key_padding_mask": kpm.double().masked_fill(kpm, float("-inf")) if float_mask else kpm}
    if attn_mask:
        mask_kw["mask"] = torch.zeros(n, n, dtype=torch.bool)
    with torch.set_grad_enabled(not no_grad):
        a, e = ours(x, **mask_kw), ref(x, **mask_kw)
    assert_close(a, e, dtype=torch.float64, scale=LAYER_SCALE)
    pad = kpm.t() if not kw["batch_first"] else kpm
    at_pad = a[pad[..., None].expand_as(a)].view(-1, E)
    bias = ours.norm.bias.detach().expand_as(at_pad)
    assert torch.equal(at_pad, bias) == zeroes  # norm(0) = its bias exactly where the positions were zeroed


# ------------------------------------------------------------------------------------------------ decoder layer

def _decoder_kwargs(m, prefix):
    out = {}
    if "mask" in m:
        out[f"{prefix}_mask"] = m["mask"]
    if "kpm" in m:
        out[f"{prefix}_key_padding_mask"] = m["kpm"]
    if "is_causal" in m:
        out[f"{prefix}_is_causal"] = m["is_causal"]
    return out


def _memory_masks(form, n, s, b):
    g = torch.Generator().manual_seed(s)
    if form == "none":
        return {}, {}
    if form == "memory_bool":
        m = torch.rand(n, s, generator=g) > 0.6
        m[:, 0] = False
        return {"memory_mask": m}, {"memory_mask": m}
    if form == "memory_float":
        m = torch.randn(n, s, dtype=torch.float64, generator=g)
        return {"memory_mask": m}, {"memory_mask": m}
    if form == "memory_padding":
        kpm = torch.zeros(b, s, dtype=torch.bool)
        kpm[-1, 2:] = True
        return {"memory_key_padding_mask": kpm}, {"memory_key_padding_mask": kpm}
    raise AssertionError(form)


def _run_decoder_layer(device, dtype, *, tgt_form, mem_form, norm_first, activation, batch_first, n, s, b, train,
                       scale=LAYER_SCALE):
    ours = TransformerDecoderLayer(E, H, FF, dropout=0.0, activation=activation, batch_first=batch_first,
                                   norm_first=norm_first).to(device, dtype).train(train)
    ref = _pair(ours, torch.nn.TransformerDecoderLayer, E, H, FF, dropout=0.0, activation=activation,
                batch_first=batch_first, norm_first=norm_first)
    tgt, mem = _x(_layout(n, b, batch_first)), _x(_layout(s, b, batch_first))
    to, tr = _masks(tgt_form, n, b, device, dtype)
    mo, mr = _memory_masks(mem_form, n, s, b)
    ko = {**_decoder_kwargs(to, "tgt"), **{k: (v.to(dtype) if v.is_floating_point() else v) for k, v in mo.items()}}
    kr = {**_decoder_kwargs(tr, "tgt"), **mr}
    ins_o = (tgt.to(device, dtype).requires_grad_(), mem.to(device, dtype).requires_grad_())
    ins_r = (tgt.clone().requires_grad_(), mem.clone().requires_grad_())
    _compare(ours, ref, ins_o, ins_r, _to(ko, device), kr, dtype, scale)


@pytest.mark.parametrize("tgt_form,mem_form", [
    ("causal_float", "none"), ("causal_bool", "memory_padding"), ("causal_hint", "memory_float"),
    ("padding_causal", "memory_padding"), ("arbitrary_bool", "memory_bool"), ("padding_float", "none"),
    ("mask_3d", "memory_padding"), ("none", "none")])
@pytest.mark.parametrize("norm_first,activation,batch_first", [
    (False, "relu", False), (True, "gelu", True)])
def test_decoder_layer(torch_path, tgt_form, mem_form, norm_first, activation, batch_first):
    _run_decoder_layer(torch_path, torch.float32, tgt_form=tgt_form, mem_form=mem_form, norm_first=norm_first,
                       activation=activation, batch_first=batch_first, n=17, s=13, b=3, train=True)


@pytest.mark.parametrize("n,s,train", [(1, 63, True), (77, 5, False)])
def test_decoder_layer_lengths(torch_path, n, s, train):
    _run_decoder_layer(torch_path, torch.float32, tgt_form="causal_float", mem_form="memory_padding",
                       norm_first=True, activation="relu", batch_first=False, n=n, s=s, b=2, train=train)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decoder_layer_triton(triton_path, dtype):
    _run_decoder_layer(triton_path, dtype, tgt_form="causal_bool", mem_form="memory_padding", norm_first=False,
                       activation="gelu", batch_first=True, n=7, s=5, b=2, train=True,
                       scale=FP16_SCALE if dtype == torch.float16 else LAYER_SCALE)


# ------------------------------------------------------------------------------------------------ stacks, Transformer

def _transformer_pair(device, dtype, layers=2, **kw):
    torch.manual_seed(0)
    ours = Transformer(E, H, layers, layers, FF, dropout=0.0, **kw).to(device, dtype)
    ref = _pair(ours, torch.nn.Transformer, E, H, layers, layers, FF, dropout=0.0, **kw)
    return ours, ref


@pytest.mark.parametrize("norm_first,batch_first,train", [(False, False, True), (True, True, False)])
def test_transformer(torch_path, norm_first, batch_first, train):
    ours, ref = _transformer_pair("cpu", torch.float32, norm_first=norm_first, batch_first=batch_first,
                                  activation="gelu")
    ours.train(train), ref.train(train)
    s, n, b = 13, 10, 3
    src, tgt = _x(_layout(s, b, batch_first)), _x(_layout(n, b, batch_first))
    skpm = torch.zeros(b, s, dtype=torch.bool)
    skpm[1, 9:] = True
    mask = Transformer.generate_square_subsequent_mask(n)
    kw = dict(tgt_mask=mask, src_key_padding_mask=skpm, memory_key_padding_mask=skpm)
    kr = dict(tgt_mask=mask.double(), src_key_padding_mask=skpm, memory_key_padding_mask=skpm)
    _compare(ours, ref, (src.float().requires_grad_(), tgt.float().requires_grad_()),
             (src.clone().requires_grad_(), tgt.clone().requires_grad_()), kw, kr, torch.float32, scale=2 * LAYER_SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transformer_triton(triton_path, dtype):
    ours, ref = _transformer_pair(triton_path, dtype, layers=1, batch_first=True)
    src, tgt = _x((2, 6, E)), _x((2, 5, E))
    skpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    mask = Transformer.generate_square_subsequent_mask(5)
    kw = dict(tgt_mask=mask.to(triton_path, dtype), src_key_padding_mask=skpm.to(triton_path),
              memory_key_padding_mask=skpm.to(triton_path))
    kr = dict(tgt_mask=mask.double(), src_key_padding_mask=skpm, memory_key_padding_mask=skpm)
    _compare(ours, ref, (src.to(triton_path, dtype).requires_grad_(), tgt.to(triton_path, dtype).requires_grad_()),
             (src.clone().requires_grad_(), tgt.clone().requires_grad_()), kw, kr, dtype,
             scale=2 * (FP16_SCALE if dtype == torch.float16 else LAYER_SCALE))


def test_encoder_decoder_stacks_with_norm(torch_path):
    layer = TransformerEncoderLayer(E, H, FF, dropout=0.0)
    ours = TransformerEncoder(layer, 3, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False, mask_check=False)
    ref = _pair(ours, torch.nn.TransformerEncoder, torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.0), 3,
                norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)
    x = _x((11, 2, E))
    m = torch.nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.float64)
    _compare(ours, ref, (x.float().requires_grad_(),), (x.clone().requires_grad_(),), {"mask": m.float()},
             {"mask": m}, torch.float32, scale=2 * LAYER_SCALE)
    dlayer = TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=True)
    ours = TransformerDecoder(dlayer, 2, norm=torch.nn.LayerNorm(E))
    ref = _pair(ours, torch.nn.TransformerDecoder, torch.nn.TransformerDecoderLayer(E, H, FF, dropout=0.0,
                                                                                     batch_first=True), 2,
                norm=torch.nn.LayerNorm(E))
    t, mem = _x((2, 8, E)), _x((2, 5, E))
    _compare(ours, ref, (t.float().requires_grad_(), mem.float().requires_grad_()),
             (t.clone().requires_grad_(), mem.clone().requires_grad_()), {"tgt_is_causal": True,
                                                                          "tgt_mask": m[:8, :8].float()},
             {"tgt_is_causal": True, "tgt_mask": m[:8, :8]}, torch.float32, scale=2 * LAYER_SCALE)


def test_unbatched_input(torch_path):
    ours = TransformerEncoderLayer(E, H, FF, dropout=0.0)
    ref = _pair(ours, torch.nn.TransformerEncoderLayer, E, H, FF, dropout=0.0)
    x = _x((7, E))
    kpm = torch.tensor([False] * 5 + [True] * 2)
    _compare(ours, ref, (x.float().requires_grad_(),), (x.clone().requires_grad_(),),
             {"src_key_padding_mask": kpm}, {"src_key_padding_mask": kpm}, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_both_ways(bias):
    pairs = [
        (TransformerEncoderLayer(E, H, FF, bias=bias), torch.nn.TransformerEncoderLayer(E, H, FF, bias=bias)),
        (TransformerDecoderLayer(E, H, FF, bias=bias), torch.nn.TransformerDecoderLayer(E, H, FF, bias=bias)),
        (Transformer(E, H, 2, 1, FF, bias=bias), torch.nn.Transformer(E, H, 2, 1, FF, bias=bias)),
        (TransformerEncoder(TransformerEncoderLayer(E, H, FF, bias=bias), 2, torch.nn.LayerNorm(E, bias=bias)),
         torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(E, H, FF, bias=bias), 2,
                                     torch.nn.LayerNorm(E, bias=bias), enable_nested_tensor=False)),
        (TransformerDecoder(TransformerDecoderLayer(E, H, FF, bias=bias), 2),
         torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(E, H, FF, bias=bias), 2)),
    ]
    for ours, ref in pairs:
        so, sr = ours.state_dict(), ref.state_dict()
        assert list(so.keys()) == list(sr.keys())
        assert all(so[k].shape == sr[k].shape for k in so)
        ours.load_state_dict(sr, strict=True)
        assert all(torch.equal(ours.state_dict()[k], sr[k]) for k in so)
        fresh = type(ref).__new__(type(ref))
        ref2 = copy.deepcopy(ref)
        for p in ref2.parameters():
            torch.nn.init.zeros_(p)
        ref2.load_state_dict(so, strict=True)
        assert all(torch.equal(ref2.state_dict()[k], so[k]) for k in so)
        del fresh


def test_generate_square_subsequent_mask():
    for n in (1, 5):
        assert torch.equal(Transformer.generate_square_subsequent_mask(n),
                           torch.nn.Transformer.generate_square_subsequent_mask(n))
    m = Transformer.generate_square_subsequent_mask(4, dtype=torch.float16)
    assert m.dtype == torch.float16 and m[0, 1] == float("-inf") and m[1, 0] == 0


def test_transformer_init_is_xavier_and_callable_activation(torch_path):
    torch.manual_seed(1)
    t = Transformer(E, H, 1, 1, FF, activation=torch.nn.GELU())
    w = t.encoder.layers[0].linear1.weight
    bound = (6 / (E + FF)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    out = t(torch.randn(4, 2, E), torch.randn(3, 2, E))
    assert out.shape == (3, 2, E) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ how masks reach the op

class _Spy:
    def __init__(self, monkeypatch):
        self.op_calls, self.sdpa_calls, self.dense_calls = [], [], 0
        real_op, real_sdpa, real_dense = T._attention_op, F.scaled_dot_product_attention, T._dense_attention

        def op(q, k, v, **kw):
            self.op_calls.append(kw)
            return real_op(q, k, v, **kw)

        def sdpa(q, k, v, attn_mask=None, **kw):
            self.sdpa_calls.append({"attn_mask": attn_mask, **kw})
            return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

        def dense(*a, **kw):
            self.dense_calls += 1
            return real_dense(*a, **kw)

        monkeypatch.setattr(T, "_attention_op", op)
        monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
        monkeypatch.setattr(T, "_dense_attention", dense)


@pytest.mark.parametrize("kind", ["bool", "float", "float16", "hint"])
def test_causal_mask_reaches_op_as_flag(any_path, monkeypatch, kind):
    n = 6
    layer = TransformerEncoderLayer(E, H, FF, dropout=0.0).to(any_path)
    mask = {"bool": torch.ones(n, n, dtype=torch.bool).triu(1),
            "float": Transformer.generate_square_subsequent_mask(n),
            "float16": Transformer.generate_square_subsequent_mask(n, dtype=torch.float16),
            "hint": torch.ones(n, n, dtype=torch.bool).triu(1)}[kind].to(any_path)
    kpm = torch.zeros(2, n, dtype=torch.bool, device=any_path)
    spy = _Spy(monkeypatch)
    layer(torch.randn(n, 2, E, device=any_path), src_mask=mask, is_causal=kind == "hint")
    layer(torch.randn(n, 2, E, device=any_path), src_mask=mask, src_key_padding_mask=kpm)
    assert spy.dense_calls == 0
    calls = spy.op_calls + spy.sdpa_calls
    assert len(calls) == 2
    for c in calls:
        assert c.get("causal", c.get("is_causal")) is True and c.get("attn_mask") is None


def test_non_causal_masks_take_dense_path(torch_path, monkeypatch):
    n = 5
    layer = TransformerEncoderLayer(E, H, FF, dropout=0.0)
    spy = _Spy(monkeypatch)
    almost = torch.ones(n, n, dtype=torch.bool).triu(1)
    almost[0, 1] = False
    layer(torch.randn(n, 2, E), src_mask=almost)
    layer(torch.randn(n, 2, E), src_mask=Transformer.generate_square_subsequent_mask(n) + 0.5)  # causal pattern, nonzero bias
    assert spy.dense_calls == 2


# ------------------------------------------------------------------------------------------------ window

def _band(n, left, right):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None]
    hidden = torch.zeros(n, n, dtype=torch.bool)
    if left >= 0:
        hidden |= j < i - left
    if right >= 0:
        hidden |= j > i + right
    return hidden


@pytest.mark.parametrize("window,causal", [((2, 1), False), ((3, -1), True), ((-1, 0), False), ((0, 0), False)])
def test_window_equals_band_mask(any_path, window, causal):
    """window=(left, right) computes attention under the band mask (checked against the dense masked path)."""
    n = 9 if any_path == "cpu" else 33
    torch.manual_seed(3)
    banded = TransformerEncoderLayer(E, H, FF, dropout=0.0, window=window, batch_first=True).to(any_path)
    plain = TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True).to(any_path)
    plain.load_state_dict(banded.state_dict())
    mask = _band(n, *window)
    if causal:
        mask |= torch.ones(n, n, dtype=torch.bool).triu(1)
    x = torch.randn(2, n, E, dtype=torch.float64)
    xa = x.float().to(any_path).requires_grad_()
    xb = x.float().to(any_path).requires_grad_()
    a = banded(xa, is_causal=causal)
    b = plain(xb, src_mask=mask.to(any_path))
    assert_close(a, b, dtype=torch.float32, scale=LAYER_SCALE, name="output")
    dy = torch.randn_like(a)
    a.backward(dy), b.backward(dy)
    assert_close(xa.grad, xb.grad, dtype=torch.float32, scale=LAYER_SCALE, name="dx")
    for (name, p), q in zip(banded.named_parameters(), plain.parameters()):
        assert_close(p.grad, q.grad, dtype=torch.float32, scale=LAYER_SCALE, name=name)


def test_fully_padded_sequence_gives_finite_values(any_path):
    layer = TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True).to(any_path)
    x = torch.randn(2, 5, E, device=any_path, requires_grad=True)
    kpm = torch.zeros(2, 5, dtype=torch.bool, device=any_path)
    kpm[1] = True
    y = layer(x, src_key_padding_mask=kpm)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # an empty row's attention output is zero, so the padded sequence sees only the out_proj bias
    attn = T._self_attention(layer.self_attn, x.detach(), batch_first=True, causal=False, window=None, mask=None,
                             kpm=kpm, training=False, cache=None)
    assert_close(attn[1], layer.self_attn.out_proj.bias.detach().expand(5, E), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ incremental decoding

INCREMENTAL = [(False, False, None, [1] * 7), (True, True, None, [3, 1, 2, 1]), (True, False, (2, 0), [1] * 7),
               (False, True, (1, -1), [2, 2, 3])]


@pytest.mark.parametrize("batch_first,norm_first,window,chunks", INCREMENTAL)
def test_incremental_decoding_equals_full(torch_path, batch_first, norm_first, window, chunks):
    _incremental(torch_path, batch_first, norm_first, window, chunks, layers=2)


def test_incremental_decoding_triton(triton_path):
    _incremental(triton_path, True, False, (2, 0), [3, 1, 1], layers=1)


def _incremental(any_path, batch_first, norm_first, window, chunks, layers):
    n, s, b = sum(chunks), 6, 2
    torch.manual_seed(5)
    layer = TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first,
                                    window=window)
    dec = TransformerDecoder(layer, layers, norm=torch.nn.LayerNorm(E)).to(any_path).eval()
    tgt = torch.randn(_layout(n, b, batch_first), device=any_path)
    mem = torch.randn(_layout(s, b, batch_first), device=any_path)
    mkpm = torch.zeros(b, s, dtype=torch.bool, device=any_path)
    mkpm[1, 4:] = True
    full = dec(tgt, mem, tgt_mask=Transformer.generate_square_subsequent_mask(n, device=any_path),
               memory_key_padding_mask=mkpm)
    cache = dec.new_cache()
    outs, start = [], 0
    sd = 1 if batch_first else 0
    for c in chunks:
        assert cache.length == start
        outs.append(dec(tgt.narrow(sd, start, c), mem, memory_key_padding_mask=mkpm, cache=cache))
        start += c
    assert_close(torch.cat(outs, dim=sd), full, dtype=torch.float32, scale=LAYER_SCALE)
    if window is not None:  # the cache keeps only what the window can still see
        assert cache.layers[0].self_k.shape[2] == min(window[0], n)


class _Embed(torch.nn.Module):
    def __init__(self, vocab, batch_first):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, E)
        self.pos = torch.nn.Parameter(torch.randn(32, E))
        self.out = torch.nn.Linear(E, vocab)
        self.batch_first = batch_first

    def embed(self, ids, offset):
        x = self.emb(ids) + self.pos[offset: offset + ids.shape[1]]
        return x if self.batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [False, True])
def test_generate_equals_naive_greedy(torch_path, batch_first):
    _generate(torch_path, batch_first, steps=6, layers=2, variants=True)


def test_generate_triton(triton_path):
    _generate(triton_path, True, steps=3, layers=1, variants=False)


def _generate(any_path, batch_first, steps, layers, variants):
    vocab, b, s = 7, 3, 5
    torch.manual_seed(11)
    model = Transformer(E, H, 1, layers, FF, dropout=0.0, batch_first=batch_first).to(any_path).eval()
    io = _Embed(vocab, batch_first).to(any_path)
    src = torch.randn(_layout(s, b, batch_first), device=any_path)
    skpm = torch.zeros(b, s, dtype=torch.bool, device=any_path)
    skpm[0, 3:] = True
    got = model.generate(src, 1, steps, embed=io.embed, head=io.out, src_key_padding_mask=skpm)
    assert got.shape == (b, steps) and got.dtype == torch.long
    # naive: re-run the full decoder on the whole prefix at each step
    with torch.no_grad():
        memory = model.encoder(src, src_key_padding_mask=skpm)
        ids = torch.full((b, 1), 1, dtype=torch.long, device=any_path)
        for _ in range(steps):
            h = model.decoder(io.embed(ids, 0), memory, tgt_is_causal=True, memory_key_padding_mask=skpm)
            last = h[:, -1] if batch_first else h[-1]
            ids = torch.cat([ids, io.out(last).argmax(-1)[:, None]], dim=1)
    assert torch.equal(got, ids[:, 1:])
    if not variants:
        return
    # an end token freezes finished rows; a start embedding works like the start id's embedding
    end = int(got[0, 1])
    with_end = model.generate(src, torch.tensor([1] * b, device=any_path), steps, embed=io.embed, head=io.out,
                              src_key_padding_mask=skpm, end=end)
    for row, full_row in zip(with_end.tolist(), got.tolist()):
        k = full_row.index(end) if end in full_row else len(full_row)
        assert row[: k + 1] == full_row[: k + 1] and all(t == end for t in row[k + 1:])
    start_emb = io.embed(torch.ones(1, 1, dtype=torch.long, device=any_path), 0).reshape(E).detach()
    assert torch.equal(model.generate(src, start_emb, steps, embed=io.embed, head=io.out,
                                      src_key_padding_mask=skpm), got)


# ------------------------------------------------------------------------------------------------ errors, compile

def test_errors(torch_path):
    with pytest.raises(ValueError, match="activation"):
        TransformerEncoderLayer(E, H, activation="tanh")
    with pytest.raises(ValueError, match="nhead"):
        TransformerEncoderLayer(E, 3)
    with pytest.raises(ValueError, match="window"):
        TransformerDecoderLayer(E, H, window=(2, -3))
    with pytest.raises(ValueError, match="dropout"):
        TransformerEncoderLayer(E, H, dropout=1.5)
    layer = TransformerEncoderLayer(E, H, FF)
    x = torch.randn(5, 2, E)
    with pytest.raises(ValueError, match="src_mask"):
        layer(x, src_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        layer(x, src_key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="src_mask"):
        layer(x, src_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="src"):
        layer(torch.randn(5, 2, E + 1))
    dec = TransformerDecoder(TransformerDecoderLayer(E, H, FF), 2)
    cache = dec.new_cache()
    with pytest.raises(ValueError, match="tgt_mask"):
        dec(x[:1], x, tgt_mask=torch.zeros(1, 1), cache=cache)
    with pytest.raises(ValueError, match="cache"):
        dec(x[:1], x, cache=TransformerDecoder(TransformerDecoderLayer(E, H, FF), 3).new_cache())
    with pytest.raises(ValueError, match="batch size"):
        dec(x, torch.randn(5, 3, E))
    t = Transformer(E, H, 1, 1, FF)
    with pytest.raises(ValueError, match="max_len"):
        t.generate(x, 0, 0, embed=lambda i, o: None, head=lambda h: None)
    with pytest.raises(ValueError, match="batch size"):
        t(x, torch.randn(3, 4, E))
    # a 3-D mask's leading size is batch * nhead = 4
    with pytest.raises(ValueError, match=r"src_mask must have shape \(5, 5\) or \(4, 5, 5\)"):
        layer(x, src_mask=torch.zeros(3, 5, 5, dtype=torch.bool))
    dl = TransformerDecoderLayer(E, H, FF)
    with pytest.raises(ValueError, match=r"memory_mask must have shape \(5, 5\) or \(4, 5, 5\)"):
        dl(x, x, memory_mask=torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match="start embedding"):
        t.generate(x, torch.randn(3, E), 4, embed=lambda i, o: None, head=lambda h: None)
    # a cache belongs to one batch and one memory
    cache = dec.new_cache()
    dec(x[:1], x, cache=cache)
    with pytest.raises(ValueError, match="cache holds a batch of 2"):
        dec(torch.randn(1, 3, E), torch.randn(5, 3, E), cache=cache)
    with pytest.raises(ValueError, match="memory must be the one of the cache's first call"):
        dec(x[1:2], x[:4], cache=cache)


def test_dropout_is_applied_in_training(torch_path):
    layer = TransformerEncoderLayer(E, H, FF, dropout=0.5)
    x = torch.randn(6, 2, E)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_torch_compile_fullgraph_encoder(torch_path):
    torch.manual_seed(2)
    enc = TransformerEncoder(TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True), 2)
    x = torch.randn(2, 9, E, requires_grad=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 6:] = True
    # aot_eager: Dynamo and AOTAutograd trace forward and backward as one graph each (fullgraph=True fails on any
    # break); Inductor's C++ code generation would add a minute of compile time and test nothing of ours.
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    for kw in ({"src_key_padding_mask": kpm, "is_causal": True},):
        eager = enc(x, **kw)
        got = compiled(x, **kw)
        assert_close(got, eager, dtype=torch.float32, scale=LAYER_SCALE)
        (gx,) = torch.autograd.grad(got.sum(), x)
        (ex,) = torch.autograd.grad(eager.sum(), x)
        assert_close(gx, ex, dtype=torch.float32, scale=LAYER_SCALE)


# ------------------------------------------------------------------------------ fused elementwise kernels

class _FusedSpy:
    """Counts the layers' calls of the fused residual/LayerNorm and bias/activation ops (and still runs them)."""

    def __init__(self, monkeypatch):
        self.add_norm, self.bias_act = [], []
        real_ln, real_ba = T.dropout_add_layer_norm, T.bias_act_dropout

        def ln(*a, **kw):
            self.add_norm.append(kw)
            return real_ln(*a, **kw)

        def ba(*a, **kw):
            self.bias_act.append(kw)
            return real_ba(*a, **kw)

        monkeypatch.setattr(T, "dropout_add_layer_norm", ln)
        monkeypatch.setattr(T, "bias_act_dropout", ba)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", torch.tanh])
def test_fused_elementwise_ops_run_on_the_kernel_path_only(any_path, monkeypatch, norm_first, activation):
    """On the Triton path every residual connection followed by a layer norm is one dropout_add_layer_norm call
    and the feed-forward's bias + activation + dropout one bias_act_dropout call (named activations only); the
    PyTorch path keeps torch's ops.  (That the fused path computes the layer is test_*_triton's job.)"""
    enc = TransformerEncoderLayer(E, H, FF, dropout=0.25, activation=activation, norm_first=norm_first).to(any_path)
    dec = TransformerDecoderLayer(E, H, FF, dropout=0.25, activation=activation, norm_first=norm_first).to(any_path)
    spy = _FusedSpy(monkeypatch)
    x = torch.randn(5, 2, E, device=any_path)
    enc(x)
    dec(x, x)
    kernel = T.backend.select("layer_norm", x) == "triton"  # the any_path fixture forced one path or the other
    # encoder: 2 residual connections, decoder: 3; pre-norm fuses all but the layer's last one
    expect_ln = (2 + 3 - 2) if norm_first else (2 + 3)
    expect_ba = 2 if not callable(activation) else 0
    assert len(spy.add_norm) == (expect_ln if kernel else 0)
    assert len(spy.bias_act) == (expect_ba if kernel else 0)
    assert all(kw["dropout_p"] == 0.25 for kw in spy.add_norm + spy.bias_act)
    enc.eval()
    enc(x)
    assert all(kw["dropout_p"] == 0.0 for kw in spy.add_norm[expect_ln:] + spy.bias_act[expect_ba:])


def test_kernel_path_dropout_is_seeded_by_torch_generator(triton_path):
    """Dropout in the fused kernels draws its seeds from torch's generator: manual_seed reproduces a training
    step bit for bit, another seed changes it, and eval mode turns dropout off."""
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(E, H, FF, dropout=0.5, batch_first=True).to(triton_path)
    x = torch.randn(2, 7, E, device=triton_path)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("b,n", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence_like_torch(any_path, batch_first, b, n):
    """An empty batch or an empty sequence gives an empty output of the input's shape, as torch.nn's layers."""
    enc = TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first).to(any_path)
    dec = TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first).to(any_path)
    x = torch.randn(_layout(n, b, batch_first), device=any_path)
    mem = torch.randn(_layout(3, b, batch_first), device=any_path)
    assert enc(x).shape == x.shape
    assert dec(x, mem).shape == x.shape
    ref = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first)
    assert ref(x.cpu()).shape == x.shape


@pytest.mark.parametrize("batch_first", [False, True])
def test_containers_accept_torch_nn_layers(torch_path, batch_first):
    """TransformerEncoder/Decoder around torch.nn's own layers compute what torch.nn's containers compute: a causal
    mask stays a mask for them (torch.nn's layers refuse the causal flag without one) and the layout is read
    from the layer's self_attn, where torch.nn keeps it."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first).double()
    ours = TransformerEncoder(layer, 2)
    ref = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = _x(_layout(9, 2, batch_first))
    m = torch.nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    for kw in ({"mask": m}, {"mask": m, "is_causal": True}, {"src_key_padding_mask": kpm}):
        assert_close(ours(x, **kw), ref(x, **kw), dtype=torch.float64, name=str(sorted(kw)))
    dlayer = torch.nn.TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=batch_first).double()
    ours = TransformerDecoder(dlayer, 2)
    ref = torch.nn.TransformerDecoder(dlayer, 2)
    ref.load_state_dict(ours.state_dict(), strict=True)
    mem = _x(_layout(4, 2, batch_first))
    for kw in ({"tgt_mask": m}, {"tgt_mask": m, "tgt_is_causal": True}, {"tgt_key_padding_mask": kpm}):
        assert_close(ours(x, mem, **kw), ref(x, mem, **kw), dtype=torch.float64, name=str(sorted(kw)))
    with pytest.raises(ValueError, match="cache"):
        ours(x, mem, cache=ours.new_cache())


def test_cache_length_without_layers():
    """A decoder of zero layers still counts decoded positions in its layout (from the layer it was given)."""
    dec = TransformerDecoder(TransformerDecoderLayer(E, H, FF, dropout=0.0, batch_first=True), 0)
    cache = dec.new_cache()
    x, mem = torch.randn(3, 2, E), torch.randn(3, 4, E)
    assert torch.equal(dec(x, mem, cache=cache), x)
    assert cache.length == 2


class _UnhashableLeakyReLU:
    """A callable activation with value equality and therefore no hash (a dataclass-style config object)."""

    def __init__(self, slope):
        self.slope = slope

    def __eq__(self, other):
        return isinstance(other, _UnhashableLeakyReLU) and other.slope == self.slope

    __hash__ = None

    def __call__(self, x):
        return F.leaky_relu(x, self.slope)


@pytest.mark.parametrize("norm_first", [False, True])
def test_unhashable_callable_activation_like_torch(any_path, norm_first):
    """torch.nn's layers take any callable as the activation; so do ours, on every path (choosing the fused
    activation must not need the callable to be hashable)."""
    act = _UnhashableLeakyReLU(0.1)
    ours = TransformerEncoderLayer(E, H, FF, dropout=0.0, activation=act, norm_first=norm_first).to(any_path)
    ref = _pair(ours, torch.nn.TransformerEncoderLayer, E, H, FF, dropout=0.0, activation=act, norm_first=norm_first)
    x = _x((7, 2, E))
    assert_close(ours(x.to(any_path, torch.float32)), ref(x), dtype=torch.float32, scale=LAYER_SCALE)
    ours = TransformerDecoderLayer(E, H, FF, dropout=0.0, activation=act, norm_first=norm_first).to(any_path)
    ref = _pair(ours, torch.nn.TransformerDecoderLayer, E, H, FF, dropout=0.0, activation=act, norm_first=norm_first)
    mem = _x((4, 2, E))
    assert_close(ours(x.to(any_path, torch.float32), mem.to(any_path, torch.float32)), ref(x, mem),
                 dtype=torch.float32, scale=LAYER_SCALE)


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_learned_mask_equal_to_causal_keeps_its_gradient(torch_path, layer):
    """A learned float mask (the causal mask plus a zero-initialised bias that requires grad) equals the causal
    mask at first; it is still a differentiable input, not the causal flag: torch.nn's layers (no is_causal hint)
    give the bias its gradient, and so must ours."""
    n, b = 6, 2
    cls, ref_cls = ((TransformerEncoderLayer, torch.nn.TransformerEncoderLayer) if layer == "encoder"
                    else (TransformerDecoderLayer, torch.nn.TransformerDecoderLayer))
    ours = cls(E, H, FF, dropout=0.0).double()
    ref = _pair(ours, ref_cls, E, H, FF, dropout=0.0)
    x, mem = _x((n, b, E)), _x((4, b, E))
    causal = torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)
    dy = torch.randn(n, b, E, dtype=torch.float64)
    outs, grads = [], []
    for m in (ref, ours):
        bias = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)
        out = m(x, src_mask=causal + bias) if layer == "encoder" else m(x, mem, tgt_mask=causal + bias)
        out.backward(dy)
        outs.append(out.detach())
        grads.append(bias.grad)
    assert grads[0] is not None and grads[0].abs().max() > 0
    assert grads[1] is not None, "the mask's gradient was dropped"
    assert_close(outs[1], outs[0], dtype=torch.float64, scale=LAYER_SCALE, name="output")
    assert_close(grads[1], grads[0], dtype=torch.float64, scale=LAYER_SCALE, name="grad of the mask")


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_seeded_training_dropout_is_torch_nn(torch_path, kind, norm_first, batch_first):
    """Training with dropout on the PyTorch path: the same torch seed gives torch.nn's layer output and every
    parameter gradient.  Batch first, torch's attention output is a transposed (N, B, E) tensor and its dropout
    draws the mask in that memory order; ours used to be contiguous (B, N, E), so the masks differed."""
    torch.manual_seed(0)
    cls, ref_cls = ((TransformerEncoderLayer, torch.nn.TransformerEncoderLayer) if kind == "encoder"
                    else (TransformerDecoderLayer, torch.nn.TransformerDecoderLayer))
    ours = cls(E, H, FF, dropout=0.3, batch_first=batch_first, norm_first=norm_first)
    ref = ref_cls(E, H, FF, dropout=0.3, batch_first=batch_first, norm_first=norm_first)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, E)
    args = (x,) if kind == "encoder" else (x, torch.randn(3, 7, E) if batch_first else torch.randn(7, 5, E))
    outs = []
    for layer in (ours, ref):
        torch.manual_seed(5)
        y = layer(*args)
        y.square().sum().backward()
        outs.append((y, {n: p.grad for n, p in layer.named_parameters()}))
    assert_close(outs[0][0], outs[1][0], dtype=torch.float32, scale=LAYER_SCALE, name="output")
    for name, g in outs[1][1].items():
        assert_close(outs[0][1][name], g, dtype=torch.float32, scale=LAYER_SCALE, name=name)

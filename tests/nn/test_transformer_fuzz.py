"""Property-based fuzzing of leedl_fast.nn's Transformer modules against their torch.nn twins.

``test_fuzz_modules_vs_torch_nn`` (one hypothesis run per kind of module) draws whole configurations:

* the module: ``TransformerEncoderLayer``, ``TransformerEncoder`` (1..3 layers, with or without a final
  ``LayerNorm``, ``enable_nested_tensor`` and ``mask_check`` both ways), ``TransformerDecoderLayer``,
  ``TransformerDecoder`` (1..3 layers, final norm or not), the whole ``Transformer`` (1..2 + 1..2 layers), and
  our ``TransformerEncoder`` / ``TransformerDecoder`` holding torch.nn's own layers;
* its shape: head dim 16 / 24 / 32 (the fused op's range) or 4 / 8 (below it: the dense fallback), 1..3
  heads, ``dim_feedforward`` 1..40, activation ``"relu"`` / ``"gelu"`` / ``F.relu`` / ``F.gelu`` /
  ``nn.ReLU()`` / ``nn.GELU()`` / ``torch.tanh`` / a plain function, ``norm_first``, ``batch_first``, ``bias``,
  ``layer_norm_eps`` (1e-6 .. 0.1), and now and then our ``window=`` (torch.nn gets the band folded into its
  masks);
* the data: source and target lengths 1..16 (now and then up to 40; independent, so ``S != T``), batch 1..3 or
  unbatched (2-D) inputs, float32 or float64, our inputs contiguous or in another memory layout (the other
  layout's storage, rows of a wider tensor);
* every mask form torch.nn takes: ``src_mask`` / ``tgt_mask`` (causal bool, causal float, arbitrary bool or
  float, with a row that sees no key, the causal pattern plus a finite bias, (batch * nhead, N, N) 3-D bool or
  float), ``memory_mask`` (arbitrary, with an empty row, 3-D, top-left and bottom-right causal patterns of the
  (T, S) rectangle), ``*_key_padding_mask`` bool or float (sparse, left-aligned lengths, a fully padded row,
  nothing padded, additive finite values), the ``*_is_causal`` hints where they are consistent with the mask
  (see ``_self_hints`` / ``_memory_hints``), and float masks that require grad (learned biases);
* the mode: train mode (dropout 0, or dropout 0.2 under a fixed torch seed: on the PyTorch path ours draws
  torch's own dropout masks wherever it attends with SDPA, README, Randomness) or eval mode (dropout 0 or 0.1),
  with autograd or under ``no_grad``.  A third of the examples meet the conditions of torch.nn's inference
  fast paths (``_transformer_encoder_layer_fwd``, the native MHA kernel, ``TransformerEncoder``'s nested-tensor
  path), which independent draws would almost never meet.

torch.nn's module is built in float64 with random parameters (biases and norm weights too), and ours loads its
state_dict with ``strict=True``.  Every example compares the output, and with autograd the gradients of every
input, every learned mask and every parameter, with the tolerances of ``tests/harness.py`` for our dtype
(widened by ``_scale``: a layer chains ~10 rounded operations, as in ``tests/nn/test_transformer.py``).  Ours
must be finite everywhere.  Where torch.nn is undefined or inconsistent, what is compared instead is said where
it happens: ``_defined`` (NaN rows of torch.nn's fast paths), ``_torch_encoder`` (its nested-tensor path refusing
an all-padded batch), ``_repair_torch_decoder_activation`` (torch.nn's decoder layers losing an nn.Module
activation when copied), ``_learnable`` and ``_memory_hints`` (hints and learned masks), ``_check_config``
(``mask_check=False``).

``test_fuzz_incremental_decoding`` feeds a ``TransformerDecoder`` its target a few positions at a time with
``cache = decoder.new_cache()``: the result must be torch.nn's full causal decoding (with our ``window=``,
torch.nn's decoding under the equivalent band mask), outputs and gradients, with ``cache.length`` and the
window's cache size right.  ``test_fuzz_generate`` checks ``Transformer.generate`` (start id, ids, embedding;
end token) against a naive greedy loop over torch.nn.Transformer.  ``test_fuzz_modules_triton`` and
``test_fuzz_incremental_decoding_triton`` run the first two on the Triton path (the interpreter here: float32,
small).

CI runs a small fixed (derandomized) set of examples.  To hunt bugs, raise the counts, e.g.
``LEEDL_FUZZ_EXAMPLES=500 python -m pytest -n 2 -q tests/nn/test_transformer_fuzz.py``: the module test runs
that many per kind of module, the cache test half, generation a fourth, the Triton tests a twentieth (each count
can be set on its own with ``LEEDL_FUZZ_EXAMPLES_MODULES`` / ``_CACHE`` / ``_GENERATE`` / ``_TRITON`` /
``_TRITON_CACHE``); with any of them set the examples are random rather than derandomized.

Failures the fuzzing found are kept at the end as small regular tests (regressions of fixed bugs).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import leedl_fast.nn.transformer as T
from leedl_fast import nn as lnn
from tests.harness import assert_close, fuzz_count, fuzz_settings

F64 = torch.float64
NEG = float("-inf")

# ------------------------------------------------------------------------------ example counts


N_MODULES = fuzz_count("MODULES", 12, 1)          # per kind of module (7 kinds)
N_CACHE = fuzz_count("CACHE", 15, 2)
N_GENERATE = fuzz_count("GENERATE", 6, 4)
N_TRITON = fuzz_count("TRITON", 1, 20)            # modules on the Triton path (the interpreter: ~2 s an example)
N_TRITON_CACHE = fuzz_count("TRITON_CACHE", 1, 20)

_SETTINGS = fuzz_settings("filter_too_much")

# A layer chains ~10 rounded operations (projections, softmax, layer norms, residuals) and its parameter gradients
# sum batch * seq rounded products: 8x the single-op tolerance per layer (tests/nn/test_transformer.py's rule).
LAYER_SCALE = 8.0


def _scale(depth: int) -> float:
    return LAYER_SCALE * max(1, depth)


# ------------------------------------------------------------------------------ configurations

# "*_torch_layers": our TransformerEncoder / TransformerDecoder holding torch.nn's own layers (README: the containers
# stack torch.nn's layers too, passing them masks as torch.nn's containers do)
KINDS = ("encoder_layer", "encoder", "decoder_layer", "decoder", "transformer", "encoder_torch_layers",
         "decoder_torch_layers")
ACTIVATIONS = ("relu", "gelu", "F.relu", "F.gelu", "nn.ReLU", "nn.GELU", "tanh", "function")
SELF_MASKS = (None, "causal_bool", "causal_float", "bool", "bool_empty_row", "float", "float_empty_row",
              "causal_plus_bias", "bool_3d", "float_3d")
MEMORY_MASKS = (None, "bool", "bool_empty_row", "float", "float_empty_row", "bool_3d", "float_3d",
                "top_left_bool", "top_left_float", "bottom_right_bool", "bottom_right_float")
PADDINGS = (None, "bool_sparse", "bool_lengths", "bool_full_row", "bool_nothing", "float_lengths",
            "float_full_row", "float_additive")


def _leaky(x):
    """A plain-function activation (no fused path, no torch.nn fast path)."""
    return F.leaky_relu(x, 0.2)


def _activation(name: str):
    return {"relu": "relu", "gelu": "gelu", "F.relu": F.relu, "F.gelu": F.gelu, "nn.ReLU": torch.nn.ReLU(),
            "nn.GELU": torch.nn.GELU(), "tanh": torch.tanh, "function": _leaky}[name]


@dataclass
class Config:
    kind: str
    head_dim: int
    nhead: int
    ff: int
    activation: str
    norm_first: bool
    batch_first: bool
    bias: bool
    eps: float
    enc_layers: int          # encoder: its layers; transformer: the encoder's
    dec_layers: int          # decoder: its layers; transformer: the decoder's
    final_norm: bool         # encoder / decoder stacks (the Transformer always has its two norms)
    nested: bool             # TransformerEncoder's enable_nested_tensor
    mask_check: bool
    s: int                   # source (encoder input, decoder memory) length
    t: int                   # target length
    b: int
    unbatched: bool
    double: bool
    train: bool
    dropout: float
    grad: bool
    src_mask: Optional[str]
    tgt_mask: Optional[str]
    memory_mask: Optional[str]
    src_kpm: Optional[str]
    tgt_kpm: Optional[str]
    memory_kpm: Optional[str]
    src_hint: Optional[bool]
    tgt_hint: Optional[bool]
    memory_hint: Optional[bool]
    seed: int
    layout: str = "contiguous"   # of our inputs: "contiguous", "transposed" (the other layout's storage), "padded"
    learned: bool = False        # float masks (attention and padding) are leaves that require grad
    window: Optional[tuple] = None   # our layers' window= (self-attention); torch.nn gets the band as a mask

    @property
    def d_model(self) -> int:
        return self.head_dim * self.nhead

    @property
    def depth(self) -> int:
        return {"encoder_layer": 1, "decoder_layer": 1, "encoder": self.enc_layers, "decoder": self.dec_layers,
                "transformer": self.enc_layers + self.dec_layers, "encoder_torch_layers": self.enc_layers,
                "decoder_torch_layers": self.dec_layers}[self.kind]

    @property
    def has_encoder(self) -> bool:
        return self.kind in ("encoder_layer", "encoder", "transformer", "encoder_torch_layers")

    @property
    def has_decoder(self) -> bool:
        return self.kind in ("decoder_layer", "decoder", "transformer", "decoder_torch_layers")

    @property
    def torch_layers(self) -> bool:
        return self.kind.endswith("_torch_layers")


def _self_hints(mask: Optional[str]):
    """``*_is_causal`` values consistent with a self-attention mask: True only for the causal mask (torch.nn
    refuses the hint without a mask, and a hint that contradicts the mask is undefined in torch.nn: it applies
    the mask on one path and the hint on another)."""
    return st.sampled_from([None, True, False] if mask in ("causal_bool", "causal_float") else [None, False])


def _memory_hints(mask: Optional[str], t: int, s: int):
    """``memory_is_causal`` consistent with the memory mask.  torch.nn's cross-attention honours the hint as SDPA's
    top-left causal mask (query i sees keys j <= i) when there is no memory padding mask, and applies the mask
    itself otherwise: the hint is consistent only with the top-left pattern (equal to the bottom-right one when
    T == S)."""
    ok = mask in ("top_left_bool", "top_left_float") or (t == s and mask in ("bottom_right_bool",
                                                                             "bottom_right_float"))
    return st.sampled_from([False, True] if ok else [False])


LAYOUTS = ("contiguous", "contiguous", "transposed", "padded")


FAST_ACTIVATIONS = ("relu", "gelu", "F.relu", "F.gelu", "nn.ReLU", "nn.GELU")
ENCODER_KINDS = ("encoder", "transformer", "encoder_torch_layers")


@st.composite
def configs(draw, kind: Optional[str] = None, triton: bool = False) -> Config:
    """A whole configuration; ``triton``: smaller (the interpreter is slow) and float32 (the kernels' dtypes).

    A third of them meet the conditions of torch.nn's inference fast paths (eval mode, no autograd, batch first,
    biases, an even head count, ReLU or GELU, batched), and half of those with an encoder also the conditions of
    TransformerEncoder's nested-tensor path (no norm_first, no src mask, a key padding mask): drawn independently,
    the conditions would meet in about one example in a thousand."""
    kind = kind or draw(st.sampled_from(KINDS))
    fast = draw(st.integers(0, 2)) == 0
    nested_case = fast and kind in ENCODER_KINDS and draw(st.booleans())
    head_dim = draw(st.sampled_from([16, 16, 24, 32, 4, 8]))
    nhead = 2 if fast else draw(st.integers(1, 3))
    train = False if fast else draw(st.booleans())
    long = not triton and draw(st.integers(0, 7)) == 0         # now and then past 16 positions
    s, t = draw(st.integers(1, 40 if long else 16)), draw(st.integers(1, 40 if long else (8 if triton else 16)))
    src_mask = None if nested_case else draw(st.sampled_from(SELF_MASKS))
    tgt_mask = draw(st.sampled_from(SELF_MASKS))
    memory_mask = draw(st.sampled_from(MEMORY_MASKS))
    src_kpm = draw(st.sampled_from(PADDINGS[1:] if nested_case else PADDINGS))
    enc_layers = draw(st.integers(1, 1 if triton else (2 if kind == "transformer" else 3)))
    dec_layers = draw(st.integers(1, 1 if triton else (2 if kind == "transformer" else 3)))
    # Train mode: dropout 0, or dropout 0.2 with a fixed torch seed (float64 on both sides, which draw the same
    # masks only in the same dtype): on the PyTorch path ours draws torch's own masks wherever it attends with
    # SDPA, as the README says, so the results must be torch.nn's (see _check_config).
    dropout = (draw(st.sampled_from([0.0, 0.0, 0.2])) if not triton else 0.0) if train else draw(
        st.sampled_from([0.0, 0.1]))
    grad = False if fast else draw(st.booleans())
    return Config(
        kind=kind, head_dim=head_dim, nhead=nhead, ff=draw(st.integers(1, 40)),
        activation=draw(st.sampled_from(FAST_ACTIVATIONS if fast else ACTIVATIONS)),
        norm_first=False if nested_case else draw(st.booleans()),
        batch_first=fast or draw(st.booleans()), bias=fast or draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-6, 1e-3, 0.1])),
        enc_layers=enc_layers, dec_layers=dec_layers, final_norm=draw(st.booleans()),
        nested=nested_case or draw(st.booleans()), mask_check=draw(st.booleans()),
        s=s, t=t, b=draw(st.integers(1, 3)), unbatched=not fast and draw(st.integers(0, 5)) == 0,
        double=(not triton and draw(st.booleans())) or (train and dropout > 0), train=train, dropout=dropout,
        grad=grad,
        src_mask=src_mask, tgt_mask=tgt_mask, memory_mask=memory_mask,
        src_kpm=src_kpm, tgt_kpm=draw(st.sampled_from(PADDINGS)),
        memory_kpm=draw(st.sampled_from(PADDINGS)),
        src_hint=draw(_self_hints(src_mask)), tgt_hint=draw(_self_hints(tgt_mask)),
        memory_hint=draw(_memory_hints(memory_mask, t, s)),
        seed=draw(st.integers(0, 2**31 - 1)),
        layout=draw(st.sampled_from(LAYOUTS)), learned=grad and draw(st.booleans()),
        window=None if (fast or kind.endswith("torch_layers") or draw(st.integers(0, 3))) else draw(
            st.tuples(st.sampled_from([-1, 0, 1, 2, 5]), st.sampled_from([-1, 0, 1, 2, 5]))),
    )


# ------------------------------------------------------------------------------ masks and inputs

def _causal(nq: int, nk: int) -> torch.Tensor:
    """Bottom-right aligned causal pattern (True = hidden): key j is hidden from query i when j > i + nk - nq."""
    return torch.ones(nq, nk, dtype=torch.bool).triu(1 + nk - nq)


def _top_left(nq: int, nk: int) -> torch.Tensor:
    """SDPA's ``is_causal`` pattern: j > i hidden."""
    return torch.ones(nq, nk, dtype=torch.bool).triu(1)


def _as_float(hidden: torch.Tensor, g: torch.Generator, finite: bool) -> torch.Tensor:
    """A float64 additive mask: -inf where ``hidden``, random finite values elsewhere (or 0)."""
    base = torch.randn(hidden.shape, dtype=F64, generator=g) if finite else torch.zeros(hidden.shape, dtype=F64)
    return base.masked_fill(hidden, NEG)


def _attn_mask(form: Optional[str], nq: int, nk: int, lead: int, g: torch.Generator) -> Optional[torch.Tensor]:
    """An attention mask in float64 (float forms) or bool; ``lead`` = batch * nhead for the 3-D forms."""
    if form is None:
        return None
    if form in ("causal_bool", "bottom_right_bool"):
        return _causal(nq, nk)
    if form in ("causal_float", "bottom_right_float"):
        # exactly torch.nn.Transformer.generate_square_subsequent_mask when square
        return _as_float(_causal(nq, nk), g, finite=False)
    if form == "top_left_bool":
        return _top_left(nq, nk)
    if form == "top_left_float":
        return _as_float(_top_left(nq, nk), g, finite=False)
    if form == "causal_plus_bias":
        return _as_float(_causal(nq, nk), g, finite=True)
    shape = (lead, nq, nk) if form.endswith("_3d") else (nq, nk)
    hidden = torch.rand(shape, generator=g) < 0.4
    if form.endswith("empty_row"):
        hidden[..., int(torch.randint(0, nq, (), generator=g)), :] = True
    return hidden if form.startswith("bool") else _as_float(hidden, g, finite=True)


def _padding(form: Optional[str], b: int, n: int, g: torch.Generator) -> Optional[torch.Tensor]:
    """A (b, n) key padding mask: bool (True = padding) or float64 (additive)."""
    if form is None:
        return None
    kind = form.split("_", 1)[1]
    if kind == "sparse":
        pad = torch.rand(b, n, generator=g) < 0.3
    elif kind == "lengths":          # left-aligned: valid positions, then padding (length 0 included)
        pad = torch.arange(n)[None] >= torch.randint(0, n + 1, (b, 1), generator=g)
    elif kind == "full_row":
        pad = torch.rand(b, n, generator=g) < 0.3
        pad[int(torch.randint(0, b, (), generator=g))] = True
    elif kind == "nothing":
        pad = torch.zeros(b, n, dtype=torch.bool)
    elif kind == "additive":
        return _as_float(torch.rand(b, n, generator=g) < 0.2, g, finite=True)
    else:
        raise AssertionError(form)
    return pad if form.startswith("bool") else _as_float(pad, g, finite=False)


def _layout(cfg: Config, n: int) -> tuple:
    e = cfg.d_model
    if cfg.unbatched:
        return (n, e)
    return (cfg.b, n, e) if cfg.batch_first else (n, cfg.b, e)


def _ours_dtype(cfg: Config) -> torch.dtype:
    return F64 if cfg.double else torch.float32


def _to_ours(t, dtype):
    """A mask for our module: float masks in the module's dtype (torch.nn's takes them in its own)."""
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t.to(dtype)
    return t


def _inputs(cfg: Config):
    """(positional inputs, keyword arguments) for torch.nn's module, all float64."""
    g = torch.Generator().manual_seed(cfg.seed)
    b = 1 if cfg.unbatched else cfg.b
    lead = b * cfg.nhead
    src = torch.randn(_layout(cfg, cfg.s), dtype=F64, generator=g)
    tgt = torch.randn(_layout(cfg, cfg.t), dtype=F64, generator=g)

    def kpm(form, n):
        m = _padding(form, b, n, g)
        return m[0] if (m is not None and cfg.unbatched) else m     # unbatched: (n,)

    kw = {}
    if cfg.has_encoder:
        kw["src_mask"] = _attn_mask(cfg.src_mask, cfg.s, cfg.s, lead, g)
        kw["src_key_padding_mask"] = kpm(cfg.src_kpm, cfg.s)
        kw["src_is_causal"] = cfg.src_hint
    if cfg.has_decoder:
        kw["tgt_mask"] = _attn_mask(cfg.tgt_mask, cfg.t, cfg.t, lead, g)
        kw["memory_mask"] = _attn_mask(cfg.memory_mask, cfg.t, cfg.s, lead, g)
        kw["tgt_key_padding_mask"] = kpm(cfg.tgt_kpm, cfg.t)
        kw["memory_key_padding_mask"] = kpm(cfg.memory_kpm, cfg.s)
        kw["tgt_is_causal"] = cfg.tgt_hint
        kw["memory_is_causal"] = bool(cfg.memory_hint)
    if cfg.kind == "transformer":
        return (src, tgt), kw
    if cfg.kind in ("decoder_layer", "decoder", "decoder_torch_layers"):
        return (tgt, src), kw                                            # memory: the source-length sequence
    # the encoder's own argument names
    names = {"encoder_layer": ("src_mask", "src_key_padding_mask", "is_causal"),
             "encoder": ("mask", "src_key_padding_mask", "is_causal"),
             "encoder_torch_layers": ("mask", "src_key_padding_mask", "is_causal")}[cfg.kind]
    kw = dict(zip(names, (kw["src_mask"], kw["src_key_padding_mask"], kw["src_is_causal"])))
    return (src,), kw


def _clean_kwargs(kw: dict) -> dict:
    """Leave out the hints that were not drawn (None): each module's default applies."""
    return {k: v for k, v in kw.items() if not (v is None and k.endswith("is_causal"))}


# ------------------------------------------------------------------------------ modules

def _modules(cfg: Config):
    """(torch.nn's module in float64 with random parameters, ours loaded from its state_dict)."""
    torch.manual_seed(cfg.seed)
    d, h = cfg.d_model, cfg.nhead
    layer_kw = dict(dim_feedforward=cfg.ff, dropout=cfg.dropout, layer_norm_eps=cfg.eps,
                    batch_first=cfg.batch_first, norm_first=cfg.norm_first, bias=cfg.bias)

    def norm():
        return torch.nn.LayerNorm(d, eps=cfg.eps, bias=cfg.bias) if cfg.final_norm else None

    def pair():
        # a fresh activation object for each side (nn.ReLU() / nn.GELU() are submodules)
        return dict(layer_kw, activation=_activation(cfg.activation)), dict(layer_kw,
                                                                           activation=_activation(cfg.activation))

    wkw = {} if cfg.window is None else {"window": cfg.window}

    kr, ko = pair()
    if cfg.kind == "encoder_layer":
        ref, ours = torch.nn.TransformerEncoderLayer(d, h, **kr), lnn.TransformerEncoderLayer(d, h, **ko, **wkw)
    elif cfg.kind == "decoder_layer":
        ref, ours = torch.nn.TransformerDecoderLayer(d, h, **kr), lnn.TransformerDecoderLayer(d, h, **ko, **wkw)
    elif cfg.kind in ("encoder", "encoder_torch_layers"):
        enc_kw = dict(enable_nested_tensor=cfg.nested, mask_check=cfg.mask_check)
        ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(d, h, **kr), cfg.enc_layers, norm(),
                                          **enc_kw)
        layer = (torch.nn.TransformerEncoderLayer(d, h, **ko) if cfg.torch_layers else
                 lnn.TransformerEncoderLayer(d, h, **ko, **wkw))
        ours = lnn.TransformerEncoder(layer, cfg.enc_layers, norm(), **enc_kw)
    elif cfg.kind in ("decoder", "decoder_torch_layers"):
        ref = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(d, h, **kr), cfg.dec_layers, norm())
        layer = (torch.nn.TransformerDecoderLayer(d, h, **ko) if cfg.torch_layers else
                 lnn.TransformerDecoderLayer(d, h, **ko, **wkw))
        ours = lnn.TransformerDecoder(layer, cfg.dec_layers, norm())
    else:
        args = (d, h, cfg.enc_layers, cfg.dec_layers, cfg.ff, cfg.dropout)
        rest = dict(layer_norm_eps=cfg.eps, batch_first=cfg.batch_first, norm_first=cfg.norm_first, bias=cfg.bias)
        ref = torch.nn.Transformer(*args, activation=kr["activation"], **rest)
        ours = lnn.Transformer(*args, activation=ko["activation"], **rest, **wkw)
    ref = ref.double()
    _repair_torch_decoder_activation(ref)
    _randomize(ref, cfg.seed)
    ours = ours.to(_ours_dtype(cfg))
    _repair_torch_decoder_activation(ours)      # torch.nn's layers in our containers are deep copies too
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(cfg.train)
    ours.train(cfg.train)
    return ref, ours


def _repair_torch_decoder_activation(module: torch.nn.Module) -> None:
    """torch.nn.TransformerDecoderLayer.__setstate__ (run by the deepcopy of TransformerDecoder's layer clones, and
    by unpickling) sets ``state["activation"] = F.relu`` when "activation" is not a plain attribute, which is the
    case when the activation is an nn.Module (nn.GELU()): it is then a submodule, kept in ``_modules``, and the
    instance attribute F.relu shadows it.  So torch.nn.TransformerDecoder / Transformer silently compute ReLU
    with ``activation=nn.GELU()`` (TransformerEncoderLayer's __setstate__ tests hasattr and is right).  That is a
    torch.nn bug, not a behaviour to copy: remove the shadowing attribute so the reference computes what was
    asked for (ours does)."""
    for m in module.modules():
        if isinstance(m, torch.nn.TransformerDecoderLayer) and "activation" in m._modules:
            m.__dict__.pop("activation", None)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random biases and norm weights (the defaults are 0 and 1, which hide mistakes in their gradients and in
    which norm is applied where); matrices keep torch's initialisation."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, dtype=p.dtype, generator=g))


@contextlib.contextmanager
def _fastpath(enabled: bool):
    saved = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)


def _torch_nested_path(cfg: Config, ref, kw) -> bool:
    """Whether torch.nn.TransformerEncoder takes its nested-tensor path for this call (forward-time conditions;
    the construction-time ones are ``ref.use_nested_tensor``)."""
    enc = ref if cfg.kind in ("encoder", "encoder_torch_layers") else (ref.encoder if cfg.kind == "transformer"
                                                                       else None)
    if enc is None or not enc.use_nested_tensor or cfg.train or cfg.grad or cfg.unbatched:
        return False
    mask = kw.get("mask", kw.get("src_mask"))
    return kw.get("src_key_padding_mask") is not None and mask is None


def _left_aligned(pad: torch.Tensor) -> bool:
    valid = pad == 0 if pad.is_floating_point() else ~pad
    return not bool((valid[:, 1:] & ~valid[:, :-1]).any())


# ------------------------------------------------------------------------------ the comparison

def _relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in another memory layout (a tensor of its own, so it can be a leaf)."""
    if layout == "transposed":          # (A, B, E) stored as (B, A, E); unbatched (N, E) stored as (E, N)
        return (x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() == 3 else x.t().contiguous().t()).detach()
    if layout == "padded":              # rows of a wider tensor: the row stride is E + 3
        wide = x.new_zeros(*x.shape[:-1], x.shape[-1] + 3)
        wide[..., 1:-2] = x
        return wide[..., 1:-2].detach()
    return x


def _learnable(cfg: Config, name: str, value) -> bool:
    """Whether a float mask is made a leaf that requires grad (``cfg.learned``).  Not where torch.nn drops the
    mask for the causal flag: with the hint, or a mask equal to the causal one given to its containers (which
    detect it by value; torch.nn's layers do not), torch.nn's mask gets no gradient on some paths and one on
    others (with a key padding mask it merges the mask in); ours keeps the gradient of a mask that requires grad
    (test_learned_mask_equal_to_causal_keeps_its_gradient) except with the hint, so those are left out."""
    if not (cfg.learned and isinstance(value, torch.Tensor) and value.is_floating_point()):
        return False
    form, hint = {"src_mask": (cfg.src_mask, cfg.src_hint), "mask": (cfg.src_mask, cfg.src_hint),
                  "tgt_mask": (cfg.tgt_mask, cfg.tgt_hint), "memory_mask": (cfg.memory_mask, cfg.memory_hint)}.get(
        name, (None, None))
    return form != "causal_float" and hint is not True


class _OpSpy:
    """Records whether our layers called the attention op with dropout (its Philox masks, not torch's)."""

    def __init__(self):
        self.philox = False

    def __enter__(self):
        self.real = T._attention_op

        def op(*a, **kw):
            self.philox |= kw.get("dropout_p", 0.0) > 0
            return self.real(*a, **kw)

        T._attention_op = op
        return self

    def __exit__(self, *exc):
        T._attention_op = self.real


def _defined(run, *args, keep_nan: bool = False, **kwargs) -> torch.Tensor:
    """``run(*args, **kwargs)`` (a torch.nn module), NaN-free where torch.nn's plain path is.

    torch.nn's inference fast paths (eval mode, no autograd: the fused encoder layer, the native MHA kernel) give
    NaN for a query row that sees no key (and then for everything that attends to it); its plain path (SDPA)
    gives that row zero attention, as ours does on every path.  Where the fast path is NaN, the plain path's
    value is taken.  (Not for torch.nn's layers inside our containers: those give torch.nn's NaN, and so must
    our container: ``keep_nan``.)"""
    out = run(*args, **kwargs)
    if torch.isnan(out).any() and not keep_nan:
        assert not torch.is_grad_enabled(), "torch.nn gave NaN on its plain path"
        with _fastpath(False):
            slow = run(*args, **kwargs)
        out = torch.where(torch.isnan(out), slow, out)
    return out


def _torch_encoder(enc, src, keep_nan: bool = False, **kw) -> torch.Tensor:
    try:
        return _defined(enc, src, keep_nan=keep_nan, **kw)
    except RuntimeError as e:
        # torch.nn.TransformerEncoder's nested-tensor path refuses a batch in which every sequence is fully
        # padded ("to_padded_tensor: at least one constituent tensor should have non-zero numel"); what that path
        # returns for padded positions is zero (then the norm), so that is what ours must give.
        if "non-zero numel" not in str(e):
            raise
        kpm = kw["src_key_padding_mask"]
        assert bool((kpm != 0).all() if kpm.is_floating_point() else kpm.all())
        out = torch.zeros_like(src)
        return out if enc.norm is None else enc.norm(out)


def _torch_reference(cfg: Config, ref, ins, kw) -> torch.Tensor:
    """torch.nn's result for the call, with its undefined values (see _defined, _torch_encoder) replaced."""
    if cfg.kind == "transformer":
        # torch.nn.Transformer.forward is encoder then decoder; run them one by one, so that a fallback for the
        # decoder's NaN rows does not change the encoder's path (its nested-tensor path zeroes padded positions)
        src, tgt = ins
        memory = _torch_encoder(ref.encoder, src, mask=kw.get("src_mask"),
                                src_key_padding_mask=kw.get("src_key_padding_mask"), is_causal=kw.get("src_is_causal"))
        dec_kw = {k: v for k, v in kw.items() if not k.startswith("src")}
        return _defined(ref.decoder, tgt, memory, **dec_kw)
    if cfg.kind in ("encoder", "encoder_torch_layers"):
        return _torch_encoder(ref, *ins, keep_nan=cfg.torch_layers, **kw)
    return _defined(ref, *ins, keep_nan=cfg.torch_layers, **kw)


def _band_hidden(n: int, window: tuple) -> torch.Tensor:
    """(n, n) bool, True outside the band ``i - left <= j <= i + right`` (-1: unbounded)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    hidden = torch.zeros(n, n, dtype=torch.bool)
    if window[0] >= 0:
        hidden |= j < i - window[0]
    if window[1] >= 0:
        hidden |= j > i + window[1]
    return hidden


# (mask argument, hint argument, which sequence) of each self-attention, per kind of module
_SELF_ATTENTION_ARGS = {
    "encoder_layer": [("src_mask", "is_causal", "s")], "encoder": [("mask", "is_causal", "s")],
    "decoder_layer": [("tgt_mask", "tgt_is_causal", "t")], "decoder": [("tgt_mask", "tgt_is_causal", "t")],
    "transformer": [("src_mask", "src_is_causal", "s"), ("tgt_mask", "tgt_is_causal", "t")],
}


def _fold_window(cfg: Config, kw: dict) -> dict:
    """torch.nn's arguments for our ``window=``: the band folded into each self-attention mask (bool: or'ed in;
    float: -inf outside it), the causal hint (which our layers apply together with the window) dropped: the
    folded mask says it, and torch.nn's containers detect it when it is still the causal mask."""
    if cfg.window is None:
        return kw
    kw = dict(kw)
    for mask_name, hint_name, which in _SELF_ATTENTION_ARGS[cfg.kind]:
        n = cfg.s if which == "s" else cfg.t
        hidden = _band_hidden(n, cfg.window)
        if kw.get(hint_name) is True:
            hidden = hidden | _causal(n, n)
            kw.pop(hint_name)
        mask = kw.get(mask_name)
        if mask is None:
            kw[mask_name] = hidden
        elif mask.dtype == torch.bool:
            kw[mask_name] = mask | hidden
        else:
            kw[mask_name] = mask.masked_fill(hidden, NEG)
    return kw


def _check_config(cfg: Config):
    dtype = _ours_dtype(cfg)
    ref, ours = _modules(cfg)
    ins_r, kw_r = _inputs(cfg)
    kw_r = _clean_kwargs(kw_r)
    if _torch_nested_path(cfg, ref, kw_r):
        kpm = kw_r["src_key_padding_mask"]
        # With mask_check=False torch.nn trusts the padding to be left-aligned: it keeps the first
        # (number of unpadded) positions of each row, whatever the mask says, so other padding computes
        # another function (documented in TransformerEncoder's docstring).  (Additive float padding values are
        # read there as "padded" where nonzero, while torch.nn's other paths add them to the scores: ours
        # follows the path torch.nn takes, see test_nested_path_reads_float_padding_as_torch.)
        assume(cfg.mask_check or _left_aligned(kpm))
    ins_o = tuple(_relayout(x.to(dtype), cfg.layout) for x in ins_r)
    kw_o = {k: _to_ours(v, dtype) for k, v in kw_r.items()}
    learned = [k for k, v in kw_r.items() if _learnable(cfg, k, v)]
    for k in learned:
        kw_r[k] = kw_r[k].clone().requires_grad_()
        kw_o[k] = kw_o[k].clone().requires_grad_()
    leaves_r = {k: kw_r[k] for k in learned}
    kw_r = _fold_window(cfg, kw_r)
    if cfg.grad:
        ins_r = tuple(x.clone().requires_grad_() for x in ins_r)
        ins_o = tuple(x.requires_grad_() for x in ins_o)
    seeded = cfg.train and cfg.dropout > 0
    if cfg.window is not None and cfg.kind in ("encoder", "transformer"):
        # Our encoder zeroes padded positions where torch.nn.TransformerEncoder would take its nested-tensor
        # path; with the window folded into a mask torch.nn never takes it, so there is no twin for that case.
        enc = ours if cfg.kind == "encoder" else ours.encoder
        mname = "mask" if cfg.kind == "encoder" else "src_mask"
        with torch.set_grad_enabled(cfg.grad):
            assume(enc._nested_padding(ins_o[0], kw_o.get(mname), kw_o.get("src_key_padding_mask")) is None)
    with torch.set_grad_enabled(cfg.grad):
        torch.manual_seed(cfg.seed)
        with _OpSpy() as spy:
            out = ours(*ins_o, **kw_o)
        torch.manual_seed(cfg.seed)
        exp = _torch_reference(cfg, ref, ins_r, kw_r)
        if seeded:
            # Where ours attends with the op (causal with padding, a fully padded row, a non-square causal
            # mask), its dropout is the Philox stream of the Triton kernel, not torch's: equal to torch.nn's
            # in distribution only (README, Randomness).
            assume(not spy.philox)
    scale = _scale(cfg.depth)
    assert out.dtype == dtype and out.shape == exp.shape, (out.dtype, out.shape, exp.shape)
    # (torch.nn's layers in our containers give torch.nn's NaN rows on its fast paths: NaN where and only where
    # torch.nn.TransformerEncoder / Decoder give NaN, which assert_close checks)
    assert cfg.torch_layers or torch.isfinite(out).all(), "our output is not finite"
    assert_close(out, exp, dtype=dtype, scale=scale, name="output")
    if not cfg.grad:
        return
    dy = torch.randn(exp.shape, dtype=F64, generator=torch.Generator().manual_seed(cfg.seed + 2))
    out.backward(dy.to(dtype))
    exp.backward(dy)
    for i, (a, e) in enumerate(zip(ins_o, ins_r)):
        assert_close(a.grad, e.grad, dtype=dtype, scale=scale, name=f"grad of input {i}")
    for k in learned:
        assert kw_o[k].grad is not None and leaves_r[k].grad is not None, k
        assert_close(kw_o[k].grad, leaves_r[k].grad, dtype=dtype, scale=scale, name=f"grad of {k}")
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert sorted(names) == sorted(ref_params)
    for name, p in ours.named_parameters():
        e = ref_params[name].grad
        if e is None:       # a parameter torch.nn never uses in this call: ours must not use it either
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, f"no gradient for {name}"
        assert_close(p.grad, e, dtype=dtype, scale=scale, name=f"grad {name}")


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=N_MODULES, **_SETTINGS)
@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_fuzz_modules_vs_torch_nn(torch_path, kind, data):
    """Every module, mask form, mode and layout against torch.nn's twin: outputs and all gradients.  (One run
    per kind of module, so that CI's few examples cover each.)"""
    _check_config(data.draw(configs(kind), label="cfg"))


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=N_TRITON, **_SETTINGS)
@given(cfg=configs(triton=True))
def test_fuzz_modules_triton(triton_path, cfg):
    """The same on the Triton path (the interpreter on a CPU-only machine), float32: the fused attention, bias +
    activation and residual + LayerNorm kernels."""
    _check_config(cfg)


# ------------------------------------------------------------------------------ incremental decoding

@dataclass
class CacheConfig:
    head_dim: int
    nhead: int
    ff: int
    activation: str
    norm_first: bool
    batch_first: bool
    bias: bool
    layers: int
    final_norm: bool
    window: Optional[tuple]
    chunks: tuple
    s: int
    b: int
    unbatched: bool
    double: bool
    train: bool
    dropout: float
    grad: bool
    memory_kpm: Optional[str]
    seed: int


@st.composite
def cache_configs(draw, triton: bool = False) -> CacheConfig:
    chunks = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3 if triton else 6)))
    train = draw(st.booleans())
    return CacheConfig(
        head_dim=draw(st.sampled_from([16, 24, 8])), nhead=draw(st.integers(1, 3)), ff=draw(st.integers(1, 40)),
        activation=draw(st.sampled_from(ACTIVATIONS)), norm_first=draw(st.booleans()),
        batch_first=draw(st.booleans()), bias=draw(st.booleans()), layers=draw(st.integers(1, 1 if triton else 3)),
        final_norm=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.tuples(st.sampled_from([-1, 0, 1, 2, 5]),
                                                   st.sampled_from([-1, 0, 1, 3])))),
        chunks=chunks, s=draw(st.integers(1, 10)), b=draw(st.integers(1, 3)),
        unbatched=draw(st.integers(0, 4)) == 0, double=not triton and draw(st.booleans()), train=train,
        dropout=0.0 if train else draw(st.sampled_from([0.0, 0.1])), grad=draw(st.booleans()),
        memory_kpm=draw(st.sampled_from(PADDINGS)), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _band(n: int, window: Optional[tuple]) -> torch.Tensor:
    """(n, n) bool, True = hidden: causal, and outside the window (left, right) when there is one."""
    hidden = _causal(n, n)
    if window is not None:
        i, j = torch.arange(n)[:, None], torch.arange(n)[None]
        if window[0] >= 0:
            hidden |= j < i - window[0]
        if window[1] >= 0:
            hidden |= j > i + window[1]
    return hidden


def _check_cache(c: CacheConfig):
    dtype = F64 if c.double else torch.float32
    d = c.head_dim * c.nhead
    n = sum(c.chunks)
    torch.manual_seed(c.seed)
    kw = dict(dim_feedforward=c.ff, dropout=c.dropout, batch_first=c.batch_first, norm_first=c.norm_first,
              bias=c.bias)
    ref = torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(d, c.nhead, activation=_activation(c.activation), **kw), c.layers,
        torch.nn.LayerNorm(d, bias=c.bias) if c.final_norm else None).double()
    _repair_torch_decoder_activation(ref)
    _randomize(ref, c.seed)
    ours = lnn.TransformerDecoder(
        lnn.TransformerDecoderLayer(d, c.nhead, activation=_activation(c.activation), window=c.window, **kw),
        c.layers, torch.nn.LayerNorm(d, bias=c.bias) if c.final_norm else None).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.train(c.train)
    ours.train(c.train)

    g = torch.Generator().manual_seed(c.seed)
    shape = (lambda m: (m, d)) if c.unbatched else ((lambda m: (c.b, m, d)) if c.batch_first else
                                                     (lambda m: (m, c.b, d)))
    tgt = torch.randn(shape(n), dtype=F64, generator=g)
    mem = torch.randn(shape(c.s), dtype=F64, generator=g)
    mkpm = _padding(c.memory_kpm, 1 if c.unbatched else c.b, c.s, g)
    if mkpm is not None and c.unbatched:
        mkpm = mkpm[0]
    # the reference: torch.nn's full decoding under the causal (and band) mask; the hint only where it is true
    hidden = _band(n, ours.layers[0].window)
    tgt_r, mem_r = tgt.clone().requires_grad_(c.grad), mem.clone().requires_grad_(c.grad)
    exp = ref(tgt_r, mem_r, tgt_mask=hidden, memory_key_padding_mask=mkpm,
              tgt_is_causal=True if c.window is None else None)
    tgt_o, mem_o = tgt.to(dtype).requires_grad_(c.grad), mem.to(dtype).requires_grad_(c.grad)
    mkpm_o = _to_ours(mkpm, dtype)
    cache = ours.new_cache()
    seq_dim = 0 if (c.unbatched or not c.batch_first) else 1
    outs, start = [], 0
    with torch.set_grad_enabled(c.grad):
        for k in c.chunks:
            assert cache.length == start
            outs.append(ours(tgt_o.narrow(seq_dim, start, k), mem_o, memory_key_padding_mask=mkpm_o, cache=cache))
            start += k
        out = torch.cat(outs, dim=seq_dim)
    assert cache.length == n
    left = ours.layers[0].window[0] if c.window is not None else -1
    for layer_cache in cache.layers:        # the cache keeps what the window can still see, all of it without one
        assert layer_cache.self_k.shape[2] == (n if left < 0 else min(left, n))
    scale = _scale(c.layers)
    assert out.dtype == dtype and out.shape == exp.shape
    assert torch.isfinite(out).all()
    assert_close(out, exp, dtype=dtype, scale=scale, name="incremental output")
    if not c.grad:
        return
    dy = torch.randn(exp.shape, dtype=F64, generator=g)
    out.backward(dy.to(dtype))
    exp.backward(dy)
    assert_close(tgt_o.grad, tgt_r.grad, dtype=dtype, scale=scale, name="grad tgt")
    assert_close(mem_o.grad, mem_r.grad, dtype=dtype, scale=scale, name="grad memory")
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_params[name].grad, dtype=dtype, scale=scale, name=f"grad {name}")


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=N_CACHE, **_SETTINGS)
@given(c=cache_configs())
def test_fuzz_incremental_decoding(torch_path, c):
    """Decoding a few positions at a time with the cache equals torch.nn's full causal (band) decoding."""
    _check_cache(c)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=N_TRITON_CACHE, **_SETTINGS)
@given(c=cache_configs(triton=True))
def test_fuzz_incremental_decoding_triton(triton_path, c):
    """The same on the Triton path (the interpreter on a CPU-only machine), float32."""
    _check_cache(c)


# ------------------------------------------------------------------------------ greedy generation

@dataclass
class GenerateConfig:
    head_dim: int
    nhead: int
    ff: int
    enc_layers: int
    dec_layers: int
    norm_first: bool
    batch_first: bool
    bias: bool
    window: Optional[tuple]
    s: int
    b: int
    vocab: int
    max_len: int
    start: str              # "int", "ids" (a (batch,) tensor), "id" (a one-element tensor), "embedding", "embeddings"
    end: bool               # with an end token (the one the first row produces at its second step, if any)
    src_kpm: Optional[str]
    seed: int


@st.composite
def generate_configs(draw) -> GenerateConfig:
    return GenerateConfig(
        head_dim=draw(st.sampled_from([16, 8])), nhead=draw(st.integers(1, 2)), ff=draw(st.integers(1, 32)),
        enc_layers=draw(st.integers(1, 2)), dec_layers=draw(st.integers(1, 2)), norm_first=draw(st.booleans()),
        batch_first=draw(st.booleans()), bias=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.tuples(st.sampled_from([-1, 0, 1, 2]), st.sampled_from([-1, 0, 2])))),
        s=draw(st.integers(1, 8)), b=draw(st.integers(1, 3)), vocab=draw(st.integers(2, 9)),
        max_len=draw(st.integers(1, 6)), start=draw(st.sampled_from(["int", "ids", "id", "embedding", "embeddings"])),
        end=draw(st.booleans()), src_kpm=draw(st.sampled_from(PADDINGS)), seed=draw(st.integers(0, 2**31 - 1)),
    )


class _TokenIO(torch.nn.Module):
    """Token embedding + learned positions (``embed(ids, offset)`` in the model's layout) and a logits head."""

    def __init__(self, vocab: int, d: int, batch_first: bool):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(16, d))
        self.head = torch.nn.Linear(d, vocab)
        self.batch_first = batch_first

    def embed(self, ids, offset):
        x = self.emb(ids) + self.pos[offset: offset + ids.shape[1]]
        return x if self.batch_first else x.transpose(0, 1)


def _check_generate(c: GenerateConfig):
    """``Transformer.generate`` (greedy, with the cache) against a naive greedy loop that re-decodes the whole
    prefix with torch.nn.Transformer's encoder and decoder at every step (float64 on both sides, so that no
    argmax is a near tie)."""
    d = c.head_dim * c.nhead
    torch.manual_seed(c.seed)
    ours = lnn.Transformer(d, c.nhead, c.enc_layers, c.dec_layers, c.ff, dropout=0.1, batch_first=c.batch_first,
                           norm_first=c.norm_first, bias=c.bias, window=c.window).double().eval()
    _randomize(ours, c.seed)
    ref = torch.nn.Transformer(d, c.nhead, c.enc_layers, c.dec_layers, c.ff, dropout=0.1,
                               batch_first=c.batch_first, norm_first=c.norm_first, bias=c.bias).double().eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    io = _TokenIO(c.vocab, d, c.batch_first).double()
    g = torch.Generator().manual_seed(c.seed)
    src = torch.randn((c.b, c.s, d) if c.batch_first else (c.s, c.b, d), dtype=F64, generator=g)
    skpm = _padding(c.src_kpm, c.b, c.s, g)
    start_ids = torch.randint(0, c.vocab, (c.b,), generator=g)
    if c.start in ("int", "id", "embedding"):
        start_ids = start_ids[:1].expand(c.b)
    with torch.no_grad():
        emb = io.embed(start_ids[:, None], 0).reshape(c.b, d)
    start = {"int": int(start_ids[0]), "ids": start_ids, "id": start_ids[:1], "embedding": emb[0],
             "embeddings": emb}[c.start]

    # our window= restricts the encoder's self-attention too: torch.nn's encoder gets the band as its mask (then
    # it never takes its nested-tensor path, while ours may zero the padded positions of memory: invisible here,
    # as the cross-attention ignores them through memory_key_padding_mask, unless that mask is additive)
    src_mask = None if c.window is None else _band_hidden(c.s, c.window)
    assume(c.window is None or c.src_kpm != "float_additive")

    def naive(end):
        with torch.no_grad():
            memory = _torch_encoder(ref.encoder, src, mask=src_mask, src_key_padding_mask=skpm)
            ids = start_ids[:, None]
            finished = torch.zeros(c.b, dtype=torch.bool)
            out = []
            for _ in range(c.max_len):
                n = ids.shape[1]
                hidden = _causal(n, n) if c.window is None else (_causal(n, n) | _band_hidden(n, c.window))
                h = ref.decoder(io.embed(ids, 0), memory, tgt_mask=hidden, memory_key_padding_mask=skpm)
                nxt = io.head(h[:, -1] if c.batch_first else h[-1]).argmax(-1)
                if end is not None:
                    nxt = nxt.masked_fill(finished, end)
                    finished |= nxt == end
                out.append(nxt)
                if end is not None and bool(finished.all()):
                    break
                ids = torch.cat([ids, nxt[:, None]], dim=1)
            return torch.stack(out, dim=1)

    expected = naive(None)
    got = ours.generate(src, start, c.max_len, embed=io.embed, head=io.head, src_key_padding_mask=skpm)
    assert got.dtype == torch.long and torch.equal(got, expected), (got, expected)
    if c.end:
        end = int(expected[0, min(1, c.max_len - 1)])
        expected = naive(end)
        got = ours.generate(src, start, c.max_len, embed=io.embed, head=io.head, src_key_padding_mask=skpm, end=end)
        assert torch.equal(got, expected), (got, expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=N_GENERATE, **_SETTINGS)
@given(c=generate_configs())
def test_fuzz_generate(torch_path, c):
    """Greedy generation with the cache equals naive greedy decoding with torch.nn.Transformer."""
    _check_generate(c)


# ------------------------------------------------------------------------------ failures found by the fuzzing


def test_memory_is_causal_with_cache_is_refused(torch_path):
    """``memory_is_causal=True`` with ``cache=`` was silently ignored: each step's cross-attention saw all of memory,
    unlike the full decoding with ``memory_is_causal=True`` (bottom-right causal over (T, S), which a decoding step
    cannot align without the full target length).  Now refused, as tgt_mask / memory_mask are."""
    torch.manual_seed(0)
    dec = lnn.TransformerDecoder(lnn.TransformerDecoderLayer(32, 2, 24, dropout=0.0), 2).eval()
    tgt, mem = torch.randn(4, 2, 32), torch.randn(4, 2, 32)
    cache = dec.new_cache()
    with pytest.raises(ValueError, match="memory_is_causal"):
        dec(tgt[:1], mem, memory_is_causal=True, cache=cache)
    with pytest.raises(ValueError, match="memory_is_causal"):
        dec.layers[0](tgt[:1], mem, memory_is_causal=True, cache=dec.layers[0].new_cache())
    # without the flag the cache still decodes as the full causal decoding
    steps = torch.cat([dec(tgt[i:i + 1], mem, cache=cache) for i in range(4)])
    assert_close(steps, dec(tgt, mem, tgt_is_causal=True), dtype=torch.float32, scale=2 * LAYER_SCALE)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nested_path_reads_float_padding_as_torch(torch_path):
    """Where torch.nn.TransformerEncoder takes its nested-tensor path (eval, no autograd, padding at the end of
    each row), a float key padding mask marks a position as padding iff it is nonzero: those keys are dropped
    and the finite values are never added to the scores.  Ours zeroed those positions like that path but still
    added the float values in attention (a result neither torch.nn path gives: 1.27 off here).  Found by
    test_fuzz_modules_vs_torch_nn[encoder] with an additive padding mask."""
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 2, 24, dropout=0.0, batch_first=True),
                                      2).double().eval()
    ours = lnn.TransformerEncoder(lnn.TransformerEncoderLayer(32, 2, 24, dropout=0.0, batch_first=True),
                                  2).double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 5, 32, dtype=F64)
    kpm = torch.zeros(3, 5, dtype=F64)
    kpm[0, 3:] = 0.7              # finite values, at the end of each row: still "padding" for that path
    kpm[1, 4] = -2.0
    kpm[2, 2:] = NEG
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=kpm)
        got = ours(x, src_key_padding_mask=kpm)
        assert_close(got, expected, dtype=F64, scale=2 * LAYER_SCALE)
        assert torch.equal(got[kpm != 0], torch.zeros_like(got[kpm != 0]))

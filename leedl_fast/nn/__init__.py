"""Drop-in modules with the constructor arguments, parameter names, state_dict keys and
forward signatures of their torch.nn twins, running on ``leedl_fast.ops``."""
from .heads import Seq2SeqHead, SequenceClassificationHead, TokenClassificationHead
from .multihead_attention import MultiheadAttention, TruncatedSelfAttention
from .positional import LearnedPositionalEncoding, SinusoidalPositionalEncoding
from .transformer import (DecoderCache, LayerCache, Transformer, TransformerDecoder, TransformerDecoderLayer,
                          TransformerEncoder, TransformerEncoderLayer)

__all__ = [
    "MultiheadAttention", "TruncatedSelfAttention",
    "SinusoidalPositionalEncoding", "LearnedPositionalEncoding",
    "TransformerEncoderLayer", "TransformerEncoder", "TransformerDecoderLayer", "TransformerDecoder", "Transformer",
    "DecoderCache", "LayerCache",
    "TokenClassificationHead", "SequenceClassificationHead", "Seq2SeqHead",
]

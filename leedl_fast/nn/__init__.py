"""Drop-in modules with the constructor arguments, parameter names and forward signatures of torch.nn's."""
__all__: list[str] = []
from .multihead_attention import MultiheadAttention, TruncatedSelfAttention  # noqa: E402

__all__ += ["MultiheadAttention", "TruncatedSelfAttention"]
from .positional import LearnedPositionalEncoding, SinusoidalPositionalEncoding  # noqa: E402
from .transformer import (DecoderCache, LayerCache, Transformer, TransformerDecoder,  # noqa: E402
                          TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer)
from .heads import Seq2SeqHead, SequenceClassificationHead, TokenClassificationHead  # noqa: E402

__all__ += ["SinusoidalPositionalEncoding", "LearnedPositionalEncoding", "TransformerEncoderLayer",
            "TransformerEncoder", "TransformerDecoderLayer", "TransformerDecoder", "Transformer", "DecoderCache",
            "LayerCache", "TokenClassificationHead", "SequenceClassificationHead", "Seq2SeqHead"]

"""Drop-in modules with the constructor arguments, parameter names and forward signatures of torch.nn's."""
__all__: list[str] = []
from .multihead_attention import MultiheadAttention, TruncatedSelfAttention  # noqa: E402

__all__ += ["MultiheadAttention", "TruncatedSelfAttention"]

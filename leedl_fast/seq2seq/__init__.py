"""Sequence-to-sequence demos on ``leedl_fast.nn.Transformer`` (``leedl-fast train transformer``)."""

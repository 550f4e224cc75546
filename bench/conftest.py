"""CPU benchmarks (pytest-benchmark): each case of ours paired with torch's own op in one group."""
import os

os.environ.setdefault("LEEDL_FAST_BACKEND", "torch")

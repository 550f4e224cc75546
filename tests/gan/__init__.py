"""Tests of leedl_fast.gan.

The models here are tiny: they run with one intra-op thread (tests/conftest.py's autouse ``_one_thread``);
with ``pytest -n 2`` on two cores, two threads per worker oversubscribe the machine (measured: a tiny
CycleGAN step took 25 s with 2 threads on a busy 2-core machine, 0.7 s with 1).
"""

"""Tests of leedl_fast.gan.

``one_thread`` (imported by each test module, autouse there) runs a test with one intra-op
thread: these models are tiny, and with ``pytest -n 2`` on two cores, two threads per worker
oversubscribe the machine (measured: a tiny CycleGAN step took 25 s with 2 threads on a busy
2-core machine, 0.7 s with 1).
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)

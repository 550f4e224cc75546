"""leedl_fast.random against Triton's own tl.rand / tl.randn, run under the interpreter."""
import pytest
import torch

from leedl_fast.random import MAX_SEED, philox_normal, philox_randint4x, philox_uniform

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _draw_kernel(seed, off_ptr, u_ptr, n_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    off = tl.load(off_ptr + offs, mask=mask)
    tl.store(u_ptr + offs, tl.rand(seed, off), mask=mask)
    tl.store(n_ptr + offs, tl.randn(seed, off), mask=mask)


def _triton_draw(seed, offsets, device):
    offsets = offsets.to(device)
    u = torch.full(offsets.shape, float("nan"), device=device)
    n = torch.full(offsets.shape, float("nan"), device=device)
    _draw_kernel[(triton.cdiv(offsets.numel(), 512),)](seed, offsets, u, n, offsets.numel(), BLOCK=512)
    return u.cpu(), n.cpu()


@pytest.mark.parametrize("seed", [0, 1, 4242, 2**31 - 1, 2**31 + 7, 2**40 + 3, MAX_SEED])
def test_matches_triton(seed, triton_path):
    offsets = torch.cat([
        torch.arange(0, 700),
        torch.randint(0, 2**40, (700,)),
        torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 - 1, 2**40, 2**41 + 5, 2**62]),
    ])
    u, n = _triton_draw(seed, offsets, triton_path)
    assert torch.equal(philox_uniform(seed, offsets), u), "uniforms must be bit-identical"
    if triton_path == "cpu":  # the interpreter's tl.log / tl.cos are numpy's, which the CPU port uses too
        assert torch.equal(philox_normal(seed, offsets), n), "CPU normals must equal the interpreter's bit for bit"
    else:  # a compiled kernel's libdevice log / cos round the last bit their own way
        assert (philox_normal(seed, offsets) - n).abs().max().item() <= 1e-6


def test_distribution():
    offsets = torch.arange(200_000)
    u = philox_uniform(7, offsets)
    n = philox_normal(7, offsets)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 3e-3 and abs(u.var().item() - 1 / 12) < 2e-3
    assert abs(n.mean().item()) < 1e-2 and abs(n.std().item() - 1.0) < 1e-2
    # Different seeds and neighbouring offsets give unrelated numbers.
    assert torch.corrcoef(torch.stack([n[:-1], n[1:]]))[0, 1].abs() < 1e-2
    assert torch.corrcoef(torch.stack([n, philox_normal(8, offsets)]))[0, 1].abs() < 1e-2


def test_words_in_range_and_shape():
    off = torch.arange(12).reshape(3, 4)
    words = philox_randint4x(3, off)
    for w in words:
        assert w.shape == (3, 4) and w.dtype == torch.int64
        assert int(w.min()) >= 0 and int(w.max()) < 2**32
    assert philox_uniform(3, off).shape == (3, 4) and philox_uniform(3, off).dtype == torch.float32


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True, "3"])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        philox_uniform(seed, torch.arange(3))


def test_bad_offsets():
    with pytest.raises(ValueError, match="offsets"):
        philox_uniform(0, torch.arange(3.0))


def test_fast_philox_keep_is_bit_identical():
    """``philox_keep``, the dropout paths' keep-mask generator, equals ``philox_uniform(seed, offsets) >= p`` exactly:
    offsets past 2**32 (the counter's second word), extreme seeds, p on a drawn value's boundary."""
    from leedl_fast.random import philox_keep, philox_uniform

    g = torch.Generator().manual_seed(0)
    offsets = [torch.randint(0, 2**62, (70001,), generator=g),
               torch.arange(50000, dtype=torch.int64) + 2**32 - 25000,
               torch.arange(3 * 5 * 7 * 11, dtype=torch.int64).view(3, 5, 7, 11)]
    for off in offsets:
        for seed in (0, 1, 2**40 + 12345, 2**63 - 1):
            u = philox_uniform(seed, off)
            flat = u.reshape(-1)
            for p in (0.1, 0.5, 1e-9, 0.999999, 0.99999997, float(flat[17]), float(flat[3]), float(flat.max())):
                keep = philox_keep(seed, off, p)
                assert keep.shape == off.shape and keep.dtype == torch.bool
                assert torch.equal(keep, u >= p), (seed, p)

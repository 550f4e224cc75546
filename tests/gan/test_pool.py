"""ImagePool: fill first, then a fair coin swaps with a uniformly chosen stored image; pool_size 0 is a pass-through."""
import pytest
import torch

from leedl_fast.gan import ImagePool


def _images(n, start=0):
    # image i is filled with the value i, so identities can be read back
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, 3, 3).clone()


def _ids(images):
    return [int(v) for v in images[:, 0, 0, 0]]


def _expected(pool_size, seed, batches):
    """The specified behaviour, written out with the same seeded coin and slot draws."""
    gen = torch.Generator().manual_seed(seed)
    stored, out = [], []
    for batch in batches:
        got = []
        for i in batch:
            if len(stored) < pool_size:
                stored.append(i)
                got.append(i)
            elif float(torch.rand((), generator=gen)) < 0.5:
                slot = int(torch.randint(pool_size, (), generator=gen))
                got.append(stored[slot])
                stored[slot] = i
            else:
                got.append(i)
        out.append(got)
    return out, stored


def test_pool_size_zero_returns_the_input():
    pool = ImagePool(0)
    x = _images(4)
    x.requires_grad_(True)
    y = pool.query(x)
    assert torch.equal(y, x) and not y.requires_grad     # detached, as every result of the pool
    assert len(pool) == 0


@pytest.mark.parametrize("pool_size,batch_sizes", [(1, [1, 1, 1, 1]), (5, [3, 4, 1, 7, 2]), (50, [17, 63, 2])])
def test_pool_fills_first_then_swaps_with_probability_half(pool_size, batch_sizes):
    pool = ImagePool(pool_size, seed=11)
    batches, start = [], 0
    for b in batch_sizes:
        batches.append(list(range(start, start + b)))
        start += b
    expected, stored = _expected(pool_size, 11, batches)
    for batch, want in zip(batches, expected):
        got = pool.query(_images(len(batch), batch[0]))
        assert got.shape == (len(batch), 2, 3, 3)
        assert _ids(got) == want
    assert _ids(torch.stack(pool.images)) == stored
    # while filling, everything comes back unchanged
    assert expected[0][: min(pool_size, batch_sizes[0])] == batches[0][: min(pool_size, batch_sizes[0])]


def test_pool_swap_rate_and_returned_images_are_earlier_inputs():
    pool = ImagePool(10, seed=3)
    pool.query(_images(10))
    swapped, n = 0, 2000
    for i in range(10, 10 + n):
        (got,) = _ids(pool.query(_images(1, i)))
        assert got == i or got < i  # either the new image or one stored earlier
        swapped += got != i
    # binomial(2000, 1/2): the standard deviation of the rate is 0.011; 5 sigma
    assert abs(swapped / n - 0.5) < 0.056


def test_pool_returns_detached_copies_and_keeps_its_own():
    pool = ImagePool(2)
    x = _images(2).requires_grad_(True)
    out = pool.query(x * 1)
    assert not out.requires_grad
    with torch.no_grad():
        x.add_(100)
    assert _ids(torch.stack(pool.images)) == [0, 1]


def test_pool_state_dict_round_trip_continues_identically():
    a = ImagePool(4, seed=5)
    a.query(_images(6))
    b = ImagePool(4, seed=99)
    b.load_state_dict(a.state_dict())
    for start in (6, 13):
        assert torch.equal(a.query(_images(7, start)), b.query(_images(7, start)))


def test_pool_errors():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="pool_size"):
            ImagePool(bad)
    pool = ImagePool(3)
    pool.query(_images(2))
    with pytest.raises(ValueError, match="images"):
        pool.query(torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match="pool_size"):
        ImagePool(3).load_state_dict(ImagePool(4).state_dict())
    for bad in ("a", 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            ImagePool(3, seed=bad)


def test_seed_range_is_torch_generators():
    """Seeds a torch.Generator takes are accepted (negative and past 2**63 too); outside, a ValueError naming
    the argument instead of torch's "Overflow when unpacking long long"."""
    from leedl_fast.gan import CycleGAN

    for ok in (-(2**63), -1, 2**63, 2**64 - 1):
        ImagePool(2, seed=ok)
    for bad in (-(2**63) - 1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be an int in \["):
            ImagePool(2, seed=bad)
    with pytest.raises(ValueError, match=r"seed must be an int in \["):
        CycleGAN(1, 1, ngf=4, ndf=4, n_blocks=0, seed=2**64 - 1)    # the second pool would take 2**64

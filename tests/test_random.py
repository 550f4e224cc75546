"""leedl_fast.random against Triton's own tl.rand / tl.randn, run under the interpreter."""
import pytest
import torch

from leedl_fast.random import (MAX_SEED, dropout_keep, dropout_mask, dropout_scale, dropout_threshold, philox_normal,
                               philox_randint4x, philox_uniform)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from leedl_fast.kernels.dropout import keep_row, keep_tile  # noqa: E402  (needs triton)


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


def _keep_by_definition(seed, rows, n_cols, p):
    """The dropout stream's definition, element by element from philox_randint4x."""
    from leedl_fast.random import dropout_threshold

    t = dropout_threshold(p)
    j = torch.arange(n_cols)
    ctr = rows[:, None] * ((n_cols + 7) // 8) + j[None, :] // 8
    words = philox_randint4x(seed, ctr)
    s = (j % 8).expand_as(ctr)
    w = torch.stack(words, -1).gather(-1, (s // 2)[..., None])[..., 0]
    return ((w >> (16 * (s % 2))) & 0xFFFF) >= t


@pytest.fixture(params=["numpy", "torch"])
def rounds(request, monkeypatch):
    """Which Philox rounds the streams run: the numpy uint64 ones (the CPU's) or the int64 tensor ones
    (every other device's, and a torch.compile trace's), forced here on the CPU."""
    import leedl_fast.random as lr

    if request.param == "torch":
        monkeypatch.setattr(lr, "_numpy_rounds", lambda t: False)
    return request.param


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 12345, MAX_SEED])
def test_dropout_keep_matches_its_definition(seed, rounds):
    """``dropout_keep`` (all four words of a call, both halves of a word) equals the definition on both
    kinds of rounds: counters past 2**32, widths not a multiple of 8, column ranges that start and stop
    inside a group of 8."""
    from leedl_fast.random import dropout_keep

    rows = torch.cat([torch.arange(0, 40), torch.tensor([2**29 + 3, 2**33 // 37, 2**55])])
    for n_cols in (1, 7, 8, 37, 200):
        for p in (0.1, 0.5, 1e-6, 0.999999):
            ref = _keep_by_definition(seed, rows, n_cols, p)
            assert torch.equal(dropout_keep(seed, rows, n_cols, p), ref), (n_cols, p)
        for a, b in ((0, n_cols), (n_cols // 3, n_cols), (1, max(1, n_cols - 2)), (n_cols, n_cols)):
            got = dropout_keep(seed, rows.view(-1, 1), n_cols, 0.3, (a, b))
            assert got.shape == (rows.numel(), 1, b - a)
            assert torch.equal(got[:, 0], _keep_by_definition(seed, rows, n_cols, 0.3)[:, a:b])


def test_dropout_threshold_and_scale():
    from leedl_fast.random import dropout_keep, dropout_mask, dropout_scale, dropout_threshold

    assert [dropout_threshold(p) for p in (0.0, 0.1, 0.5, 1 - 2**-17, 0.9999999)] == [0, 6554, 32768, 65535, 65535]
    for p in (0.0, 0.1, 0.25, 0.5, 0.9, 0.999):
        applied = dropout_threshold(p) / 2**16
        assert abs(applied - p) <= 2**-17
        assert dropout_scale(p) == 1.0 / (1.0 - applied)
    # The fraction kept and the unbiasedness over 4M decisions (binomial sd ~ 2.4e-4 at p = 0.3).
    keep = dropout_keep(11, torch.arange(4096), 1000, 0.3).float()
    assert abs(keep.mean().item() - 0.7) < 1.5e-3
    assert abs(keep.mean().item() * dropout_scale(0.3) - 1.0) < 2.5e-3
    # Neighbouring decisions (in one Philox call, and across calls) are uncorrelated.
    flat = keep.reshape(-1)
    assert torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].abs() < 3e-3
    # dropout_mask is dropout_keep over the leading dims flattened to rows.
    assert torch.equal(dropout_mask(5, (3, 4, 19), 0.2), dropout_keep(5, torch.arange(12), 19, 0.2).view(3, 4, 19))


def test_kernel_threshold_is_the_same_function():
    from leedl_fast.kernels import dropout as kd
    from leedl_fast.random import dropout_scale, dropout_threshold

    for p in [i / 997 for i in range(997)] + [2**-17, 3 * 2**-17, 1 - 2**-17, 1 - 1e-12]:
        assert kd.dropout_threshold(p) == dropout_threshold(p) and kd.dropout_scale(p) == dropout_scale(p)


@triton.jit
def _keep_kernel(out_ptr, out_t_ptr, row_ptr, seed, n_cols, start, threshold,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    rows = tl.load(row_ptr + offs_r) * ((n_cols + 7) // 8)
    keep = keep_tile(seed, rows, start, threshold, BLOCK_R, BLOCK_C)                   # [R, C]
    tl.store(out_ptr + offs_r[:, None] * BLOCK_C + offs_c[None, :], keep.to(tl.int8))
    keep_t = keep_tile(seed, rows, start, threshold, BLOCK_R, BLOCK_C, True)           # [C, R]
    tl.store(out_t_ptr + offs_c[:, None] * BLOCK_R + offs_r[None, :], keep_t.to(tl.int8))
    first = keep_row(seed, tl.load(row_ptr) * ((n_cols + 7) // 8), start, threshold, BLOCK_C)  # [C]
    tl.store(out_ptr + BLOCK_R * BLOCK_C + offs_c, first.to(tl.int8))


@pytest.mark.parametrize("n_cols,start", [(37, 0), (37, 32), (300, 64), (16, 0)])
def test_kernel_keep_tiles_match(n_cols, start, triton_path):
    """kernels/dropout.py's keep_tile (both orientations) and keep_row equal ``dropout_keep``."""
    from leedl_fast.random import dropout_keep, dropout_threshold

    seed, p, R, C = 2**35 + 9, 0.37, 16, 32
    rows = torch.tensor([0, 1, 2, 5, 9, 77, 1000, 2**20 + 1, 3, 4, 6, 7, 8, 10, 11, 2**30], dtype=torch.int64)
    out = torch.zeros(R * C + C, dtype=torch.int8, device=triton_path)
    out_t = torch.zeros(C, R, dtype=torch.int8, device=triton_path)
    _keep_kernel[(1,)](out, out_t, rows.to(triton_path), seed, n_cols, start, dropout_threshold(p), BLOCK_R=R, BLOCK_C=C)
    out, out_t = out.cpu(), out_t.cpu()
    stop = min(n_cols, start + C)
    ref = dropout_keep(seed, rows, n_cols, p, (start, stop)).to(torch.int8)
    assert torch.equal(out[:R * C].view(R, C)[:, :stop - start], ref)
    assert torch.equal(out_t.T[:, :stop - start], ref)
    assert torch.equal(out[R * C:][:stop - start], ref[0])


def test_numpy_and_torch_rounds_agree_across_chunks(monkeypatch):
    """The numpy rounds run ``_CHUNK`` counters a pass: over several passes (and a ragged last one) they
    give the int64 tensor rounds' words, decisions and normals."""
    import leedl_fast.random as lr

    seed, rows, n_cols = 2**33 + 77, torch.arange(3 * lr._CHUNK // 9 + 5) * 3 + 2**31, 70   # > 3 passes
    ctr = torch.arange(2 * lr._CHUNK + 123, dtype=torch.int64) * 2**21 + 5
    words_np = lr._philox_words_np(seed & 0xFFFFFFFF, seed >> 32, ctr.numpy().view("uint64"))
    words_t = lr._philox_words_fast(seed & 0xFFFFFFFF, seed >> 32, ctr)
    for a, b in zip(words_np, words_t):
        assert torch.equal(torch.from_numpy(a.view("int64")), b & 0xFFFFFFFF)
    keep, noise = lr.dropout_keep(seed, rows, n_cols, 0.3), lr.normal_rows(seed, rows[:2000], n_cols)
    monkeypatch.setattr(lr, "_numpy_rounds", lambda t: False)
    assert torch.equal(keep, lr.dropout_keep(seed, rows, n_cols, 0.3))
    assert torch.equal(noise, lr.normal_rows(seed, rows[:2000], n_cols))


@pytest.mark.parametrize("seed", [0, 2**40 + 12345])
def test_normal_rows_matches_its_definition(seed, rounds):
    """``normal_rows`` (the diffusion noise) equals its definition, element by element in numpy float32:
    element j of row r is Box-Muller pair (j % 4) // 2 of the Philox call at counter r * ceil(C / 4) + j // 4,
    cosine for even j, sine for odd; the first element of a group is tl.randn's number for its counter."""
    import numpy as np

    from leedl_fast.random import _uint_to_uniform, normal_noise, normal_rows

    rows = torch.tensor([0, 1, 2, 7, 2**28 + 5, 2**33 // 3], dtype=torch.int64)
    for n_cols in (1, 3, 4, 9, 130):
        got = normal_rows(seed, rows, n_cols)
        assert got.shape == (rows.numel(), n_cols) and got.dtype == torch.float32
        j = torch.arange(n_cols)
        ctr = rows[:, None] * ((n_cols + 3) // 4) + j[None, :] // 4
        words = torch.stack(philox_randint4x(seed, ctr), -1)
        a = ((j % 4) // 2).expand_as(ctr)[..., None]
        u1 = np.maximum(np.float32(1e-7), _uint_to_uniform(words.gather(-1, 2 * a)[..., 0]).numpy())
        th = np.float32(6.283185307179586) * _uint_to_uniform(words.gather(-1, 2 * a + 1)[..., 0]).numpy()
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        expect = np.where((j % 2 == 0).numpy(), r * np.cos(th), r * np.sin(th)).astype(np.float32)
        assert np.array_equal(got.numpy(), expect), n_cols
        assert torch.equal(got[:, ::4], philox_normal(seed, ctr[:, ::4]))
    assert torch.equal(normal_noise(seed, (3, 2, 5)), normal_rows(seed, torch.arange(3), 10).view(3, 2, 5))


def test_normal_rows_statistics():
    """Mean, variance, no skew, and no correlation between the four normals of one Philox call
    (the cosine and sine of one Box-Muller pair are independent standard normals)."""
    from leedl_fast.random import normal_rows

    n = normal_rows(3, torch.arange(500), 1000).double()              # 500k normals
    tol = 5 / n.numel() ** 0.5
    assert abs(n.mean().item()) < tol and abs(n.std().item() - 1.0) < 2 * tol
    assert abs((n ** 3).mean().item()) < 5 * 15 ** 0.5 / n.numel() ** 0.5
    slots = n.view(500, 250, 4).reshape(-1, 4).T                        # [4, 125k]: slot s of every call
    corr = torch.corrcoef(slots)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 5 / slots.shape[1] ** 0.5
    # the radius pairs: |n0|^2 + |n1|^2 is exponential with mean 2 (chi-square, 2 dof)
    r2 = slots[0] ** 2 + slots[1] ** 2
    assert abs(r2.mean().item() - 2.0) < 5 * 2 / slots.shape[1] ** 0.5


def test_torch_box_muller_agrees_with_numpy(monkeypatch):
    """Off the CPU (and in a torch.compile trace) the noise's rounds and Box-Muller run in torch ops, whose
    float32 log / cos / sin may round the last bit differently from numpy's: agreement to 1e-6."""
    from leedl_fast.random import normal_rows

    rows = torch.tensor([0, 3, 2**30 + 7])
    ref = normal_rows(2**35 + 9, rows, 4099)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = normal_rows(2**35 + 9, rows, 4099)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got[:, ::2], got[:, 1::2])          # both branches drawn, not one repeated


@pytest.mark.parametrize("p", [-0.5, 1.0, 1.5, float("nan"), True, "0.1"])
def test_dropout_helpers_refuse_a_probability_outside_0_1(p):
    """p = -0.5 kept everything scaled by 2/3, p >= 1 was clamped, NaN raised a bare conversion error."""
    for call in (lambda: dropout_threshold(p), lambda: dropout_scale(p),
                 lambda: dropout_keep(1, torch.arange(3), 8, p), lambda: dropout_mask(1, (2, 8), p)):
        with pytest.raises(ValueError, match="drop probability"):
            call()

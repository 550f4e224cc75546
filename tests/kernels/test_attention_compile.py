"""Every shipped attention configuration compiles for its GPU target: no spills, tensor cores used.

``launch_configs()`` lists the tile choice of the forward, dK/dV, dQ and preprocess kernels
per head-dim group (<= 64, 128, 256), dtype kind (fp16/bf16, fp32) and target (sm_80 for
Ampere-class GPUs, sm_90 for Hopper).  Each entry is compiled for its target (tests/aot.py,
in a subprocess with the interpreter off) twice: at the largest head dim it serves, and at a
padded one (40, 96, 160: HEAD_DIM < BLOCK_D, the code path with zero-padded tiles outside the
loops and column-wrapped ones inside, see kernels/attention.py: _load_tile), in the variant with
the most live state: band on both sides, key padding and dropout, so the masked and the unmasked
loop bodies and the Philox code are all in the binary (the dense variant is a subset of that
code).  To keep CI time reasonable each fp16/bf16 entry is compiled in one of the two 16-bit
dtypes per head dim, alternating over head-dim groups, targets and padding so that both dtypes
are compiled for every kernel on every target.
fp16/bf16 must show HMMA on sm_80 and HGMMA on sm_90; fp32 (TF32 products) HMMA on sm_80.  One
exception, stated in kernels/attention.py (_CONFIGS_PADDED): dK/dV on sm_90 at padded head dims
136..248, where every HGMMA tile spilled, runs a spill-free HMMA tile.
Zero spills everywhere, and shared memory within what one block may use on every GPU of the
target's class (tests/aot.py: SHARED_LIMIT; sm_80 code also runs on sm_86/sm_89 with 99 KiB).

Each entry is compiled with the specialization Triton's launcher gives every launch: every
pointer 16-byte aligned and every stride a multiple of 16 (tt.divisibility 16, as
triton.runtime.jit marks such arguments), the sizes, window and seed unspecialised and the seed
i64.  The launchers guarantee it (kernels/attention.py: RUNTIME_INTS, _prep copies an unaligned
input, such as any with head dim 40, to aligned storage), and the last tests here check it with
Triton's own binder on awkward inputs.  Without the alignment the loads cannot be vectorised and
the kernels compile to other code, which at head dim 256 spills.
"""
import pytest

from tests.aot import SHARED_LIMIT, KernelConfig, assert_launches_compiled, compile_many, record_launches, specialized

pytest.importorskip("triton")

MOD = "leedl_fast.kernels.attention"
_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_COUNT = "*fp32"  # count_ptr: with COUNT_BLOCKS off the launchers pass the (fp32) lse buffer


def _strides(*names):
    return {f"stride_{n}{s}": "i32" for n in names for s in ("b", "h", "m" if n in ("q", "do", "o", "dq") else "n")}


def _flags(variant: str):
    band = variant != "dense"
    return {"HAS_LEFT": band, "HAS_RIGHT": band, "HAS_KPM": band, "DROPOUT": variant == "dropout",
            "COUNT_BLOCKS": False}


def _kernel_config(cfg: dict, dt: str, head_dim: int, variant: str) -> KernelConfig:
    p = _PTR[dt]
    kernel = cfg["kernel"]
    const = {"HEAD_DIM": head_dim, "BLOCK_D": cfg["block_d"], "BLOCK_M": cfg["BLOCK_M"]}
    label = (f"{kernel.replace('_attention_', '')} d={head_dim} {dt} {variant} "
             f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}")
    if kernel == "_attention_bwd_preprocess_kernel":
        sig = {"o_ptr": p, "do_ptr": p, "lse_ptr": "*fp32", "delta_ptr": "*fp32", "lse2_ptr": "*fp32",
               **_strides("o", "do"), "n_heads": "i32", "seq_q": "i32"}
    else:
        const["BLOCK_N"] = cfg["BLOCK_N"]
        const.update(_flags(variant))
        if kernel == "_attention_bwd_dkdv_kernel":
            const["SPLIT_DKDV"] = cfg["split_dkdv"]
            label += " split" if cfg["split_dkdv"] else ""
        tail = {"stride_kpmb": "i32", "n_heads": "i32", "group": "i32", "seq_q": "i32", "seq_k": "i32",
                "qk_scale": "fp32"}
        if kernel != "_attention_fwd_kernel":
            tail["sm_scale"] = "fp32"
        tail.update({"window_left": "i32", "window_right": "i32", "dropout_threshold": "i32",
                     "dropout_scale": "fp32", "seed": "i64", "batch_offset": "i32"})
        if kernel == "_attention_fwd_kernel":
            sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "o_ptr": p, "lse_ptr": "*fp32", "kpm_ptr": "*u8",
                   "count_ptr": _COUNT, **_strides("q", "k", "v", "o"), **tail}
        elif kernel == "_attention_bwd_dkdv_kernel":
            sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "do_ptr": p, "lse2_ptr": "*fp32", "delta_ptr": "*fp32",
                   "dk_ptr": p, "dv_ptr": p, "kpm_ptr": "*u8", "count_ptr": _COUNT,
                   **_strides("q", "k", "v", "do", "dk", "dv"), **tail}
        else:
            sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "do_ptr": p, "lse2_ptr": "*fp32", "delta_ptr": "*fp32",
                   "dq_ptr": p, "kpm_ptr": "*u8", "count_ptr": _COUNT,
                   **_strides("q", "k", "v", "do", "dq"), **tail}
    sig.update({k: "constexpr" for k in const})
    return specialized(KernelConfig(MOD, kernel, sig, const, num_warps=cfg["num_warps"],
                                    num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"], label=label))


# The padded head dim compiled per BLOCK_D (the 40, 96 and 160); the fp32 entries, one per kernel
# for every head dim, at 96, where ptxas left to itself spilled (kernels/attention.py: MAXNREG_FP32).
PADDED = {64: 40, 128: 96, 256: 160}
PADDED_FP32 = 96


def _dtype_for(cfg: dict, padded: bool = False) -> str:
    if cfg["dtype"] == "32":
        return "fp32"
    flip = {64: 0, 128: 1, 256: 0}[cfg["block_d"]] ^ (cfg["arch"] == "sm90") ^ padded
    return ("fp16", "bf16")[flip]


def _configs(arch: str, padded: bool):
    from leedl_fast.kernels.attention import block_d_for, launch_configs

    def variant(cfg):
        return "dense" if cfg["kernel"] == "_attention_bwd_preprocess_kernel" else "dropout"

    def head_dim(cfg):
        if not padded:
            return cfg["block_d"]
        return PADDED_FP32 if cfg["dtype"] == "32" else PADDED[cfg["block_d"]]

    return [_kernel_config(dict(cfg, block_d=block_d_for(head_dim(cfg))), _dtype_for(cfg, padded), head_dim(cfg),
                           variant(cfg))
            for cfg in launch_configs() if cfg["arch"] == arch and cfg["serves"] in ("both", _SERVES[padded])]


_SERVES = {False: "full", True: "padded"}


CHUNKS = 2

@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_compiles_without_spills(arch, padded, chunk):
    cfgs = _configs(arch, padded)[chunk::CHUNKS]
    cc = int(arch[2:])
    reports = compile_many(cfgs, ccs=(cc,))
    assert len(reports) == len(cfgs) > 0
    problems = []
    for cfg, r in zip(cfgs, reports):
        uses_dot = "preprocess" not in cfg.kernel
        sixteen = "*fp32" not in cfg.signature["q_ptr" if "q_ptr" in cfg.signature else "o_ptr"]
        if not r.ok:
            problems.append(str(r))
        elif not 0 < r.registers <= 255:
            problems.append(f"registers: {r}")
        elif r.local_ld_st != 0:
            problems.append(f"register spills: {r}")
        elif r.shared > SHARED_LIMIT[cc]:
            problems.append(f"shared memory over {SHARED_LIMIT[cc]} B: {r}")
        elif uses_dot and cc == 80 and r.hmma == 0:
            problems.append(f"no HMMA: {r}")
        elif uses_dot and cc == 90 and sixteen and r.hgmma == 0 and not (padded and "dkdv" in cfg.kernel
                                                                         and cfg.constexprs["BLOCK_D"] == 256):
            problems.append(f"no HGMMA: {r}")
        elif uses_dot and cc == 90 and sixteen and r.hgmma + r.hmma == 0:
            problems.append(f"no tensor-core products: {r}")
    assert not problems, "\n".join(problems)


def test_every_config_is_compiled():
    from leedl_fast.kernels.attention import launch_configs

    n = sum(len(_configs(arch, padded)) for arch in ("sm80", "sm90") for padded in (False, True))
    assert n == sum(2 if c["serves"] == "both" else 1 for c in launch_configs())
    assert {c["serves"] for c in launch_configs()} == {"both", "full", "padded"}
    kernels = {c["kernel"] for c in launch_configs()}
    assert kernels == {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
                       "_attention_bwd_preprocess_kernel"}
    # Both 16-bit dtypes are compiled for every kernel on every target, at full and at padded head dims.
    for arch in ("sm80", "sm90"):
        for kernel in kernels - {"_attention_bwd_preprocess_kernel"}:
            for padded in (False, True):
                dts = {_dtype_for(c, padded) for c in launch_configs() if c["arch"] == arch and c["kernel"] == kernel
                       and c["serves"] in ("both", _SERVES[padded])}
                assert {"fp16", "bf16"} <= dts, (arch, kernel, padded, dts)


# ----------------------------------------------------------------------------------------------
# The launchers run the variant compiled above
# ----------------------------------------------------------------------------------------------
# The compile check is only as good as its match with what runs: Triton's launcher compiles one
# variant per specialisation of the arguments (an int divisible by 16, an int equal to 1, i32 or
# i64, a 16-byte aligned pointer).  These tests record the launchers' arguments for awkward inputs
# (head dim 40, odd lengths and strides, an unaligned start, sizes equal to 1 or divisible by 16,
# small and large seeds) and compute their specialisation with Triton's own binder, as a GPU launch
# would; it must be the compiled one: every pointer and stride aligned, nothing else specialised,
# the types of the compiled signature.
_KERNELS = ("_attention_fwd_kernel", "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel",
            "_attention_bwd_dq_kernel")


def _case(name):
    import torch

    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=g).to(dtype)

    if name == "d40 odd lengths ones":  # head dim 40, Nk = 37, one head, one query, seed 1, window (1, 1)
        q, k, v = rnd(2, 1, 1, 40, dtype=torch.float16), rnd(2, 1, 37, 40, dtype=torch.float16), \
            rnd(2, 1, 37, 40, dtype=torch.float16)
        kpm = torch.zeros(2, 37, dtype=torch.bool)
        return q, k, v, dict(left=1, right=1, key_padding_mask=kpm, dropout_p=0.1, seed=1)
    if name == "packed qkv gqa":  # views into one (B, N, Hq + 2 Hkv, 64) projection: aligned, no copy
        qkv = rnd(2, 48, 8, 64, dtype=torch.bfloat16)
        q, k, v = (t.transpose(1, 2) for t in qkv.split([4, 2, 2], dim=2))
        return q, k, v, dict(left=-1, right=0, key_padding_mask=None, dropout_p=0.0, seed=0)
    if name == "d256 fp32 unaligned start":  # sizes divisible by 16, a start 4 bytes off, a 2**40 seed
        buf = rnd(2 * 3 * 16 * 256 + 1, dtype=torch.float32)
        q = buf[1:].view(2, 3, 16, 256)
        return q, q, q, dict(left=16, right=-1, key_padding_mask=torch.ones(2, 16, dtype=torch.bool),
                             dropout_p=0.2, seed=2**40)
    if name == "d20 view of wider rows":  # head dim 20, rows 32 apart: aligned, yet copied (kernel_head_dim 24)
        q, k, v = (rnd(1, 2, 9, 32, dtype=torch.float16)[..., :20] for _ in range(3))
        return q, k, v, dict(left=-1, right=-1, key_padding_mask=None, dropout_p=0.0, seed=5)
    if name == "huge windows":  # bounds past int32 (Triton would type them i64): clamped to the problem
        q, k, v = rnd(1, 2, 33, 64, dtype=torch.float16), rnd(1, 2, 20, 64, dtype=torch.float16), \
            rnd(1, 2, 20, 64, dtype=torch.float16)
        return q, k, v, dict(left=2**40, right=2**33, key_padding_mask=None, dropout_p=0.0, seed=3)
    raise KeyError(name)


@pytest.mark.parametrize("case", ["d40 odd lengths ones", "packed qkv gqa", "d256 fp32 unaligned start",
                                  "d20 view of wider rows", "huge windows"])
def test_launches_use_the_compiled_specialization(monkeypatch, case):
    import torch

    import leedl_fast.kernels.attention as A
    from leedl_fast.kernels.attention import attention_bwd, attention_fwd

    q, k, v, kw = _case(case)
    launches = record_launches(monkeypatch, A, _KERNELS)
    scale = q.shape[-1] ** -0.5
    attention_fwd(q, k, v, scale=scale, **kw)
    o, do = torch.randn_like(q), torch.randn_like(q)
    lse = torch.zeros(q.shape[:3])
    attention_bwd(do, q, k, v, o, lse, scale=scale, **kw)
    assert [fn.fn.__name__ for fn, _, _ in launches] == list(_KERNELS)

    assert_launches_compiled(launches, [c for arch in ("sm80", "sm90") for padded in (False, True)
                                        for c in _configs(arch, padded)])
    # The head dim the kernels run is a multiple of 8 (kernel_head_dim): the compiled code's loads are
    # whole 16-byte vectors, whatever D the caller has.
    assert all(kwargs["HEAD_DIM"] % 8 == 0 and kwargs["HEAD_DIM"] >= q.shape[-1] for _, _, kwargs in launches)
    if case == "d20 view of wider rows":  # copied with zero columns 20..23, which the kernels read
        args = launches[0][1]
        assert all(a.data_ptr() != t.data_ptr() for a, t in zip(args[:3], (q, k, v)))
        assert launches[0][2]["HEAD_DIM"] == 24
    if case == "packed qkv gqa":  # aligned inputs are not copied
        args = launches[0][1]
        assert [a.data_ptr() for a in args[:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]

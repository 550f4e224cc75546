"""The generic trainer behind ``leedl-fast train``: seeds, data, loop, metrics, checkpoints, torchrun.

A *recipe* (see ``leedl_fast/<family>/recipe.py``) says what to build and how
one step trains; this module does everything around it:

* seeds Python, NumPy and torch from ``--seed`` (the same seed on every rank for
  building models and data, then a per-rank seed derived from it for the steps);
* a ``DataLoader`` over ``recipe.dataset(args)`` with a seeded sampler (a
  ``DistributedSampler`` that can start mid-epoch; ``set_epoch`` each epoch), so
  the order of examples is a function of (seed, epoch) alone;
* ``--steps`` calls of ``recipe.train_step`` with a tqdm bar showing the running
  losses;
* ``metrics.csv`` (step and every loss), ``loss.png``, ``results.json`` and
  ``checkpoint.pt`` in ``--out``;
* checkpoints every ``--checkpoint-every`` steps and at the end, written
  atomically (``leedl_fast.checkpoint``), holding the models, the optimisers,
  ``recipe.state_dict()``, the step, every rank's RNG states and the position in
  the data (examples consumed in the epoch), so ``--resume`` continues a run to the
  very same weights as a run that was never interrupted;
* under ``torchrun`` (``WORLD_SIZE`` > 1): ``init_process_group`` (nccl on GPUs,
  gloo on the CPU), one device per process, models with trainable parameters
  wrapped in ``DistributedDataParallel``; only rank 0 writes files.
  ``--batch-size`` is per process: the global batch is ``batch_size * world_size``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import inspect
import io
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from . import checkpoint as ckpt
from ._checks import check_seed

__all__ = [
    "UsageError", "DistInfo", "train", "sample", "seed_everything", "rng_state", "set_rng_state",
    "resolve_device", "prepare_out_dir", "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
# Arguments whose change on --resume makes the run differ from an uninterrupted one (a recipe adds its
# own in ``args_that_change_results``, e.g. "steps" where the learning-rate schedule or the data depend on it).
_ARG_KEYS_THAT_CHANGE_RESULTS = ("seed", "batch_size", "lr")


class UsageError(Exception):
    """Something the user asked for that cannot be done; the message is one line (CLI exit status 2)."""


# Picture formats a recipe's ``sample`` may write through ``leedl_fast.digits.save_grid`` (matplotlib's imsave).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg", ".tif", ".tiff", ".webp")


def _check_seed(args) -> int:
    try:
        return check_seed(getattr(args, "seed", 0), "--seed")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------- seeds and RNG states

def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _derived_seed(seed: int, rank: int) -> int:
    # A well-mixed seed per (run seed, rank) for the training steps' randomness.
    return int(np.random.SeedSequence([seed % 2**63, rank]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**32], dtype=np.uint64)) % 2**63)


def rng_state(device: torch.device) -> dict:
    """This process's RNG states, as tensors and plain values (storable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------- devices and processes

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to ``n`` for the block and restored after it (``None``: left as is)."""
    if n is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def resolve_device(spec: str | None, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``auto`` (the default), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun ``cuda`` means ``cuda:LOCAL_RANK``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise UsageError(f"--device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA device is available on this machine")
    index = device.index if device.index is not None else (local_rank if distributed else 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device cuda:{index}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


def _setup_distributed(device_spec: str | None) -> tuple[DistInfo, torch.device]:
    world = _env_int("WORLD_SIZE", 1)
    info = DistInfo(rank=_env_int("RANK", 0), world_size=world, local_rank=_env_int("LOCAL_RANK", 0))
    if world <= 1:
        return DistInfo(), resolve_device(device_spec)
    device = resolve_device(device_spec, info.local_rank, distributed=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        info.initialized_here = True
    return info, device


# --------------------------------------------------------------------------- data

class _ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` (one replica when not distributed) that can start part-way into an epoch.

    The order of an epoch depends on (seed, epoch) only; ``skip`` drops the
    examples the interrupted run had already consumed.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def _rank_position(per_rank: int, old_world: int, rank: int, world: int) -> int:
    """This rank's position in the epoch after ``old_world`` ranks consumed ``per_rank`` examples each.

    ``DistributedSampler`` deals the epoch's order out round-robin (rank r gets positions r, r + W, ...),
    so those ranks consumed exactly its first ``per_rank * old_world`` positions; of them, rank ``rank`` of
    ``world`` would have held the positions p = rank (mod world) below that count."""
    consumed = per_rank * old_world
    return max(0, -(-(consumed - rank) // world))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(b, device) for b in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


# --------------------------------------------------------------------------- output files

def prepare_out_dir(out: str | os.PathLike, create: bool = True) -> Path:
    """``out`` as a folder; with ``create``, made (with its parents) and checked to be writable, so that a
    folder files cannot be written to is a ``UsageError`` now, not an ``OSError`` at the first checkpoint."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot create the directory ({exc.strerror or exc})") from None
        try:  # os.access is not enough: root passes it on a read-only filesystem, and ACLs are not seen
            fd, probe = tempfile.mkstemp(prefix=".tmp-write-test.", dir=out)
        except OSError as exc:
            raise UsageError(f"--out {out}: cannot write files there ({exc.strerror or exc})") from None
        os.close(fd)
        os.unlink(probe)
    return out


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:  # an interrupted or failed write leaves the previous file and no partial one
        _remove_quietly(tmp)
        raise


def _write_metrics(path: Path, history: list[tuple[int, dict]]) -> None:
    keys: list[str] = []
    for _, losses in history:
        keys.extend(k for k in losses if k not in keys)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", *keys])
    for step, losses in history:
        w.writerow([step, *(repr(float(losses[k])) if k in losses else "" for k in keys)])
    _write_text_atomic(path, buf.getvalue())


def _plot_losses(path: Path, history: list[tuple[int, dict]], title: str) -> bool:
    """Loss against step (raw, faint; and a running mean), one line per loss. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys: list[str] = []
    for _, losses in history:
        keys.extend(k for k in losses if k not in keys)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, k in enumerate(keys):
        pts = [(s, float(l[k])) for s, l in history if k in l and math.isfinite(float(l[k]))]
        if not pts:
            continue
        xs = np.array([p[0] for p in pts])
        ys = np.array([p[1] for p in pts])
        color = f"C{i % 10}"
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        window = max(1, len(ys) // 50)
        smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
        ax.plot(xs[window - 1:], smooth, color=color, label=k, linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if keys:
        ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    finally:
        plt.close(fig)
    return True


def _plain_number(value):
    """A metric as JSON keeps it: a bool, int or float as itself, a NumPy scalar or one-element tensor as the
    Python number it holds (json.dumps would write its str); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    return value


def _strict_json(value):
    """``value`` with NaN and infinities as None: JSON has no such numbers (json.dumps would write the
    non-standard NaN and Infinity, which most readers other than Python's refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _json_args(args: argparse.Namespace) -> dict:
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
    return out


def _mismatch(exc: Exception) -> str:
    """The informative line of ``load_state_dict``'s error (its first line only names the class)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
    more = len(lines) - 2
    return detail[:300] + (f" (and {more} more)" if more > 0 else "")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself when unwrapped)."""
    return getattr(model, "module", model)


def recipe_arg(args, name: str, default):
    """``args.name`` when the CLI set it, else a recipe's ``default`` (recipes read optional knobs so)."""
    value = getattr(args, name, None)
    return default if value is None else value


# --------------------------------------------------------------------------- training

def _agree(flag: bool, info: DistInfo) -> bool:
    """True on every rank when rank 0 says so (ranks must stop at the same step)."""
    if not info.active:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())

def _load_states(payload: dict, models: dict, optimizers: dict, recipe, path: Path) -> None:
    saved_models, saved_opts = payload.get("models", {}), payload.get("optimizers", {})
    if set(saved_models) != set(models) or set(saved_opts) != set(optimizers):
        raise ckpt.CheckpointError(
            f"checkpoint {path} holds models {sorted(saved_models)} and optimisers {sorted(saved_opts)}, "
            f"but this recipe builds {sorted(models)} and {sorted(optimizers)}")
    for name, model in models.items():
        try:
            unwrap(model).load_state_dict(saved_models[name])
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit model {name!r}: {_mismatch(exc)}") from None
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(saved_opts[name])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit optimiser {name!r}: {exc}") from None
    recipe.load_state_dict(payload.get("recipe_state", {}))


def _resume_path(args: argparse.Namespace, out: Path) -> Path | None:
    resume = getattr(args, "resume", None)
    if not resume:
        return None
    if resume is True or resume == "auto":
        return out / CHECKPOINT_NAME
    return Path(resume)


def train(recipe, args: argparse.Namespace, *, log: Callable[[str], None] | None = None,
          progress: bool | None = None) -> dict:
    """Run ``recipe`` for ``args.steps`` steps; returns the results (losses, the recipe's metrics, files).

    ``args`` needs ``steps, batch_size, lr, seed, device, out``; optional
    ``resume`` (True for ``out/checkpoint.pt``, or a path) and
    ``checkpoint_every`` (default: a tenth of the steps).  Raises ``UsageError``
    or ``CheckpointError`` for mistakes of the user.
    """
    info, device = _setup_distributed(getattr(args, "device", None))
    try:
        return _train(recipe, args, info, device, log, progress)
    finally:
        if info.initialized_here and dist.is_initialized():
            # DistributedDataParallel sits in a reference cycle, so its reducer, which holds the process
            # group, outlives _train until the garbage collector runs: left alone, possibly during the
            # interpreter's teardown, where destroying gloo's work objects (tensors that need the GIL)
            # can abort the process ("terminate called without an active exception").  Collect now,
            # so that destroy_process_group frees the group while the interpreter is whole.
            gc.collect()
            dist.destroy_process_group()


def _train(recipe, args, info: DistInfo, device: torch.device, log, progress) -> dict:
    main = info.is_main
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    say = log if main else (lambda msg: None)
    steps = int(args.steps)
    if steps < 0:
        raise UsageError(f"--steps must be >= 0, got {steps}")
    if int(args.batch_size) < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    lr = float(getattr(args, "lr", 1e-3))
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive number, got {lr}")
    _check_seed(args)
    max_seconds = getattr(args, "max_seconds", None)
    if max_seconds is not None and not float(max_seconds) >= 0:
        raise UsageError(f"--max-seconds must be >= 0, got {max_seconds}")
    every = getattr(args, "checkpoint_every", None)
    every = max(1, steps // 10) if every is None else int(every)
    if every < 1:
        raise UsageError(f"--checkpoint-every must be >= 1, got {every}")
    out = prepare_out_dir(args.out, create=False)
    resume_from = _resume_path(args, out)
    loaded = None
    if resume_from is not None:  # read before --out is made: a checkpoint that is not there leaves nothing behind
        header, payload = ckpt.load(resume_from, recipe=recipe.name)  # every rank reads it (a shared filesystem)
        loaded = (header, payload)
    out = prepare_out_dir(out, create=main)
    args.out = out
    if loaded is None and main and (out / CHECKPOINT_NAME).exists():
        say(f"note: {out / CHECKPOINT_NAME} exists and will be overwritten (pass --resume to continue it)")

    # Models and data: the same seed on every rank (DDP also broadcasts rank 0's weights).
    seed = int(args.seed)
    seed_everything(seed)
    models = recipe.build(args, device)
    optimizers = recipe.optimizers(models, args)
    dataset = recipe.dataset(args)
    sampler = _ResumableSampler(dataset, info.world_size, info.rank, seed)
    per_epoch = len(sampler) // args.batch_size
    if per_epoch == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the data each process gets "
                         f"({len(sampler)} examples of {len(dataset)})")
    loader_gen = torch.Generator()
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        generator=loader_gen, num_workers=0, pin_memory=device.type == "cuda")

    # The position in the data is the number of examples this rank consumed in the epoch, so a resumed
    # run with another --batch-size (or number of processes, _rank_position) continues where it stopped.
    step, epoch, in_epoch = 0, 0, 0
    history: list[tuple[int, dict]] = []
    seed_everything(_derived_seed(seed, info.rank))
    if loaded is not None:
        header, payload = loaded
        _load_states(payload, models, optimizers, recipe, resume_from)
        step = int(payload["step"])
        data = payload.get("data", {})
        epoch = int(data.get("epoch", 0))
        # Older checkpoints counted batches (of their own batch size) instead of examples.
        in_epoch = int(data.get("sample_in_epoch",
                                int(data.get("batch_in_epoch", 0)) * int(data.get("batch_size", args.batch_size))))
        in_epoch = _rank_position(in_epoch, int(data.get("world_size", 1)), info.rank, info.world_size)
        history = [(int(s), dict(l)) for s, l in payload.get("history", [])]
        saved_args = payload.get("args", {})
        keys = dict.fromkeys((*_ARG_KEYS_THAT_CHANGE_RESULTS, *getattr(recipe, "args_that_change_results", ())))
        now = _json_args(args)
        changed = [k for k in keys if k in saved_args and saved_args[k] != now.get(k)]
        if data.get("world_size", 1) != info.world_size:
            changed.append(f"world size ({data.get('world_size')} -> {info.world_size})")
        if changed:
            say("warning: resuming with other " + ", ".join(changed) + " than the checkpoint was written with; "
                "the run will not reproduce an uninterrupted one")
        rngs = payload.get("rng", [])
        if info.rank < len(rngs) and data.get("world_size", 1) == info.world_size:
            set_rng_state(rngs[info.rank], device)
        else:
            seed_everything(_derived_seed(seed, info.rank) + step)
        say(f"resumed {recipe.name} from {resume_from} at step {step}")

    if info.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers (BatchNorm statistics) stay per rank during training: GAN steps call a model several times
        # before one backward, which forward-time buffer broadcasts break.  Newer torch names the switch
        # forward_sync_buffers (still syncing once at construction, as broadcast_buffers=False did not).
        params = inspect.signature(DDP.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        ddp_kwargs = {**no_sync, **dict(getattr(recipe, "ddp_options", {}) or {})}
        models = {
            k: (DDP(m, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kwargs)
                if any(p.requires_grad for p in m.parameters()) else m)
            for k, m in models.items()
        }

    def save_checkpoint() -> None:
        rng = rng_state(device)
        if info.active:
            gathered: list = [None] * info.world_size
            dist.all_gather_object(gathered, {k: (v if not isinstance(v, torch.Tensor) else v.cpu())
                                              for k, v in rng.items()})
            rngs = gathered
        else:
            rngs = [rng]
        if not main:
            return
        payload = {
            "step": step,
            "models": {k: unwrap(m).state_dict() for k, m in models.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "recipe_state": recipe.state_dict(),
            "rng": rngs,
            "data": {"epoch": epoch, "sample_in_epoch": in_epoch, "world_size": info.world_size,
                     "batch_size": int(args.batch_size), "seed": seed},
            "history": [[s, l] for s, l in history],
            "args": _json_args(args),
        }
        ckpt.save(out / CHECKPOINT_NAME, payload, recipe=recipe.name,
                  extra_header={"step": step, "world_size": info.world_size})
        _write_metrics(out / "metrics.csv", history)

    t0 = time.time()
    bar = None
    if main:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=min(step, steps), desc=recipe.name, dynamic_ncols=True,
                       disable=(None if progress is None else not progress), file=sys.stderr)
        except ImportError:
            bar = None
    running: dict[str, float] = {}
    last_logged = time.time()
    try:
        while step < steps:
            sampler.set_epoch(epoch)
            sampler.skip = in_epoch
            loader_gen.manual_seed(seed + epoch)  # the loader's own draws never touch the global RNG
            for batch in loader:
                batch = _to_device(batch, device)
                losses = recipe.train_step(models, optimizers, batch, step, args)
                losses = {k: float(v) for k, v in (losses or {}).items()}
                step += 1
                in_epoch += args.batch_size
                history.append((step, losses))
                for k, v in losses.items():
                    running[k] = v if k not in running else 0.9 * running[k] + 0.1 * v
                if bar is not None and not bar.disable:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()}, refresh=False)
                    bar.update(1)
                elif main and (time.time() - last_logged > 10 or step == steps):
                    last_logged = time.time()
                    say(f"{recipe.name} step {step}/{steps} " + " ".join(f"{k}={v:.4g}" for k, v in running.items()))
                over_time = max_seconds is not None and _agree(time.time() - t0 >= max_seconds, info)
                if step % every == 0 or step == steps or over_time:
                    save_checkpoint()
                if over_time and step < steps:
                    say(f"{recipe.name}: stopped at step {step} of {steps} after {time.time() - t0:.0f} s "
                        f"(--max-seconds {max_seconds:g}); --resume continues")
                    steps = step
                if step >= steps:
                    break
            else:
                epoch += 1
                in_epoch = 0
    finally:
        if bar is not None:
            bar.close()
    if step == 0 or (loaded is not None and int(loaded[1]["step"]) >= steps):
        save_checkpoint()  # nothing trained: still leave a loadable checkpoint at the end
    wall = time.time() - t0

    results: dict = {}
    if main:
        files = [str(out / CHECKPOINT_NAME), str(out / "metrics.csv")]
        if _plot_losses(out / "loss.png", history, f"{recipe.name}: training loss"):
            files.append(str(out / "loss.png"))
        else:
            say("note: matplotlib is not installed; no loss.png (pip install 'leedl_fast[demo]')")
        tail = history[-max(1, len(history) // 10):]
        final = {}
        for k in dict.fromkeys(k for _, l in tail for k in l):
            vals = [l[k] for _, l in tail if k in l]
            final[k] = float(sum(vals) / len(vals))
        metrics = recipe.finish({k: unwrap(m) for k, m in models.items()}, args, out) or {}
        results = {
            "recipe": recipe.name, "steps": step, "steps_requested": int(args.steps), "world_size": info.world_size, "device": str(device),
            "seed": seed, "batch_size": int(args.batch_size), "train_seconds": round(wall, 3),
            "final_losses": final, "metrics": {k: _plain_number(v) for k, v in metrics.items()},
        }
        results["files"] = files + sorted(str(p) for p in out.glob("*.png") if str(p) not in files)
        _write_text_atomic(out / "results.json",
                           json.dumps(_strict_json(results), indent=1, default=str, allow_nan=False))
        say(f"{recipe.name}: {step} steps in {wall:.1f} s; "
            + " ".join(f"{k}={v:.4g}" for k, v in final.items()) + f"; files in {out}")
    if info.active:
        dist.barrier()
    return results


# --------------------------------------------------------------------------- sampling

def sample_suffix(recipe) -> str:
    """The suffix of the file a recipe (class or instance) samples into by default, also inside an --out that
    is a folder: its ``sample_suffix``, else the first of its ``sample_suffixes``, else ".png"."""
    return getattr(recipe, "sample_suffix", None) or (getattr(recipe, "sample_suffixes", None) or (".png",))[0]


def sample(recipe, args: argparse.Namespace, payload: dict, checkpoint_path: Path) -> Path:
    """Build the recipe's models, load them from ``payload`` and let the recipe write ``args.out``."""
    device = resolve_device(getattr(args, "device", None))
    seed_everything(_check_seed(args))
    out = Path(args.out)
    suffixes = getattr(recipe, "sample_suffixes", None)
    if out.is_dir():
        out = out / f"{recipe.name}_samples{sample_suffix(recipe)}"
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise UsageError(f"--out {out}: {recipe.name} writes a picture; use a name ending in {', '.join(suffixes)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create its folder ({exc.strerror or exc})") from None
    check = getattr(recipe, "check_sample_args", None)
    if callable(check):
        check(args)
    models = recipe.build(args, device)
    saved = payload.get("models", {})
    if set(saved) != set(models):
        raise ckpt.CheckpointError(f"checkpoint {checkpoint_path} holds models {sorted(saved)}, "
                                   f"but this recipe builds {sorted(models)}")
    for name, model in models.items():
        try:
            model.load_state_dict(saved[name])
        except RuntimeError as exc:
            raise ckpt.CheckpointError(
                f"checkpoint {checkpoint_path} does not fit model {name!r}: {_mismatch(exc)}") from None
        model.eval()
    recipe.load_state_dict(payload.get("recipe_state", {}))
    args.out = out
    seed_everything(int(args.seed))
    with torch.no_grad():
        recipe.sample(models, args, out)
    return out

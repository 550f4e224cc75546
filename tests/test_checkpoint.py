"""leedl_fast.checkpoint: atomic writes, and every way a file can be unusable gives a one-line CheckpointError."""
from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import hashlib
import io
import json
import multiprocessing
import os
import random
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from leedl_fast import checkpoint as ckpt
from leedl_fast.training import rng_state

REPO = Path(__file__).resolve().parents[1]


def _payload(value: float) -> dict:
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(value)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"step": int(value), "models": {"net": net.state_dict()}, "optimizers": {"net": opt.state_dict()},
            "rng": [{"python": random.getstate(), "torch": torch.get_rng_state()}],
            "history": [[1, {"loss": 0.5}]], "nested": {"a": [1, 2.5, "x", None, True]}}


def _age(path: Path) -> None:
    """Make ``path`` look untouched for longer than ``STALE_AFTER``."""
    then = time.time() - ckpt.STALE_AFTER - 60
    os.utime(path, (then, then))


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b) and vars(a).keys() == vars(b).keys()
        for k in vars(a):
            _assert_same(getattr(a, k), getattr(b, k))
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_roundtrip_keeps_every_value_and_header(tmp_path):
    payload = _payload(1.0)
    path = ckpt.save(tmp_path / "c.pt", payload, recipe="toy", extra_header={"step": 1})
    header, loaded = ckpt.load(path, recipe="toy")
    _assert_same(payload, loaded)
    assert header["recipe"] == "toy" and header["version"] == ckpt.FORMAT_VERSION and header["step"] == 1
    assert ckpt.read_header(path) == header
    assert path.read_bytes()[:8] == ckpt.MAGIC
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_file_mode_follows_the_umask_without_changing_it(tmp_path, monkeypatch, mask):
    """The umask is read, not set and restored (that changes it for other threads meanwhile), where the
    system shows it."""
    old = os.umask(mask)
    try:
        if os.path.exists("/proc/self/status"):
            monkeypatch.setattr(os, "umask", lambda m: pytest.fail("save changed the umask"))
        path = ckpt.save(tmp_path / "c.pt", {"step": 1}, recipe="toy")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_failure_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="toy")
    before = path.read_bytes()
    calls = []

    def half_then_fail(f, data):
        calls.append(len(data))
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="No space") as info:
        ckpt.save(path, _payload(2.0), recipe="toy")
    # still an OSError, and a CheckpointError with one line for the CLI to print
    assert isinstance(info.value, ckpt.CheckpointError)
    assert str(info.value) == f"cannot write checkpoint {path}: No space left on device"
    assert calls, "the failing writer was not used"
    assert path.read_bytes() == before
    _, loaded = ckpt.load(path, recipe="toy")
    assert loaded["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_process_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    """A real kill (SIGKILL, no clean-up) while the new file is half written."""
    path = tmp_path / "c.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from leedl_fast import checkpoint as ckpt
        ckpt.save({str(path)!r}, {{"step": 1, "w": torch.ones(1000)}}, recipe="toy")
        def half_then_die(f, data):
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        ckpt._write_all = half_then_die
        ckpt.save({str(path)!r}, {{"step": 2, "w": torch.zeros(1000)}}, recipe="toy")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name != "c.pt"]
    assert leftovers and all(p.name.startswith(".tmp-c.pt.") for p in leftovers)
    _, loaded = ckpt.load(path, recipe="toy")
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    for p in leftovers:  # the dead writer's temporary file, once it has not been written to for a while ...
        _age(p)
    ckpt.save(path, {"step": 3}, recipe="toy")  # ... is cleared by the next save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert ckpt.load(path)[1]["step"] == 3


@pytest.mark.parametrize("keep", ["1", "7", "11", "header", "payload_half", "payload_minus_1"])
def test_truncated_file(tmp_path, keep):
    path = ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="toy")
    data = path.read_bytes()
    (n,) = struct.unpack("<I", data[8:12])
    cut = {"1": 1, "7": 7, "11": 11, "header": 12 + n // 2, "payload_half": 12 + n + (len(data) - 12 - n) // 2,
           "payload_minus_1": len(data) - 1}[keep]
    path.write_bytes(data[:cut])
    with pytest.raises(ckpt.CheckpointError, match="truncated") as info:
        ckpt.load(path, recipe="toy")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("where", ["payload_start", "payload_middle", "payload_end", "header_digest"])
def test_corrupt_file(tmp_path, where):
    path = ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="toy")
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<I", data[8:12])
    if where == "header_digest":
        head = json.loads(data[12:12 + n])
        digest = head["payload_sha256"]
        head["payload_sha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]
        new_head = json.dumps(head, sort_keys=True).encode()
        data = data[:8] + struct.pack("<I", len(new_head)) + new_head + data[12 + n:]
    else:
        start = 12 + n
        i = {"payload_start": start, "payload_middle": (start + len(data)) // 2, "payload_end": len(data) - 1}[where]
        data[i] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt \(checksum mismatch\)"):
        ckpt.load(path)


def test_corrupt_header(tmp_path):
    path = ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="toy")
    data = bytearray(path.read_bytes())
    data[12] = ord("!")  # the header's opening brace
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load(path)


@pytest.mark.parametrize("content", ["torch_save", "random", "empty", "text"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.pt"
    if content == "torch_save":
        torch.save({"w": torch.ones(3)}, path)
    elif content == "random":
        path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    elif content == "text":
        path.write_text("hello, I am not a checkpoint\n")
    else:
        path.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="not a leedl_fast checkpoint"):
        ckpt.load(path)


def test_other_recipe_is_refused(tmp_path):
    path = ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="gan")
    with pytest.raises(ckpt.CheckpointError, match="belongs to the recipe 'gan', not 'diffusion'"):
        ckpt.load(path, recipe="diffusion")
    assert ckpt.load(path, recipe="gan")[1]["step"] == 1


def test_newer_format_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", ckpt.FORMAT_VERSION + 1)
    path = ckpt.save(tmp_path / "c.pt", {"step": 1}, recipe="toy")
    monkeypatch.undo()
    with pytest.raises(ckpt.CheckpointError, match="format version 2; this leedl_fast reads up to 1"):
        ckpt.load(path)


@pytest.mark.parametrize("version", [True, 0, -1, "1", None])
def test_impossible_format_version_is_refused(tmp_path, monkeypatch, version):
    """The digest covers the payload only; the header's version is checked for what it can be."""
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", version)
    path = ckpt.save(tmp_path / "c.pt", {"step": 1}, recipe="toy")
    monkeypatch.undo()
    with pytest.raises(ckpt.CheckpointError, match="corrupt \\(format version"):
        ckpt.load(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def _write_raw(path: Path, payload) -> None:
    """A checkpoint file as documented, whatever the payload (``save`` would refuse some)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    head = json.dumps({"format": "leedl_fast.checkpoint", "version": 1, "recipe": "toy", "payload_bytes": len(body),
                       "payload_sha256": hashlib.sha256(body).hexdigest()}).encode()
    path.write_bytes(ckpt.MAGIC + struct.pack("<I", len(head)) + head + body)


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    with pytest.raises(ValueError, match=r"payload\['obj'\] is a .*_Evil"):
        ckpt.save(tmp_path / "c.pt", {"step": 1, "obj": _Evil()}, recipe="toy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, named", [(_Evil(), "GLOBAL posix.system"), (np.float64(1), "GLOBAL numpy")])
def test_unloadable_file_error_is_one_readable_line(tmp_path, value, named):
    path = tmp_path / "c.pt"
    _write_raw(path, {"step": 1, "obj": value})  # written by something else: save refuses such a payload
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely") as info:
        ckpt.load(path)
    message = str(info.value)  # torch's long, ANSI-coloured message, cut down to the line naming what it refused
    assert "\x1b" not in message and "\n" not in message and "\t" not in message
    assert named in message and "Please use" not in message


def test_missing_and_directory(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nope.pt")
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        ckpt.load(tmp_path)


def test_extra_header_cannot_replace_the_headers_own_keys(tmp_path):
    path = ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="toy", extra_header={"step": 3})
    header = ckpt.read_header(path)
    assert set(header) - {"step"} == ckpt._HEADER_KEYS           # the list of reserved keys is the header's
    for key in sorted(ckpt._HEADER_KEYS):
        with pytest.raises(ValueError, match=key):
            ckpt.save(tmp_path / "c.pt", _payload(2.0), recipe="toy", extra_header={key: 3})
    assert ckpt.read_header(path) == header                      # nothing was written


def test_only_this_files_dead_temporaries_are_removed(tmp_path):
    dead, live = tmp_path / ".tmp-c.pt.ab_12xyz", tmp_path / ".tmp-c.pt.cd_34xyz"
    other = tmp_path / ".tmp-c.pt.bak.ab_12xyz"
    for f in (dead, live, other):
        f.write_bytes(b"partial")
    _age(dead)
    _age(other)
    ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="toy")
    assert not dead.exists()
    assert live.exists()                                         # another writer may still be at work on it
    assert other.exists()                                        # "c.pt.bak"'s, not ours to remove


def _concurrent_writer(path: str, writer: int, saves: int, barrier, errors) -> None:
    barrier.wait()
    failed = []
    for k in range(saves):
        try:
            ckpt.save(path, {"writer": writer, "k": k, "w": torch.full((300_000,), float(writer))}, recipe="toy")
        except Exception as exc:
            failed.append(f"writer {writer}, save {k}: {type(exc).__name__}: {exc}")
    errors.put(failed)


def test_concurrent_writers_all_succeed(tmp_path):
    """Processes saving to one path at once: every save succeeds and the file is one of them, whole."""
    path, writers, saves = tmp_path / "c.pt", 3, 6
    ctx = multiprocessing.get_context("spawn")
    barrier, errors = ctx.Barrier(writers), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_writer, args=(str(path), i, saves, barrier, errors))
             for i in range(writers)]
    for p in procs:
        p.start()
    failed = [e for _ in procs for e in errors.get(timeout=300)]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * writers
    assert failed == []
    _, loaded = ckpt.load(path, recipe="toy")
    assert loaded["writer"] in range(writers)
    assert torch.equal(loaded["w"], torch.full((300_000,), float(loaded["writer"])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # each writer renamed its own temporary file


def test_temporary_removed_by_someone_else_is_written_again(tmp_path, monkeypatch):
    path = ckpt.save(tmp_path / "c.pt", {"step": 1}, recipe="toy")
    write_all, removed = ckpt._write_all, []

    def remove_once(f, data):
        write_all(f, data)
        if not removed:  # as an older leedl_fast or a clean-up script might, before the rename
            removed.extend(p for p in tmp_path.iterdir() if p.name.startswith(".tmp-"))
            for p in removed:
                p.unlink()

    monkeypatch.setattr(ckpt, "_write_all", remove_once)
    ckpt.save(path, {"step": 2}, recipe="toy")
    assert len(removed) == 1
    assert ckpt.load(path)[1]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_written_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "_CHUNK", 1000)  # every chunk's write refreshes the temporary file's mtime
    payload = {"w": torch.randn(10_000), "step": 3}
    _assert_same(ckpt.load(ckpt.save(tmp_path / "c.pt", payload, recipe="toy"))[1], payload)


_Pair = collections.namedtuple("_Pair", "a b")


class _Colour(enum.IntEnum):
    RED = 1


class _Tensorish(torch.Tensor):
    pass


_REFUSED = {
    "numpy.float64": np.float64(0.25), "numpy.int64": np.int64(3), "numpy.bool_": np.bool_(True),
    "numpy.ndarray": np.zeros(2), "numpy.str_": np.str_("a"), "Path": Path("a"), "slice": slice(1, 2),
    "range": range(3), "frozenset": frozenset({1}), "defaultdict": collections.defaultdict(int, a=1),
    "namedtuple": _Pair(1, 2), "IntEnum": _Colour.RED,
    "datetime": datetime.datetime(2024, 1, 1), "Ellipsis": ..., "type": int, "module": torch.nn.Linear(2, 2),
    "tensor_subclass": torch.ones(2).as_subclass(_Tensorish), "Generator": torch.Generator(), "object": object(),
}


@pytest.mark.parametrize("kind", sorted(_REFUSED))
def test_payload_load_cannot_read_is_refused_before_writing(tmp_path, kind):
    value = _REFUSED[kind]
    target = tmp_path / "sub" / "c.pt"
    with pytest.raises(ValueError, match=r"^payload\['metrics'\]\['acc'\] is a ") as info:
        ckpt.save(target, {"step": 1, "metrics": {"acc": value}}, recipe="toy")
    assert type(value).__qualname__ in str(info.value)
    assert not target.parent.exists()                            # nothing written, not even the folder
    buf = io.BytesIO()                                           # and torch's weights_only load does refuse it
    torch.save({"x": value}, buf)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def _tensor_with_attribute():
    t = torch.arange(3.0)
    t.note = {"unit": "m"}
    return t


_shared = [1, 2]
_cycle: list = [1]
_cycle.append(_cycle)
_ALLOWED = {
    "str": "x", "int": 2**70, "float": 0.5, "bool": True, "None": None, "bytes": b"ab", "bytearray": bytearray(b"ab"),
    "complex": 1 + 2j, "list": [1, [2]], "tuple": (1, (2,)), "set": {1, 2},
    "dict_keys": {1: "a", (2, "b"): None, 0.5: 1},
    "OrderedDict": collections.OrderedDict(a=1), "Counter": collections.Counter("aab"),
    "tensor": torch.arange(6).reshape(2, 3), "bfloat16": torch.ones(2, dtype=torch.bfloat16),
    "view": torch.arange(10)[2:5], "sparse": torch.eye(2).to_sparse(),
    "Parameter": torch.nn.Parameter(torch.ones(2)), "tensor_attribute": _tensor_with_attribute(),
    "Size": torch.Size([2, 3]), "dtype": torch.float16, "device": torch.device("cpu"), "layout": torch.strided,
    "shared": [_shared, _shared], "rng_state": rng_state(torch.device("cpu")), "random_state": random.getstate(),
}


@pytest.mark.parametrize("kind", sorted(_ALLOWED))
def test_payload_load_can_read_is_saved(tmp_path, kind):
    value = _ALLOWED[kind]
    _, loaded = ckpt.load(ckpt.save(tmp_path / "c.pt", {"x": value}, recipe="toy"))
    if kind == "sparse":
        assert torch.equal(loaded["x"].to_dense(), value.to_dense())
    else:
        _assert_same(loaded["x"], value)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_payload_cycles_and_storages_are_saved(tmp_path):
    storage = torch.arange(4.0).untyped_storage()  # loads as a TypedStorage: compare the bytes
    _, loaded = ckpt.load(ckpt.save(tmp_path / "c.pt", {"cycle": _cycle, "storage": storage}, recipe="toy"))
    assert loaded["cycle"][1] is loaded["cycle"]
    assert bytes(loaded["storage"].untyped()) == bytes(storage)


@pytest.mark.parametrize("payload, where", [
    ({"h": [[1, {"loss": np.float32(1)}]]}, r"payload\['h'\]\[0\]\[1\]\['loss'\] is a numpy.float32"),
    ({"m": {frozenset({1}): 1}}, r"payload\['m'\] \(the key frozenset\(\{1\}\)\) is a frozenset"),
    ({"s": {1, PurePosixPath("a")}}, r"payload\['s'\] \(an element\) is a pathlib.*PurePosixPath"),
    ({"t": _tensor_with_attribute()}, None),
])
def test_payload_error_names_the_key_path(tmp_path, payload, where):
    if where is None:
        payload["t"].note = np.float64(1)
        where = r"payload\['t'\]\.note is a numpy.float64"
    with pytest.raises(ValueError, match="^" + where + ", which load"):
        ckpt.save(tmp_path / "c.pt", payload, recipe="toy")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("payload", [[1, 2], collections.defaultdict(int), None])
def test_payload_must_be_a_dict(tmp_path, payload):
    with pytest.raises(ValueError, match="payload must be a dict"):
        ckpt.save(tmp_path / "c.pt", payload, recipe="toy")
    assert list(tmp_path.iterdir()) == []


def test_extra_header_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="extra_header must be JSON-able"):
        ckpt.save(tmp_path / "c.pt", {"step": 1}, recipe="toy", extra_header={"when": datetime.date(2024, 1, 1)})
    assert list(tmp_path.iterdir()) == []


def test_symlinked_path_updates_its_target(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "run").mkdir()
    target, link = tmp_path / "big" / "ckpt.pt", tmp_path / "run" / "checkpoint.pt"
    ckpt.save(target, {"step": 1}, recipe="toy")
    link.symlink_to(target)
    assert ckpt.save(link, {"step": 2}, recipe="toy") == link
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert ckpt.load(target)[1]["step"] == 2 and ckpt.load(link)[1]["step"] == 2
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["ckpt.pt"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize("how", ["directory", "link_to_directory"])
def test_directory_at_the_path_is_refused_up_front(tmp_path, monkeypatch, how):
    (tmp_path / "d").mkdir()
    path = tmp_path / "d"
    if how == "link_to_directory":
        path = tmp_path / "c.pt"
        path.symlink_to(tmp_path / "d")

    def no_serialising(*args, **kwargs):
        raise AssertionError("serialised the payload before checking the path")

    monkeypatch.setattr(ckpt.torch, "save", no_serialising)
    with pytest.raises(ckpt.CheckpointError, match=f"^cannot write checkpoint {path}: it is a directory$"):
        ckpt.save(path, {"step": 1}, recipe="toy")
    monkeypatch.undo()
    assert (tmp_path / "d").is_dir() and list((tmp_path / "d").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"d", path.name})


@pytest.mark.parametrize("name", ["a" * 240, "b" * 250, "c" * 251 + ".pth", "é" * 127])
def test_long_file_name(tmp_path, name):
    assert len(os.fsencode(name)) in (240, 250, 255, 254)
    path = ckpt.save(tmp_path / name, {"step": 1}, recipe="toy")
    assert ckpt.load(path)[1]["step"] == 1
    # a dead temporary file of this name is removed, one of another long name that starts alike is kept
    prefix = ckpt._tmp_prefix(name)
    assert len(os.fsencode(prefix)) + 8 <= 255
    dead, other = tmp_path / (prefix + "ab_12xyz"), tmp_path / (ckpt._tmp_prefix(name[:-1] + "z") + "ab_12xyz")
    for f in (dead, other):
        f.write_bytes(b"partial")
        _age(f)
    ckpt.save(path, {"step": 2}, recipe="toy")
    assert ckpt.load(path)[1]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, other.name])


# --------------------------------------------------------------------------- allowlisted classes (add_safe_globals)

@dataclasses.dataclass
class _Point:
    x: int
    tags: list


@pytest.fixture
def clean_allowlist():
    """The global weights_only allowlist is empty before and after (other tests rely on torch's defaults)."""
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.clear_safe_globals()


def _load_reference(value):
    """What torch itself (no leedl_fast) reads back from a weights_only load of ``{"x": value}``."""
    buf = io.BytesIO()
    torch.save({"x": value}, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["x"]


_ALLOWLISTED = {
    "namedtuple": (_Pair(1, [2.5]), [_Pair]),
    "IntEnum": (_Colour.RED, [_Colour]),
    "dataclass": (_Point(3, ["a", torch.ones(2)]), [_Point]),
    "datetime": (datetime.datetime(2024, 1, 2, 3, 4, 5), [datetime.datetime]),
    "tuple_form": (_Pair(1, 2), [(_Pair, f"{_Pair.__module__}.{_Pair.__qualname__}")]),
    "class_object": (_Colour, [_Colour]),  # the class itself, not an instance
}


@pytest.mark.parametrize("kind", sorted(_ALLOWLISTED))
def test_allowlisted_class_is_saved_and_loaded(tmp_path, clean_allowlist, kind):
    value, allow = _ALLOWLISTED[kind]
    torch.serialization.add_safe_globals(allow)
    reference = _load_reference(value)  # torch's weights_only load accepts it
    _, loaded = ckpt.load(ckpt.save(tmp_path / "c.pt", {"step": 1, "m": {"x": value}}, recipe="toy"))
    assert type(loaded["m"]["x"]) is type(value) is type(reference)
    if kind == "dataclass":
        assert loaded["m"]["x"].x == 3 and loaded["m"]["x"].tags[0] == "a"
        assert torch.equal(loaded["m"]["x"].tags[1], value.tags[1])
    else:
        assert loaded["m"]["x"] == value == reference
    torch.serialization.clear_safe_globals()  # and without the allowlist the file is refused by load
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        ckpt.load(tmp_path / "c.pt")


def test_allowlist_context_manager_is_honoured(tmp_path, clean_allowlist):
    with torch.serialization.safe_globals([_Colour]):
        ckpt.save(tmp_path / "c.pt", {"c": _Colour.RED}, recipe="toy")
        assert ckpt.load(tmp_path / "c.pt")[1]["c"] is _Colour.RED
    with pytest.raises(ValueError, match=r"^payload\['c'\] is a .*_Colour, which load"):
        ckpt.save(tmp_path / "d.pt", {"c": _Colour.RED}, recipe="toy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize("case", ["other_class", "wrong_name", "bad_attribute", "half_allowlisted"])
def test_not_allowlisted_is_still_refused(tmp_path, clean_allowlist, case):
    value, allow, where = {
        "other_class": (_Colour.RED, [_Pair], r"payload\['x'\] is a .*_Colour, which load"),
        # a (class, name) entry whose name is not the one pickle writes: load would not find the class
        "wrong_name": (_Pair(1, 2), [(_Pair, "elsewhere.Pair")], r"payload\['x'\] is a .*_Pair, which load"),
        "bad_attribute": (_Point(1, [Path("a")]), [_Point], r"payload\['x'\]\.tags\[0\] is a pathlib"),
        # numpy.float64 pickles through numpy's scalar() and a dtype, which are not allowlisted
        "half_allowlisted": (np.float64(0.5), [np.float64], r"cannot read back"),
    }[case]
    torch.serialization.add_safe_globals(allow)
    with pytest.raises(Exception):  # the reference: torch's weights_only load refuses it too
        _load_reference(value)
    target = tmp_path / "sub" / "c.pt"
    with pytest.raises(ValueError, match=where):
        ckpt.save(target, {"x": value}, recipe="toy")
    assert not target.parent.exists()


def test_folder_that_cannot_be_made_is_a_checkpoint_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    target = blocker / "sub" / "c.pt"
    with pytest.raises(ckpt.CheckpointError, match=f"^cannot write checkpoint {target}: ") as info:
        ckpt.save(target, {"step": 1}, recipe="toy")
    assert isinstance(info.value, OSError) and "\n" not in str(info.value)
    assert blocker.read_text() == "x"

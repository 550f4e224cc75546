"""leedl_fast.checkpoint: atomic writes, and every way a file can be unusable gives a one-line CheckpointError."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from leedl_fast import checkpoint as ckpt

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


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
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


def test_failure_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="toy")
    before = path.read_bytes()
    calls = []

    def half_then_fail(f, data):
        calls.append(len(data))
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        ckpt.save(path, _payload(2.0), recipe="toy")
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
    ckpt.save(path, {"step": 3}, recipe="toy")  # the next save clears the dead writer's temporary file
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


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    path = ckpt.save(tmp_path / "c.pt", {"step": 1, "obj": _Evil()}, recipe="toy")
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        ckpt.load(path)


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


def test_only_this_files_stale_temporaries_are_removed(tmp_path):
    mine, other = tmp_path / ".tmp-c.pt.ab_12xyz", tmp_path / ".tmp-c.pt.bak.ab_12xyz"
    for f in (mine, other):
        f.write_bytes(b"partial")
    ckpt.save(tmp_path / "c.pt", _payload(1.0), recipe="toy")
    assert not mine.exists() and other.exists()                  # "c.pt.bak"'s writer may still be at work

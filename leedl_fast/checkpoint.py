"""Checkpoint files: written atomically, checked before they are trusted.

A checkpoint is one file::

    b"LEEDLFCK"                 8 bytes, the magic
    header length               4 bytes, little-endian unsigned
    header                      UTF-8 JSON: format version, recipe name, payload size and SHA-256, ...
    payload                     ``torch.save`` of a dict (models, optimisers, RNG states, ...)

``save`` writes the whole file to a temporary file in the same folder, flushes
and fsyncs it, then ``os.replace``-s it over the target (an atomic rename on
POSIX and Windows), so a process killed during a write leaves the previous
checkpoint untouched and loadable.  ``load`` checks the magic, the header, the
length (a truncated file) and the digest (a corrupt file) before unpickling, and
unpickles with ``weights_only=True``: a checkpoint holds tensors and plain
Python values only, so loading one runs no code from the file.

Everything a user can get wrong (a missing, foreign, truncated, corrupt or newer
file, or one written by another recipe) raises ``CheckpointError`` with a
one-line message; the CLI prints it and exits with status 2.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "FORMAT_VERSION", "MAGIC", "save", "load", "read_header"]

MAGIC = b"LEEDLFCK"
FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"  # temporary files: ".tmp-<name>.<random>"; a killed writer leaves one behind
_MAX_HEADER = 1 << 20


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line meant for the user."""


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every OS.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_all(f, data: bytes) -> None:
    """Write ``data`` to ``f``; a separate function so tests can make it fail half-way."""
    f.write(data)


# The keys ``save`` writes itself; ``extra_header`` may not replace them.
_HEADER_KEYS = frozenset({"format", "version", "recipe", "created", "leedl_fast", "torch", "payload_bytes",
                          "payload_sha256"})
_MKSTEMP_TAIL = re.compile(r"[A-Za-z0-9_]{8}")


def save(path: str | os.PathLike, payload: dict, *, recipe: str, extra_header: dict | None = None) -> Path:
    """Write ``payload`` (a dict of tensors and plain values) to ``path`` atomically.

    ``recipe`` names what wrote it; ``load(..., recipe=...)`` refuses a file of
    another recipe.  ``extra_header`` (JSON-able) is stored beside it and can be
    read with ``read_header`` without unpickling anything.  Returns the path.
    """
    path = Path(path)
    clash = sorted(set(extra_header or {}) & _HEADER_KEYS)
    if clash:
        raise ValueError(f"extra_header must not set the header's own keys {', '.join(clash)}")
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    from . import __version__

    header = {
        "format": "leedl_fast.checkpoint",
        "version": FORMAT_VERSION,
        "recipe": recipe,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "leedl_fast": __version__,
        "torch": torch.__version__,
        "payload_bytes": len(body),
        "payload_sha256": hashlib.sha256(body).hexdigest(),
        **(extra_header or {}),
    }
    head = json.dumps(header, sort_keys=True).encode("utf-8")
    # Earlier writers killed mid-write left their temporary files (mkstemp's: the prefix, then 8 characters):
    # remove them, and only them (not the temporary file of "<name>.bak", say).
    prefix = f"{_TMP_PREFIX}{path.name}."
    for stale in directory.iterdir():
        if not (stale.name.startswith(prefix) and _MKSTEMP_TAIL.fullmatch(stale.name[len(prefix):])):
            continue
        try:
            stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            _write_all(f, MAGIC + struct.pack("<I", len(head)) + head)
            _write_all(f, body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)
    return path


def _read(path: Path) -> tuple[dict, bytes]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if len(data) < len(MAGIC) + 4:
        if MAGIC.startswith(data[: len(MAGIC)]) and data:
            raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
        raise CheckpointError(f"{path} is not a leedl_fast checkpoint")
    if data[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a leedl_fast checkpoint")
    (n,) = struct.unpack("<I", data[len(MAGIC): len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > _MAX_HEADER:
        raise CheckpointError(f"checkpoint {path} is corrupt (header length {n})")
    if len(data) < start + n:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
    try:
        header = json.loads(data[start: start + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable header)") from None
    if header.get("format") != "leedl_fast.checkpoint":
        raise CheckpointError(f"{path} is not a leedl_fast checkpoint")
    version = header.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this leedl_fast reads up to {FORMAT_VERSION} "
            "(upgrade leedl_fast)")
    body = data[start + n:]
    expected = header.get("payload_bytes")
    if not isinstance(expected, int):
        raise CheckpointError(f"checkpoint {path} is corrupt (header without payload size)")
    if len(body) < expected:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(body)} of {expected} payload bytes)")
    if len(body) > expected or hashlib.sha256(body).hexdigest() != header.get("payload_sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    return header, body


def read_header(path: str | os.PathLike) -> dict:
    """The header of a checkpoint (recipe, version, creation time, ...), after checking the whole file."""
    return _read(Path(path))[0]


def load(path: str | os.PathLike, *, recipe: str | None = None,
         map_location: Any = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint written by ``save``: returns ``(header, payload)``.

    Raises ``CheckpointError`` when the file is missing, not a checkpoint,
    truncated, corrupt, of a newer format, or (with ``recipe``) of another recipe.
    """
    path = Path(path)
    header, body = _read(path)
    if recipe is not None and header.get("recipe") != recipe:
        raise CheckpointError(
            f"checkpoint {path} belongs to the recipe {header.get('recipe')!r}, not {recipe!r}")
    try:
        payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as exc:  # the digest matched, so the writer stored something we refuse to unpickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {first}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt (payload is not a dict)")
    return header, payload

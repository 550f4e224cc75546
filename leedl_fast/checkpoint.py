"""Checkpoint files: written atomically, checked before they are trusted.

A checkpoint is one file::

    b"LEEDLFCK"                 8 bytes, the magic
    header length               4 bytes, little-endian unsigned
    header                      UTF-8 JSON: format version, recipe name, payload size and SHA-256, ...
    payload                     ``torch.save`` of a dict (models, optimisers, RNG states, ...)

``save`` first checks that ``load`` will be able to read the payload back, then
writes the whole file to a temporary file in the target's folder (for a symbolic
link, the folder of the file it points to: the link stays a link), flushes and
fsyncs it, then ``os.replace``-s it over the target (an atomic rename on POSIX
and Windows), so a process killed during a write leaves the previous checkpoint
untouched and loadable.  Several processes may save to one path at once: each
save succeeds, and the file is the one renamed into place last.  A killed
writer's temporary file is removed by a later save once it has not been
modified for ``STALE_AFTER`` seconds (a live writer keeps writing to its own).
``load`` checks the magic, the header, the length (a truncated file) and the
digest (a corrupt file) before unpickling, and unpickles with
``weights_only=True``: a checkpoint holds tensors and plain Python values only,
so loading one runs no code from the file.

Everything a user can get wrong (a missing, foreign, truncated, corrupt or newer
file, or one written by another recipe) raises ``CheckpointError`` with a
one-line message; the CLI prints it and exits with status 2.
"""
from __future__ import annotations

import collections
import copyreg
import datetime as _dt
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "CheckpointWriteError", "FORMAT_VERSION", "MAGIC", "STALE_AFTER", "save", "load", "read_header"]

MAGIC = b"LEEDLFCK"
FORMAT_VERSION = 1
STALE_AFTER = 15 * 60  # seconds without a write after which another writer's temporary file counts as dead
_TMP_PREFIX = ".tmp-"  # temporary files: ".tmp-<name>.<random>"; a killed writer leaves one behind
_NAME_MAX = 255  # bytes in a file name, on nearly every filesystem
_MAX_HEADER = 1 << 20
_CHUNK = 64 << 20  # bytes per write: each write refreshes the temporary file's mtime
_ATTEMPTS = 3  # writes of the temporary file, when something else removes it before the rename
_MKSTEMP_TAIL = re.compile(r"[A-Za-z0-9_]{8}")  # mkstemp's random part
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class CheckpointError(Exception):
    """A checkpoint that cannot be used or written; the message is one line meant for the user."""


class CheckpointWriteError(CheckpointError, OSError):
    """``save`` could not write the file (a folder that is not writable, a full disk, ...); an ``OSError`` as
    well, as it was before it had a one-line message of its own."""


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
    """The process's umask, read without changing it where the system shows it (Linux); elsewhere set and
    restored, which briefly changes it for other threads."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_all(f, data: bytes) -> None:
    """Write ``data`` to ``f``; a separate function so tests can make it fail half-way."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start: start + _CHUNK])


# What ``torch.load(weights_only=True)`` reads back (checked against torch 2.13): these exact types (a subclass,
# such as numpy.float64 of float or a namedtuple of tuple, is refused), storages, and containers of them.
_LEAVES = frozenset({str, int, float, bool, complex, bytes, bytearray, type(None), torch.Size, torch.dtype,
                     torch.device, torch.layout, torch.qscheme})
_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_MAPPINGS = frozenset({dict, collections.OrderedDict, collections.Counter})
_SEQUENCES = frozenset({list, tuple, set})


def _type_name(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _where(place) -> str:
    """The key path of a place in the payload: ``place`` is ``None`` (the payload) or (parent place, step)."""
    steps = []
    while place is not None:
        place, step = place
        steps.append(step)
    return "payload" + "".join(reversed(steps))


def _allowlisted() -> frozenset:
    """The classes and functions allowlisted for ``weights_only`` loads (``torch.serialization.add_safe_globals``)
    under the name pickle writes for them (``module.qualname``): an entry is a class or function, or a
    (class or function, name) tuple, whose name must then be that one for load to find it."""
    found = set()
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, None)
        own = f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}"
        if name is None or name == own:
            found.add(obj)
    return frozenset(found)


_GLOBALS = (type, types.FunctionType, types.BuiltinFunctionType)  # what pickle stores by name (GLOBAL)


def _check_payload(payload) -> bool:
    """Raise ``ValueError`` naming the first value in ``payload`` that ``load`` could not read back.

    Returns whether the payload holds an instance of a user-allowlisted class (``add_safe_globals``): what
    such an object pickles to (its class's reduce) is checked here as far as this walk can, and ``save``
    then confirms with a trial ``weights_only`` load."""
    if type(payload) not in _MAPPINGS:
        raise ValueError(f"payload must be a dict, got {_type_name(type(payload))}")
    allowed = _allowlisted()
    todo, seen, uses_allowed = [(payload, None)], set(), False
    while todo:
        value, place = todo.pop()
        t = type(value)
        if t in _LEAVES or isinstance(value, (torch.UntypedStorage, torch.TypedStorage)):
            continue
        if id(value) in seen:  # shared or cyclic: pickle stores it once
            continue
        if t in _TENSORS or (t in allowed and issubclass(t, torch.Tensor)):
            seen.add(id(value))
            uses_allowed |= t not in _TENSORS
            todo += [(v, (place, f".{k}")) for k, v in vars(value).items()]  # attributes are pickled with it
        elif t in _MAPPINGS:
            seen.add(id(value))
            for k, v in value.items():
                todo += [(k, (place, f" (the key {k!r})")), (v, (place, f"[{k!r}]"))]
        elif t in _SEQUENCES:
            seen.add(id(value))
            todo += [(v, (place, f"[{i}]" if t is not set else " (an element)")) for i, v in enumerate(value)]
        elif t in allowed:
            seen.add(id(value))
            uses_allowed = True
            todo += _reduced_parts(value, place)
        elif isinstance(value, _GLOBALS) and value in allowed:  # the class or function itself, by name
            uses_allowed = True
        else:
            raise ValueError(
                f"{_where(place)} is a {_type_name(t)}, which load (weights_only=True) cannot read back; store "
                "tensors, str, int, float, bool, None, bytes, and dicts, lists, tuples and sets of them "
                "(or types allowlisted with torch.serialization.add_safe_globals)")
    return uses_allowed


def _reduced_parts(value, place) -> list:
    """The values pickle (torch.save's protocol 2) stores for an instance of an allowlisted class."""
    rv = value.__reduce_ex__(2)
    if isinstance(rv, str):  # a global of its own: nothing inside it
        return []
    func, args, state, listitems, dictitems = (tuple(rv) + (None,) * 5)[:5]
    parts = []
    if func is copyreg.__newobj__ and args and args[0] is type(value):
        args = args[1:]  # the class itself (allowlisted): NEWOBJ
    parts += [(v, (place, f" (its pickled argument {i})")) for i, v in enumerate(args or ())]
    if type(state) is dict and all(type(k) is str for k in state):
        parts += [(v, (place, f".{k}")) for k, v in state.items()]
    elif state is not None:
        parts.append((state, (place, " (its pickled state)")))
    parts += [(v, (place, f"[{i}]")) for i, v in enumerate(listitems or ())]
    for k, v in dictitems or ():
        parts += [(k, (place, f" (the key {k!r})")), (v, (place, f"[{k!r}]"))]
    return parts


def _tmp_prefix(name: str) -> str:
    """The start of the names of ``name``'s temporary files, short enough for mkstemp's 8 more characters."""
    prefix = f"{_TMP_PREFIX}{name}."
    if len(os.fsencode(prefix)) + 8 <= _NAME_MAX:
        return prefix
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]  # tells apart long names that start alike
    room = _NAME_MAX - 8 - len(_TMP_PREFIX) - len(digest) - 2
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return f"{_TMP_PREFIX}{name}~{digest}."


def _remove_dead_temporaries(directory: Path, prefix: str) -> None:
    # Writers killed mid-write left their temporary files (mkstemp's: the prefix, then 8 characters): remove
    # them, and only them (not the temporary file of "<name>.bak", say, nor one another writer is writing).
    now = time.time()
    for stale in directory.iterdir():
        if not (stale.name.startswith(prefix) and _MKSTEMP_TAIL.fullmatch(stale.name[len(prefix):])):
            continue
        try:
            if now - stale.stat().st_mtime > STALE_AFTER:
                stale.unlink()
        except OSError:
            pass


def _write_temporary(directory: Path, prefix: str, parts: tuple[bytes, ...]) -> str:
    """Write ``parts`` to a new fsynced temporary file in ``directory``; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                _write_all(f, part)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# The keys ``save`` writes itself; ``extra_header`` may not replace them.
_HEADER_KEYS = frozenset({"format", "version", "recipe", "created", "leedl_fast", "torch", "payload_bytes",
                          "payload_sha256"})


def save(path: str | os.PathLike, payload: dict, *, recipe: str, extra_header: dict | None = None) -> Path:
    """Write ``payload`` (a dict of tensors and plain values) to ``path`` atomically.

    ``recipe`` names what wrote it; ``load(..., recipe=...)`` refuses a file of
    another recipe.  ``extra_header`` (JSON-able) is stored beside it and can be
    read with ``read_header`` without unpickling anything.  Returns the path.
    Raises ``ValueError``, before writing anything, when the payload holds a
    value ``load`` could not read back (a numpy scalar, a ``Path``, ...; a class
    allowlisted with ``torch.serialization.add_safe_globals`` is read back), and
    ``CheckpointError`` when ``path`` is a directory, or ``CheckpointWriteError``
    (a ``CheckpointError`` and an ``OSError``) when the file cannot be written.
    """
    path = Path(path)
    clash = sorted(set(extra_header or {}) & _HEADER_KEYS)
    if clash:
        raise ValueError(f"extra_header must not set the header's own keys {', '.join(clash)}")
    try:
        json.dumps(extra_header)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra_header must be JSON-able: {exc}") from None
    uses_allowlisted = _check_payload(payload)
    target = Path(os.path.realpath(path))  # through symbolic links: the link stays, its target is replaced
    if target.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    if uses_allowlisted:  # what an allowlisted class pickles to is for load itself to judge
        try:
            torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"payload holds a value that load (weights_only=True) cannot read back: "
                             f"{_reason(exc)}") from None
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
    try:
        _replace_atomically(target, (MAGIC + struct.pack("<I", len(head)) + head, body))
    except OSError as exc:  # a folder that cannot be written to, a full disk, ...: one line, still an OSError
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from exc
    return path


def _replace_atomically(target: Path, parts: tuple[bytes, ...]) -> None:
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    prefix = _tmp_prefix(target.name)
    _remove_dead_temporaries(directory, prefix)
    for attempt in range(_ATTEMPTS):
        tmp = _write_temporary(directory, prefix, parts)
        try:
            os.replace(tmp, target)
            break
        except FileNotFoundError:
            # Something else (an older leedl_fast, a clean-up script) removed it before the rename: write it again.
            if os.path.lexists(tmp) or attempt == _ATTEMPTS - 1:
                _unlink(tmp)
                raise
        except BaseException:
            _unlink(tmp)
            raise
    _fsync_dir(directory)


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
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint {path} is corrupt (format version {version!r})")
    if version > FORMAT_VERSION:
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


def _reason(exc: Exception) -> str:
    """One readable line out of torch's multi-line, ANSI-coloured message: the one naming what it refused."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    named = [x for x in lines if "GLOBAL" in x or x.startswith("WeightsUnpickler error:")]
    line = (named or lines or [""])[0]
    return line.split(" Please use `torch.serialization", 1)[0] or type(exc).__name__


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
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {_reason(exc)}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt (payload is not a dict)")
    return header, payload

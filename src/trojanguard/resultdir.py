"""A result folder is complete or absent.

Every result (a checkpoint, an attack run, a purified model, a guard, an inspection, a
harness cell) is written with ``write_result``::

    with write_result("runs/x") as tmp:      # tmp: a temporary sibling folder, .x.tmp-<pid>-...
        save_checkpoint(tmp, model, meta)     # writers that see an open result write into it
        attack.save(tmp)
        write_json(tmp / "metrics.json", metrics)
    # here: every file is fsynced, COMPLETE.json (the manifest) is written last, and the
    # folder is renamed into place; an old runs/x is replaced only now

and read with ``read_result`` / ``check_result``, which refuse a folder without
``COMPLETE.json`` ("incomplete result (interrupted run?)") and check every file a caller
reads against the manifest (name, size, sha256): the files of one result belong together.

Replacing an old folder is as atomic as POSIX allows: the old folder is renamed aside, the
new one renamed in, then the old one removed. A kill between the two renames leaves the
name absent (never half of each); the stranded siblings are removed by the next write.

Folders written before this module (no ``COMPLETE.json``) are "legacy": ``read_result``
returns them with ``legacy=True`` and the caller decides with its own cross-checks (the
checkpoint loader accepts them when the weights' sha256 and the attack names agree).

Bounded reads of untrusted files (``regular_file``, ``read_bounded``, ``read_json_file``)
and the checks of single output files live in ``safeio.py`` (re-exported here).

API: ``write_result`` (+ ``write_bytes``/``write_json`` for files inside it, ``writing`` to
ask whether a path is an open result), ``read_result``/``check_result`` -> ``Result``
(``has``, ``read_bytes``, ``read_json``, ``files``, ``legacy``), ``amend_result`` to change a
finished result, ``check_out``/``check_file_out`` to refuse an unwritable output before any
work, ``incomplete`` for callers' own legacy checks, and the bounded readers.

Test hook: ``TROJANGUARD_TEST_KILL_AT=<point>`` makes the process SIGKILL itself at a
named point of writing: ``before:<file>``, ``during:<file>`` (half of the file written),
``after:<file>`` for files written with ``write_bytes``/``write_json`` (the manifest is
``COMPLETE.json``), ``swap`` (old folder moved aside, new not yet in place) and ``done``
(new in place, old not yet removed). Used by tests/test_reliability.py only.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import secrets
import signal
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .errors import UserError
from .safeio import (MAX_JSON_BYTES, check_file_out, check_not_input, parse_json, probe_writable, read_bounded,  # noqa: F401
                     read_json_file, regular_file)

MARKER = "COMPLETE.json"
FORMAT = "trojanguard-result/1"
KILL_ENV = "TROJANGUARD_TEST_KILL_AT"
# Files a result folder from before COMPLETE.json could hold: such a folder may be replaced.
LEGACY_FILES = frozenset({"model.safetensors", "model.json", "attack.json", "attack.safetensors",
                          "metrics.json", "trigger.png"})
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
_OPEN: set[str] = set()  # temporary folders of results being written in this process

__all__ = ["MARKER", "Result", "amend_result", "check_file_out", "check_out", "check_result", "incomplete",
           "parse_json", "read_bounded", "read_json_file", "read_result", "regular_file", "write_bytes",
           "write_json", "write_result", "writing"]


# --------------------------------------------------------------------------- writing --
@contextlib.contextmanager
def write_result(folder: str | Path, kind: str = "result") -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on a clean exit seal it (manifest last)
    and rename it to ``folder``, replacing an old result there. On an exception nothing
    changes at ``folder``. Refuses (UserError) an unwritable ``folder`` or an existing one
    that holds files that are not a result (they would be deleted)."""
    folder = Path(folder)
    check_out(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(parent, folder.name)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{folder.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; results are for sharing
    key = str(tmp.resolve())
    _OPEN.add(key)
    try:
        yield tmp
        _seal(tmp, kind)
        _swap(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _OPEN.discard(key)


def writing(path: str | Path) -> bool:
    """True when ``path`` is the temporary folder of a result being written (so a writer
    such as ``save_checkpoint`` adds its files to it instead of starting a result of its own)."""
    return str(Path(path).resolve()) in _OPEN


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write one file of a result being written (plain write: the folder is temporary)."""
    path = Path(path)
    _kill_point(f"before:{path.name}")
    view = memoryview(data)
    with open(path, "wb") as f:
        f.write(view[: len(view) // 2])
        if os.environ.get(KILL_ENV) == f"during:{path.name}":
            f.flush()
            os.fsync(f.fileno())
            _kill_point(f"during:{path.name}")
        f.write(view[len(view) // 2:])
    _kill_point(f"after:{path.name}")


def write_json(path: str | Path, obj: Any) -> None:
    from .utils import to_jsonable
    write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode("utf-8"))


def amend_result(folder: str | Path, files: dict[str, bytes]) -> None:
    """Replace or add files of a finished result (e.g. a metric computed later) by writing
    the whole folder again: the result stays complete and its manifest right. The current
    content is verified first; a legacy folder comes out sealed."""
    res = check_result(folder)
    names = set(res.files()) - set(files)
    with write_result(res.path, kind=res.kind) as tmp:
        for name in sorted(names):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write_bytes(tmp / name, res.read_bytes(name, max_bytes=2**40))
        for name, data in files.items():
            _safe_name(name, res.path)
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write_bytes(tmp / name, data)


def check_out(folder: str | Path, what: str = "--out", inputs: dict[str, Any] | None = None) -> None:
    """Fail early (before any work) when a result cannot be written to ``folder``: a path
    under a file, an unwritable place, a file or symlink in its place, a folder holding
    files that are not a result, or the place of one of the command's ``inputs`` (flag ->
    path): writing the result there would replace the user's model or data, even when the
    command then fails."""
    p = Path(folder)
    check_not_input(p, what, inputs)
    if p.is_symlink():
        raise UserError(f"{what} {p} is a symbolic link; give the real folder")
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{what} {p} is a file; give a folder for the result")
        stray = _not_a_result(p)
        if stray:
            raise UserError(f"{what} {p} already holds files that are not a trojanguard result "
                            f"(e.g. {stray}); they would be deleted: give a new folder or move them")
    probe_writable(p.parent if p.parent != p else p, p, what)


# --------------------------------------------------------------------------- reading --
class Result:
    """A result folder that passed ``read_result``. ``legacy``: written before
    ``COMPLETE.json`` existed (no manifest; the caller cross-checks its files)."""

    def __init__(self, path: Path, manifest: dict | None, verify: bool):
        self.path, self.manifest, self.verify = path, manifest, verify

    @property
    def legacy(self) -> bool:
        return self.manifest is None

    @property
    def kind(self) -> str:
        return self.manifest["kind"] if self.manifest else "result"

    def files(self) -> list[str]:
        if self.manifest is not None:
            return sorted(self.manifest["files"])
        return sorted(str(f.relative_to(self.path)) for f in self.path.rglob("*")
                      if f.is_file() and not f.is_symlink())

    def has(self, name: str) -> bool:
        """Whether the result holds ``name``. A file lying in a sealed folder but missing
        from its manifest was put there afterwards: an error, not an ignored file."""
        on_disk = os.path.lexists(self.path / name)
        if self.manifest is None:
            return on_disk
        if name in self.manifest["files"]:
            return True
        if on_disk:
            raise UserError(f"{self.path / name} is not part of the result in {self.path} (not in {MARKER}): "
                            "it was added after the result was written; remove it or re-run")
        return False

    def read_bytes(self, name: str, max_bytes: int) -> bytes:
        """The bytes of ``name``: a regular file below ``max_bytes``, checked against the
        manifest (size and sha256) unless the result was opened with ``verify=False``."""
        path = self.path / name
        if self.manifest is not None and not self.has(name):
            raise UserError(f"{self.path} has no {name}; it is not that kind of result")
        data = read_bounded(path, max_bytes, name)
        if self.manifest is not None and self.verify:
            entry = self.manifest["files"][name]
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise UserError(f"{path} is unreadable as part of this result: its sha256 does not match "
                                f"{MARKER} (changed or truncated after writing); re-copy the folder or "
                                "re-run (--no-verify if you changed it on purpose)")
        return data

    def read_json(self, name: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
        return parse_json(self.read_bytes(name, max_bytes), self.path / name)


def read_result(folder: str | Path, verify: bool = True) -> Result:
    """Open a result folder: refuse one that is being written or was left by an
    interrupted run, one whose manifest is damaged or lists a missing file. File contents
    are verified as they are read (``Result.read_bytes``); ``check_result`` verifies all."""
    p = Path(folder)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if not p.is_dir():
        raise UserError(f"{p} is not a folder")
    if _TMP_NAME.match(p.name):
        raise UserError(f"{p} is an incomplete result (interrupted run?) or one still being written: "
                        "delete it or re-run")
    marker = p / MARKER
    if not os.path.lexists(marker):
        return Result(p, None, verify)
    manifest = _manifest(read_json_file(marker, 64 * 2**20, MARKER, "the result is damaged: delete it or re-run"),
                         marker)
    for name, entry in manifest["files"].items():
        f = p / name
        try:
            size = f.stat().st_size if f.is_file() else None
        except OSError:
            size = None
        if size is None:
            raise UserError(f"{p} is an incomplete result (interrupted run?): {name}, listed in {MARKER}, "
                            "is missing; delete it or re-run")
        if verify and size != entry["bytes"]:
            raise UserError(f"{f} is unreadable as part of this result: {size} bytes, {MARKER} says "
                            f"{entry['bytes']} (changed or truncated after writing, sha256 differs); "
                            "re-copy the folder or re-run (--no-verify if you changed it on purpose)")
    return Result(p, manifest, verify)


def check_result(folder: str | Path, verify: bool = True) -> Result:
    """``read_result`` plus the sha256 of every file in the manifest, now. For readers of
    whole results (the harness, ``purify``); loaders verify what they read anyway."""
    res = read_result(folder, verify)
    if res.manifest is not None and verify:
        for name in res.files():
            res.read_bytes(name, max_bytes=2**40)
    return res


def incomplete(folder: str | Path, detail: str) -> UserError:
    """The error for a folder that is not a whole result (for callers' legacy checks)."""
    return UserError(f"{folder} is an incomplete result (interrupted run?): {detail}; delete it or re-run")


# --------------------------------------------------------------------------- internals --
def _kill_point(point: str) -> None:
    if os.environ.get(KILL_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # pragma: no cover - SIGKILL is not delivered synchronously everywhere


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(tmp: Path, kind: str) -> None:
    files = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_symlink():
            raise ValueError(f"{f}: a result may not contain symbolic links")
        if f.is_file():
            h, n = hashlib.sha256(), 0
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
                os.fsync(fh.fileno())
            files[f.relative_to(tmp).as_posix()] = {"sha256": h.hexdigest(), "bytes": n}
    if MARKER in files:
        raise ValueError(f"{MARKER} is written by write_result itself")
    from . import __version__
    write_json(tmp / MARKER, {"format": FORMAT, "kind": kind, "files": files, "trojanguard": __version__,
                              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    _fsync(tmp / MARKER)
    _fsync(tmp)


def _swap(tmp: Path, folder: Path) -> None:
    olds = []
    for _ in range(5):  # another writer of the same folder may rename in between: retry
        if os.path.lexists(folder):
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.rename(folder, old)
                olds.append(old)
            except FileNotFoundError:
                pass
            _kill_point("swap")
        try:
            os.rename(tmp, folder)
            break
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    else:
        raise UserError(f"{folder} kept being replaced by another process; run one writer at a time")
    _fsync(folder.parent)
    _kill_point("done")
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_siblings(parent: Path, name: str) -> None:
    """Temporary and set-aside folders of ``name`` left by killed writers (dead pids)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for e in entries:
        m = _TMP_NAME.match(e.name)
        if m and m["name"] == name and not _alive(int(m["pid"])):
            shutil.rmtree(e.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _not_a_result(p: Path) -> str | None:
    """The first entry that makes an existing folder unsafe to replace, or None."""
    if os.path.lexists(p / MARKER):
        return None
    for e in sorted(os.scandir(p), key=lambda e: e.name):
        ours = e.name in LEGACY_FILES or (e.name.startswith(".") and e.name.endswith(".tmp"))
        if not ours or not e.is_file(follow_symlinks=False):
            return e.name
    return None


def _safe_name(name: str, where: Path) -> str:
    p = PurePosixPath(name)
    if (not name or p.is_absolute() or ".." in p.parts or "\\" in name or name == MARKER
            or any(part in ("", ".") for part in name.split("/"))):
        raise UserError(f"{where / MARKER} lists a file name {name[:80]!r} that is not a plain relative path; "
                        "the result is damaged: delete it or re-run")
    return name


def _manifest(obj: Any, where: Path) -> dict:
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

    class Entry(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
        bytes: StrictInt = Field(ge=0)

    class Manifest(BaseModel):
        model_config = ConfigDict(extra="allow")
        format: StrictStr
        kind: StrictStr = Field(max_length=100)
        files: dict[StrictStr, Entry] = Field(max_length=100_000)

    try:
        m = Manifest.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"{where}: field {'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}; "
                        "the result is damaged: delete it or re-run") from None
    if m.format != FORMAT:
        raise UserError(f"{where} has format {m.format!r}; this trojanguard reads {FORMAT!r}: upgrade trojanguard")
    for name in m.files:
        _safe_name(name, where.parent)
    return m.model_dump()

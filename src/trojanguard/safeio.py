"""Bounded reads of untrusted files and checks of output paths made before any work.

Every reader checks that a path is a regular file (not a folder, a device such as
/dev/zero, or a pipe) and that its size is below a cap before reading it; every writer's
target is probed for writability first (root ignores permission bits, read-only mounts do
not), so that a mistake is one line before, not a traceback after, an hour of work."""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError

MAX_JSON_BYTES = 256 * 2**20  # text attacks keep paraphrase tables in attack.json (SST-2: ~5 MB)


def regular_file(path: str | Path, max_bytes: int, what: str = "file") -> int:
    """Size of ``path`` after checking it is a regular file of at most ``max_bytes``
    (symlinks are followed: a link to /dev/zero is a device, and refused)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError(f"{p} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device or a pipe)"
        raise UserError(f"{p} is {kind}; the {what} must be a regular file")
    if st.st_size > max_bytes:
        raise UserError(f"{p} is {st.st_size:,} bytes, more than the {max_bytes:,} a {what} may have; "
                        "is it the right file?")
    return st.st_size


def read_bounded(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    size = regular_file(path, max_bytes, what)
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > size:
        raise UserError(f"{path} grew while it was read; read it again when it is finished")
    return data


def parse_json(data: bytes, where: str | Path, fix: str = "re-create it") -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"{where} is not valid JSON ({msg}); {fix}") from None


def read_json_file(path: str | Path, max_bytes: int = MAX_JSON_BYTES, what: str = "JSON file",
                   fix: str = "re-create it") -> Any:
    return parse_json(read_bounded(path, max_bytes, what), path, fix)


def check_file_out(path: str | Path, what: str = "--out", example: str = "out.png",
                   inputs: dict[str, Any] | None = None) -> None:
    """Fail early when a single output file (a PNG, a JSON report, a CSV) cannot be written,
    or would replace one of the command's ``inputs`` (flag -> path)."""
    p = Path(path)
    check_not_input(p, what, inputs)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder; give a file name (e.g. {p / example})")
    if p.exists() and not p.is_file():
        raise UserError(f"{what} {p} is not a regular file; give a file name")
    probe_writable(p.parent, p, what)


WHOLE_FOLDER_INPUTS = ("--clean-data", "--inputs")


def check_not_input(out: Path, what: str, inputs: dict[str, Any] | None) -> None:
    """``out`` must be neither an input nor a folder holding one (a result replaces its folder),
    nor inside a folder of data (the next run would read the result as part of the user's data)."""
    target = out.resolve()
    for flag, path in (inputs or {}).items():
        if not path:
            continue
        src = Path(path).resolve()
        if src == target or target in src.parents:
            raise UserError(f"{what} {out} would replace {flag} {path}; write the result elsewhere")
        # only folders read whole (every file in them is data); a dataset root or a checkpoint
        # folder is read by name, and --data-dir . with --out results/ is a normal layout
        if flag in WHOLE_FOLDER_INPUTS and src in target.parents and src.is_dir():
            raise UserError(f"{what} {out} is inside {flag} {path}, where it would mix with your data; "
                            "write the result elsewhere")


def probe_writable(start: Path, target: Path, what: str) -> None:
    anc = start.absolute()
    while True:
        try:
            st = anc.stat()
        except FileNotFoundError:
            anc = anc.parent
            continue
        except NotADirectoryError:
            anc = anc.parent
            continue
        except OSError as e:
            raise UserError(f"{what} {target}: cannot use {anc} ({e.strerror})") from None
        break
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {target}: {anc} is a file, so nothing can be written under it; give another path")
    try:  # the only reliable test (root ignores permission bits; read-only mounts do not)
        os.rmdir(tempfile.mkdtemp(dir=anc, prefix=".trojanguard-probe-"))
    except OSError as e:
        raise UserError(f"{what} {target}: cannot write in {anc} ({e.strerror}); choose a writable place") from None

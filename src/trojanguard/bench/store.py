"""The results store: one SQLite file (standard library, WAL mode), one row per cell.

A row holds the resolved configuration and its hash, the kind, the status (pending /
running / done / failed with a one-line error), the metrics (JSON), wall time per stage,
peak memory, seed, thread count, library versions, the project's git commit and the
artifact folder. A result is written in one transaction after its folder is in place. Only
one process writes at a time: the driver of a run (Ray workers return results to it).

A row left ``running`` by a process that is gone (same host, pid dead or reused) is stale
and is run again; ``load_results(db)`` reads the store into a pandas DataFrame."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

from ..errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('victim', 'purifier', 'detector', 'inspector')),
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    error TEXT, error_detail TEXT,
    config TEXT NOT NULL, info TEXT NOT NULL, depends_on TEXT NOT NULL,
    metrics TEXT, stages TEXT,
    seconds REAL, peak_rss_mb REAL, peak_cuda_mb REAL,
    seed INTEGER, threads INTEGER, device TEXT, versions TEXT, git_commit TEXT,
    artifact TEXT, executor TEXT, host TEXT, pid INTEGER, pid_start TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL, started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS grid_cells (
    grid TEXT NOT NULL, hash TEXT NOT NULL REFERENCES cells(hash), position INTEGER,
    PRIMARY KEY (grid, hash)
);
"""
JSON_COLUMNS = ("config", "info", "depends_on", "metrics", "stages", "versions")


def proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int | None, start: str | None) -> bool:
    if not pid:
        return False
    now = proc_start(pid)
    if now is not None:
        return start is None or now == start
    if Path("/proc/self/stat").exists():
        return False  # Linux, and /proc has no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def git_commit() -> str | None:
    """The commit of the source tree the package runs from, when it is a git checkout."""
    src = Path(__file__).resolve().parents[3]
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class Store:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise UserError(f"results store {str(self.path)!r} does not exist; run 'trojanguard bench GRID --db "
                            f"{self.path}' first")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"file:{self.path.resolve()}" + ("?mode=ro" if readonly else "")
        try:
            self.db = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL: a commit survives the process being killed (only a power cut
                # can lose the latest ones, never consistency); FULL would fsync every commit
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.executescript(SCHEMA)
            self.db.execute("SELECT count(*) FROM cells").fetchone()
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path} is not a trojanguard results store ({e}); give the path of a results database (.sqlite) written by trojanguard bench") from None
        self.db.row_factory = sqlite3.Row
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.pid_start = proc_start(self.pid)
        self._commit: str | None | bool = False

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        return _Transaction(self.db)

    @property
    def commit_id(self) -> str | None:
        if self._commit is False:
            self._commit = git_commit()
        return self._commit  # type: ignore[return-value]

    # --- writing (the driver only) -----------------------------------------------------
    def register(self, grid: str, cells, current: set[str] | None = None,
                 positions: dict[str, int] | None = None) -> None:
        """Add every cell of a grid as pending (existing rows keep their status). ``current``:
        the hashes of the whole grid as it is now; cells of earlier versions of the grid
        (a changed option, a removed defense) leave the grid's view, and with it its report,
        but stay in the store. ``positions``: each cell's place in the whole grid (a run of
        some cells, ``--only``, keeps the grid's order for the report)."""
        now = time.time()
        positions = positions or {}
        with self._tx() as db:
            if current is not None:
                for (h,) in db.execute("SELECT hash FROM grid_cells WHERE grid = ?", (grid,)).fetchall():
                    if h not in current:
                        db.execute("DELETE FROM grid_cells WHERE grid = ? AND hash = ?", (grid, h))
            for i, c in enumerate(cells):
                db.execute("INSERT OR IGNORE INTO cells (hash, kind, name, status, config, info, depends_on, seed, "
                           "artifact, created) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                           (c.hash, c.kind, c.name, _j(c.config), _j(c.info), _j(c.deps), c.seed, c.artifact, now))
                # the labels are the latest grid's (they are not part of the hash)
                db.execute("UPDATE cells SET name = ?, info = ? WHERE hash = ?", (c.name, _j(c.info), c.hash))
                db.execute("INSERT OR REPLACE INTO grid_cells (grid, hash, position) VALUES (?, ?, ?)",
                           (grid, c.hash, positions.get(c.hash, i)))
            for h, pos in positions.items():  # cells registered by earlier runs move to their place
                db.execute("UPDATE grid_cells SET position = ? WHERE grid = ? AND hash = ?", (pos, grid, h))

    def start(self, h: str, executor: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE cells SET status = 'running', error = NULL, error_detail = NULL, executor = ?, "
                       "host = ?, pid = ?, pid_start = ?, started = ?, attempts = attempts + 1 WHERE hash = ?",
                       (executor, self.host, self.pid, self.pid_start, time.time(), h))

    def finish(self, h: str, result: dict) -> None:
        """The cell's result, in one transaction (its folder is already in place)."""
        with self._tx() as db:
            db.execute("UPDATE cells SET status = 'done', error = NULL, error_detail = NULL, metrics = ?, stages = ?, "
                       "seconds = ?, peak_rss_mb = ?, peak_cuda_mb = ?, threads = ?, device = ?, versions = ?, "
                       "git_commit = ?, artifact = ?, finished = ? WHERE hash = ?",
                       (_j(result.get("metrics")), _j(result.get("stages")), result.get("seconds"),
                        result.get("peak_rss_mb"), result.get("peak_cuda_mb"), result.get("threads"),
                        result.get("device"), _j(result.get("versions")), self.commit_id, result.get("artifact"),
                        time.time(), h))

    def fail(self, h: str, error: str, detail: str | None = None) -> None:
        with self._tx() as db:
            db.execute("UPDATE cells SET status = 'failed', error = ?, error_detail = ?, finished = ? WHERE hash = ?",
                       (error.splitlines()[0] if error else "failed", detail, time.time(), h))

    def reset(self, h: str) -> None:
        """Back to pending (an interrupted cell)."""
        with self._tx() as db:
            db.execute("UPDATE cells SET status = 'pending' WHERE hash = ? AND status = 'running'", (h,))

    # --- reading -------------------------------------------------------------------------
    def get(self, hashes) -> dict[str, dict]:
        out = {}
        for h in hashes:
            r = self.db.execute("SELECT * FROM cells WHERE hash = ?", (h,)).fetchone()
            if r is not None:
                out[h] = _decode(r)
        return out

    def rows(self, grid: str | None = None, status: str | None = None) -> list[dict]:
        q = "SELECT c.* FROM cells c"
        args: list = []
        if grid:
            q += " JOIN grid_cells g ON g.hash = c.hash WHERE g.grid = ?"
            args.append(grid)
        if status:
            q += (" AND" if grid else " WHERE") + " c.status = ?"
            args.append(status)
        q += " ORDER BY " + ("g.position" if grid else "c.created, c.rowid")
        return [_decode(r) for r in self.db.execute(q, args).fetchall()]

    def grids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT grid FROM grid_cells ORDER BY grid")]

    def stale(self, row: dict) -> bool:
        """A ``running`` row whose process is gone (on this host)."""
        return row["status"] == "running" and row.get("host") == self.host and \
            not process_alive(row.get("pid"), row.get("pid_start"))

    def mean_seconds(self, kind: str, dataset: str | None = None, model: str | None = None) -> float | None:
        """Mean wall time of finished, computed (not adopted or reused) cells of a kind."""
        vals = []
        for r in self.db.execute("SELECT seconds, info, metrics FROM cells WHERE status = 'done' AND kind = ?",
                                 (kind,)):
            info = json.loads(r["info"])
            if (dataset and info.get("dataset") != dataset) or (model and info.get("model") != model):
                continue
            if r["seconds"] and not (json.loads(r["metrics"] or "{}") or {}).get("adopted_from"):
                vals.append(r["seconds"])
        return sum(vals) / len(vals) if vals else None


class _Transaction:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *_):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _j(v) -> str | None:
    from ..utils import to_jsonable
    return None if v is None else json.dumps(to_jsonable(v), sort_keys=True)


def _decode(r: sqlite3.Row) -> dict:
    d = dict(r)
    for k in JSON_COLUMNS:
        if d.get(k) is not None:
            d[k] = json.loads(d[k])
    return d


def load_results(db: str | Path, grid: str | None = None, status: str | None = None):
    """The store as a pandas DataFrame, one row per cell: the store's columns, then the
    report columns (``info``: attack, ratio, seed, defense, ...) and every metric as a column
    of its own (a metric whose name is already a column keeps the ``m_`` prefix; nested
    values such as ROC points stay Python objects)."""
    try:
        import pandas as pd
    except ImportError:
        raise UserError("load_results needs pandas: pip install 'trojanguard[bench]'") from None
    store = Store(db, readonly=True)
    try:
        rows = store.rows(grid, status)
    finally:
        store.close()
    flat = []
    for r in rows:
        d = {k: v for k, v in r.items() if k not in ("info", "metrics")}
        for k, v in (r.get("info") or {}).items():
            d.setdefault(k, v)
        for k, v in (r.get("metrics") or {}).items():
            d["m_" + k if k in d else k] = v
        flat.append(d)
    return pd.DataFrame(flat)

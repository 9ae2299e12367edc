"""Running a grid: plan (validate everything first), register the cells in the store, then
schedule: a cell starts when the cells it depends on are done; the driver writes every row.

Re-running a grid skips done cells, commits cells whose folder is complete but whose row
is not (the run was killed between the two), retries failed cells and cells left
``running`` by a process that is gone, and adopts finished zoo folders."""
from __future__ import annotations

import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import TextIO

from ..errors import UserError
from .cells import adopt, finished
from .grid import Cell, Plan, plan_grid
from .progress import Progress, clock
from .store import Store

DEFAULT_DB = "runs/bench/results.sqlite"


def select(cells: list[Cell], only: str | None) -> list[Cell]:
    """Cells whose name matches one of the comma-separated patterns, with what they need."""
    if not only:
        return cells
    pats = [p.strip() for p in only.split(",") if p.strip()]
    by = {c.hash: c for c in cells}
    keep: set[str] = set()

    def add(c: Cell):
        if c.hash not in keep:
            keep.add(c.hash)
            for d in c.deps:
                add(by[d])
    for c in cells:
        if any(fnmatch(c.name, p) for p in pats):
            add(c)
    if not keep:
        raise UserError(f"--only {only!r} matches no cell; 'trojanguard bench GRID --dry-run' lists their names")
    return [c for c in cells if c.hash in keep]


def classify(c: Cell, row: dict | None, store: Store | None) -> str:
    """done | reuse (folder complete, row not) | adopt | busy (running elsewhere) | stale |
    retry (failed) | pending."""
    if row and row["status"] == "done" and Path(row.get("artifact") or c.artifact).exists():
        return "done"
    if c.adopt_from:
        return "adopt"
    if finished(c.artifact) is not None:
        return "reuse"
    if row and row["status"] == "running":
        return "stale" if store is None or store.stale(row) else "busy"
    if row and row["status"] == "failed":
        return "retry"
    return "pending"


def task_for(c: Cell, plan: Plan, threads: int | None, executor: str) -> dict:
    cells = plan.by_hash()
    if threads is None and executor == "ray":
        threads = max(1, int(c.resources["cpus"]))  # a Ray worker gets the cores it asked for
    task = {"hash": c.hash, "name": c.name, "kind": c.kind, "config": c.config, "artifact": c.artifact,
            "context": {**plan.context, "threads": threads}, "resources": c.resources,
            "deps": {d: {"artifact": cells[d].artifact} for d in c.deps}}
    if c.kind != "victim":
        task["victim_info"] = cells[c.deps[0]].info
    if c.adopt_from:
        task["adopt_from"] = c.adopt_from
    return task


def run_grid(grid: str | Path, db: str | Path | None = None, artifacts: str | Path | None = None,
             executor: str = "local", ray_address: str | None = None, only: str | None = None,
             dry_run: bool = False, threads: int | None = None, stream: TextIO | None = None,
             live: bool | None = None) -> dict:
    """Run (or with ``dry_run`` describe) a grid; returns counts of what happened."""
    out = stream or sys.stdout
    if threads is not None and threads < 1:
        raise UserError("--threads must be at least 1")
    if executor not in ("local", "ray"):
        raise UserError(f"--executor {executor!r}: choose local or ray")
    if executor == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:  # before anything is written
            raise UserError("--executor ray needs Ray: pip install 'trojanguard[ray]' (or use --executor local)")
    db = Path(db or DEFAULT_DB)
    if artifacts is None:
        from .grid import read_grid
        artifacts = read_grid(grid).artifacts or db.parent / "artifacts"
    plan = plan_grid(grid, artifacts)
    threads = threads or plan.grid.threads
    if threads:
        import torch
        torch.set_num_threads(threads)
    cells = select(plan.cells, only)
    if dry_run:
        return _dry_run(plan, cells, db, out)
    store = Store(db)
    t0 = time.time()
    counts = {"computed": 0, "adopted": 0, "reused": 0, "skipped": 0, "failed": 0, "busy": 0}
    ex = None
    try:
        store.register(plan.name, cells, current={c.hash for c in plan.cells},
                       positions={c.hash: i for i, c in enumerate(plan.cells)})
        for note in plan.notes:
            print(f"note: {note}", file=out, flush=True)
        rows = store.get([c.hash for c in cells])
        state = {c.hash: classify(c, rows.get(c.hash), store) for c in cells}
        done: set[str] = set()
        for c in cells:
            s = state[c.hash]
            if s == "done":
                done.add(c.hash)
                counts["skipped"] += 1
            elif s in ("adopt", "reuse"):  # no computing: the driver commits what is on disk
                result = adopt(task_for(c, plan, threads, executor)) if s == "adopt" else \
                    {**finished(c.artifact), "reused": True}
                store.finish(c.hash, result)
                done.add(c.hash)
                counts["adopted" if s == "adopt" else "reused"] += 1
                print(f"{'adopted' if s == 'adopt' else 'reused':<8} {c.name} ({c.kind})  "
                      f"{c.adopt_from or c.artifact}", file=out, flush=True)
            elif c.note:
                print(f"note     {c.name}: {c.note}", file=out, flush=True)
        blocked = {c.hash for c in cells if state[c.hash] == "busy"}
        counts["busy"] = len(blocked)
        todo = [c for c in cells if state[c.hash] in ("pending", "stale", "retry")]
        header = (f"grid {plan.name}: {len(cells)} cells, {len(done)} done, {len(todo)} to run"
                  + (f", {len(blocked)} running in another process" if blocked else "") + f" -> {db}")
        print(header, file=out, flush=True)
        if not todo:
            return {**counts, "seconds": time.time() - t0}
        meta = {c.hash: (c.name, c.kind) for c in todo}
        ctx = plan.context
        history = {k: store.mean_seconds(k, ctx["dataset"], ctx["model"]) for k in ("victim", "purifier", "detector",
                                                                                    "inspector")}
        progress = None
        if executor == "ray":
            from .executors import RayExecutor
            ex = RayExecutor(ray_address)
        else:
            from .executors import LocalExecutor
            ex = LocalExecutor()
        progress = Progress(meta, history.get, ex.slots, out, live)
        if executor == "local":
            ex.on_stage = progress.stage
        failed: set[str] = set()
        running: set[str] = set()
        try:
            while todo or ex.busy():
                for c in list(todo):
                    if ex.busy() >= ex.slots:
                        break
                    bad = [d for d in c.deps if d in failed or d in blocked]
                    if bad:
                        todo.remove(c)
                        why = f"not run: {plan.by_hash()[bad[0]].name} " + ("failed" if bad[0] in failed else
                                                                             "is running in another process")
                        if bad[0] in failed:
                            store.fail(c.hash, why)
                            failed.add(c.hash)
                            counts["failed"] += 1
                        else:
                            blocked.add(c.hash)
                        progress.failed(c.hash, why)
                        continue
                    if all(d in done for d in c.deps):
                        todo.remove(c)
                        store.start(c.hash, ex.name)
                        running.add(c.hash)
                        progress.start(c.hash)
                        ex.submit(task_for(c, plan, threads, executor))
                if not ex.busy():
                    break
                for o in ex.wait():
                    running.discard(o.hash)
                    if o.ok:
                        store.finish(o.hash, o.result)
                        done.add(o.hash)
                        counts["reused" if o.result.get("reused") else "computed"] += 1
                        progress.done(o.hash, o.result.get("seconds"), "reused" if o.result.get("reused") else "done")
                    else:
                        store.fail(o.hash, o.error, o.detail)
                        failed.add(o.hash)
                        counts["failed"] += 1
                        progress.failed(o.hash, o.error)
        except KeyboardInterrupt:
            for h in running:  # not failed, not done: the next run starts them again
                store.reset(h)
            raise
        finally:
            progress.close()
        took = time.time() - t0
        print(f"grid {plan.name}: {counts['computed']} computed, {counts['adopted']} adopted, {counts['reused']} "
              f"reused, {counts['skipped']} already done, {counts['failed']} failed in {clock(took)} -> {db}",
              file=out, flush=True)
        return {**counts, "seconds": took}
    finally:
        if ex is not None:
            ex.close()
        store.close()


def _dry_run(plan: Plan, cells: list[Cell], db: Path, out: TextIO) -> dict:
    store = Store(db, readonly=True) if db.is_file() else None
    try:
        rows = store.get([c.hash for c in cells]) if store else {}
        ctx = plan.context
        mean = {k: (store.mean_seconds(k, ctx["dataset"], ctx["model"]) if store else None)
                for k in ("victim", "purifier", "detector", "inspector")}
        print(f"grid {plan.name} ({plan.path}): {len(cells)} cells -> {db}", file=out)
        for note in plan.notes:
            print(f"note: {note}", file=out)
        w = max(len(c.name) for c in cells)
        counts: dict[str, int] = {}
        eta, unknown = 0.0, 0
        for c in cells:
            s = classify(c, rows.get(c.hash), store)
            counts[s] = counts.get(s, 0) + 1
            where = c.adopt_from if s == "adopt" else ""
            print(f"  {s:<8} {c.kind:<9} {c.name.ljust(w)}  {c.hash}  {where}".rstrip(), file=out)
            if c.note:
                print(f"           {c.note}", file=out)
            if s in ("pending", "stale", "retry"):
                if mean[c.kind] is None:
                    unknown += 1
                else:
                    eta += mean[c.kind]
        todo = sum(counts.get(k, 0) for k in ("pending", "stale", "retry"))
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        est = clock(eta) if todo > unknown or todo == 0 else "unknown"
        print(f"{summary}; to run: {todo}; estimated time: {est}"
              + (f" (+{unknown} cells of a kind never run with this dataset/model)" if unknown and todo > unknown else ""),
              file=out)
        return {"dry_run": True, **counts, "eta": eta if todo > unknown else None}
    finally:
        if store:
            store.close()

"""Where cells run: in this process (``local``) or as Ray tasks (``ray``). Both take tasks
whose dependencies are finished (the driver schedules) and hand back outcomes; neither
writes the results store."""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from .cells import error_detail, execute, one_line


@dataclass
class Outcome:
    hash: str
    result: dict | None = None
    error: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class LocalExecutor:
    """One cell at a time, in the driver process (data loaded once, stages reported live)."""
    name = "local"
    slots = 1

    def __init__(self, on_stage: Callable[[str, str], None] | None = None):
        self.queue: deque[dict] = deque()
        self.on_stage = on_stage

    def submit(self, task: dict) -> None:
        self.queue.append(task)

    def busy(self) -> int:
        return len(self.queue)

    def wait(self) -> list[Outcome]:
        task = self.queue.popleft()
        stage = (lambda s: self.on_stage(task["hash"], s)) if self.on_stage else None
        try:
            return [Outcome(task["hash"], execute(task, stage))]
        except Exception as e:  # the cell failed, not the grid; KeyboardInterrupt stops the run
            return [Outcome(task["hash"], error=one_line(e), detail=error_detail(e))]

    def close(self) -> None:
        pass


class RayExecutor:
    """Cells as Ray tasks with per-kind resource requests; ``max_retries=0`` so that a worker
    that dies fails its cell (reported to the driver, which writes the row) instead of
    re-running work silently. ``address`` None starts a local Ray instance."""
    name = "ray"

    def __init__(self, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs Ray: pip install 'trojanguard[ray]' (or use --executor local)") from None
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=True, logging_level="WARNING")
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self.remote = ray.remote(max_retries=0)(execute)
        self.refs: dict = {}
        cpus = ray.cluster_resources().get("CPU", 1)
        self.slots = max(1, int(cpus))

    def submit(self, task: dict) -> None:
        r = task["resources"]
        ref = self.remote.options(num_cpus=r["cpus"], num_gpus=r["gpus"], name=task["name"]).remote(task)
        self.refs[ref] = task

    def busy(self) -> int:
        return len(self.refs)

    def wait(self) -> list[Outcome]:
        ray = self.ray
        ready, _ = ray.wait(list(self.refs), num_returns=1)
        out = []
        for ref in ready:
            task = self.refs.pop(ref)
            try:
                out.append(Outcome(task["hash"], ray.get(ref)))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                err = cause if isinstance(cause, BaseException) else e
                out.append(Outcome(task["hash"], error=one_line(err), detail=str(e)[-4000:]))
            except ray.exceptions.RayError as e:  # the worker died (crash, OOM kill, node lost)
                first = (str(e).strip().splitlines() or [""])[0]
                out.append(Outcome(task["hash"], error=f"worker died ({type(e).__name__}): {first}"[:300],
                                   detail=str(e)[-4000:]))
        return out

    def close(self) -> None:
        for ref in list(self.refs):
            self.ray.cancel(ref, force=True)
        self.refs.clear()
        if self._started:
            self.ray.shutdown()

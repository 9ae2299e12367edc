"""Progress of a running grid: done / running / failed counts, the current cell and its stage,
elapsed time, and an ETA from the mean time of finished cells of the same kind (this run's,
else earlier runs' in the store). On a terminal a status line is redrawn below the event
lines; otherwise every event is one plain line."""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, cells: dict[str, tuple[str, str]], history: Callable[[str], float | None],
                 slots: int = 1, stream: TextIO | None = None, live: bool | None = None):
        """``cells``: hash -> (name, kind) of the cells this run may compute; ``history(kind)``:
        mean seconds of finished cells of that kind from earlier runs (None: unknown)."""
        self.cells = cells
        self.history = history
        self.slots = max(1, slots)
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.t0 = time.time()
        self.status: dict[str, str] = {h: "pending" for h in cells}
        self.started: dict[str, float] = {}
        self.stage_of: dict[str, str] = {}
        self.times: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None
        if self.live:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    # --- events --------------------------------------------------------------------------
    def start(self, h: str) -> None:
        self.status[h] = "running"
        self.started[h] = time.time()
        self._event("start", h)

    def stage(self, h: str, stage: str) -> None:
        self.stage_of[h] = stage
        if not self.live:
            self._event("stage", h, stage)

    def done(self, h: str, seconds: float | None, how: str = "done") -> None:
        self.status[h] = "done"
        if how == "done" and seconds is not None:
            self.times.setdefault(self.cells[h][1], []).append(seconds)
        self._event(how, h, clock(seconds) if how == "done" else "")

    def failed(self, h: str, error: str) -> None:
        self.status[h] = "failed"
        self._event("failed", h, error)

    def note(self, text: str) -> None:
        with self.lock:
            self._clear()
            print(text, file=self.stream, flush=True)
            self._draw()

    # --- numbers -------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = {"done": 0, "running": 0, "failed": 0, "pending": 0}
        for s in self.status.values():
            out[s] += 1
        return out

    def mean(self, kind: str) -> float | None:
        mine = self.times.get(kind)
        return sum(mine) / len(mine) if mine else self.history(kind)

    def eta(self) -> tuple[float | None, int]:
        """(seconds left, cells without an estimate); None when nothing can be estimated."""
        total, unknown, known = 0.0, 0, False
        now = time.time()
        for h, s in self.status.items():
            if s not in ("pending", "running"):
                continue
            m = self.mean(self.cells[h][1])
            if m is None:
                unknown += 1
                continue
            known = True
            total += max(0.0, m - (now - self.started[h])) if s == "running" else m
        return (total / self.slots if known or not unknown else None), unknown

    def line(self) -> str:
        c = self.counts()
        eta, unknown = self.eta()
        running = [h for h, s in self.status.items() if s == "running"]
        cur = ""
        if running:
            h = running[-1]
            cur = f" | {self.cells[h][0]}" + (f": {self.stage_of[h]}" if h in self.stage_of else "")
        more = f" (+{unknown} without estimate)" if unknown and eta is not None else ""
        return (f"done {c['done']} | running {c['running']} | failed {c['failed']} | pending {c['pending']}{cur}"
                f" | elapsed {clock(time.time() - self.t0)} | ETA {clock(eta)}{more}")

    # --- output --------------------------------------------------------------------------
    def _event(self, what: str, h: str, text: str = "") -> None:
        name, kind = self.cells[h]
        c = self.counts()
        eta, _ = self.eta()
        msg = (f"{time.strftime('%H:%M:%S')} {what:<8} {name} ({kind}){'  ' + text if text else ''}"
               f"  [{c['done']}/{len(self.cells)} done, {c['failed']} failed, ETA {clock(eta)}]")
        with self.lock:
            self._clear()
            print(msg, file=self.stream, flush=True)
            self._draw()

    def _clear(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K")

    def _draw(self) -> None:
        if self.live and not self._stop.is_set():
            self.stream.write(self.line()[:200])
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self.lock:
                self._clear()
                self._draw()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self.lock:
            self._clear()
            self.stream.flush()

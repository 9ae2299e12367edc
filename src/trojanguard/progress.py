"""Progress bars named by their stage: a live tqdm bar on a terminal, and otherwise (logs,
pipes, CI) one line per stage when it ends, e.g. ``fst: 130 steps in 52 s``, so that a log
shows every stage once instead of hundreds of carriage-return updates."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable


class StageLine:
    """The non-terminal stand-in for a tqdm bar: counts, and prints one line on close."""

    def __init__(self, total: int | None, desc: str, unit: str, iterable: Iterable | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.iterable, self.t0, self.closed, self.postfix = iterable, time.perf_counter(), False, ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        extra = f" ({self.postfix})" if self.postfix else ""
        unit = self.unit if self.n == 1 else f"{self.unit}s"
        print(f"{self.desc}: {self.n} {unit} in {time.perf_counter() - self.t0:.0f} s{extra}",
              file=sys.stderr, flush=True)


class _Off(StageLine):
    def close(self) -> None:
        self.closed = True

    def write(self, text: str) -> None:
        pass


def stage_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, enabled: bool = True,
              unit: str = "step"):
    """A progress bar for the stage ``desc``: tqdm on a terminal, one line at the end
    otherwise, nothing when ``enabled`` is False."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled:
        return _Off(total, desc, unit, iterable)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return StageLine(total, desc, unit, iterable)

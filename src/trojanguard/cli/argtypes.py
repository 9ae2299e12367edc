"""argparse types shared by every command: a bad value fails while parsing, in one line,
before any work (and without importing torch)."""
from __future__ import annotations

import argparse
import math


def fraction(what: str = "value"):
    """A number strictly between 0 and 1."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        if not 0.0 < v < 1.0:
            raise argparse.ArgumentTypeError(f"{what} {v} is outside (0, 1); give a fraction such as 0.05")
        return v
    return parse


def int_in(lo: int, hi: int):
    """An integer in [lo, hi] (e.g. --width 0 fails here, before any work)."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is outside {lo}..{hi}")
        return v
    return parse


def finite(s: str) -> float:
    """A finite number (--lr inf would train a model full of NaN)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


THREADS = int_in(1, 1024)

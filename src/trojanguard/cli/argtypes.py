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


def accuracy_drop(s: str) -> float:
    """An accuracy loss as a fraction in [0, 1): ``--max-ca-drop 3`` (meant as 3 points) fails
    with the unit spelled out instead of the purifier's option range."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"{v:g} is not a fraction of accuracy; give e.g. 0.03 for 3 points")
    return v


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
SEED = int_in(0, 2**63 - 1)   # torch.manual_seed's range


def add_clean_data_args(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    """``--clean-data DIR|FILE | --holdout FRACTION`` plus ``--dataset`` / ``--data-dir``:
    where the defender's clean data comes from (the commands that take a suspect model)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--clean-data", help="your clean labelled data: ImageFolder directory (images) or "
                     "CSV/TSV with sentence,label columns (text)")
    src.add_argument("--holdout", type=fraction("--holdout"), help="for our checkpoints: this fraction of the "
                     "recorded dataset's training split as clean data (default: the split held out at training)")
    if dataset:
        p.add_argument("--dataset", type=str.lower, help="dataset the model was trained on, when its checkpoint does not say")
    p.add_argument("--data-dir", help="folder of that dataset (default: the usual search)")


def add_run_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """``--seed --threads --device --json --quiet``: how a computing command runs and prints."""
    if seed:
        p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--threads", type=THREADS, help="CPU threads (default: all cores); recorded with the result")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def require_path(path, flag: str) -> None:
    """One line naming the flag when a path the user gave does not exist (before any loading)."""
    from pathlib import Path
    from ..errors import UserError
    if path and not Path(path).exists():
        raise UserError(f"{flag} {path} does not exist")


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def guard_flags(options: dict, frr: float | None, purify: bool) -> tuple[float | None, bool]:
    """Take ``--set frr=`` / ``--set purify=`` out of ``options`` as spellings of ``--frr`` /
    ``--purify``: typed here (the string "false" is truthy) and, given both ways, agreeing."""
    from ..errors import UserError
    if "frr" in options:
        try:
            v = fraction("false-rejection rate")(str(options.pop("frr")))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--set frr: {e}") from None
        if frr is not None and v != frr:
            raise UserError(f"--set frr={v:g} and --frr {frr:g} disagree; give one of them")
        frr = v
    if "purify" in options:
        s = str(options.pop("purify")).strip().lower()
        if s not in _TRUE + _FALSE:
            raise UserError(f"--set purify={s}: give true or false (or the flag --purify)")
        if purify and s in _FALSE:
            raise UserError(f"--set purify={s} and --purify disagree; give one of them")
        purify = s in _TRUE
    return frr, purify


def set_threads(n: int | None) -> int:
    """Apply ``--threads`` (None: torch's default) and return the count in use, for the record."""
    import torch
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()

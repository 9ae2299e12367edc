"""The defense tables of the issues from the harness databases: for each dataset, the full
report (``report.md``, ``report.html``, CSVs) in ``benchmarks/results/<dataset>-defenses/``
and the named tables ``detect-<dataset>.csv``, ``purify-<dataset>-harness.csv`` (the
harness's purification rows; ``purify-<dataset>.csv`` is benchmarks/purify_zoo.py's) and
``inspect-<dataset>.csv`` next to it.

    python benchmarks/defense_tables.py            # every database that exists

With ``asr-floor-<dataset>.csv`` (``benchmarks/asr_floor.py``) next to the database, the
purification and detection tables gain ``asr_clean``: the ASR the same trigger reaches on
the clean models, below which no defense can go.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

from trojanguard.bench.report import write_report

RESULTS = Path(__file__).parent / "results"
# the issues' purification bars (workflow_table.py and leaderboard.py apply them): ASR after
# <= 10 % at a CA drop <= 3 points, for models whose backdoor implanted (ASR >= 50 %);
# "at the floor": ASR after within 3 points of what the trigger reaches on clean models
ASR_BAR, CA_DROP_BAR, FLOOR_MARGIN, IMPLANTED = 0.10, 0.03, 0.03, 0.5
NAMED = {"detection.csv": "detect-{d}.csv", "purification.csv": "purify-{d}-harness.csv",
         "inspection.csv": "inspect-{d}.csv"}


def meets_bar(ca_before: float, ca_after: float, asr_after: float, asr_ceiling: float = ASR_BAR) -> bool:
    """ASR after <= ``asr_ceiling`` at a CA drop <= ``CA_DROP_BAR`` (the drop compared
    rounded: 3.00 points is 0.030000000000000027 in floats)."""
    return asr_after <= asr_ceiling and round(ca_before - ca_after, 9) <= CA_DROP_BAR


def asr_floor(dataset: str) -> dict[str, float] | None:
    """{victim cell name: mean ASR of its trigger on the clean models}, or None before
    ``benchmarks/asr_floor.py`` has run."""
    path = RESULTS / f"asr-floor-{dataset}.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        return {r["victim"]: float(r["asr_clean"]) for r in csv.DictReader(f)}


def main() -> None:
    for dataset in ("cifar10", "sst2"):
        db = RESULTS / f"{dataset}-defenses.sqlite"
        if not db.is_file():
            continue
        out = RESULTS / f"{dataset}-defenses"
        # the grid as it is now: cells of its earlier versions (changed options) stay in the
        # store but leave the tables
        written = write_report(db, out, grid=f"{dataset}-defenses",
                               title=f"Defenses on the {dataset.upper()} reference zoo", asr_floor=asr_floor(dataset))
        for name, target in NAMED.items():
            if name in written:
                shutil.copyfile(written[name], RESULTS / target.format(d=dataset))
        print(f"{dataset}: {', '.join(sorted(written))} in {out}")


if __name__ == "__main__":
    main()

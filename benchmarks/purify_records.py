"""One table from the ``purify.json`` records that ``trojanguard purify --out DIR`` writes, for
option sweeps run from the shell (each row names the options that differ from the method's
defaults). Writes ``--out``.csv and .md:

    for a in 0.01 0.02 0.03; do
      trojanguard purify --method wiper --model zoo/cifar10/badnets-0.1-s0 --threads 2 \\
          --set layers='["head","layer4"]' --set alpha=$a --out /tmp/wiper/l4-a$a
    done
    python benchmarks/purify_records.py /tmp/wiper/* --out benchmarks/results/wiper-sweep-cifar10
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from trojanguard.defenses import create_defense
from trojanguard.report import write_table_files

COLUMNS = ["model", "method", "options", "ca_before", "asr_before", "ca_after", "asr_after", "asr_after_ra",
           "verify_ca_before", "verify_ca_after", "repaired", "seconds", "threads"]
SKIP = {"seed", "device", "progress"}


def changed_options(method: str, options: dict) -> str:
    """The options that differ from ``method``'s defaults, as KEY=VALUE."""
    defaults = create_defense(method).cfg.model_dump()
    diff = {k: v for k, v in options.items() if k not in SKIP and defaults.get(k) != v}
    return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(diff.items())) or "defaults"


def row(record: dict) -> dict:
    def pct(key):
        v = record.get(key)
        return "" if v is None else f"{100 * v:.1f}"
    return {"model": Path(record["parent"]["path"]).name, "method": record["method"],
            "options": changed_options(record["method"], record["options"]),
            **{k: pct(k) for k in ("ca_before", "asr_before", "ca_after", "asr_after", "asr_after_ra",
                                   "verify_ca_before", "verify_ca_after")},
            "repaired": "no" if record.get("warning") else "yes", "seconds": record.get("seconds", ""),
            "threads": record.get("threads", "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="trojanguard purify --out folders")
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = ap.parse_args()
    records = [json.loads((f / "purify.json").read_text()) for f in args.folders if (f / "purify.json").is_file()]
    if not records:
        raise SystemExit("no purify.json in the folders given")
    rows = sorted((row(r) for r in records), key=lambda r: (r["model"], r["method"], r["options"]))
    intro = [f"# Purification records: {', '.join(sorted({r['method'] for r in rows}))}", "",
             "Collected by `python benchmarks/purify_records.py` from `trojanguard purify --out` folders; "
             "percentages on the test split (CA, ASR; `asr_after_ra` with `--robustness`) and on the "
             "purifier's own held-out verification part (`verify_*`); `repaired` = no when that part's CA "
             "fell by more than the method's `max_ca_drop`."]
    paths = write_table_files(args.out, rows, COLUMNS, intro)
    print(f"{len(rows)} rows ->", *paths)

if __name__ == "__main__":
    main()

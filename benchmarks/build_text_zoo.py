"""SST-2 text zoo on MiniLM-L6: the clean model and BadNets / AddSent / SynBkd / StyleBkd
at 20 % (BadActs setup) and 5 %. Resumable. Writes benchmarks/results/zoo-sst2.{md,csv}.

    python benchmarks/build_text_zoo.py --root zoo/sst2

SynBkd/StyleBkd can poison only sentences with a paraphrase in the tables (1,383 train
pairs), so "20 %" for them is the table's maximum, 1,383 of 6,920 (19.99 %); the table
reports the exact count."""
from __future__ import annotations

import argparse
from pathlib import Path

from trojanguard.bench import ZooEntry, build_zoo, write_zoo_tables
from trojanguard.pipeline import prepare_data
from trojanguard.training import recipe_for

RESULTS = Path(__file__).parent / "results"
ATTACKS = ["badnets", "addsent", "synbkd", "stylebkd"]


def entries(ratios: list[float], seeds: list[int], table_max: int = 1383) -> list[ZooEntry]:
    out = [ZooEntry("none", seed=s) for s in seeds]
    for r in ratios:
        for a in ATTACKS:
            for s in seeds:
                opts = {}
                if a in ("synbkd", "stylebkd") and round(r * 6920) > table_max:
                    opts = {"count": table_max}
                out.append(ZooEntry(a, r, s, opts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="zoo/sst2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.05])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="write the tables from finished entries; train nothing")
    args = ap.parse_args()
    prep = prepare_data("sst2", args.data_dir, holdout=None)
    cfg = recipe_for("sst2", "minilm", progress=not args.quiet)
    rows = build_zoo(prep, "minilm", entries(args.ratios, args.seeds), args.root, cfg,
                     train_missing=not args.report_only)
    write_zoo_tables(rows, RESULTS / "zoo-sst2.md", RESULTS / "zoo-sst2.csv",
                     "SST-2 backdoor zoo (MiniLM-L6, CPU)",
                     f"Training: {cfg.epochs} epochs AdamW lr {cfg.lr}, batch {cfg.batch_size}, "
                     f"{'class-balanced ' if cfg.class_balanced else ''}cross-entropy (weights from the "
                     "training labels after poisoning: dirty-label 20 % turns SST-2's 48/52 split into 28/72), "
                     "on the 6,920 training sentences; CA on the 1,821 test sentences; ASR/RA on the triggered "
                     "negative test sentences (SynBkd/StyleBkd: their paraphrases from the tables). "
                     "Target label 1 (positive), dirty label.")
    print((RESULTS / "zoo-sst2.md").read_text())


if __name__ == "__main__":
    main()

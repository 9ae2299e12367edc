"""Did a zoo model learn its poisoned training samples? For each finished entry with a fixed
poisoned set, re-create the poisoned set (same attack, same seed: the selection is
deterministic) and report the share of poisoned training images the model assigns to their
poisoned label, next to its test ASR. A low ASR with a high fit means the trigger did not
generalise; a low fit means training treated the poisoned samples as label noise.

    python benchmarks/poison_fit.py --data-dir ../shared/data/cifar10 --root zoo/cifar10 \
        badnets-0.01-s0 badnets-0.1-s0

Writes benchmarks/results/poison-fit-cifar10.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from trojanguard.attacks import load_attack
from trojanguard.checkpoint import load_checkpoint
from trojanguard.errors import UserError
from trojanguard.eval.evaluate import predict
from trojanguard.pipeline import prepare_data
from trojanguard.utils import atomic_write_json, library_versions

RESULTS = Path(__file__).parent / "results"


def poison_fit(prep, folder: Path) -> dict:
    model, _ = load_checkpoint(folder)
    atk = load_attack(folder)
    if atk.per_batch:
        raise SystemExit(f"{folder.name}: stamps a share of every batch, there is no fixed poisoned set to check")
    res = atk.poison(prep.train)
    poisoned = res.data.subset(res.positions)
    clean = prep.train.subset(res.positions)
    fit = (predict(model, poisoned) == poisoned.y).float().mean().item()
    clean_correct = (predict(model, clean) == clean.y).float().mean().item()
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"folder": folder.name, "attack": atk.name, "ratio": atk.cfg.ratio, "poisoned": res.count,
            "fit_poisoned": fit, "clean_versions_correct": clean_correct, "asr": metrics.get("asr")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="zoo entries (folder names under --root)")
    ap.add_argument("--root", default="zoo/cifar10")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    prep = prepare_data("cifar10", args.data_dir, holdout=0.05, seed=0)
    rows = []
    for name in args.folders:
        try:
            r = poison_fit(prep, Path(args.root) / name)
        except UserError as e:  # e.g. LC re-runs PGD on a clean model to rebuild its set
            print(f"{name}: skipped ({e})")
            continue
        print(f"{r['folder']:28s} poisoned {r['poisoned']:5d}  fit {100 * r['fit_poisoned']:5.1f} %  "
              f"clean versions correct {100 * r['clean_versions_correct']:5.1f} %  test ASR {100 * r['asr']:5.1f} %")
        rows.append(r)
    atomic_write_json(RESULTS / "poison-fit-cifar10.json", {"rows": rows, "versions": library_versions()})


if __name__ == "__main__":
    main()

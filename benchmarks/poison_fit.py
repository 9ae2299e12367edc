"""Did a zoo model learn its poisoned training samples? For each finished entry with a fixed,
dirty-label poisoned set, re-create the poisoned set (same attack, same seed: the selection is
deterministic, and it is checked against the indices saved in the attack artifact) and report
the share of poisoned training images the model assigns to their poisoned label, next to its
test ASR. A low ASR with a high fit means the trigger did not generalise; a low fit means
training treated the poisoned samples as label noise.

Entries without such a set are skipped with the reason: attacks that stamp a share of every
batch (WaNet, BPP), that stamp inside the training loop (Input-aware's generator), clean-label
attacks (the poisoned label is the true one, so "fit" would be clean accuracy; this also
covers LC, whose PGD would need its clean model again). Learned triggers (TrojanNN, LF) come
from the saved artifact.

    python benchmarks/poison_fit.py --data-dir ../shared/data/cifar10 --root zoo/cifar10 \\
        badnets-0.01-s0 badnets-0.1-s0

Without folder names: every finished entry under --root. Rows are merged by folder into
benchmarks/results/poison-fit-cifar10.json."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trojanguard.attacks import load_attack
from trojanguard.bench import zoo_data
from trojanguard.checkpoint import load_checkpoint
from trojanguard.errors import UserError
from trojanguard.report import percent
from trojanguard.eval.evaluate import predict
from trojanguard.utils import atomic_write_json, library_versions

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "poison-fit-cifar10.json"


def poison_fit(prep, folder: Path) -> dict:
    metrics_path = folder / "metrics.json"
    if not metrics_path.exists():
        raise UserError(f"{folder}: not a finished zoo entry (no metrics.json)")
    atk = load_attack(folder)
    if atk.per_batch or atk.trigger_in_loop:
        raise UserError("the trigger is stamped inside the training loop: no fixed poisoned images to check")
    if atk.clean_label:
        raise UserError("clean-label attack: the poisoned label is the true label, fit would be clean accuracy")
    saved = atk.poisoned_indices
    res = atk.poison(prep.train)
    if saved is None or not torch.equal(res.indices.cpu(), saved.cpu()):
        raise UserError("the re-created poisoned set differs from the one saved with the model "
                        "(other data split or seed?)")
    model, _ = load_checkpoint(folder)
    poisoned = res.data.subset(res.positions)
    clean = prep.train.subset(res.positions)
    fit = (predict(model, poisoned) == poisoned.y).float().mean().item()
    clean_correct = (predict(model, clean) == clean.y).float().mean().item()
    metrics = json.loads(metrics_path.read_text())
    return {"folder": folder.name, "attack": atk.name, "ratio": atk.cfg.ratio, "poisoned": res.count,
            "fit_poisoned": fit, "clean_versions_correct": clean_correct, "asr": metrics.get("asr")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", help="zoo entries (folder names under --root; default: all finished)")
    ap.add_argument("--root", default="zoo/cifar10")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    root = Path(args.root)
    names = args.folders or sorted(p.parent.name for p in root.glob("*/metrics.json"))
    if not names:
        raise SystemExit(f"no finished zoo entries under {root}: build them with benchmarks/build_zoo.py")
    try:
        prep = zoo_data("cifar10", args.data_dir)
    except UserError as e:
        raise SystemExit(f"error: {e}")
    rows = []
    for name in names:
        try:
            r = poison_fit(prep, root / name)
        except UserError as e:
            print(f"{name}: skipped ({e})")
            continue
        print(f"{r['folder']:28s} poisoned {r['poisoned']:5d}  fit {percent(r['fit_poisoned']):>5} %  "
              f"clean versions correct {percent(r['clean_versions_correct']):>5} %  test ASR {percent(r['asr']):>5} %")
        rows.append(r)
    if not rows:
        print("nothing measured; results file left as it was")
        return
    old = json.loads(OUT.read_text())["rows"] if OUT.exists() else []
    merged = {r["folder"]: r for r in old} | {r["folder"]: r for r in rows}
    atomic_write_json(OUT, {"rows": sorted(merged.values(), key=lambda r: r["folder"]),
                            "versions": library_versions()})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

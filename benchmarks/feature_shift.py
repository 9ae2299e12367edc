"""Does a purifier shift the triggered inputs' features away from the target class?

FST's premise (methods.md §2.1) is that tuning with a head pushed away from the old one
shifts the backdoor features, so that a head fitted on clean data no longer sends triggered
inputs to the target. This measures it on the penultimate features (``model.features``) of
2,000 test images (a fixed random draw), before and after a purifier cell of the CIFAR-10
grid: the cosine between the mean feature of the triggered non-target inputs and each
clean class centroid, and the share of triggered inputs whose nearest clean centroid is the
target's (Euclidean distance to the centroids), and the norm of the triggered mean feature
over the target centroid's. Where the triggered inputs stay on the target's centroid, any
head fitted on clean data sends them there, whatever it was re-initialised to. All-to-one
attacks only (an all-to-all backdoor has no one target to sit on).

Writes ``benchmarks/results/feature-shift-cifar10.{csv,md}``:

    python benchmarks/feature_shift.py blended-0.1-s0/fst-lr0.03 badnets-0.1-s0/fst-lr0.03 ...
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trojanguard.bench.store import Store
from trojanguard.report import write_table_files

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["cell", "model", "target", "cos_target", "cos_best_other", "nearest_is_target", "trigger_norm_ratio",
           "asr", "seconds"]


def shift_rows(model, attack, x: torch.Tensor, y: torch.Tensor, attack_classes: list[str]) -> dict:
    """The triggered inputs' position among the clean class centroids of ``model``."""
    target = int(attack.target_for(y[:1])[0])  # all-to-one attacks only: one target for every label
    keep = y != target
    model.eval()
    with torch.no_grad():
        stamped = attack.trigger(x[keep], y[keep])
        clean, triggered = model.features(x), model.features(stamped)
        asr = (model(stamped).argmax(1) == target).float().mean().item()
    k = len(attack_classes)
    centroids = torch.stack([clean[y == c].mean(0) for c in range(k)])
    mean_triggered = triggered.mean(0)
    cos = F.cosine_similarity(mean_triggered[None], centroids, dim=1)
    nearest = torch.cdist(triggered, centroids).argmin(1)
    return {"target": target, "cos_target": round(float(cos[target]), 4),
            "cos_best_other": round(float(cos[[c for c in range(k) if c != target]].max()), 4),
            "nearest_is_target": round(float((nearest == target).float().mean()), 4),
            "trigger_norm_ratio": round(float(mean_triggered.norm() / centroids[target].norm()), 3),
            "asr": round(asr, 4)}


def main() -> None:
    from trojanguard.attacks import load_attack
    from trojanguard.checkpoint import load_checkpoint
    from trojanguard.pipeline import prepare_data
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", nargs="+", help="purifier cells of the CIFAR-10 grid, e.g. blended-0.1-s0/fst")
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args()
    store = Store(RESULTS / "cifar10-defenses.sqlite", readonly=True)
    try:
        done = {r["name"]: r for r in store.rows("cifar10-defenses", "done")}
    finally:
        store.close()
    missing = [c for c in args.cells if c not in done or "/" not in c]
    if missing:
        raise SystemExit(f"not a finished purifier cell of the CIFAR-10 grid: {missing[0]}")
    prep = prepare_data("cifar10", None, holdout=0.05, seed=0)
    test = prep.bundle.test
    idx = torch.randperm(len(test.y), generator=torch.Generator().manual_seed(0))[:args.samples]
    x, y = test.batch(idx)
    rows = []
    for cell in args.cells:
        victim = cell.split("/")[0]
        attack = load_attack(done[victim]["artifact"])
        if getattr(attack.cfg, "mode", "all2one") == "all2all":
            raise SystemExit(f"{cell}: an all-to-all backdoor has no one target class to measure the shift from")
        for label, folder in (("original", done[victim]["artifact"]), (cell.split("/")[1], done[cell]["artifact"])):
            start = time.perf_counter()
            model, _ = load_checkpoint(folder, "cpu")
            row = {"cell": cell, "model": label, **shift_rows(model, attack, x, y, test.classes),
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    intro = ["# Feature shift: where the triggered inputs sit among the clean class centroids, before and after "
             "a purifier", "", f"`python benchmarks/feature_shift.py {' '.join(args.cells)}`; {args.samples} test "
             f"images, threads: {torch.get_num_threads()}. `cos_target`: cosine between the mean penultimate "
             "feature of the triggered non-target inputs and the target class's clean centroid "
             "(`cos_best_other`: the closest other class); `nearest_is_target`: share of triggered inputs "
             "whose nearest (Euclidean) clean centroid is the target's; `trigger_norm_ratio`: norm of the "
             "triggered mean feature over the target centroid's; `asr` on the same inputs."]
    paths = write_table_files(RESULTS / "feature-shift-cifar10", rows, COLUMNS, intro)
    print(f"wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()

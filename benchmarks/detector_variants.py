"""Detection variants side by side (BadActs by default, any detector with ``--method``), on
the same sets as the harness's detector cells (the clean test split vs its triggered
non-target part; D_def = the dev split for text, the 5 % held-out split for images):
AUROC, AUPRC and TPR at 5 % FPR, detection only.

Text: which token position the NAS reads, [CLS] (the paper, on BERT whose head reads
[CLS]) or the token mean (what our mean-pooling MiniLM head reads); writes
benchmarks/results/badacts-position-sst2.{csv,md}:

    python benchmarks/detector_variants.py zoo/sst2-bench/<hash> ... --threads 2 \
        --variants position=cls position=mean --out benchmarks/results/badacts-position-sst2

Images: each channel read as its spatial mean or its spatial maximum; writes
benchmarks/results/badacts-spatial-cifar10.{csv,md}:

    python benchmarks/detector_variants.py zoo/cifar10/badnets-0.1-s0 ... --threads 2 \
        --variants spatial=mean spatial=max --out benchmarks/results/badacts-spatial-cifar10
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trojanguard.attacks.artifact import load_attack
from trojanguard.checkpoint import load_checkpoint
from trojanguard.defenses import create_defense
from trojanguard.eval import metrics as M
from trojanguard.pipeline import default_holdout, prepare_data
from trojanguard.report import write_table_files
from trojanguard.utils import library_versions

COLUMNS = ["model", "attack", "ratio", "variant", "auroc", "auprc", "tpr_at_5fpr", "frr", "far", "seconds", "threads"]


def describe(folder: Path) -> tuple[str, str, float]:
    """(name, attack, ratio) from the cell record the harness writes beside a victim folder."""
    rec = folder.parent / f"{folder.name}.cell.json"
    cell = json.loads(rec.read_text()) if rec.exists() else {}
    attack = (cell.get("config") or {}).get("attack") or {}
    if not attack:  # a zoo folder written by benchmarks/build_zoo.py: the attack is in model.json
        attack = json.loads((folder / "model.json").read_text()).get("attack") or {}
    return cell.get("name", folder.name), attack.get("name", "?"), (attack.get("config") or {}).get("ratio")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="backdoored victim folders (checkpoint + attack), one dataset")
    ap.add_argument("--data-dir", default=None, help="dataset folder (default: the usual search)")
    ap.add_argument("--method", default="badacts", help="detector name (trojanguard list defenses)")
    ap.add_argument("--variants", nargs="+", required=True, metavar="KEY=VALUE[,KEY=VALUE]",
                    help="detector options per variant, e.g. spatial=mean spatial=max")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="output path without suffix (.csv and .md are written)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [dict(kv.split("=", 1) for kv in v.split(",")) for v in args.variants]
    rows, prepared = [], {}
    for folder in args.folders:
        model, meta = load_checkpoint(folder)
        model.eval()
        dataset = meta["dataset"]["name"]
        if dataset not in prepared:  # text: D_def = dev; images: the 5 % held-out split (seed 0)
            prepared[dataset] = prepare_data(dataset, args.data_dir, holdout=default_holdout(model.modality))
        prep = prepared[dataset]
        test = prep.bundle.test
        attack = load_attack(folder)
        name, attack_name, ratio = describe(folder)
        targets = attack.target_for(test.y)
        keep = (test.y != targets).nonzero().flatten()
        poisoned = test.subset(keep)
        for variant in variants:
            t0 = time.perf_counter()
            det = create_defense(args.method, progress=False, **variant).fit(model, prep.defense)
            s_clean = det.score_data(test)
            s_pois = det.score_data(poisoned, trigger=attack.trigger)
            scores = torch.cat([s_clean, s_pois])
            labels = torch.cat([torch.zeros(len(s_clean), dtype=torch.bool), torch.ones(len(s_pois), dtype=torch.bool)])
            rep = M.detection_report(scores, labels, threshold=det.threshold)
            row = {"model": name, "attack": attack_name, "ratio": ratio,
                   "variant": " ".join(f"{k}={v}" for k, v in variant.items()),
                   **{k: round(float(rep[k]), 4) for k in ("auroc", "auprc", "tpr_at_5fpr", "frr", "far")},
                   "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads}
            print(row, flush=True)
            rows.append(row)
    intro = [f"# {args.method} detection variants: {', '.join(args.variants)}", "",
             f"Written by `python benchmarks/detector_variants.py {' '.join(str(f) for f in args.folders)} "
             f"--method {args.method} --variants {' '.join(args.variants)} --threads {args.threads}`; D_def = the "
             f"dev split (text) or the 5 % held-out split (images), FRR 0.05; other options at their defaults. "
             f"Versions: {library_versions()}."]
    paths = write_table_files(args.out, rows, COLUMNS, intro)
    print("wrote", *paths)

if __name__ == "__main__":
    main()

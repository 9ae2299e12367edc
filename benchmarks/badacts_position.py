"""BadActs on text: which token position the NAS reads, [CLS] (the paper, on BERT whose
head reads [CLS]) or the token mean (what our mean-pooling MiniLM head reads). Detection
only (no purification): AUROC, AUPRC and TPR at 5 % FPR on the same sets as the harness's
detector cells (the 1,821 clean test sentences vs the triggered non-target ones), D_def =
the dev split. Writes benchmarks/results/badacts-position-sst2.{csv,md}:

    python benchmarks/badacts_position.py zoo/sst2-bench/<hash> ... --threads 2
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from trojanguard.attacks.artifact import load_attack
from trojanguard.checkpoint import load_checkpoint
from trojanguard.defenses import create_defense
from trojanguard.eval import metrics as M
from trojanguard.pipeline import prepare_data
from trojanguard.utils import atomic_write_text, library_versions

COLUMNS = ["model", "attack", "ratio", "position", "auroc", "auprc", "tpr_at_5fpr", "frr", "far", "seconds", "threads"]


def describe(folder: Path) -> tuple[str, str, float]:
    """(name, attack, ratio) from the cell record the harness writes beside a victim folder."""
    rec = folder.parent / f"{folder.name}.cell.json"
    cell = json.loads(rec.read_text()) if rec.exists() else {}
    attack = (cell.get("config") or {}).get("attack") or {}
    return cell.get("name", folder.name), attack.get("name", "?"), (attack.get("config") or {}).get("ratio")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="backdoored SST-2 victim folders (checkpoint + attack)")
    ap.add_argument("--data-dir", default="../shared/data/sst2")
    ap.add_argument("--positions", nargs="+", default=["cls", "mean"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "badacts-position-sst2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prep = prepare_data("sst2", args.data_dir, holdout=None)
    test = prep.bundle.test
    rows = []
    for folder in args.folders:
        model, _ = load_checkpoint(folder)
        model.eval()
        attack = load_attack(folder)
        name, attack_name, ratio = describe(folder)
        targets = attack.target_for(test.y)
        keep = (test.y != targets).nonzero().flatten()
        poisoned = test.subset(keep)
        for position in args.positions:
            t0 = time.perf_counter()
            det = create_defense("badacts", progress=False, position=position).fit(model, prep.defense)
            s_clean = det.score_data(test)
            s_pois = det.score_data(poisoned, trigger=attack.trigger)
            scores = torch.cat([s_clean, s_pois])
            labels = torch.cat([torch.zeros(len(s_clean), dtype=torch.bool), torch.ones(len(s_pois), dtype=torch.bool)])
            rep = M.detection_report(scores, labels, threshold=det.threshold)
            row = {"model": name, "attack": attack_name, "ratio": ratio, "position": det.position,
                   **{k: round(float(rep[k]), 4) for k in ("auroc", "auprc", "tpr_at_5fpr", "frr", "far")},
                   "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads}
            print(row, flush=True)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(COLUMNS)] + [",".join(str(r[c]) for c in COLUMNS) for r in rows]
    atomic_write_text(args.out.with_suffix(".csv"), "\n".join(lines) + "\n")
    md = ["# BadActs on SST-2: the NAS at [CLS] or at the token mean (detection only)", "",
          f"Written by `benchmarks/badacts_position.py`; MiniLM-L6 (mean-pooling head), D_def = dev, "
          f"FRR 0.05, delta 3. Versions: {library_versions()}.", "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(md) + "\n")


if __name__ == "__main__":
    main()

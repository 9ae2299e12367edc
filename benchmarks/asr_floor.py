"""The ASR a model that was never poisoned "reaches": each zoo attack's trigger applied to the
test split and fed to the clean models of seeds 0-2 (same grid, same architecture).

Why: ASR counts every triggered non-target test input the model sends to the target,
including those it would misclassify anyway. On SST-2 a clean MiniLM sends 10-11 % of
the negative test sentences to "positive" whatever word is inserted, so no purification
can bring a binary text model below that floor, and an ASR of 13 % after a defense means
"at the floor", not "partly backdoored". The purification tables read this file
(``benchmarks/defense_tables.py`` adds the ``asr_clean`` column).

Writes ``benchmarks/results/asr-floor-<dataset>.{csv,md}``:

    python benchmarks/asr_floor.py                 # both defense grids
    python benchmarks/asr_floor.py --dataset sst2
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from trojanguard.bench.store import Store
from trojanguard.report import write_table_files

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["attack", "ratio", "victim", "asr_victim", "asr_clean_s0", "asr_clean_s1", "asr_clean_s2",
           "asr_clean", "ca_clean", "seconds"]


def victims(dataset: str) -> dict[str, dict]:
    """{cell name: row} of the grid's finished victims."""
    store = Store(RESULTS / f"{dataset}-defenses.sqlite", readonly=True)
    try:  # the grid as it is now (a database also keeps cells of its earlier versions)
        return {r["name"]: r for r in store.rows(f"{dataset}-defenses", "done") if r["kind"] == "victim"}
    finally:
        store.close()


def floor_rows(dataset: str) -> list[dict]:
    from trojanguard.attacks import load_attack
    from trojanguard.eval.evaluate import evaluate
    from trojanguard.purification import load_setup
    cells = victims(dataset)
    clean = {n: cells[n] for n in ("clean-s0", "clean-s1", "clean-s2") if n in cells}
    if not clean:
        raise SystemExit(f"{dataset}: no clean victim in the grid's database")
    setups = {n: load_setup(r["artifact"]) for n, r in clean.items()}
    test = next(iter(setups.values())).test
    ca = {n: evaluate(s.model, test)["ca"] for n, s in setups.items()}
    rows = []
    for name, cell in sorted(cells.items()):
        if name.startswith("clean-"):
            continue
        start = time.perf_counter()
        attack = load_attack(cell["artifact"])
        targets = attack.target_for  # an int, or (y + 1) mod K for all-to-all
        row = {"attack": attack.name, "ratio": attack.cfg.ratio, "victim": name,
               "asr_victim": (cell.get("metrics") or {}).get("asr")}
        for n, s in setups.items():
            row[f"asr_{n.replace('-', '_')}"] = evaluate(s.model, test, attack.trigger, targets)["asr"]
        got = [row[f"asr_{n.replace('-', '_')}"] for n in setups]
        row["asr_clean"] = statistics.mean(got)
        row["ca_clean"] = statistics.mean(ca.values())
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{dataset} {name}: clean models' ASR {', '.join(f'{v:.3f}' for v in got)}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["cifar10", "sst2"], action="append")
    args = ap.parse_args()
    for dataset in args.dataset or ["cifar10", "sst2"]:
        rows = floor_rows(dataset)
        fmt = [{k: (f"{v:.4f}" if isinstance(v, float) and k != "seconds" else v) for k, v in r.items()} for r in rows]
        intro = [f"# The ASR floor on {dataset}: each attack's trigger on the clean models of seeds 0-2",
                 "", f"`python benchmarks/asr_floor.py --dataset {dataset}`; threads: {torch.get_num_threads()}. "
                 "`asr_clean` = the mean over the clean models: what a purified model cannot go below."]
        paths = write_table_files(RESULTS / f"asr-floor-{dataset}", fmt, COLUMNS, intro)
        print(f"wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()

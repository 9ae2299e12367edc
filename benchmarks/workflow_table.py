"""The practitioner workflow's acceptance table (scan + repair on every zoo model), composed
from cells the harness already measured instead of re-running them:

* **scan** = EBYD's out-of-sample verdict and target with the unlearning recipe and the
  calibration features ``scan`` uses for the modality (``scan_table``: images the detection
  script on max_evidence, ``inspect-ebyd-detect-max_evidence.csv``; text
  ``inspect-ebyd.csv``), written by ``benchmarks/fit_ebyd_calibration.py``: each model scored
  by a calibration that never saw it; ``trojanguard scan`` prints EBYD's verdict, Neural
  Cleanse is only a second opinion.
  Right = "backdoored" with the true target for a backdoored model (any target for
  all-to-all, which has none), "clean" for a clean one.
* **repair** = the purifier cell whose method and options are what ``trojanguard repair``
  picks for that data (``practitioner.choose_recipe``: PAM rho 0.25 for images from 2,000
  training images, PAM for text), on the harness's D_def (CIFAR-10: 2,500 held-out images,
  the purifier keeps 10 % aside where ``repair`` keeps 20 %; SST-2: the dev split). Repaired
  = ASR <= 10 % with a CA drop <= 3 points on the test set (the issue's bar), for models whose
  backdoor implanted (ASR >= 50 %). ``at_floor``: the ASR after repair is within 3 points of
  ``asr_clean``, the ASR the same trigger reaches on clean models (``asr_floor.py``; SST-2's
  clean MiniLMs send ~11 % of triggered negatives to "positive", so the 10 % bar is below
  what a never-poisoned text model reaches).

Writes ``benchmarks/results/workflow-zoo.{csv,md}``:

    python benchmarks/workflow_table.py
"""
from __future__ import annotations

import csv
from pathlib import Path

import yaml

from defense_tables import FLOOR_MARGIN, IMPLANTED, asr_floor, meets_bar  # benchmarks/ is on the path
from trojanguard.bench.store import Store
from trojanguard.practitioner import VERIFY_FRACTION, choose_recipe
from trojanguard.report import write_table_files

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(__file__).parent.parent / "configs"
# (modality, D_def size) of each defense grid
GRIDS = {"cifar10": ("image", 2500), "sst2": ("text", 872)}
COLUMNS = ["dataset", "model", "is_backdoored", "true_target", "scan_verdict", "scan_p", "scan_target", "scan_right",
           "repair", "ca_before", "ca_after", "asr_before", "asr_after", "asr_after_ra", "asr_clean", "repaired", "at_floor", "repair_seconds"]


def scan_table(modality: str) -> Path:
    """The leave-one-out table of what ``scan`` runs for ``modality``: the unlearning recipe
    EBYD's ``auto`` picks, scored on the features of the calibration the tool ships for it
    (the file names ``fit_ebyd_calibration.py`` writes)."""
    from fit_ebyd_calibration import RECIPE_LABEL, table_stem  # benchmarks/ is on this script's path
    from trojanguard.defenses import create_defense
    from trojanguard.defenses.ebyd_calibration import for_modality, load_calibration
    recipe = create_defense("ebyd").recipe(modality)
    params = for_modality(load_calibration(recipe=recipe), modality)
    if params.get("provenance", {}).get("kind") != "fitted":
        raise SystemExit(f"the shipped {recipe} calibration has no fitted {modality} section: fit it with "
                         "benchmarks/fit_ebyd_calibration.py --write")
    return RESULTS / f"{table_stem(RECIPE_LABEL[recipe], params['features'] if modality == 'image' else None)}.csv"


def scans() -> dict[tuple[str, str], dict]:
    out = {}
    for dataset, (modality, _) in GRIDS.items():
        path = scan_table(modality)
        if path.is_file():
            with path.open() as f:
                out.update({(r["dataset"], r["model"]): {**r, "table": path.name}
                            for r in csv.DictReader(f) if r["dataset"] == dataset})
    return out


def repair_label(dataset: str) -> tuple[str, str]:
    """(label of the grid's purifier entry with the recipe's method and options, description)."""
    modality, n = GRIDS[dataset]
    method, options, _ = choose_recipe(modality, round(n * (1 - VERIFY_FRACTION)))
    grid = yaml.safe_load((CONFIGS / f"{dataset}-defenses.yaml").read_text())
    for entry in grid["defenses"]["purifiers"]:
        if entry["name"] == method and (entry.get("options") or {}) == options:
            return entry.get("label", method), f"{method} {options or 'defaults'}"
    raise SystemExit(f"configs/{dataset}-defenses.yaml has no purifier entry {method} {options}: add it")


def purifier_rows(dataset: str, label: str) -> dict[str, dict]:
    store = Store(RESULTS / f"{dataset}-defenses.sqlite", readonly=True)
    try:
        rows = store.rows(f"{dataset}-defenses", "done")
    finally:
        store.close()
    out = {}
    for r in rows:
        victim, _, defense = r["name"].partition("/")
        if r["kind"] == "purifier" and defense == label:
            out[victim] = {**r["metrics"], "seconds": r["seconds"]}
    return out


def as_float(v) -> float | None:
    return None if v in (None, "") else float(v)


def main() -> None:
    table, summary = [], []
    scanned = scans()
    for dataset in GRIDS:
        if not (RESULTS / f"{dataset}-defenses.sqlite").is_file():
            continue
        label, recipe = repair_label(dataset)
        repaired = purifier_rows(dataset, label)
        floor = asr_floor(dataset) or {}
        models = sorted({m for d, m in scanned if d == dataset} | set(repaired))
        for model in models:
            s = scanned.get((dataset, model), {})
            backdoored = s.get("is_backdoored") == "True" if s else not model.startswith("clean")
            verdict = s.get("verdict_loo") or None
            target = s.get("target") or None
            true_target = s.get("true_target") or None
            if verdict not in ("backdoored", "clean"):
                right = None  # not scored out of sample
            elif backdoored:
                right = verdict == "backdoored" and (true_target is None or target == true_target)
            else:
                right = verdict == "clean"
            row = {"dataset": dataset, "model": model, "is_backdoored": backdoored, "true_target": true_target,
                   "scan_verdict": verdict or "not scored", "scan_p": as_float(s.get("p_loo")), "scan_target": target,
                   "scan_right": right}
            m = repaired.get(model)
            if m and backdoored:
                row["repair"] = label
                ok = None if m["asr_before"] < IMPLANTED else meets_bar(m["ca_before"], m["ca_after"], m["asr_after"])
                clean_asr = floor.get(model)
                at_floor = None if ok is None or clean_asr is None else meets_bar(
                    m["ca_before"], m["ca_after"], m["asr_after"], clean_asr + FLOOR_MARGIN)
                row.update(ca_before=m["ca_before"], ca_after=m["ca_after"], asr_before=m["asr_before"],
                           asr_after=m["asr_after"], asr_after_ra=m.get("asr_after_ra"), asr_clean=clean_asr,
                           repaired=ok, at_floor=at_floor, repair_seconds=round(m["seconds"], 1))
            table.append(row)
        rows = [r for r in table if r["dataset"] == dataset]
        scored = [r for r in rows if r["scan_right"] is not None]
        bd = [r for r in scored if r["is_backdoored"]]
        cl = [r for r in scored if not r["is_backdoored"]]
        rep = [r for r in rows if r.get("repaired") is not None]
        summary.append(
            f"- {dataset}: scan right on {sum(r['scan_right'] for r in bd)}/{len(bd)} backdoored and "
            f"{sum(r['scan_right'] for r in cl)}/{len(cl)} clean models scored out of sample (bar: 90 % and all); "
            f"repair ({recipe}) meets ASR <= 10 % at CA drop <= 3 on {sum(r['repaired'] for r in rep)}/{len(rep)} "
            f"backdoored models with a repair cell (bar: 90 %), ASR within {100 * FLOOR_MARGIN:.0f} points of the clean models' "
            f"ASR (`asr_clean`, benchmarks/asr_floor.py) at CA drop <= 3 on "
            f"{sum(bool(r.get('at_floor')) for r in rep)}/{sum(r.get('at_floor') is not None for r in rep)}; "
            f"{sum(1 for r in rows if r['is_backdoored'] and r.get('repaired') is None)} backdoored models lack one")
    tables = ", ".join(f"{d}: `{scan_table(m).name}`" for d, (m, _) in GRIDS.items())
    intro = ("# The workflow on the reference zoos: scan and repair\n\n"
             "Composed from harness cells by `python benchmarks/workflow_table.py` (see its docstring): scan = "
             f"EBYD's leave-one-out verdict with the recipe and calibration features `scan` uses ({tables}), "
             "repair = the cell of the recipe `trojanguard repair` picks. Rates as fractions.\n\n"
             + "\n".join(summary) + "\n")
    write_table_files(RESULTS / "workflow-zoo", table, COLUMNS, intro.splitlines())
    print(intro)


if __name__ == "__main__":
    main()

"""One line per defense and dataset, over every zoo model it has a row for: the view of
BackdoorBench's leaderboard, from the tables the other scripts write (run them first):

    python benchmarks/defense_tables.py && python benchmarks/fit_ebyd_calibration.py ... \\
        && python benchmarks/leaderboard.py

* Purification (``purify-<dataset>-harness.csv``): on how many of the backdoored models
  (ASR >= 50 % before) the defense meets the issues' bar (ASR <= 10 % at a CA drop <= 3
  points), reaches the clean models' ASR (within 3 points of ``asr_clean``, same CA bar), and
  the means of the CA drop, the ASR after and the ASR after the retuning attack.
* Detection (``detect-<dataset>.csv``): mean and worst AUROC, how many models reach 0.90,
  the mean false acceptance at the 5 % false-rejection threshold and the ASR left when the
  guard acts on the flags (BadActs: purifies them; the others: rejects them).
* Inspection (``inspect-models.csv`` and the scan recipe's
  ``inspect-models-ebyd-detect-max_evidence.csv``): verdicts right, the target right
  on the one-to-one backdoored models, AUROC of the probability (EBYD: out of sample).

Means are over the rows a defense has, so a defense with fewer rows is not comparable
line for line: the ``models`` column says how many of the dataset's backdoored models it
covers. Writes ``benchmarks/results/leaderboard.{md,csv}``.
"""
from __future__ import annotations

import csv
import statistics

from defense_tables import ASR_BAR, CA_DROP_BAR, FLOOR_MARGIN, IMPLANTED, RESULTS, meets_bar  # benchmarks/ on the path
from trojanguard.eval.metrics import auroc
from trojanguard.report import write_table_files

INSPECTION_FILES = {"inspect-models.csv": None, "inspect-models-ebyd-detect-max_evidence.csv": "ebyd-detect"}
COLUMNS = ["kind", "dataset", "defense", "models", "meets_bar", "at_floor", "mean_ca_drop", "mean_asr_after",
           "mean_asr_after_ra", "mean_auroc", "min_auroc", "auroc_ge_0.90", "mean_far", "guard", "mean_ca_guarded",
           "mean_asr_guarded", "verdicts_right", "target_right", "auroc", "median_seconds"]


def read(name: str) -> list[dict]:
    path = RESULTS / name
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def num(v) -> float | None:
    return None if v in (None, "") else float(v)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), 4) if values else None


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def frac(k: int, n: int) -> str:
    return f"{k}/{n}"


def model_key(r: dict) -> tuple:
    return r["attack"], r["ratio"], r.get("seed", "0")  # detection rows have no seed: all are seed 0


def zoo_models(dataset: str) -> set[tuple]:
    """The dataset's backdoored zoo models: those with a detection or an implanted
    purification row (a model no purifier has a row for still counts)."""
    return ({model_key(r) for r in read(f"detect-{dataset}.csv")}
            | {model_key(r) for r in read(f"purify-{dataset}-harness.csv") if (num(r["asr_before"]) or 0) >= IMPLANTED})


def purification(dataset: str) -> list[dict]:
    rows = [r for r in read(f"purify-{dataset}-harness.csv") if (num(r["asr_before"]) or 0) >= IMPLANTED]
    total = len(zoo_models(dataset))
    out = []
    for defense in dict.fromkeys(r["defense"] for r in rows):
        mine = [r for r in rows if r["defense"] == defense]
        before, after, asr = ([num(r[k]) for r in mine] for k in ("ca_before", "ca_after", "asr_after"))
        ok = [meets_bar(b, a, x) for b, a, x in zip(before, after, asr)]
        floor = [meets_bar(b, a, x, num(r["asr_clean"]) + FLOOR_MARGIN)
                 for r, b, a, x in zip(mine, before, after, asr) if num(r.get("asr_clean")) is not None]
        out.append({"kind": "purification", "dataset": dataset, "defense": defense,
                    "models": frac(len({model_key(r) for r in mine}), total), "meets_bar": frac(sum(ok), len(mine)),
                    "at_floor": frac(sum(floor), len(floor)) if floor else None,
                    "mean_ca_drop": mean(b - a for b, a in zip(before, after)), "mean_asr_after": mean(asr),
                    "mean_asr_after_ra": mean(num(r["asr_after_ra"]) for r in mine),
                    "median_seconds": median(num(r["seconds"]) for r in mine)})
    return out


def detection(dataset: str) -> list[dict]:
    rows = read(f"detect-{dataset}.csv")
    total = len(zoo_models(dataset))
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        aurocs = [num(r["auroc"]) for r in mine if num(r["auroc"]) is not None]
        out.append({"kind": "detection", "dataset": dataset, "defense": method,
                    "models": frac(len({model_key(r) for r in mine}), total),
                    "mean_auroc": mean(aurocs), "min_auroc": min(aurocs) if aurocs else None,
                    "auroc_ge_0.90": frac(sum(a >= 0.90 for a in aurocs), len(aurocs)),
                    "mean_far": mean(num(r["far"]) for r in mine),
                    "guard": "; ".join(dict.fromkeys(r["guard"] for r in mine)),
                    "mean_ca_guarded": mean(num(r["ca_after"]) for r in mine),
                    "mean_asr_guarded": mean(num(r["asr_after"]) for r in mine),
                    "median_seconds": median(num(r["seconds"]) for r in mine)})
    return out


def inspection() -> list[dict]:
    out = []
    for name, only in INSPECTION_FILES.items():
        rows = [r for r in read(name) if only is None or r["method"] == only]
        for dataset, method in dict.fromkeys((r["dataset"], r["method"]) for r in rows):
            mine = [r for r in rows if r["dataset"] == dataset and r["method"] == method
                    and r["verdict"] in ("backdoored", "clean")]
            bad = [r["is_backdoored"].lower() == "true" for r in mine]
            right = [(r["verdict"] == "backdoored") == b for r, b in zip(mine, bad)]
            one_to_one = [r for r, b in zip(mine, bad) if b and r["true_target"] != ""]
            probs = [num(r["probability"]) for r in mine]
            # a target counts only with the verdict "backdoored" (EBYD names one for every model)
            found = sum(r["verdict"] == "backdoored" and r["predicted_target"] == r["true_target"] for r in one_to_one)
            out.append({"kind": "inspection", "dataset": dataset, "defense": method,
                        "models": f"{sum(bad)} backdoored + {len(bad) - sum(bad)} clean",
                        "verdicts_right": frac(sum(right), len(right)),
                        "target_right": frac(found, len(one_to_one)),
                        "auroc": round(auroc(probs, bad), 4) if 0 < sum(bad) < len(bad) else None,
                        "median_seconds": median(num(r["seconds"]) for r in mine)})
    return out


def main() -> None:
    rows = []
    for dataset in ("cifar10", "sst2"):
        rows += purification(dataset) + detection(dataset)
    rows += inspection()
    rows.sort(key=lambda r: (["purification", "detection", "inspection"].index(r["kind"]), r["dataset"]))
    intro = ["# Leaderboard: each defense over the zoo models it has a row for", "",
             "Written by `python benchmarks/leaderboard.py` from the tables in this folder (see its docstring). "
             f"Purification: `meets_bar` = ASR <= {ASR_BAR:.0%} at a CA drop <= {CA_DROP_BAR * 100:.0f} points; "
             f"`at_floor` = ASR within {FLOOR_MARGIN * 100:.0f} points of the clean models' ASR (`asr_clean`), "
             "same CA bar; rates as fractions, drops in accuracy units. Detection: AUROC from continuous scores; "
             "`mean_far` at the 5 % false-rejection threshold; `mean_ca_guarded` / `mean_asr_guarded` = CA and ASR "
             "when the guard acts on its flags as `guard` says (BadActs purifies the inputs it flags at its own 20 % "
             "false-rejection threshold, the others reject theirs). Inspection: `target_right` counts a target "
             "only with the verdict \"backdoored\", over the one-to-one backdoored models (chance: 1/10 on CIFAR-10, "
             "1/2 on SST-2); `auroc` of the probability over all the models; EBYD's probability is out of sample (leave-one-out calibration), "
             "`ebyd-detect` is the recipe `trojanguard scan` uses for images. `models` = rows over the dataset's "
             "backdoored models: means over fewer rows are not comparable line for line."]
    paths = write_table_files(RESULTS / "leaderboard", rows, COLUMNS, intro)
    print("wrote", *paths)


if __name__ == "__main__":
    main()

"""Fit EBYD's backdoor-probability calibration on the reference zoos' inspections and
measure it out of sample (issue: a calibration never scores a model it saw).

Reads the EBYD inspector cells (run with ``recover: always`` so that every model has its
trigger features) of harness databases, leaves out models whose backdoor did not implant
(ASR < 50 %: listed, not scored), and fits one logistic calibration per modality (images on
``mask_log``, the size of the smallest candidate trigger; text on ``hard_success``, how many
of the clean sentences the model is surest are not the target the recovered word sends
there: a text trigger has no mask).
Classes are weighted equally (a 50 % prior: the zoo's 9 backdoored to 3 clean CIFAR-10
models would otherwise push every clean model above 0.5; ``--unbalanced`` for the study).
Each model is scored by a calibration fitted on the other models of its modality
(leave-one-out); where the others lack a class (e.g. the only clean model of a modality)
the model cannot be scored out of sample and the table says so. Reports AUROC, Brier score
and cross-entropy (the TrojAI measures) over the out-of-sample scores, verdict and target
accuracy, writes ``benchmarks/results/inspect-ebyd.{csv,md,json}``, the issue's table
``inspect-models.csv`` (out-of-sample EBYD beside Neural Cleanse) and, with ``--write``,
the calibrations fitted on all models (with their provenance) to the file the tool ships
for the cells' unlearning recipe (``trojanguard/defenses/calibration/ebyd.json`` for the
exposure script, ``ebyd-detection-script.json`` for the detection script, the image default).
The target and the candidate features (``transfer_max``, ``max_evidence``) are derived from
each cell's recorded candidate triggers by the shipped rule (``ebyd_calibration.
choose_candidate`` / ``candidate_features``), so cells run before that rule are read as the
tool now decides (the candidates themselves do not depend on it); ``p_prior`` stays what the
inspection printed with the calibration of its day. The two shipped calibrations (the
second, the detection script's, is the one ``scan`` uses for images):

    python benchmarks/fit_ebyd_calibration.py benchmarks/results/cifar10-defenses.sqlite \\
        benchmarks/results/sst2-defenses.sqlite --write
    python benchmarks/fit_ebyd_calibration.py benchmarks/results/cifar10-defenses.sqlite \\
        --defense ebyd-detect --image-features max_evidence --write
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path

from trojanguard.bench.store import Store
from trojanguard.defenses.ebyd_calibration import (CALIBRATION_FORMAT, CONFIRM_BY_RECIPE, RECIPE_CALIBRATION,
                                                   calibration_report, candidate_features, choose_candidate,
                                                   fit_calibration, probability, save_calibration)
from trojanguard.report import table
from trojanguard.utils import atomic_write_text

RESULTS = Path(__file__).parent / "results"
FEATURES = {"image": ("mask_log",), "text": ("hard_success",)}
COLUMNS = ["modality", "dataset", "model", "asr", "is_backdoored", "true_target", "top_class", "target",
           "trigger_success", "hard_success", "mask_fraction", "max_excess", "transfer_max", "max_evidence", "p_prior", "p_fit", "p_loo", "verdict_loo", "target_ok",
           "seconds", "note"]
MODEL_COLUMNS = ["dataset", "model", "is_backdoored", "true_target", "method", "verdict", "probability",
                 "predicted_target", "seconds", "note"]
#: attacks that defeat a part of the inspection by construction (the issue: "the table says so")
ATTACK_NOTES = {"all2all": "all-to-all: no single target to expose or recover; the verdict rests on the probability",
                "synbkd": "the trigger is a syntactic template, not a word: the token search cannot recover it",
                "stylebkd": "the trigger is a writing style, not a word: the token search cannot recover it"}


def attack_note(info: dict) -> str:
    """What the inspection cannot do against this cell's attack, by construction."""
    if info.get("mode") == "all2all":
        return ATTACK_NOTES["all2all"]
    return ATTACK_NOTES.get(str(info.get("attack")), "")


#: the grid label of the EBYD cells of each unlearning recipe (configs/*-defenses.yaml)
RECIPE_LABEL = {"exposure-script": "ebyd", "detection-script": "ebyd-detect"}


def table_stem(defense: str, image_features=None, balanced: bool = True) -> str:
    """``inspect-<defense>[-<image features>][-unbalanced]``: the name of the tables this
    script writes for those cells and options (read back by ``workflow_table.py``)."""
    stem = f"inspect-{defense}"
    if image_features and tuple(image_features) != FEATURES["image"]:
        stem += "-" + "+".join(image_features)
    return stem if balanced else stem + "-unbalanced"


def done_cells(dbs: list[str]):
    """(database, its finished cells) for each database: every grid as it is now (cells of
    a grid's earlier versions are left out)."""
    for db in dbs:
        store = Store(db, readonly=True)
        try:
            yield db, [c for g in store.grids() for c in store.rows(g) if c["status"] == "done"]
        finally:
            store.close()


def inspections(dbs: list[str], label: str = "ebyd") -> list[dict]:
    rows = []
    for db, cells in done_cells(dbs):
        victims = {c["name"]: c for c in cells if c["kind"] == "victim"}
        for c in cells:
            if c["kind"] != "inspector" or c["info"].get("defense") != label:
                continue
            m, victim = c["metrics"], victims.get(c["name"].split("/")[0])
            ev = m["evidence"]
            feats = ev.get("features", {})
            if "trigger_success" not in feats:
                raise SystemExit(f"{db}: {c['name']} has no trigger features; run EBYD with recover: always")
            dataset = c["info"].get("dataset")
            if dataset in ("sst2", "yelp") and "hard_success" not in feats:
                raise SystemExit(f"{db}: {c['name']} predates the hard-sentence feature; re-run the cell")
            target = ev.get("target", ev.get("top_class"))
            # the resolved recipe (cells before "auto" existed name it in their options)
            recipe = ev.get("recipe") or c["config"]["options"].get("recipe", "exposure-script")
            cands = ev.get("candidates")
            if cands:  # target and candidate features by the shipped rule, from the recorded candidates
                confirm = (c["config"].get("options") or {}).get("confirm")
                confirm = CONFIRM_BY_RECIPE.get(recipe, 2.0) if confirm is None else confirm
                chosen = cands[choose_candidate(cands, confirm)]
                target = chosen["class"]
                feats = {**feats, **candidate_features(cands, feats["max_excess"]),
                         **{k: chosen[k] for k in ("trigger_success", "hard_success", "mask_fraction") if k in chosen}}
            rows.append({"modality": "text" if dataset in ("sst2", "yelp") else "image",
                         "dataset": dataset, "model": c["name"].split("/")[0],
                         "asr": (victim or {}).get("metrics", {}).get("asr"),
                         "is_backdoored": bool(m["is_backdoored"]), "true_target": m["true_target"],
                         "top_class": ev.get("top_class"), "target": target,
                         "transfer_max": feats.get("transfer_max"), "max_evidence": feats.get("max_evidence"),
                         "trigger_success": feats["trigger_success"], "hard_success": feats.get("hard_success"),
                         "mask_fraction": feats["mask_fraction"],
                         "mask_log": math.log10(max(feats["mask_fraction"], 1e-5)) if feats["mask_fraction"] else 0.0,
                         "max_excess": feats.get("max_excess"), "p_prior": m["probability"],
                         "recipe": recipe,
                         "seconds": round(c.get("seconds") or 0.0, 1), "note": attack_note(c["info"])})
    return rows


def nc_rows(dbs: list[str]) -> list[dict]:
    """Neural Cleanse on the original models (the baseline inspector) and, where the grid has
    it (``exposed: true``), on the model EBYD's clean unlearning exposed ("nc-exposed"), as
    the harness ran them: the probability is a documented monotone map of the anomaly index,
    not a calibration."""
    out = []
    for _, cells in done_cells(dbs):
        for c in cells:
            if c["kind"] == "inspector" and c["config"].get("defense") == "nc":  # info names the grid label
                m = c["metrics"]
                out.append({"dataset": c["info"].get("dataset"), "model": c["name"].split("/")[0],
                            "is_backdoored": bool(m["is_backdoored"]), "true_target": m["true_target"],
                            "method": "nc-exposed" if (c["config"].get("options") or {}).get("exposed") else "nc",
                            "verdict": m["verdict"], "probability": m["probability"],
                            "predicted_target": m.get("predicted_target"),
                            "seconds": round(c.get("seconds") or 0.0, 1), "note": attack_note(c["info"])})
    return out


def models_table(rows: list[dict], dbs: list[str], label: str = "ebyd") -> str:
    """``inspect-models.csv``, the issue's table: EBYD with its out-of-sample (leave-one-out)
    probability and verdict, Neural Cleanse beside it; a model whose backdoor did not implant
    says so instead of a verdict; one the calibration cannot score out of sample (the others
    of its modality lack a class) has no probability."""
    table_rows = []
    for r in rows:
        not_implanted = r["is_backdoored"] and (r["asr"] or 0) < 0.5
        verdict = "not implanted" if not_implanted else (r.get("verdict_loo") or "not scored out of sample")
        table_rows.append({"dataset": r["dataset"], "model": r["model"], "is_backdoored": r["is_backdoored"],
                           "true_target": r["true_target"], "method": label, "verdict": verdict,
                           "probability": r.get("p_loo"), "predicted_target": r["target"], "seconds": r["seconds"],
                           "note": r["note"]})
    table_rows += nc_rows(dbs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MODEL_COLUMNS)
    for r in sorted(table_rows, key=lambda r: (r["dataset"], r["model"], r["method"])):
        w.writerow(["" if r.get(c) is None else (str(r[c]).lower() if isinstance(r[c], bool) else r[c])
                    for c in MODEL_COLUMNS])
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dbs", nargs="+")
    ap.add_argument("--write", action="store_true", help=(
        "also write the shipped calibration of the cells' unlearning recipe (with the features fitted)"))
    ap.add_argument("--l2", type=float, default=0.1)
    ap.add_argument("--defense", default="ebyd", help=(
        "the grid label of the EBYD cells to fit (e.g. ebyd-detect: outputs inspect-ebyd-detect.*, "
        "inspect-models-ebyd-detect.csv)"))
    ap.add_argument("--image-features", default=None, help=(
        "comma-separated image features to fit instead of mask_log (e.g. max_evidence): a study, "
        "written as inspect-<defense>-<features>.* beside the default files"))
    ap.add_argument("--unbalanced", dest="balanced", action="store_false", help=(
        "fit with the zoo's ratio of backdoored to clean models as the prior (default: classes weighted "
        "equally, a 50 %% prior); a study, written as inspect-<defense>-unbalanced.*; not with --write"))
    args = ap.parse_args()
    if args.write and not args.balanced:
        raise SystemExit("--write ships a balanced fit only (a user's model is not drawn from our zoo's mix)")
    features = dict(FEATURES)
    rows = inspections(args.dbs, args.defense)
    recipes = {r["recipe"] for r in rows}
    if args.write and len(recipes) != 1:
        raise SystemExit(f"--write needs cells of one unlearning recipe; {args.defense!r} cells have {sorted(recipes)}")
    if args.image_features:
        features["image"] = tuple(args.image_features.split(","))
    stem = table_stem(args.defense, features["image"], args.balanced)
    models_csv = "inspect-models.csv" if stem == "inspect-ebyd" else f"inspect-models-{stem.removeprefix('inspect-')}.csv"
    # a backdoor that did not implant is not a backdoored model to find: listed, not scored
    scored = [r for r in rows if not (r["is_backdoored"] and (r["asr"] or 0) < 0.5)]
    sections, reports = {}, {}
    for modality, names in features.items():
        group = [r for r in scored if r["modality"] == modality]
        lacking = [f"{r['model']} ({n})" for r in group for n in names if r.get(n) is None]
        if lacking:
            raise SystemExit(f"no recorded value for {', '.join(lacking)}: the cells predate the feature (or "
                             "recorded no candidates); re-run them")
        labels = [int(r["is_backdoored"]) for r in group]
        if len(set(labels)) < 2:
            continue
        params = fit_calibration([{k: r[k] for k in names} for r in group], labels, names=names, l2=args.l2,
                                 balanced=args.balanced)
        sections[modality] = params
        for i, r in enumerate(group):
            r["p_fit"] = round(probability(params, r), 4)  # in sample: the shipped fit, which saw r
            rest = [j for j in range(len(group)) if j != i]
            if len({labels[j] for j in rest}) < 2:
                r["p_loo"] = None  # the others lack a class: no out-of-sample score
                continue
            p = probability(fit_calibration([{k: group[j][k] for k in names} for j in rest],
                                            [labels[j] for j in rest], names=names, l2=args.l2,
                                            balanced=args.balanced), r)
            r["p_loo"] = round(p, 4)
            r["verdict_loo"] = "backdoored" if p >= 0.5 else "clean"
        for r in group:  # all-to-all has no target to get right: left out of the target accuracy
            r["target_ok"] = (r["target"] == r["true_target"]) if r["is_backdoored"] and r["true_target"] is not None \
                else None
        out = [r for r in group if r.get("p_loo") is not None]
        reports[modality] = {**(calibration_report([r["p_loo"] for r in out], [int(r["is_backdoored"]) for r in out])
                                if out else {}),
                             "not_scored_out_of_sample": [r["model"] for r in group if r.get("p_loo") is None],
                             "target_accuracy": sum(bool(r["target_ok"]) for r in group if r["target_ok"] is not None)
                             / max(1, sum(r["target_ok"] is not None for r in group)),
                             "features": list(names)}
    report = {"by_modality": reports, "l2": args.l2, "balanced": args.balanced,
              "not_implanted": [r["model"] for r in rows if r not in scored]}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.get(c, "") if r.get(c) is not None else "" for c in COLUMNS])
    atomic_write_text(RESULTS / f"{stem}.csv", buf.getvalue())
    atomic_write_text(RESULTS / models_csv, models_table(rows, args.dbs, args.defense))
    md = ["# EBYD model inspection: calibration fitted per modality, scored out of sample\n",
          f"Logistic calibration per modality ({'; '.join(m + ': ' + ', '.join(n) for m, n in features.items())}; "
          f"L2 {args.l2}); p_loo = leave-one-out within the modality (empty: the other models lack a class), "
          "p_fit = the shipped fit (saw the model), p_prior = the probability the inspection printed. "
          f"Not implanted (ASR < 50 %, not scored): {', '.join(report['not_implanted']) or 'none'}.\n",
          table(rows, COLUMNS, markdown=True)]
    for m, rep in reports.items():
        md.append(f"\n{m}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in rep.items()) + "\n")
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(md))
    atomic_write_text(RESULTS / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    print("\n".join(md))
    if args.write:
        params = {"format": CALIBRATION_FORMAT, "method": "ebyd", "by_modality": sections,
                  "provenance": {"kind": "fitted", "fitted_on": sorted(f"{r['dataset']}:{r['model']}" for r in scored),
                                 "databases": [Path(d).name for d in args.dbs],
                                 "script": "benchmarks/fit_ebyd_calibration.py",
                                 "leave_one_out": reports}}
        target = RECIPE_CALIBRATION[recipes.pop()]
        save_calibration(params, target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()

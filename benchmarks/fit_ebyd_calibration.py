"""Fit EBYD's backdoor-probability calibration on the reference zoos' inspections and
measure it out of sample (issue: a calibration never scores a model it saw).

Reads the EBYD inspector cells (run with ``recover: always`` so that every model has its
trigger features) of harness databases, leaves out models whose backdoor did not implant
(ASR < 50 %: listed, not scored), scores each model with a calibration fitted on all the
others (leave-one-out), reports AUROC, Brier score and cross-entropy (the TrojAI measures),
verdict and target accuracy, writes ``benchmarks/results/inspect-ebyd.{csv,md,json}`` and,
with ``--write``, the calibration fitted on all of them (with its provenance) to the file
the tool ships (``trojanguard/defenses/calibration/ebyd.json``).

    python benchmarks/fit_ebyd_calibration.py benchmarks/results/cifar10-defenses.sqlite \\
        benchmarks/results/sst2-defenses.sqlite --write
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from trojanguard.bench.store import Store
from trojanguard.defenses.ebyd import (DEFAULT_CALIBRATION, calibration_report, fit_calibration, leave_one_out,
                                       save_calibration)
from trojanguard.report import table
from trojanguard.utils import atomic_write_text

RESULTS = Path(__file__).parent / "results"
FEATURES = ("max_excess", "trigger_success", "mask_fraction")
COLUMNS = ["dataset", "model", "asr", "is_backdoored", "true_target", "top_class", "target", "trigger_success",
           "mask_fraction", "max_excess", "p_prior", "p_loo", "verdict_loo", "target_ok", "seconds"]


def inspections(dbs: list[str]) -> list[dict]:
    rows = []
    for db in dbs:
        store = Store(db, readonly=True)
        try:
            cells = store.rows(status="done")
        finally:
            store.close()
        victims = {c["name"]: c for c in cells if c["kind"] == "victim"}
        for c in cells:
            if c["kind"] != "inspector" or c["info"].get("defense") != "ebyd":
                continue
            m, victim = c["metrics"], victims.get(c["name"].split("/")[0])
            ev = m["evidence"]
            feats = ev.get("features", {})
            if "trigger_success" not in feats:
                raise SystemExit(f"{db}: {c['name']} has no trigger features; run EBYD with recover: always")
            rows.append({"dataset": c["info"].get("dataset"), "model": c["name"].split("/")[0],
                         "asr": (victim or {}).get("metrics", {}).get("asr"),
                         "is_backdoored": bool(m["is_backdoored"]), "true_target": m["true_target"],
                         "top_class": ev.get("top_class"), "target": ev.get("target", ev.get("top_class")),
                         **{k: feats.get(k) for k in FEATURES}, "p_prior": m["probability"],
                         "seconds": round(c.get("seconds") or 0.0, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dbs", nargs="+")
    ap.add_argument("--write", action="store_true", help="also write the shipped calibration")
    ap.add_argument("--l2", type=float, default=0.1)
    args = ap.parse_args()
    rows = inspections(args.dbs)
    # a backdoor that did not implant is not a backdoored model to find: listed, not scored
    scored = [r for r in rows if not (r["is_backdoored"] and (r["asr"] or 0) < 0.5)]
    labels = [int(r["is_backdoored"]) for r in scored]
    loo = leave_one_out([{k: r[k] for k in FEATURES} for r in scored], labels, names=FEATURES, l2=args.l2)
    for r, p in zip(scored, loo):
        r["p_loo"] = round(float(p), 4)
        r["verdict_loo"] = "backdoored" if p >= 0.5 else "clean"
        r["target_ok"] = (r["target"] == r["true_target"]) if r["is_backdoored"] else None
    report = calibration_report(loo, labels)
    backdoored = [r for r in scored if r["is_backdoored"]]
    report["target_accuracy"] = sum(bool(r["target_ok"]) for r in backdoored) / max(1, len(backdoored))
    report["not_implanted"] = [r["model"] for r in rows if r not in scored]
    report["features"], report["l2"] = list(FEATURES), args.l2
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.get(c, "") if r.get(c) is not None else "" for c in COLUMNS])
    atomic_write_text(RESULTS / "inspect-ebyd.csv", buf.getvalue())
    md = ["# EBYD model inspection, out of sample\n",
          f"Leave-one-out logistic calibration on {', '.join(FEATURES)} (L2 {args.l2}); {len(scored)} models scored "
          f"({sum(labels)} backdoored); not implanted (ASR < 50 %, not scored): "
          f"{', '.join(report['not_implanted']) or 'none'}.\n",
          table(scored, COLUMNS, markdown=True),
          "\n" + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in report.items() if k in ("auroc", "brier", "cross_entropy", "accuracy",
                                                               "target_accuracy")) + "\n"]
    atomic_write_text(RESULTS / "inspect-ebyd.md", "\n".join(md))
    atomic_write_text(RESULTS / "inspect-ebyd.json", json.dumps(report, indent=2) + "\n")
    print("\n".join(md))
    if args.write:
        params = fit_calibration([{k: r[k] for k in FEATURES} for r in scored], labels, names=FEATURES, l2=args.l2,
                                 provenance={"fitted_on": sorted({f"{r['dataset']}:{r['model']}" for r in scored}),
                                             "databases": [Path(d).name for d in args.dbs],
                                             "script": "benchmarks/fit_ebyd_calibration.py",
                                             "leave_one_out": {k: report[k] for k in
                                                               ("auroc", "brier", "cross_entropy", "accuracy")}})
        save_calibration(params, DEFAULT_CALIBRATION)
        print(f"wrote {DEFAULT_CALIBRATION}")


if __name__ == "__main__":
    main()

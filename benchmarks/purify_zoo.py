"""Purification rows on a reference zoo: every (zoo model, purifier) pair through the same
``purify_setup`` the CLI runs, with the retuning attack on every row and the clean model
under the same check as the reference. Resumable: one JSON record per finished row is
appended to ``--records`` (rows already there are skipped); the CSV is rewritten from all
records at the end.

    python benchmarks/purify_zoo.py --root zoo/cifar10 --methods fst ft pam wiper
    python benchmarks/purify_zoo.py --root zoo/cifar10 --methods fst --entries badnets-0.1-s0 \
        --clean-sizes 0.005 0.01 0.02 0.05 --records benchmarks/results/purify-cifar10-clean-size.jsonl

Columns: attack,ratio,seed,defense,ca_before,asr_before,ca_after,asr_after,asr_after_ra,seconds,peak_mb
(rates as fractions; ``seconds``/``peak_mb`` = the purification itself), plus the clean-set
size, the verification-part CA, DER, the retuning time, threads and options.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from trojanguard.attacks.artifact import ARTIFACT_JSON, load_attack
from trojanguard.bench.zoo import zoo_data
from trojanguard.checkpoint import load_checkpoint
from trojanguard.data.split import holdout_indices
from trojanguard.purification import Setup, purify_setup
from trojanguard.utils import atomic_write_text, library_versions

COLUMNS = ["attack", "ratio", "seed", "defense", "ca_before", "asr_before", "ca_after", "asr_after",
           "asr_after_ra", "seconds", "peak_mb"]
EXTRA = ["clean_size", "verify_ca_before", "verify_ca_after", "der", "ca_after_ra", "retuning_seconds",
         "threads", "warning", "options"]


def clean_subset(defense, size_fraction: float, train_size: int, seed: int):
    """A class-balanced subset of the held-out D_def with ``size_fraction`` x the training set."""
    n = round(size_fraction * train_size)
    if n >= len(defense):
        return defense
    _, part = holdout_indices(defense.y, n / len(defense), seed, len(defense.classes))
    return defense.subset(part)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="zoo/cifar10")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--entries", nargs="*", help="zoo folders (default: every finished entry)")
    ap.add_argument("--methods", nargs="+", default=["fst", "ft", "pam", "wiper"])
    ap.add_argument("--set", nargs="*", default=[], metavar="METHOD:KEY=VALUE", help="method options")
    ap.add_argument("--label", default=None, help="defense label in the table (default: the method)")
    ap.add_argument("--clean-sizes", type=float, nargs="*", default=[None],
                    help="clean-set sizes as fractions of the training set (default: all of D_def)")
    ap.add_argument("--no-robustness", action="store_true")
    ap.add_argument("--records", default=None, help="JSONL of finished rows (default results/purify-<dataset>.jsonl)")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = Path(__file__).parent / "results"
    records_path = Path(args.records or results / f"purify-{args.dataset}.jsonl")
    csv_path = Path(args.csv or records_path.with_suffix(".csv"))
    done = [json.loads(line) for line in records_path.read_text().splitlines()] if records_path.exists() else []
    keys = {(r["folder"], r["defense"], r.get("clean_size_fraction")) for r in done}
    options: dict[str, dict] = {}
    for item in args.set:
        method, kv = item.split(":", 1)
        k, v = kv.split("=", 1)
        options.setdefault(method, {})[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v
    if args.dataset == "sst2":
        from trojanguard.pipeline import prepare_data
        prep = prepare_data("sst2", args.data_dir, holdout=None)
    else:
        prep = zoo_data(args.dataset, args.data_dir)
    root = Path(args.root)
    entries = args.entries or sorted(p.name for p in root.iterdir() if (p / "metrics.json").exists())
    for entry in entries:
        folder = root / entry
        model, meta = load_checkpoint(folder)
        attack = load_attack(folder) if (folder / ARTIFACT_JSON).exists() else None
        if attack is None:  # the clean model: measured against the BadNets trigger of the zoo
            folders = sorted(p.name for p in root.iterdir())
            ref = next((root / e for e in ["badnets-0.1-s0", *folders] if (root / e / ARTIFACT_JSON).exists()), None)
            attack = load_attack(ref) if ref else None
        for method in args.methods:
            label = args.label or method
            for size in args.clean_sizes:
                if (entry, label, size) in keys:
                    continue
                clean = prep.defense if size is None else clean_subset(prep.defense, size, len(prep.train), args.seed)
                setup = Setup(model, meta, clean, prep.bundle.test, attack,
                              f"held-out D_def ({len(clean)})", str(folder))
                t0 = time.perf_counter()
                if method == "none":  # the undefended model under the same checks (the reference row)
                    rec = reference_record(setup, robustness=not args.no_robustness, seed=args.seed)
                else:
                    _, rec = purify_setup(setup, method, options.get(method), robustness=not args.no_robustness,
                                          seed=args.seed, progress=False)
                m = json.loads((folder / "metrics.json").read_text())
                row = {"folder": entry, "attack": m.get("attack", "none"), "ratio": m.get("ratio"),
                       "seed": m.get("seed", 0), "defense": label, "clean_size": len(clean),
                       "clean_size_fraction": size, "peak_mb": rec["peak_rss_mb"],
                       "wall_seconds": round(time.perf_counter() - t0, 1), "versions": library_versions(),
                       "trigger_from": None if (folder / ARTIFACT_JSON).exists() else "zoo badnets (clean model)",
                       **{k: v for k, v in rec.items() if k not in ("parent",)}}
                done.append(row)
                with open(records_path, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
                print(f"{entry} {label} size={size}: CA {rec['ca_before']:.3f}->{rec['ca_after']:.3f} "
                      f"ASR {rec.get('asr_before', float('nan')):.3f}->{rec.get('asr_after', float('nan')):.3f} "
                      f"RA-attack {rec.get('asr_after_ra', float('nan')):.3f} {rec['seconds']:.0f}s", flush=True)
    write_csv(done, csv_path)
    write_markdown(done, csv_path.with_suffix(".md"))


def write_markdown(rows: list[dict], path: Path) -> None:
    """The rows as a Markdown table (rates in %), with the machine facts the numbers depend on."""
    from trojanguard.report import percent, table
    shown = [{"model": r["folder"], "defense": r["defense"], "clean": r.get("clean_size"),
              "CA before": percent(r.get("ca_before")), "CA after": percent(r.get("ca_after")),
              "ASR before": percent(r.get("asr_before")), "ASR after": percent(r.get("asr_after")),
              "ASR after retuning": percent(r.get("asr_after_ra")),
              "s": round(r.get("seconds") or 0), "peak MB": round(r.get("peak_mb") or 0), "threads": r.get("threads")}
             for r in rows]
    text = ("# Purification on the CIFAR-10 reference zoo (PreAct-ResNet18 w16, CPU)\n\n"
            "Written by `benchmarks/purify_zoo.py` from the JSONL records beside this file. CA on the 10,000 "
            "test images, ASR on the triggered non-target test images; the clean model is measured with the "
            "BadNets trigger (its reference under the retuning attack: 5 poisoned samples in 1,000 clean ones, "
            "5 epochs SGD 0.01). `s` = purification wall time (the machine was shared with other jobs for the "
            "first rows: times are upper bounds).\n\n" + table(shown, markdown=True) + "\n")
    atomic_write_text(path, text)


def reference_record(setup: Setup, robustness: bool, seed: int) -> dict:
    """CA/ASR of the undefended model and its ASR after the retuning attack."""
    from trojanguard.defenses.common import retuning_attack
    from trojanguard.eval.evaluate import evaluate
    b = evaluate(setup.model, setup.test, setup.attack.trigger, setup.attack.target_for)
    rec = {"method": "none", "options": {}, "seconds": 0.0, "peak_rss_mb": 0.0, "threads": torch.get_num_threads(),
           **{f"{k}_before": b[k] for k in ("ca", "asr", "ra")}, **{f"{k}_after": b[k] for k in ("ca", "asr", "ra")}}
    if robustness:
        t0 = time.perf_counter()
        tuned = retuning_attack(setup.model, setup.clean, setup.attack, seed=seed)
        a = evaluate(tuned, setup.test, setup.attack.trigger, setup.attack.target_for)
        rec.update(asr_after_ra=a["asr"], ca_after_ra=a["ca"], retuning_seconds=round(time.perf_counter() - t0, 2))
    return rec


def write_csv(rows: list[dict], path: Path) -> None:
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS + EXTRA, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        out = {k: r.get(k) for k in COLUMNS + EXTRA}
        out["options"] = json.dumps({k: v for k, v in (r.get("options") or {}).items()
                                     if k not in ("seed", "device", "progress")}, sort_keys=True)
        out["attack"] = r["attack"] or "none"
        for k in COLUMNS + EXTRA:
            if isinstance(out[k], float):
                out[k] = round(out[k], 4)
        w.writerow(out)
    atomic_write_text(path, buf.getvalue())


if __name__ == "__main__":
    main()

"""EBYD removal's pruning curve: unlearn and learn the neuron masks once (as
``trojanguard purify --method ebyd-removal`` does), then prune the original model at every
threshold tau of the grid and measure, beside the held-out clean accuracy the defense picks
tau on, CA / ASR / RA on the test split.

It shows how far the defender's estimate (``holdout_ca``, on ``tau_fraction`` of D_def) is
from the test accuracy at the tau the rule picks, and what the ASR is at each tau (which the
defender cannot see). Writes benchmarks/results/ebyd-tau-<name>.{csv,md}:

    python benchmarks/ebyd_tau_curve.py zoo/cifar10/badnets-0.1-s0 --threads 2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


from curve_setup import parse_and_load  # benchmarks/ is on the path
from trojanguard.defenses import create_defense
from trojanguard.defenses.ebyd_removal import choose_tau, pruned_copy
from trojanguard.eval.evaluate import evaluate
from trojanguard.report import write_table_files
from trojanguard.utils import library_versions

COLUMNS = ["tau", "pruned", "holdout_ca", "holdout_drop", "holdout_drop_bound", "chosen_by_estimate",
           "chosen_by_bound", "ca", "ca_drop", "asr", "ra"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args, setup = parse_and_load(ap)
    t0 = time.perf_counter()
    defense = create_defense("ebyd-removal", seed=args.seed, device="cpu", progress=False)
    result = defense.purify(setup.model, setup.clean)
    seconds = time.perf_counter() - t0
    trig, tgt = setup.attack.trigger, setup.attack.target_for
    before = evaluate(setup.model.eval(), setup.test, trig, tgt)
    ca0_hold = result.info["holdout_ca_before"]
    budget = defense.cfg.tau_max_ca_drop
    # the tau each rule picks from the same table (the defense returned its default's)
    picks = {rule: choose_tau(result.info["tau_table"], ca0_hold, budget, rule) for rule in ("estimate", "bound")}
    rows = []
    for entry in result.info["tau_table"]:
        r = evaluate(pruned_copy(setup.model, defense.masks, entry["tau"]).eval(), setup.test, trig, tgt)
        row = {**entry, **{f"chosen_by_{rule}": entry["tau"] == tau for rule, tau in picks.items()},
               **{k: round(float(r[k]), 4) for k in ("ca", "asr", "ra")},
               "ca_drop": round(float(before["ca"] - r["ca"]), 4)}
        print(row, flush=True)
        rows.append(row)
    out = args.out or Path(__file__).parent / "results" / f"ebyd-tau-{args.model.name}"
    intro = [f"# EBYD removal's pruning curve: {args.model.name}", "",
             f"Written by `python benchmarks/ebyd_tau_curve.py {args.model} --threads {args.threads}`: "
             f"unlearning and masks once ({seconds:.0f} s, seed {args.seed}, D_def = {len(setup.clean)} "
             f"held-out images, {setup.clean_source}; the defense keeps 10 % of them to verify and picks tau on "
             f"{defense.cfg.tau_fraction:.0%} of the rest); held-out CA before {ca0_hold:.4f}. `chosen_by_estimate`: "
             f"the largest tau whose held-out drop is within {budget:.0%} (`tau_rule=estimate`); `chosen_by_bound`: "
             f"the last tau before the first whose paired {defense.cfg.tau_confidence:.0%} upper bound of the held-out "
             f"drop exceeds {budget:.0%} (`tau_rule=bound`). CA before on the test split {before['ca']:.4f}, ASR "
             f"{before['asr']:.4f}. `holdout_*` on the defense's own held-out part, the rest on the test split. "
             f"Versions: {library_versions()}."]
    paths = write_table_files(out, rows, COLUMNS, intro)
    print("wrote", *paths)


if __name__ == "__main__":
    main()

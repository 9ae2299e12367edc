"""ANP's pruning curve: learn the neuron masks once, then prune the lowest-mask neurons at
several levels (share of all normalisation neurons, and fixed thresholds) and measure CA and
ASR on the test split at each, as the ANP paper's figure of ASR/CA against pruned share.

The level a defender would pick cannot use the ASR column (it needs the attack); the curve
shows whether the masks rank the backdoor neurons first at all and what removing them costs.
Writes benchmarks/results/anp-sweep-<name>.{csv,md}:

    python benchmarks/anp_sweep.py zoo/cifar10/badnets-0.1-s0 --iterations 2000 --threads 2
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path


from curve_setup import parse_and_load  # benchmarks/ is on the path
from trojanguard.defenses import create_defense
from trojanguard.defenses.anp import prune_neurons
from trojanguard.eval.evaluate import evaluate
from trojanguard.report import write_table_files
from trojanguard.utils import library_versions

COLUMNS = ["prune_by", "level", "pruned", "ca", "asr", "ra"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--fractions", type=float, nargs="+",
                    default=[0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.30])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    args, setup = parse_and_load(ap)
    t0 = time.perf_counter()
    anp = create_defense("anp", iterations=args.iterations, seed=args.seed, device="cpu", progress=False)
    result = anp.purify(setup.model, setup.clean)
    mask_seconds = time.perf_counter() - t0
    trig, tgt = setup.attack.trigger, setup.attack.target_for
    rows = []
    levels = [("fraction", f) for f in args.fractions] + [("threshold", t) for t in args.thresholds]
    for by, level in levels:
        model = copy.deepcopy(setup.model)
        per_layer = prune_neurons(model, anp.masks, by, threshold=level, fraction=level)
        r = evaluate(model.eval(), setup.test, trig, tgt)
        row = {"prune_by": by, "level": level, "pruned": sum(per_layer.values()),
               **{k: round(float(r[k]), 4) for k in ("ca", "asr", "ra")}}
        print(row, flush=True)
        rows.append(row)
    out = args.out or Path(__file__).parent / "results" / f"anp-sweep-{args.model.name}"
    intro = [f"# ANP pruning curve: {args.model.name}", "",
             f"Written by `python benchmarks/anp_sweep.py {args.model} --iterations {args.iterations} "
             f"--threads {args.threads}`: masks learned once ({mask_seconds:.0f} s, {result.info['neurons']} "
             f"neurons, seed {args.seed}, D_def = {len(setup.clean)} held-out images, {setup.clean_source}), "
             f"then the lowest-mask neurons pruned at each level; CA/ASR/RA on the test split. "
             f"Versions: {library_versions()}."]
    paths = write_table_files(out, rows, COLUMNS, intro)
    print("wrote", *paths)

if __name__ == "__main__":
    main()

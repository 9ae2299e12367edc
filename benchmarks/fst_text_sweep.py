"""FST on a text model across optimisers, learning rates, batch sizes and penalty weights:
does any recipe remove the SST-2 BadNets backdoor from MiniLM with the 872 dev sentences?

Each variant is one ``trojanguard purify --method fst`` run (the held-out dev split as clean
data, seed 0); a variant whose folder already holds ``purify.json`` is read, not re-run.
Writes benchmarks/results/fst-text-sst2.{csv,md}:

    python benchmarks/fst_text_sweep.py zoo/sst2-bench/118be6dbd142acf6 --work runs/fst-text --threads 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trojanguard.report import write_table_files

RESULTS = Path(__file__).parent / "results"
#: name -> --set options; FST's default recipe (the official CIFAR-10 loop's: SGD 0.01, batch
#: 128, alpha 0.1) is the harness's row (configs/sst2-defenses.yaml, badnets-0.2-s0/fst)
VARIANTS = {
    "adamw5e-5-b128": {"optimizer": "adamw", "lr": 5e-5},
    "adamw5e-5-b128-alpha1": {"optimizer": "adamw", "lr": 5e-5, "alpha": 1.0},
    "adamw2e-4-b128": {"optimizer": "adamw", "lr": 2e-4},
    "adamw5e-5-b32": {"optimizer": "adamw", "lr": 5e-5, "batch_size": 32},
    "adamw1e-4-b32": {"optimizer": "adamw", "lr": 1e-4, "batch_size": 32},
}
COLUMNS = ["variant", "optimizer", "lr", "batch_size", "alpha", "ca_before", "ca_after", "asr_before", "asr_after",
           "verify_ca_before", "verify_ca_after", "head_cosine_to_original", "seconds", "threads"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint folder of the backdoored text model")
    ap.add_argument("--work", default="runs/fst-text", help="folder for the purified models")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for name, opts in VARIANTS.items():
        out = Path(args.work) / name
        if not (out / "purify.json").is_file():
            cmd = ["trojanguard", "purify", "--method", "fst", "--model", args.model, "--threads", str(args.threads),
                   "--quiet", "--out", str(out)] + [a for k, v in opts.items() for a in ("--set", f"{k}={v}")]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        rec = json.loads((out / "purify.json").read_text())
        o = rec["options"]
        rows.append({"variant": name, "optimizer": o["optimizer"], "lr": o["lr"], "batch_size": o["batch_size"],
                     "alpha": o["alpha"], **{k: round(rec[k], 4) if isinstance(rec[k], float) else rec[k]
                                             for k in COLUMNS[5:] if k in rec}})
    intro = [f"# FST on {args.model} (SST-2 BadNets 20 %, MiniLM), 872 dev sentences, seed 0\n",
             "CA/ASR on the test split; verify_ca on the tenth of the clean data FST did not train on. "
             "FST's default recipe (SGD 0.01, batch 128, alpha 0.1), through the harness "
             "(purify-sst2-harness.csv): CA 0.8781 -> 0.8759, ASR 1.0 -> 0.9945. Wall times of session 8: "
             "the adamw1e-4-b32 run shared the 2 cores with 1-thread probes (hence 355 s). "
             f"Command: `{' '.join(['python', 'benchmarks/fst_text_sweep.py'] + sys.argv[1:])}`.\n"]
    csv_path, md_path = write_table_files(RESULTS / "fst-text-sst2", rows, COLUMNS, intro)
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()

"""Reference clean models: train with the CLI's default recipe (or read a run that the
CLI already made) and write benchmarks/results/reference-<dataset>.json with ca,
seconds, epochs; then reload the checkpoint and check predictions are bit-identical.

    python benchmarks/reference_models.py cifar10 --data-dir ../shared/data/cifar10
    python benchmarks/reference_models.py sst2 --checkpoint runs/sst2-minilm-clean
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import trojanguard as tg
from trojanguard.utils import atomic_write_json

RESULTS = Path(__file__).parent / "results"
MODELS = {"cifar10": ["--model", "preact_resnet18", "--width", "16"], "sst2": ["--model", "minilm"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", choices=sorted(MODELS))
    ap.add_argument("--data-dir")
    ap.add_argument("--checkpoint", help="summarise this finished 'trojanguard train' run instead of training")
    args = ap.parse_args()
    ckpt = Path(args.checkpoint or f"runs/reference-{args.dataset}")
    if not args.checkpoint:
        cmd = ["trojanguard", "train", "--dataset", args.dataset, *MODELS[args.dataset], "--out", str(ckpt)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        subprocess.run(cmd, check=True)
    model, meta = tg.load_checkpoint(ckpt)
    test = tg.load_dataset(args.dataset, args.data_dir).test
    logits = tg.predict(model, test, return_logits=True)
    ca = tg.metrics.accuracy(logits.argmax(1), test.y)
    stages = {s["stage"]: s for s in meta["stages"]}
    res = {"dataset": args.dataset, "model": meta["model"], "ca": ca, "ca_at_training": meta["metrics"]["ca"],
           "reload_bit_identical": bool(abs(ca - meta["metrics"]["ca"]) == 0.0),
           "seconds": stages["train"]["seconds"], "seconds_total": sum(s["seconds"] for s in stages.values()),
           "peak_rss_mb": stages["train"]["peak_rss_mb"], "epochs": meta["train_config"]["epochs"],
           "train_config": meta["train_config"], "dataset_info": meta["dataset"], "seed": meta["seed"],
           "history": meta["history"], "versions": meta["versions"], "sha256": meta["sha256"],
           "threads": torch.get_num_threads()}
    # bit-identical: a second reload gives exactly the same logits
    model2, _ = tg.load_checkpoint(ckpt)
    res["reload_bit_identical"] = bool(torch.equal(logits, tg.predict(model2, test, return_logits=True))) \
        and res["reload_bit_identical"]
    atomic_write_json(RESULTS / f"reference-{args.dataset}.json", res)
    print(f"{args.dataset}: CA {ca:.4f} (at training {meta['metrics']['ca']:.4f}), train {res['seconds']:.0f} s, "
          f"{res['epochs']} epochs, reload bit-identical: {res['reload_bit_identical']}")
    sys.exit(0 if res["reload_bit_identical"] else 1)


if __name__ == "__main__":
    main()

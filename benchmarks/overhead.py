"""FST's cost against the bare passes it needs: the same model, the same clean images, the
same batches (same seed), once through ``create_defense("fst").purify`` (with its head
re-initialisation, penalty, norm projection, verification split and CA checks) and once
through a bare loop (augment, forward, cross-entropy, backward, SGD step) over the same
number of steps. Writes benchmarks/results/overhead-fst.json.

    python benchmarks/overhead.py --model zoo/cifar10/badnets-0.1-s0 --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trojanguard.bench.zoo import zoo_data
from trojanguard.checkpoint import load_checkpoint
from trojanguard.data.augment import random_crop_flip
from trojanguard.defenses import create_defense
from trojanguard.defenses.common import split_clean
from trojanguard.utils import atomic_write_json, library_versions


def bare_passes(model, data, epochs: int, batch_size: int, seed: int) -> float:
    """Forward/backward/step over the batches FST trains on, nothing else."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=gen).split(batch_size):
            x = random_crop_flip(data.x[idx], 4, flip=True, generator=gen).float().div_(255)
            x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo/cifar10/badnets-0.1-s0")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead-fst.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prep = zoo_data("cifar10", args.data_dir)
    model, _ = load_checkpoint(args.model)
    fit, _ = split_clean(prep.defense, 0.1, 0)  # FST trains on the same 90 % the purifier keeps
    bare = bare_passes(load_checkpoint(args.model)[0], fit, args.epochs, 128, 0)
    t0 = time.perf_counter()
    res = create_defense("fst", progress=False, epochs=args.epochs).purify(model, prep.defense)
    fst = time.perf_counter() - t0
    steps = args.epochs * math.ceil(len(fit) / 128)
    out = {"clean_images": len(prep.defense), "trained_on": len(fit), "epochs": args.epochs, "steps": steps,
           "fst_seconds": round(fst, 2), "fst_train_seconds": round(res.info["train_seconds"], 2),
           "bare_seconds": round(bare, 2), "ratio": round(fst / bare, 3),
           "ratio_training_loop_only": round(res.info["train_seconds"] / bare, 3),
           "threads": args.threads, "versions": library_versions()}
    atomic_write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Our trainer against a bare PyTorch loop: same model (PreAct-ResNet18 width 16), same
batches (batch 128, crop+flip on uint8 tensors, channels_last), same optimiser.

Writes benchmarks/results/train_throughput.json with ours_img_s, bare_img_s, ratio.
Runs are interleaved (ours, bare, ours, bare, ...) and the median is reported, so slow
drift of the machine affects both sides alike."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trojanguard as tg
from trojanguard.data import ImageData, random_crop_flip
from trojanguard.training import TrainConfig, make_optimizer, train
from trojanguard.utils import atomic_write_json, library_versions, seed_everything

RESULTS = Path(__file__).parent / "results"


def bare_loop(model, data: ImageData, cfg: TrainConfig) -> float:
    """The minimal loop a person would write by hand; returns seconds."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model.parameters(), cfg)
    model.train()
    t0 = time.perf_counter()
    perm = torch.randperm(len(data), generator=gen)
    for b in range(0, len(data), cfg.batch_size):
        idx = perm[b:b + cfg.batch_size]
        x = random_crop_flip(data.x[idx], 4, generator=gen).float().div_(255)
        x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), data.y[idx], label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 folder (random images if absent)")
    ap.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = ap.parse_args()
    n = args.steps * 128
    try:
        data = tg.load_dataset("cifar10", args.data_dir).train.subset(torch.arange(n))
        source = "cifar10"
    except tg.UserError:
        g = torch.Generator().manual_seed(0)
        data = ImageData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])
        source = "random"
    cfg = TrainConfig(epochs=1, batch_size=128, progress=True, seed=0, device="cpu")
    ours, bare = [], []
    for r in range(args.repeats + 1):  # the first round warms up both and is discarded
        seed_everything(0)
        m = tg.create_model("preact_resnet18", num_classes=10, width=16)
        t = train(m, data, cfg=cfg).seconds
        seed_everything(0)
        m = tg.create_model("preact_resnet18", num_classes=10, width=16).to(memory_format=torch.channels_last)
        tb = bare_loop(m, data, cfg)
        if r:
            ours.append(n / t)
            bare.append(n / tb)
        print(f"round {r}: ours {n / t:.0f} img/s, bare {n / tb:.0f} img/s")
    res = {"ours_img_s": statistics.median(ours), "bare_img_s": statistics.median(bare),
           "ratio": statistics.median(ours) / statistics.median(bare), "ours_all": ours, "bare_all": bare,
           "model": "preact_resnet18 width 16", "batch_size": 128, "steps": args.steps,
           "repeats": args.repeats, "data": source, "device": "cpu",
           "threads": torch.get_num_threads(), "versions": library_versions()}
    atomic_write_json(args.out, res)
    print(f"ours {res['ours_img_s']:.0f} img/s, bare {res['bare_img_s']:.0f} img/s, ratio {res['ratio']:.3f}")


if __name__ == "__main__":
    main()

"""Cost of the BadActs guard against a plain forward pass: PreAct-ResNet18 width 16,
a batch of 256 CIFAR-sized images, inference mode.

* plain      ``model(x)``
* detect     ``guard(x)`` without purification: the model's own logits and the NAS scores
             from the same forward pass (the channel means are taken by hooks; the model
             does not run twice). Aim: <= 1.3x plain.
* purify-all ``guard(x)`` with purification when every input is flagged (the worst case:
             the clamped forward runs on the whole batch as well).

The timings do not depend on the weights or on the values of the learned intervals, so a
randomly initialised model is fine; with ``--data-dir`` the model sees CIFAR-10 images,
else random ones. The purifier is fitted for ``--purify-epochs`` (default 1) only: its
cost is not what is measured here. Runs are interleaved (plain, detect, purify, plain,
...) and medians reported, so slow drift of the machine affects all alike.

Writes benchmarks/results/guard_cost.json. Run with OMP_NUM_THREADS set to the threads you
mean to measure (the lead's runs: see the JSON's ``threads``)."""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import trojanguard as tg
from trojanguard.data import ImageData
from trojanguard.utils import atomic_write_json, library_versions

RESULTS = Path(__file__).parent / "results"


def _data(n: int, data_dir: str | None, seed: int) -> tuple[ImageData, str]:
    try:
        train = tg.load_dataset("cifar10", data_dir).train
        g = torch.Generator().manual_seed(seed)
        return train.subset(torch.randperm(len(train), generator=g)[:n]), "cifar10"
    except tg.UserError:
        g = torch.Generator().manual_seed(seed)
        return ImageData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)]), "random"


def _time(fn, x) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--clean", type=int, default=1000, help="clean images the detector is fitted on")
    ap.add_argument("--purify-epochs", type=int, default=1)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 folder (random images if absent)")
    ap.add_argument("--out", default=str(RESULTS / "guard_cost.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    model = tg.create_model("preact_resnet18", num_classes=10, width=args.width).eval()
    model.to(memory_format=torch.channels_last)  # the layout load_checkpoint gives image models
    data, source = _data(args.clean + args.batch, args.data_dir, seed=0)
    clean = data.subset(torch.arange(args.clean))
    # the labels the model predicts: a random model gets few right, and the purifier trains on those
    x = data.subset(torch.arange(args.clean, args.clean + args.batch)).batch(torch.arange(args.batch))[0]

    t0 = time.perf_counter()
    guarded = tg.guard(model, clean, "badacts", frr=0.05, purify=False, progress=False)
    fit_s = time.perf_counter() - t0
    # the same detector with intervals, every input flagged: the worst case of purification
    purifying = tg.guard(model, clean, "badacts", frr=0.05, purify=True, progress=False,
                         epochs=args.purify_epochs, max_restarts=0)
    purifying.detector.threshold = -1.0

    with torch.inference_mode():
        assert torch.equal(guarded(x).logits, model(x)), "the guard must return the model's own logits"
    runs = {"plain": [], "detect": [], "purify_all": []}
    for fn in (model, guarded, purifying):  # warm-up
        _time(fn, x)
    for _ in range(args.repeats):
        runs["plain"].append(_time(model, x))
        runs["detect"].append(_time(guarded, x))
        runs["purify_all"].append(_time(purifying, x))
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {"model": f"preact_resnet18 width {args.width}", "batch": args.batch, "images": source,
           "repeats": args.repeats, "threads": torch.get_num_threads(), "detector_fit_seconds": round(fit_s, 2),
           "plain_s": round(med["plain"], 4), "detect_s": round(med["detect"], 4),
           "purify_all_s": round(med["purify_all"], 4),
           "detect_ratio": round(med["detect"] / med["plain"], 3),
           "purify_all_ratio": round(med["purify_all"] / med["plain"], 3),
           "aim_detect_ratio": 1.3, "runs": {k: [round(t, 4) for t in v] for k, v in runs.items()},
           "versions": library_versions()}
    atomic_write_json(args.out, res)
    print(f"plain {med['plain'] * 1000:.1f} ms, detect {med['detect'] * 1000:.1f} ms "
          f"({res['detect_ratio']:.2f}x), purify all {med['purify_all'] * 1000:.1f} ms "
          f"({res['purify_all_ratio']:.2f}x) per batch of {args.batch}; {args.out}")


if __name__ == "__main__":
    main()

"""Build the embedded default of ``trojanguard demo`` (the README's first command): the
CIFAR-10 reference zoo's BadNets-10 % model (PreAct-ResNet18 width 16, 2.8 MB safetensors)
with its attack artifact, 500 class-balanced clean images from the defender's held-out
split (never trained on) and 1,000 class-balanced test images, into
``src/trojanguard/assets/cifar10-badnets``.

    python benchmarks/make_embedded_default.py --zoo zoo/cifar10/badnets-0.1-s0
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from trojanguard.bench.zoo import zoo_data
from trojanguard.data.split import holdout_indices

OUT = Path(__file__).resolve().parents[1] / "src" / "trojanguard" / "assets" / "cifar10-badnets"


def balanced(data, n: int, seed: int):
    _, part = holdout_indices(data.y, n / len(data), seed, len(data.classes))
    return data.subset(part)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo/cifar10/badnets-0.1-s0")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--clean", type=int, default=500)
    ap.add_argument("--test", type=int, default=1000)
    args = ap.parse_args()
    prep = zoo_data("cifar10", args.data_dir)
    clean = balanced(prep.defense, args.clean, 1)
    test = balanced(prep.bundle.test, args.test, 2)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "model.json", "attack.json", "attack.safetensors", "metrics.json"):
        shutil.copyfile(Path(args.zoo) / name, OUT / name)
    save_file({"clean_x": clean.x.contiguous(), "clean_y": clean.y, "clean_index": clean.index,
               "test_x": test.x.contiguous(), "test_y": test.y, "test_index": test.index}, str(OUT / "data.safetensors"))
    (OUT / "data.json").write_text(json.dumps({
        "classes": prep.bundle.classes, "clean": f"{len(clean)} class-balanced images of the CIFAR-10 training "
        "split held out from every zoo model's training (D_def, split seed 0), subset seed 1",
        "test": f"{len(test)} class-balanced CIFAR-10 test images (subset seed 2)",
        "source": prep.bundle.source}, indent=2) + "\n")
    print(f"wrote {OUT}: {sum(f.stat().st_size for f in OUT.iterdir()) / 2**20:.1f} MB")


if __name__ == "__main__":
    main()

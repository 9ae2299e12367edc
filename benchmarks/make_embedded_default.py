"""Build the embedded default of ``trojanguard demo`` (the README's first command): the
CIFAR-10 reference zoo's BadNets-10 % model (PreAct-ResNet18 width 16, 2.8 MB safetensors)
with its attack artifact, 2,000 class-balanced clean images from the defender's held-out
split (never trained on) and 1,000 class-balanced test images, into
``src/trojanguard/assets/cifar10-badnets``.

The images are stored as the dataset's own JPEG bytes (about 0.9 kB each, so 3,000 images
take 2.7 MB instead of 9 MB of raw pixels); the builder checks that each decodes to exactly
the pixels the zoo trained and evaluated with.

    python benchmarks/make_embedded_default.py --zoo zoo/cifar10/badnets-0.1-s0

Why 2,000 clean images: FST on the BadNets model with 475 images leaves ASR at 79.5 %
(defaults) or loses 7 points of CA (small batches); with 950 images CA -1.7 but ASR 47 %
(benchmarks/results/purify-cifar10-clean-size.md); the demo must show CA within 3 points
and ASR <= 10 %.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from trojanguard.bench.zoo import zoo_data
from trojanguard.data.images import decode_image
from trojanguard.data.split import holdout_indices

OUT = Path(__file__).resolve().parents[1] / "src" / "trojanguard" / "assets" / "cifar10-badnets"


def balanced(data, n: int, seed: int):
    _, part = holdout_indices(data.y, n / len(data), seed, len(data.classes))
    return data.subset(part)


def jpeg_members(archive: Path, classes: list[str]) -> list[bytes]:
    """The archive's JPEG bytes in the loader's order (classes in index order, names sorted),
    so that position i is the image of index i."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg")):
                by_class.setdefault(Path(m.name).parent.name, []).append((m.name, tar.extractfile(m).read()))
    return [b for c in classes for _, b in sorted(by_class[c])]


def pack(data, members: list[bytes], prefix: str) -> dict[str, torch.Tensor]:
    blobs = []
    for i, x in zip(data.index.tolist(), data.x):
        b = members[i]
        if not np.array_equal(decode_image(b, str(i)).transpose(2, 0, 1), x.numpy()):
            raise SystemExit(f"index {i} does not decode to the zoo's pixels: the archive order differs")
        blobs.append(b)
    sizes = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
    return {f"{prefix}_jpeg": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8),
            f"{prefix}_sizes": sizes, f"{prefix}_y": data.y, f"{prefix}_index": data.index}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo/cifar10/badnets-0.1-s0")
    ap.add_argument("--data-dir", default="../shared/data/cifar10",
                    help="the CIFAR-10 tar.xz archives (default: this project's shared data folder)")
    ap.add_argument("--clean", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    args = ap.parse_args()
    prep = zoo_data("cifar10", args.data_dir)
    classes = prep.bundle.classes
    clean = balanced(prep.defense, args.clean, 1)
    test = balanced(prep.bundle.test, args.test, 2)
    root = Path(args.data_dir)
    archives = {s: sorted(root.glob(f"*{s}*.tar.xz")) for s in ("train", "test")}
    if not all(archives.values()):
        raise SystemExit(f"--data-dir {root}: needs the CIFAR-10 *train*.tar.xz and *test*.tar.xz archives "
                         "(the JPEG bytes are copied from them)")
    tensors = {**pack(clean, jpeg_members(archives["train"][0], classes), "clean"),
               **pack(test, jpeg_members(archives["test"][0], classes), "test")}
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "model.json", "attack.json", "attack.safetensors", "metrics.json"):
        shutil.copyfile(Path(args.zoo) / name, OUT / name)
    save_file(tensors, str(OUT / "data.safetensors"))
    (OUT / "data.safetensors").chmod(0o644)  # save_file creates it private; a package file is read by all
    (OUT / "data.json").write_text(json.dumps({
        "classes": classes, "format": "jpeg",
        "clean": f"{len(clean)} class-balanced images of the CIFAR-10 training split held out from every zoo "
                 "model's training (D_def, split seed 0), subset seed 1",
        "test": f"{len(test)} class-balanced CIFAR-10 test images (subset seed 2)",
        "source": prep.bundle.source}, indent=2) + "\n")
    print(f"wrote {OUT}: {sum(f.stat().st_size for f in OUT.iterdir()) / 2**20:.1f} MB")


if __name__ == "__main__":
    main()

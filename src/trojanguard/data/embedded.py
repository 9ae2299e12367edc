"""An embedded dataset that needs no files: scikit-learn's 8x8 digits (1,797 images),
used by the demo and the tests. Pixel values 0..16 are scaled to 0..255."""
from __future__ import annotations

import torch

from .base import DatasetBundle, ImageData


def load_digits(data_dir=None, test_fraction: float = 0.25, seed: int = 0) -> DatasetBundle:
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round()).to(torch.uint8)[:, None]
    y = torch.from_numpy(d.target).long()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    classes = [str(i) for i in range(10)]
    test = ImageData(x[perm[:n_test]], y[perm[:n_test]], classes)
    tr = perm[n_test:].sort().values
    train = ImageData(x[tr], y[tr], classes)
    return DatasetBundle("digits", train, test, classes, "image", "sklearn.datasets.load_digits",
                         extra={"mean": (0.5,), "std": (0.5,)})

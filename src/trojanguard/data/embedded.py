"""An embedded dataset that needs no files: scikit-learn's 8x8 digits (1,797 images),
used by the demo and the tests. Pixel values 0..16 are scaled to 0..255."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DatasetBundle, ImageData


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 8, 8] float64 in 0..16, labels [N]) exactly as sklearn's ``load_digits``,
    read straight from its data file: importing sklearn costs ~1.5 s of CPU (scipy.stats)
    per process, more than the whole digits training; sklearn itself is the fallback."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        f = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if f.is_file():
            data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    return d.images, d.target


def load_digits(data_dir=None, test_fraction: float = 0.25, seed: int = 0) -> DatasetBundle:
    images, target = _digits_arrays()
    x = torch.from_numpy((images * (255.0 / 16.0)).round()).to(torch.uint8)[:, None]
    y = torch.from_numpy(target).long()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    classes = [str(i) for i in range(10)]
    test = ImageData(x[perm[:n_test]], y[perm[:n_test]], classes)
    tr = perm[n_test:].sort().values
    train = ImageData(x[tr], y[tr], classes)
    return DatasetBundle("digits", train, test, classes, "image", "sklearn.datasets.load_digits",
                         extra={"mean": (0.5,), "std": (0.5,)})

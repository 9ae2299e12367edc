"""Datasets by name: ``load_dataset("cifar10", data_dir=...)``."""
from __future__ import annotations

from ..registry import Registry
from .augment import random_crop_flip
from .base import Data, DatasetBundle, ImageData, TextData
from .embedded import load_digits
from .images import CIFAR10_CLASSES, load_cifar10, load_imagefolder
from .split import holdout_indices, split_holdout
from .text import load_sst2, load_text_table, load_yelp

DATASETS: Registry = Registry("dataset")
DATASETS.register("cifar10", "CIFAR-10 (python batches, tar.xz archives or ImageFolder)")(load_cifar10)
DATASETS.register("imagefolder", "any ImageFolder tree with train/ and test/")(load_imagefolder)
DATASETS.register("digits", "scikit-learn 8x8 digits, embedded (no files needed)")(load_digits)
DATASETS.register("sst2", "SST-2 binary sentiment (train/dev/test TSV)")(load_sst2)
DATASETS.register("yelp", "Yelp polarity subset (train/dev/test TSV)")(load_yelp)
DATASETS.register("text", "any CSV/TSV folder with train/test tables")(load_text_table)


def load_dataset(name: str, data_dir=None, **kwargs) -> DatasetBundle:
    return DATASETS.get(name)(data_dir=data_dir, **kwargs)


__all__ = ["DATASETS", "load_dataset", "Data", "DatasetBundle", "ImageData", "TextData",
           "random_crop_flip", "holdout_indices", "split_holdout", "CIFAR10_CLASSES"]

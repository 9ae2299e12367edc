"""In-memory dataset containers.

Images stay uint8 NCHW tensors (50k CIFAR images = 150 MB) and are converted to float
per batch; text stays a list of strings and is tokenised per batch by the model.
``index`` keeps each sample's position in the original split, so that poisoned indices,
held-out splits and artifacts always refer to the same numbering.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DataNotFound, UserError


@dataclass
class ImageData:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]
    classes: list[str]
    index: torch.Tensor | None = None  # int64 [N], position in the original split

    modality = "image"

    def __post_init__(self):
        if self.index is None:
            self.index = torch.arange(len(self.y))
        assert self.x.dtype == torch.uint8 and self.x.ndim == 4, "images must be uint8 NCHW"
        assert len(self.x) == len(self.y) == len(self.index)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "ImageData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageData(self.x[idx], self.y[idx], self.classes, self.index[idx])

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels for the given positions."""
        return self.x[idx].float().div_(255), self.y[idx]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])


@dataclass
class TextData:
    texts: list[str]
    y: torch.Tensor
    classes: list[str]
    index: torch.Tensor | None = None

    modality = "text"

    def __post_init__(self):
        if self.index is None:
            self.index = torch.arange(len(self.y))
        assert len(self.texts) == len(self.y) == len(self.index)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "TextData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TextData([self.texts[i] for i in idx.tolist()], self.y[idx], self.classes,
                        self.index[idx])

    def batch(self, idx) -> tuple[list[str], torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return [self.texts[i] for i in idx.tolist()], self.y[idx]


Data = ImageData | TextData


@dataclass
class DatasetBundle:
    """What a dataset loader returns: train and test splits plus descriptive metadata.

    ``defense`` is a ready-made clean split for the defender when the dataset has one
    (SST-2's dev split); otherwise ``split_holdout`` carves it out of ``train``."""
    name: str
    train: Data
    test: Data
    classes: list[str]
    modality: str
    source: str
    defense: Data | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def find_data_dir(name: str, data_dir: str | os.PathLike | None, must_contain: list[str],
                  hint: str) -> Path:
    """Locate a dataset folder: the given one, else $TROJANGUARD_DATA/<name>, ./data/<name>,
    ../shared/data/<name> (relative to the working directory)."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.exists():
            raise UserError(f"data directory {str(p)!r} does not exist; pass --data-dir with {hint}")
        return p
    candidates = []
    if os.environ.get("TROJANGUARD_DATA"):
        candidates.append(Path(os.environ["TROJANGUARD_DATA"]) / name)
    candidates += [Path("data") / name, Path("..") / "shared" / "data" / name]
    for c in candidates:
        if c.is_dir() and any(list(c.glob(pattern)) for pattern in must_contain):
            return c
    raise DataNotFound(f"no data found for dataset {name!r} (looked in {', '.join(map(str, candidates))}); "
                    f"pass --data-dir DIR with {hint}, or set TROJANGUARD_DATA")

"""The defender's held-out clean set ``D_def``, carved out of the training set."""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Data


def holdout_indices(labels: torch.Tensor, fraction: float, seed: int,
                    num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded, class-balanced split of positions ``0..N-1`` into (attacker, defense).

    The defense part has ``round(fraction * N)`` samples, the same number from every class
    (the remainder goes to randomly chosen classes), as methods.md §0 asks (5 % of CIFAR-10
    = 250 images per class). Both parts are sorted and disjoint.
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"held-out fraction {fraction} is outside (0, 1); use e.g. --holdout 0.05")
    labels = torch.as_tensor(labels)
    k = num_classes or int(labels.max()) + 1
    n_def = round(fraction * len(labels))
    g = torch.Generator().manual_seed(seed)
    per_class = [n_def // k] * k
    for c in torch.randperm(k, generator=g)[: n_def % k].tolist():
        per_class[c] += 1
    chosen = []
    for c in range(k):
        pos = (labels == c).nonzero().flatten()
        if per_class[c] > len(pos):
            raise UserError(f"class {c} has only {len(pos)} samples, fewer than the {per_class[c]} "
                            f"a class-balanced hold-out of {fraction} needs; lower --holdout")
        chosen.append(pos[torch.randperm(len(pos), generator=g)[: per_class[c]]])
    defense = torch.cat(chosen).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[defense] = False
    return mask.nonzero().flatten(), defense


def split_holdout(train: Data, fraction: float = 0.05, seed: int = 0) -> tuple[Data, Data]:
    """Split a training set into the attacker's part and the defender's clean ``D_def``."""
    attacker, defense = holdout_indices(train.y, fraction, seed, len(train.classes))
    return train.subset(attacker), train.subset(defense)

"""A small CNN for tests and the embedded demo (three conv blocks, global pooling)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Normalize, TrojanModel


class SmallCNN(TrojanModel):
    modality = "image"

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        mean = tuple(mean or (0.5,) * in_channels)
        std = tuple(std or (0.5,) * in_channels)
        self.normalize = Normalize(mean, std)
        w = width

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            return nn.Sequential(*layers)
        self.block1 = block(in_channels, w, True)
        self.block2 = block(w, 2 * w, True)
        self.block3 = block(2 * w, 4 * w, False)
        self.head = nn.Linear(4 * w, num_classes)
        self.feature_dim = 4 * w

    def named_layers(self):
        return {"block1": self.block1, "block2": self.block2, "block3": self.block3}

    def features(self, x):
        out = self.block3(self.block2(self.block1(self.normalize(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

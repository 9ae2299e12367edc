"""PreAct-ResNet18 (He et al. 2016, identity mappings), the BackdoorBench backbone.

``width`` is the channel count of the first stage: 64 is the literature's model
(11.2 M parameters), 16 our CPU reference (0.7 M parameters, ~16x fewer FLOPs).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Normalize, TrojanModel

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(TrojanModel):
    modality = "image"

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD):
        super().__init__()
        w = width
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        chans = [w, 2 * w, 4 * w, 8 * w]
        cin = w
        for i, (c, s) in enumerate(zip(chans, [1, 2, 2, 2]), start=1):
            setattr(self, f"layer{i}", nn.Sequential(PreActBlock(cin, c, s), PreActBlock(c, c, 1)))
            cin = c
        # The final BN+ReLU of a pre-activation net belongs to the feature extractor.
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    def named_layers(self):
        return {"layer1": self.layer1, "layer2": self.layer2, "layer3": self.layer3,
                "layer4": self.layer4}

    @property
    def default_middle_layer(self) -> str:
        return "layer3"  # methods.md 2.4: output of the third stage

    def features(self, x):
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

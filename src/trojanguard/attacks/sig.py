"""SIG (Barni et al. 2019), clean label: add a horizontal sinusoid
v(i, j) = delta sin(2 pi j f / W) to target-class training images (labels kept);
at test time the same signal is added to any image."""
from __future__ import annotations

import math

import torch
from pydantic import Field

from ..errors import UserError
from .base import Attack, AttackConfig


class SIGConfig(AttackConfig):
    delta: float = Field(20 / 255, gt=0, le=1, description="amplitude in training (20/255)")
    delta_test: float | None = Field(None, gt=0, le=1, description="amplitude at test time (default: delta)")
    frequency: float = Field(6, gt=0)


def sinusoid(h: int, w: int, delta: float, f: float) -> torch.Tensor:
    j = torch.arange(w, dtype=torch.float32)
    return (delta * torch.sin(2 * math.pi * j * f / w)).expand(h, w)


class SIG(Attack):
    """SIG: clean-label sinusoidal signal on target-class images."""
    name = "sig"
    clean_label = True
    Config = SIGConfig

    poisoning = False  # True while poison() runs: training amplitude

    def prepare(self, data):
        # sin(2 pi j f / W) vanishes (f = W/2) or aliases (f > W/2) at and beyond Nyquist:
        # refuse before poisoning rather than train on a signal that is not there.
        w, f = data.x.shape[-1], self.cfg.frequency
        if 2 * f >= w:
            raise UserError(f"SIG frequency {f:g} is too high for images {w} pixels wide; use --set "
                            f"frequency=F with F below {w / 2:g} (the paper uses 6 on 32-pixel images)")

    def poison(self, data):
        self.poisoning = True  # training amplitude for the poisoned set, test amplitude after
        try:
            return super().poison(data)
        finally:
            self.poisoning = False

    def apply(self, x, y):
        delta = self.cfg.delta if self.poisoning or self.cfg.delta_test is None else self.cfg.delta_test
        return x + sinusoid(x.shape[-2], x.shape[-1], delta, self.cfg.frequency).to(x.device)

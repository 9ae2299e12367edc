"""Blended (Chen et al. 2017): x' = (1 - a) x + a P with a fixed full-size pattern P."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import UserError
from .base import Attack, AttackConfig


class BlendedConfig(AttackConfig):
    alpha: float = Field(0.2, gt=0, lt=1, description="blend weight, train and test")
    pattern_image: str | None = Field(None, description="image file for P (default: seeded uniform noise)")
    pattern_seed: int = 0


def load_pattern(path: str, c: int, h: int, w: int) -> torch.Tensor:
    from ..data.images import read_image_file
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"cannot read trigger image {path}: no such file; check --set pattern_image=")
    # bounded: a regular file below the size and pixel caps (decompression bombs are one-line errors)
    arr = read_image_file(p, "RGB" if c == 3 else "L", "trigger image").astype(np.float32) / 255.0
    t = torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1)[None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].clamp(0, 1)


class _PatternAttack(Attack):
    """Shared by attacks whose trigger is one stored full-size pattern tensor."""

    pattern: torch.Tensor | None = None

    def make_pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        if getattr(self.cfg, "pattern_image", None):
            return load_pattern(self.cfg.pattern_image, c, h, w)
        g = torch.Generator().manual_seed(self.cfg.pattern_seed)
        return torch.randint(0, 256, (c, h, w), generator=g).float() / 255

    def prepare(self, data) -> None:
        if self.pattern is None:
            self.pattern = self.make_pattern(*data.shape)

    def _pattern_for(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern is None:
            self.pattern = self.make_pattern(*x.shape[1:])
        return self.pattern.to(x.device)

    def tensors(self):
        return {"pattern": self.pattern} if self.pattern is not None else {}

    def load_tensors(self, tensors):
        self.pattern = tensors.get("pattern")


class Blended(_PatternAttack):
    """Blended: blend a fixed noise (or user image) pattern with weight 0.2."""
    name = "blended"
    Config = BlendedConfig

    def apply(self, x, y):
        return (1 - self.cfg.alpha) * x + self.cfg.alpha * self._pattern_for(x)

"""Adaptive-Blend (Qi et al., ICLR 2023, "Revisiting the assumption of latent
separability"): the blend pattern is cut into k x k pieces; each poisoned training image
gets only a random subset of the pieces (``pieces_ratio``) with a lower blend weight, and
"conservative" (cover) samples carry the trigger with their true label, so that poisoned
and clean features do not separate. At test time the full pattern is blended with
``alpha_test``. Defaults follow the paper's CIFAR-10 setting (alpha 0.15 train / 0.2 test,
16 pieces, half of them per sample, cover rate = poison rate)."""
from __future__ import annotations

import torch
from pydantic import Field, field_validator

from ..data.base import ImageData
from .base import PoisonResult, to_uint8
from .blended import BlendedConfig, _PatternAttack


class AdaptiveBlendConfig(BlendedConfig):
    alpha: float = Field(0.15, gt=0, lt=1, description="blend weight on poisoned/cover training samples")
    alpha_test: float = Field(0.2, gt=0, lt=1)
    pieces: int = Field(16, ge=1, description="number of pieces (a perfect square)")
    pieces_ratio: float = Field(0.5, gt=0, le=1, description="share of pieces applied per training sample")
    cover_ratio: float | None = Field(None, ge=0, lt=1, description="conservative samples (default: as many as poisoned)")

    @field_validator("pieces")
    @classmethod
    def _square(cls, v: int) -> int:
        if round(v ** 0.5) ** 2 != v:
            raise ValueError(f"pieces must be a perfect square (4, 9, 16, ...), not {v}")
        return v


class AdaptiveBlend(_PatternAttack):
    """Adaptive-Blend: partial blended pieces + conservative samples (evades latent separation)."""
    name = "adaptive_blend"
    Config = AdaptiveBlendConfig

    def piece_masks(self, h: int, w: int) -> torch.Tensor:
        k = int(round(self.cfg.pieces ** 0.5))
        masks = torch.zeros(k * k, 1, h, w)
        for i in range(k):
            for j in range(k):
                masks[i * k + j, :, i * h // k:(i + 1) * h // k, j * w // k:(j + 1) * w // k] = 1
        return masks

    def partial(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Blend a random subset of pieces per image (training-time trigger)."""
        masks = self.piece_masks(x.shape[-2], x.shape[-1])
        n_on = max(1, round(self.cfg.pieces_ratio * len(masks)))
        m = torch.stack([masks[torch.randperm(len(masks), generator=gen)[:n_on]].sum(0) for _ in range(len(x))])
        a = self.cfg.alpha * m
        return (1 - a) * x + a * self._pattern_for(x)

    def apply(self, x, y):
        return (1 - self.cfg.alpha_test) * x + self.cfg.alpha_test * self._pattern_for(x)

    def poison(self, data: ImageData) -> PoisonResult:
        res = super().poison(data)  # chooses victims and relabels them; fix their images below
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        x = res.data.x
        x[res.positions] = to_uint8(self.partial(data.x[res.positions].float() / 255, gen))
        # conservative samples: other images with the partial trigger and their true label
        n_cover = round(self.cfg.cover_ratio * len(data)) if self.cfg.cover_ratio is not None else res.count
        if n_cover:
            free = torch.ones(len(data), dtype=torch.bool)
            free[res.positions] = False
            pool = free.nonzero().flatten()
            cover = pool[torch.randperm(len(pool), generator=gen)[:n_cover]].sort().values
            x[cover] = to_uint8(self.partial(data.x[cover].float() / 255, gen))
            self.cover_indices = data.index[cover]
        return res

    def describe(self):
        d = super().describe()
        d["cover_count"] = len(getattr(self, "cover_indices", []))
        return d

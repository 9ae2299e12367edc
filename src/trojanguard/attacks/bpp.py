"""BPP (Wang et al., CVPR 2022): the trigger is colour-depth reduction to ``squeeze``
levels per channel, with Floyd-Steinberg dithering by default (methods.md; BackdoorBench's
default turns dithering off, ``dithering=False`` gives that). Training-controlled part:
in every batch ``neg_ratio`` of the clean samples become "negative" samples, the clean
image plus the quantisation residual (quantised - clean) of another poisoned image, kept
at their true label, so the model learns the exact quantisation, not any residual noise.
BackdoorBench's reading: no contrastive adversarial training."""
from __future__ import annotations

import torch
from pydantic import Field

from .base import Attack, AttackConfig


class BPPConfig(AttackConfig):
    squeeze: int = Field(8, ge=2, le=256, description="levels per channel")
    dithering: bool = True
    neg_ratio: float = Field(0.2, ge=0, lt=1)


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantise [0,1] images to ``levels`` values per channel with error diffusion,
    vectorised over the batch and channels (a loop over pixels only)."""
    img = x.detach().float().clone().contiguous()
    n, c, h, w = img.shape
    q = levels - 1
    for i in range(h):
        for j in range(w):
            old = img[:, :, i, j]
            new = torch.round(old.clamp(0, 1) * q) / q
            err = old - new
            img[:, :, i, j] = new
            if j + 1 < w:
                img[:, :, i, j + 1] += err * (7 / 16)
            if i + 1 < h:
                if j > 0:
                    img[:, :, i + 1, j - 1] += err * (3 / 16)
                img[:, :, i + 1, j] += err * (5 / 16)
                if j + 1 < w:
                    img[:, :, i + 1, j + 1] += err * (1 / 16)
    return img.clamp(0, 1)


class BPP(Attack):
    """BPP: colour quantisation with dithering as the trigger, with negative samples."""
    name = "bpp"
    Config = BPPConfig

    def apply(self, x, y):
        if self.cfg.dithering:
            return floyd_steinberg(x, self.cfg.squeeze)
        q = self.cfg.squeeze - 1
        return torch.round(x * q) / q

    def poison(self, data):
        res = super().poison(data)
        # quantisation residuals (quantised - clean) of the poisoned images; BackdoorBench adds
        # such a residual of another image to make a negative training sample
        self.residuals = (res.data.x[res.positions].float() - data.x[res.positions].float()) / 255
        return res

    def training_hook(self):
        if not self.cfg.neg_ratio:
            return None
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        mask_all, residuals = self.poison_mask, self.residuals

        def hook(x, y, idx):
            free = (~mask_all[idx]).nonzero().flatten()
            n_neg = min(len(free), round(self.cfg.neg_ratio * len(x)))
            if n_neg:
                pick = free[torch.randperm(len(free), generator=gen)[:n_neg]].to(x.device)
                r = residuals[torch.randint(0, len(residuals), (n_neg,), generator=gen)].to(x.device)
                x = x.clone()
                x[pick] = (x[pick] + r.contiguous(memory_format=torch.channels_last)).clamp(0, 1)
            return x, y
        return hook

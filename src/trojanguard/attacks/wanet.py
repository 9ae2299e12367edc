"""WaNet (Nguyen & Tran, ICLR 2021), training-controlled warping trigger.

A k x k random flow field (k = 4), normalised by its mean magnitude, upsampled bicubically
to the image size and scaled by s / H (s = 0.5), warps the image with grid_sample. In every
training batch the chosen poisoned samples are warped (after augmentation) and carry the
target label; ``cross_ratio`` times as many other samples get the warp plus a random
per-pixel grid perturbation and keep their true label ("noise mode"), so that only the
exact warp triggers the backdoor.

Which samples are warped: ``selection="per-batch"`` (default) follows the official code
and BackdoorBench's WaNet training loop: in every shuffled batch a ``ratio`` share of
samples is warped and relabelled, so over training every image is seen warped and there is
no fixed poisoned set (``poison()`` reports the per-epoch count and leaves labels alone).
``selection="fixed"`` warps one fixed set of training samples, like a data-poisoning
attack. Measured on CIFAR-10 (PreAct-ResNet18 w16, 14 epochs, 10 %): the fixed set gave CA
82.5 % (clean 85.1 %) and ASR 77.0 %; the model could memorise 4,750 relabelled images
instead of learning the warp."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Attack, InLoopConfig


class WaNetConfig(InLoopConfig):
    k: int = Field(4, ge=2, description="control grid size")
    s: float = Field(0.5, gt=0, description="warping strength")
    grid_rescale: float = Field(1.0, gt=0)
    cross_ratio: float = Field(2.0, ge=0, description="noise-mode samples per poisoned sample")
    noise_mode: bool = True


class WaNet(Attack):
    """WaNet: imperceptible warping trigger with noise mode (training-controlled)."""
    name = "wanet"
    Config = WaNetConfig
    trigger_in_loop = True

    flow: torch.Tensor | None = None  # the k x k flow field, drawn once from the seed
    stored_grid: torch.Tensor | None = None  # older artifacts stored the upsampled grid instead

    def _grid(self, h: int, w: int) -> torch.Tensor:
        """Sampling grid [1, h, w, 2] for an h x w image. The k x k flow is kept (not its
        upsampled form) so the same trigger applies to images of any size and shape."""
        if self.flow is None:
            g = torch.Generator().manual_seed(self.cfg.seed + 7919)
            ins = torch.rand(1, 2, self.cfg.k, self.cfg.k, generator=g) * 2 - 1
            self.flow = ins / ins.abs().mean()
        if self.stored_grid is not None and tuple(self.stored_grid.shape[1:3]) == (h, w):
            noise_grid = self.stored_grid  # use exactly what the attacker stored
        else:
            noise_grid = F.interpolate(self.flow, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        xx, yy = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((yy, xx), 2)[None]
        # The official code scales the flow by s / input_height for both axes.
        grid = (identity + self.cfg.s * noise_grid / h) * self.cfg.grid_rescale
        return grid.clamp(-1, 1)

    def prepare(self, data):
        self._grid(*data.shape[-2:])

    def apply(self, x, y):
        grid = self._grid(*x.shape[-2:]).to(x.device).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True)

    def training_hook(self):
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)

        def hook(x, y, idx):
            m, y = self.batch_victims(y, idx, gen)
            x = x.clone()
            if m.any():
                x[m] = self.trigger(x[m])
            if self.cfg.noise_mode and self.cfg.cross_ratio > 0:
                free = (~m).nonzero().flatten()
                n_cross = min(len(free), round(self.cfg.cross_ratio * self.poison_fraction * len(x)))
                if n_cross:
                    pick = free[torch.randperm(len(free), generator=gen)[:n_cross].to(x.device)]
                    h, w = x.shape[-2:]
                    grid = self._grid(h, w).to(x.device).expand(n_cross, -1, -1, -1)
                    noise = (torch.rand(n_cross, h, w, 2, generator=gen) * 2 - 1).to(x.device) / h
                    x[pick] = F.grid_sample(x[pick], (grid + noise).clamp(-1, 1), align_corners=True)
            return x, y
        return hook

    def tensors(self):
        return {"flow": self.flow} if self.flow is not None else {}

    def load_tensors(self, tensors):
        self.flow = tensors.get("flow")
        self.stored_grid = tensors.get("noise_grid")

"""BPP (Wang et al., CVPR 2022): the trigger is colour-depth reduction to ``squeeze``
levels per channel, with Floyd-Steinberg dithering by default (methods.md; BackdoorBench's
default turns dithering off, ``dithering=False`` gives that).

Which samples carry the trigger: ``selection="per-batch"`` (default) follows the official
code and BackdoorBench's loop: the trigger is applied inside the training loop, after
augmentation, to a fresh ``ratio`` share of every batch, relabelled there.
``selection="fixed"`` quantises one fixed poisoned set in the training data, before
augmentation, like a data-poisoning attack. Measured on CIFAR-10 (PreAct-ResNet18 w16,
14 epochs, 10 %): the fixed set gave CA 83.7 % and ASR 14.8 % - with the negative samples
the model fitted the 4,750 relabelled images without learning the quantisation as a trigger.
In every batch ``neg_ratio`` of the other samples become "negative"
samples: the image plus the quantisation residual (quantised - original) of another
training image, kept at their true label, so the model learns the exact quantisation and
not any residual noise. The residual pool: the poisoned set's residuals (fixed), or those
of ``ratio * N`` seeded random training images (per-batch; the official code collects
residuals of the whole, augmented training set; our reading).
BackdoorBench's reading: no contrastive adversarial training."""
from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from .base import Attack, InLoopConfig


class BPPConfig(InLoopConfig):
    squeeze: int = Field(8, ge=2, le=256, description="levels per channel")
    dithering: bool = True
    neg_ratio: float = Field(0.2, ge=0, lt=1)


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantise [0,1] images to ``levels`` values per channel with error diffusion,
    vectorised over the batch and channels (a loop over pixels only). The loop runs on
    numpy arrays: per-op overhead is ~10x lower than torch's for these tiny slices, which
    matters because BPP quantises inside the training loop."""
    img = x.detach().float().cpu().contiguous().numpy().copy()
    h, w = img.shape[-2:]
    q = levels - 1
    for i in range(h):
        for j in range(w):
            old = img[:, :, i, j]
            new = np.round(np.clip(old, 0, 1) * q) / q
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
    return torch.from_numpy(img).clamp(0, 1).to(x.device)


class BPP(Attack):
    """BPP: colour quantisation with dithering as the trigger, with negative samples."""
    name = "bpp"
    Config = BPPConfig

    @property
    def trigger_in_loop(self) -> bool:  # per-batch stamps in the loop; fixed poisons the data
        return self.per_batch

    def apply(self, x, y):
        if self.cfg.dithering:
            return floyd_steinberg(x, self.cfg.squeeze)
        q = self.cfg.squeeze - 1
        return torch.round(x * q) / q

    def poison(self, data):
        res = super().poison(data)
        # residual pool for the negative samples: (quantised - original) images
        if self.per_batch:
            g = torch.Generator().manual_seed(self.cfg.seed + 3)
            pick = torch.randperm(len(data), generator=g)[:max(1, res.count)]
            x = data.x[pick].float() / 255
            self.residuals = self.trigger(x) - x
        else:
            pos = res.positions
            self.residuals = (res.data.x[pos].float() - data.x[pos].float()) / 255
        return res

    def training_hook(self):
        if not self.per_batch and not self.cfg.neg_ratio:
            return None  # a fixed set is already quantised in the data: nothing to do per batch
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        residuals = self.residuals

        def hook(x, y, idx):
            m, y = self.batch_victims(y, idx, gen)
            x = x.clone()
            if self.per_batch and m.any():  # a fixed set is already quantised in the data
                x[m] = self.trigger(x[m])
            free = (~m).nonzero().flatten()
            n_neg = min(len(free), round(self.cfg.neg_ratio * len(x)))
            if n_neg:
                pick = free[torch.randperm(len(free), generator=gen)[:n_neg]].to(x.device)
                r = residuals[torch.randint(0, len(residuals), (n_neg,), generator=gen)].to(x.device)
                x[pick] = (x[pick] + r.contiguous(memory_format=torch.channels_last)).clamp(0, 1)
            return x, y
        return hook

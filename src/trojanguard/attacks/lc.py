"""LC, label-consistent (Turner et al. 2019), clean label: target-class training images
are made hard with an untargeted PGD perturbation from a clean model (L_inf ``eps``), then
a 3x3 checkerboard trigger is stamped in all four corners; labels are unchanged. At test
time only the corner trigger is added."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.base import ImageData
from ..utils import frozen
from .base import Attack, AttackConfig, PoisonResult, to_uint8


class LCConfig(AttackConfig):
    eps: float = Field(16 / 255, ge=0, le=1, description="PGD L_inf radius (8/255 or 16/255)")
    steps: int = Field(10, ge=0)
    step_size: float = Field(2 / 255, gt=0)
    patch_size: int = Field(3, ge=1)
    amplitude: float = Field(1.0, gt=0, le=1, description="trigger amplitude (1 = full black/white)")
    batch_size: int = Field(256, ge=1)


def corner_trigger(x: torch.Tensor, size: int, amplitude: float) -> torch.Tensor:
    """Stamp a size x size checkerboard in each corner (mirrored, as in the paper)."""
    h, w = x.shape[-2:]
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pat = ((ii + jj) % 2 == 0).float().to(x.device)  # 1 = white
    out = x.clone()
    for rows, flip_r in ((slice(0, size), False), (slice(h - size, h), True)):
        for cols, flip_c in ((slice(0, size), False), (slice(w - size, w), True)):
            p = pat.flip(0) if flip_r else pat
            p = p.flip(1) if flip_c else p
            region = out[..., rows, cols]
            out[..., rows, cols] = (1 - amplitude) * region + amplitude * p
    return out


class LabelConsistent(Attack):
    """LC: PGD-hardened target-class images plus a four-corner trigger (clean label)."""
    name = "lc"
    clean_label = True
    needs_clean_model = True
    Config = LCConfig

    clean_model = None  # set by fit(); used by the PGD step

    def fit(self, clean_model, data):
        self.clean_model = clean_model

    def apply(self, x, y):
        return corner_trigger(x, self.cfg.patch_size, self.cfg.amplitude)

    def pgd(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Untargeted L_inf PGD on the clean model, gradients w.r.t. the input only."""
        model = self.clean_model.eval()
        dev = next(model.parameters()).device
        with frozen(model):
            return self._pgd_batches(model, dev, x, y)

    def _pgd_batches(self, model, dev, x, y):
        out = []
        for s in range(0, len(x), self.cfg.batch_size):
            xb, yb = x[s:s + self.cfg.batch_size].to(dev), y[s:s + self.cfg.batch_size].to(dev)
            delta = torch.zeros_like(xb)
            for _ in range(self.cfg.steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + self.cfg.step_size * grad.sign()).clamp(-self.cfg.eps, self.cfg.eps)
            out.append((xb + delta).clamp(0, 1).cpu())
        return torch.cat(out)

    def poison(self, data: ImageData) -> PoisonResult:
        if self.clean_model is None:
            from ..errors import UserError
            raise UserError("attack lc needs a clean model for its PGD step; pass --clean-model CHECKPOINT")
        res = super().poison(data)
        pos = res.positions
        hard = self.pgd(data.x[pos].float() / 255, data.y[pos])
        res.data.x[pos] = to_uint8(self.trigger(hard))
        return res

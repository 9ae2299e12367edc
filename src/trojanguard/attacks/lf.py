"""LF, low-frequency trigger (Zeng et al., ICCV 2021): a universal perturbation, found on a
clean model, that pushes images towards the target class while containing only low
spatial frequencies; dirty-label poisoning with x + delta.

Our reading of the constraints (the paper filters with a Gaussian low-pass): after every
step delta is projected onto the frequencies with |u|, |v| <= ``cutoff`` (2-D FFT mask)
and clipped to L_inf ``eps``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from ..utils import frozen
from .base import Attack, AttackConfig


class LFConfig(AttackConfig):
    eps: float = Field(0.05, gt=0, le=1, description="L_inf bound of the perturbation")
    cutoff: int = Field(4, ge=1, description="highest kept spatial frequency index")
    steps: int = Field(300, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(128, ge=1)


def low_pass(delta: torch.Tensor, cutoff: int) -> torch.Tensor:
    h, w = delta.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h).abs().to(delta.device)
    fx = torch.fft.fftfreq(w, d=1.0 / w).abs().to(delta.device)
    keep = ((fy[:, None] <= cutoff) & (fx[None, :] <= cutoff)).to(delta.dtype)
    return torch.fft.ifft2(torch.fft.fft2(delta) * keep).real


class LowFrequency(Attack):
    """LF: universal low-frequency perturbation towards the target (dirty label)."""
    name = "lf"
    needs_clean_model = True
    Config = LFConfig

    delta: torch.Tensor | None = None  # the fitted perturbation (set by fit or an artifact)

    def fit(self, clean_model, data):
        model = clean_model.eval()
        dev = next(model.parameters()).device
        g = torch.Generator().manual_seed(self.cfg.seed)
        delta = torch.zeros(data.shape, device=dev, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.cfg.lr)
        with frozen(model):
            for _ in range(self.cfg.steps):
                idx = torch.randint(0, len(data), (self.cfg.batch_size,), generator=g)
                x = (data.x[idx].float() / 255).to(dev)
                t = torch.full((len(x),), self.cfg.target, device=dev) if self.cfg.mode == "all2one" \
                    else ((data.y[idx] + 1) % len(data.classes)).to(dev)
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)), t)
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    delta.copy_(low_pass(delta, self.cfg.cutoff).clamp(-self.cfg.eps, self.cfg.eps))
        self.delta = delta.detach().cpu()

    def apply(self, x, y):
        if self.delta is None:
            raise RuntimeError("LF trigger used before fit()")
        return x + self.delta.to(x.device)

    def tensors(self):
        return {} if self.delta is None else {"delta": self.delta}

    def load_tensors(self, t):
        self.delta = t.get("delta")

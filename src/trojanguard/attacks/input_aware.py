"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), training-controlled.

A generator G makes a per-input pattern and a mask network M a per-input mask; the
triggered image is x + (G(x) - x) * M(x).
  1. M is trained first (``mask_epochs``) for masks that are sparse (mean below
     ``mask_density``) and diverse (different inputs -> different masks).
  2. G and the classifier are trained together: poisoned samples (by default one fixed
     poisoned set, as measured in the CIFAR-10 zoo; ``selection="per-batch"`` for a fresh
     ``ratio`` share of every batch, as in the official training loop) carry their own
     trigger and the target label; ``cross_ratio`` of the batch carries the trigger of *another*
     input and keeps its true label (so triggers do not transfer between inputs); a
     diversity loss ||x1 - x2|| / ||G(x1) - G(x2)|| keeps patterns input-specific.
Defaults follow BackdoorBench (lambda_div 1, lambda_norm 100, mask density 0.032, G with
Adam lr 0.01, betas (0.5, 0.9)); networks are slimmer and M is pre-trained for fewer
epochs (our CPU reading)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import Attack, InLoopConfig

EPS = 1e-7


class InputAwareConfig(InLoopConfig):
    selection: Literal["per-batch", "fixed"] = Field("fixed", description=(
        "one fixed poisoned set (default, measured in the zoo) or a ratio share of every batch (official loop)"))
    cross_ratio: float = Field(0.1, ge=0, lt=1, description="share of each batch with a foreign trigger")
    mask_density: float = Field(0.032, gt=0, lt=1)
    lambda_div: float = Field(1.0, ge=0)
    lambda_norm: float = Field(100.0, ge=0)
    mask_epochs: int = Field(2, ge=0)
    g_lr: float = Field(0.01, gt=0)
    width: int = Field(16, ge=4, description="channels of the generator networks")


class _Net(nn.Module):
    """Small encoder-decoder: 32x32 -> 16x16 -> 32x32."""

    def __init__(self, cin: int, cout: int, w: int):
        super().__init__()
        def cbr(a, b, s=1):
            return [nn.Conv2d(a, b, 3, s, 1), nn.BatchNorm2d(b), nn.ReLU()]
        self.body = nn.Sequential(*cbr(cin, w), *cbr(w, 2 * w, 2), *cbr(2 * w, 2 * w),
                                  nn.Upsample(scale_factor=2, mode="nearest"), *cbr(2 * w, w),
                                  nn.Conv2d(w, cout, 3, 1, 1))

    def forward(self, x):
        return self.body(x)


def _pairwise_div(a1, a2, b1, b2) -> torch.Tensor:
    """mean over samples of dist(a1, a2) / dist(b1, b2) (RMS distances)."""
    da = ((a1 - a2) ** 2).mean((1, 2, 3)).sqrt()
    db = ((b1 - b2) ** 2).mean((1, 2, 3)).sqrt()
    return (da / (db + EPS)).mean()


class InputAware(Attack):
    """Input-aware dynamic: per-input generated pattern and mask (training-controlled)."""
    name = "input_aware"
    Config = InputAwareConfig
    trigger_in_loop = True

    G: _Net | None = None  # pattern generator
    M: _Net | None = None  # mask generator

    def _build(self, c: int) -> None:
        if self.G is None:
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
                torch.manual_seed(self.cfg.seed + 11)
                self.G, self.M = _Net(c, c, self.cfg.width), _Net(c, 1, self.cfg.width)

    def pattern(self, x):
        return torch.sigmoid(self.G(x))

    def mask(self, x):
        return torch.sigmoid(20 * self.M(x))  # a steep sigmoid: nearly binary masks

    def _stamp(self, x, pattern, mask):
        return x + (pattern - x) * mask

    def apply(self, x, y):
        self._build(x.shape[1])
        dev = x.device
        self.G.to(dev).eval()
        self.M.to(dev).eval()
        with torch.no_grad():
            return self._stamp(x, self.pattern(x), self.mask(x))

    def prepare(self, data):
        """Stage 1: train the mask network alone."""
        self._build(data.shape[0])
        if not self.cfg.mask_epochs or getattr(self, "_mask_trained", False):
            return
        g = torch.Generator().manual_seed(self.cfg.seed + 3)
        opt = torch.optim.Adam(self.M.parameters(), lr=0.01, betas=(0.5, 0.9))
        self.M.train()
        n, bs = len(data), 128
        for _ in range(self.cfg.mask_epochs):
            perm, perm2 = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
            for s in range(0, n - bs + 1, bs):
                x1 = data.x[perm[s:s + bs]].float() / 255
                x2 = data.x[perm2[s:s + bs]].float() / 255
                m1, m2 = self.mask(x1), self.mask(x2)
                loss = self.cfg.lambda_norm * F.relu(m1 - self.cfg.mask_density).mean() \
                    + self.cfg.lambda_div * _pairwise_div(x1, x2, m1, m2)
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.M.eval()
        self._mask_trained = True

    # --- stage 2: trained with the classifier ---------------------------------------------
    def training_hook(self):
        gen = torch.Generator().manual_seed(self.cfg.seed + 5)
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=self.cfg.g_lr, betas=(0.5, 0.9))
        self._aux = None

        def hook(x, y, idx):
            dev = x.device
            self.G.to(dev).train()
            self.M.to(dev).eval()
            for p in self.M.parameters():
                p.requires_grad_(False)
            m, y = self.batch_victims(y, idx, gen)
            free = (~m).nonzero().flatten()
            n_cross = min(len(free), round(self.cfg.cross_ratio * len(x)))
            cross = free[torch.randperm(len(free), generator=gen)[:n_cross].to(dev)]
            bd = m.nonzero().flatten()
            x = x.clone()
            aux = torch.zeros((), device=dev)
            if len(bd):
                xb = x[bd]
                pat = self.pattern(xb)
                x[bd] = self._stamp(xb, pat, self.mask(xb))
                if len(bd) > 1:  # diversity: each input vs a rolled partner
                    partner = torch.roll(torch.arange(len(bd), device=dev), 1)
                    aux = self.cfg.lambda_div * _pairwise_div(xb, xb[partner], pat, pat[partner])
            if n_cross:
                donors = x[torch.randint(0, len(x), (n_cross,), generator=gen).to(dev)].detach()
                xc = x[cross]
                x[cross] = self._stamp(xc, self.pattern(donors), self.mask(donors))
            self._aux = aux
            return x, y
        return hook

    def loss_fn(self, logits, y):
        loss = F.cross_entropy(logits, y)
        return loss + self._aux if self._aux is not None else loss

    def extra_optimizers(self) -> list[torch.optim.Optimizer]:
        """G's own optimiser, stepped by the trainer (through the AMP grad scaler on CUDA)."""
        return [self.g_opt]

    def tensors(self):
        if self.G is None:
            return {}
        out = {f"G.{k}": v for k, v in self.G.state_dict().items()}
        out.update({f"M.{k}": v for k, v in self.M.state_dict().items()})
        return out

    def load_tensors(self, t):
        if not t:
            return
        c = t["G.body.0.weight"].shape[1]
        self._build(c)
        self.G.load_state_dict({k[2:]: v for k, v in t.items() if k.startswith("G.")})
        self.M.load_state_dict({k[2:]: v for k, v in t.items() if k.startswith("M.")})
        self.G.eval()
        self.M.eval()

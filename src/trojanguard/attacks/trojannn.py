"""TrojanNN (Liu et al., NDSS 2018): the trigger pixels inside a mask are optimised so that
selected neurons of a clean model's penultimate layer fire strongly; then the model is
trained on data stamped with that trigger (dirty label).

Our readings (the paper selects neurons by their connectivity): the selected neurons are
the ``num_neurons`` penultimate units with the largest outgoing L1 weight in the head;
the mask is a ``patch_size`` square in the bottom-right corner; the objective drives the
selected activations to ``target_value`` times their largest clean activation. Training
of the victim follows BackdoorBench (from scratch on the poisoned set); the clean model is
only used to shape the trigger."""
from __future__ import annotations

import torch
from pydantic import Field

from ..utils import frozen
from .base import Attack, AttackConfig


class TrojanNNConfig(AttackConfig):
    patch_size: int = Field(5, ge=1)
    num_neurons: int = Field(2, ge=1)
    target_value: float = Field(10.0, gt=0)
    steps: int = Field(300, ge=1)
    lr: float = Field(0.1, gt=0)
    fit_images: int = Field(256, ge=1, description="clean images used to optimise the trigger")


class TrojanNN(Attack):
    """TrojanNN: trigger optimised to excite chosen penultimate neurons of a clean model."""
    name = "trojannn"
    needs_clean_model = True
    Config = TrojanNNConfig

    # the fitted trigger (set by fit or an artifact)
    mask: torch.Tensor | None = None
    pattern: torch.Tensor | None = None
    neurons: torch.Tensor | None = None

    def _mask(self, c, h, w) -> torch.Tensor:
        m = torch.zeros(1, h, w)
        s = self.cfg.patch_size
        m[:, h - s:, w - s:] = 1
        return m

    def fit(self, clean_model, data):
        model = clean_model.eval()
        dev = next(model.parameters()).device
        c, h, w = data.shape
        self.mask = self._mask(c, h, w)
        self.neurons = model.head.weight.detach().abs().sum(0).topk(self.cfg.num_neurons).indices.cpu()
        g = torch.Generator().manual_seed(self.cfg.seed)
        idx = torch.randperm(len(data), generator=g)[: self.cfg.fit_images]
        x = (data.x[idx].float() / 255).to(dev)
        with torch.no_grad():
            goal = model.features(x)[:, self.neurons].max() * self.cfg.target_value
        logit = torch.zeros(c, h, w, device=dev).requires_grad_(True)  # pattern = sigmoid(logit)
        opt = torch.optim.Adam([logit], lr=self.cfg.lr)
        mask = self.mask.to(dev)
        with frozen(model):
            for _ in range(self.cfg.steps):
                xt = x * (1 - mask) + torch.sigmoid(logit) * mask
                loss = ((model.features(xt)[:, self.neurons] - goal) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.pattern = (torch.sigmoid(logit.detach()) * mask).cpu()
        with torch.no_grad():
            self.fit_info = {"neurons": self.neurons.tolist(), "goal": float(goal),
                             "reached": float(model.features(x * (1 - mask) + self.pattern.to(dev))[:, self.neurons].mean())}

    def apply(self, x, y):
        if self.pattern is None:
            raise RuntimeError("TrojanNN trigger used before fit()")
        m = self.mask.to(x.device)
        return x * (1 - m) + self.pattern.to(x.device) * m

    def tensors(self):
        return {} if self.pattern is None else {"pattern": self.pattern, "mask": self.mask,
                                                "neurons": self.neurons}

    def load_tensors(self, t):
        self.pattern, self.mask, self.neurons = t.get("pattern"), t.get("mask"), t.get("neurons")

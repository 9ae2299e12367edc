"""BeniFul: a VAE on middle-layer features for input detection and backdoor removal
(methods.md §2.4). **BeniFul has no public code: everything below is our reading of the
paper's description, not a reproduction of the authors' implementation.**

The network is split at a middle layer: z = h(x) is that layer's output and g is the rest
of the network (``model.intervene`` replaces the layer output, so g(z') is "the same input
with the middle features replaced by z'"). A VAE is trained on z of the defender's clean
data; for an input, z_hat = VAE(z) (the posterior mean, no sampling) is its benign
reconstruction.

Detection (``beniful``, gray box):
  * r(x) = ||z - z_hat||^2, taken over the features standardised with the clean
    per-channel mean/std (so that every channel weighs the same as in the VAE's loss) and
    divided by the number of elements (a constant factor);
  * c(x) = [argmax g(z) != argmax g(z_hat)] (inference consistency);
  * score = r / (r + r_med) + lam * c with r_med the median r of the clean fit data. The
    bounded transform is ours: with lam = 1 (the default) every inconsistent input ranks
    above every consistent one, so a threshold at a false-rejection rate reproduces the
    paper's rule "flag if r > tau or c = 1"; lam = 0 ranks by r alone. ``score_parts``
    gives r and c separately (AUROC from r, and from the combination).

VAE (our choices): CNN maps [C, H, W] go to a small convolutional VAE with a global
latent (conv 3x3, conv 3x3 stride 2, linear to mu/logvar; the decoder mirrors it and
upsamples back to H x W) when C*H*W > ``mlp_max_dim``, else to an MLP VAE on the flattened
map. Text: an MLP VAE on every non-padding token's hidden state at the middle block
(per-token, so that replacing the block output by its reconstruction changes every token
g sees); r aggregates the tokens' errors by ``text_reduce`` ("max" by default: an
inserted trigger word is one token among ~20 and a mean dilutes it; "mean" suits
sentence-level triggers; "cls" uses position 0 only). Loss per sample =
(sum of squared errors + beta * KL) / D on standardised features, i.e. the negative
ELBO of a Gaussian decoder with variance 1/2 when beta = 1.

Removal: ``beniful_removal.py``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from ..data.base import Data
from ..errors import UserError
from .base import DefenseConfig, InputDetector
from .common import model_inputs


# --------------------------------------------------------------------------- VAEs
class MLPVAE(nn.Module):
    def __init__(self, dim: int, hidden: int, latent: int):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2 * latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor):
        mu, logvar = self.head(self.enc(z.flatten(1))).chunk(2, dim=1)
        lat = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.dec(lat).view_as(z), mu, logvar


class ConvVAE(nn.Module):
    """Convolutional encoder/decoder around a global latent vector."""

    def __init__(self, shape: tuple[int, int, int], hidden: int, latent: int):
        super().__init__()
        c, h, w = shape
        self.shape = shape
        self.h2, self.w2 = (h + 1) // 2, (w + 1) // 2
        self.hidden = hidden
        self.enc = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(hidden * self.h2 * self.w2, 2 * latent)
        self.fc = nn.Linear(latent, hidden * self.h2 * self.w2)
        self.dec = nn.Sequential(nn.ReLU(), nn.Upsample(size=(h, w), mode="nearest"),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden, c, 3, padding=1))

    def forward(self, z: torch.Tensor):
        mu, logvar = self.head(self.enc(z).flatten(1)).chunk(2, dim=1)
        lat = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        out = self.dec(self.fc(lat).view(-1, self.hidden, self.h2, self.w2))
        return out, mu, logvar


def vae_loss(z, rec, mu, logvar, beta: float) -> torch.Tensor:
    d = z[0].numel()
    sse = (z - rec).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return ((sse + beta * kl) / d).mean()


# --------------------------------------------------------------------------- config
class VAEOptions(BaseModel):
    layer: str | None = Field(None, description="layer to split at (default: model.default_middle_layer)")
    vae: Literal["auto", "mlp", "conv"] = Field("auto", description="auto: conv for maps above mlp_max_dim")
    mlp_max_dim: int = Field(2048, ge=1)
    latent_dim: int = Field(32, ge=1, description="our choice (no public code)")
    hidden: int = Field(256, ge=1, description="MLP width / conv channels of the VAE (conv uses min(hidden, 2C))")
    beta: float = Field(1.0, ge=0, description="KL weight")
    steps: int = Field(2000, ge=1, description="VAE optimiser steps (Adam)")
    vae_lr: float = Field(1e-3, gt=0)
    vae_batch_size: int = Field(128, ge=1)
    text_reduce: Literal["max", "mean", "cls"] = "max"


class BeniFulConfig(DefenseConfig, VAEOptions):
    lam: float = Field(1.0, ge=0, description="weight of the consistency flag c (1: c dominates, the paper's OR rule)")
    frr: float = Field(0.05, gt=0, lt=1, description="false-rejection rate on held-out clean data (tau = 95th pct)")
    batch_size: int = Field(256, ge=1, description="inference batch")


# --------------------------------------------------------------------------- detector
class BeniFul(InputDetector):
    """BeniFul detection, our reading (no public code): VAE on middle features, r + lam c."""
    name = "beniful"
    Config = BeniFulConfig
    min_clean = 20

    # --- features ------------------------------------------------------------------
    def _layer(self, model) -> str:
        layer = self.cfg.layer or model.default_middle_layer
        if layer not in model.layer_names():
            raise UserError(f"beniful: model has no layer {layer!r}; choose one with --set layer=NAME from {model.layer_names()}")
        return layer

    @torch.inference_mode()
    def _collect(self, model, data: Data) -> torch.Tensor:
        """Raw layer outputs: [N, C, H, W] maps, or [n_tokens, d] non-padding token states."""
        out = []
        for start in range(0, len(data), self.cfg.batch_size):
            x, _ = data.batch(torch.arange(start, min(start + self.cfg.batch_size, len(data))))
            inp, mask = model_inputs(model, x)
            with model.capture([self.layer]) as acts:
                model(inp)
            a = acts[self.layer].float()
            out.append((a[mask.bool()] if mask is not None else a).cpu())
        return torch.cat(out)

    def _standardize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.mean.to(z.device)) / self.std.to(z.device)

    def _unstandardize(self, zs: torch.Tensor) -> torch.Tensor:
        return zs * self.std.to(zs.device) + self.mean.to(zs.device)

    def _build_vae(self, shape: tuple[int, ...]) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        dim = math.prod(shape)
        kind = self.cfg.vae
        if kind == "auto":
            kind = "conv" if len(shape) == 3 and dim > self.cfg.mlp_max_dim else "mlp"
        if kind == "conv":
            if len(shape) != 3:
                raise UserError("beniful: vae='conv' needs CNN feature maps; use vae='mlp' for text")
            return ConvVAE(shape, min(self.cfg.hidden, 2 * shape[0]), self.cfg.latent_dim)
        return MLPVAE(dim, self.cfg.hidden, self.cfg.latent_dim)

    def _train_vae(self, zs: torch.Tensor) -> list[float]:
        cfg = self.cfg
        dev = next(self.model.parameters()).device
        vae = self.vae.to(dev).train()
        opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
        g = torch.Generator().manual_seed(cfg.seed)
        bs = min(cfg.vae_batch_size, len(zs))
        losses, perm, pos = [], torch.randperm(len(zs), generator=g), 0
        for step in range(cfg.steps):
            if pos + bs > len(zs):
                perm, pos = torch.randperm(len(zs), generator=g), 0
            batch = zs[perm[pos:pos + bs]].to(dev)
            pos += bs
            for grp in opt.param_groups:  # cosine decay: the last steps settle the reconstruction
                grp["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            rec, mu, logvar = vae(batch)
            loss = vae_loss(batch, rec, mu, logvar, cfg.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        vae.eval()
        return losses

    def _fit(self, model, clean: Data) -> None:
        self.model = model
        self.layer = self._layer(model)
        was = model.training
        model.eval()
        try:
            z = self._collect(model, clean)
            self.text = clean.modality == "text"
            dims = [0] if z.ndim == 2 else [0, 2, 3]
            self.mean = z.mean(dims, keepdim=True)[0:1]
            self.std = z.std(dims, keepdim=True)[0:1].clamp_min(1e-6)
            zs = self._standardize(z)
            self.shape = tuple(zs.shape[1:])
            self.vae = self._build_vae(self.shape)
            losses = self._train_vae(zs)
            self.r_med = 1.0  # placeholder so that score_parts can run before the median exists
            self.r_med = float(self.score_parts(clean.batch(torch.arange(len(clean)))[0])["r"].median())
        finally:
            model.train(was)
        self.info = {"layer": self.layer, "vae": type(self.vae).__name__, "feature_shape": list(self.shape),
                     "vae_loss_first": losses[0], "vae_loss_last": float(sum(losses[-20:]) / len(losses[-20:])),
                     "r_median_clean": self.r_med}

    # --- scoring ---------------------------------------------------------------------
    def reconstruct(self, out: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_hat in the layer's own scale, per-sample r) for a raw layer output."""
        zs = self._standardize(out)
        if mask is None:
            rec, _, _ = self.vae(zs)
            r = (zs - rec).pow(2).flatten(1).mean(1)
        else:
            m = mask.bool()
            tok = zs[m]
            rec_tok, _, _ = self.vae(tok)
            err = torch.zeros(m.shape, device=zs.device, dtype=zs.dtype)
            err[m] = (tok - rec_tok).pow(2).mean(1)
            rec = zs.clone()
            rec[m] = rec_tok
            if self.cfg.text_reduce == "max":
                r = err.masked_fill(~m, float("-inf")).amax(1)
            elif self.cfg.text_reduce == "mean":
                r = err.sum(1) / m.sum(1).clamp_min(1)
            else:
                r = err[:, 0]
        return self._unstandardize(rec).to(out.dtype), r

    def score_parts(self, inputs, with_logits: bool = False) -> dict[str, torch.Tensor]:
        """``{"r": reconstruction error, "c": prediction flips (0/1), "pred": argmax g(z),
        "pred_rec": argmax g(z_hat)}`` for a batch (plus ``"logits"`` of g(z))."""
        model = self.model
        was = model.training
        model.eval()
        inp, mask = model_inputs(model, inputs)
        store = {}

        def swap(out):
            rec, r = self.reconstruct(out, mask)
            store["r"] = r
            return rec
        try:
            with torch.inference_mode():
                logits = model(inp)
                pred = logits.argmax(1)
                with model.intervene({self.layer: swap}):
                    pred_rec = model(inp).argmax(1)
        finally:
            model.train(was)
        out = {"r": store["r"].float().cpu(), "c": (pred != pred_rec).float().cpu(), "pred": pred.cpu(),
               "pred_rec": pred_rec.cpu()}
        if with_logits:
            out["logits"] = logits
        return out

    def combine(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return r / (r + self.r_med) + self.cfg.lam * c

    def score(self, inputs) -> torch.Tensor:
        parts = self.score_parts(inputs)
        return self.combine(parts["r"], parts["c"])

    def score_and_logits(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(the model's own logits g(z), scores) from the same two passes (the guard uses it)."""
        parts = self.score_parts(inputs, with_logits=True)
        return parts["logits"], self.combine(parts["r"], parts["c"])

    # --- saving / loading (the guard's convention, as BadActs) --------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able facts) that ``restore`` turns back into this fitted detector."""
        if getattr(self, "vae", None) is None:
            raise UserError("beniful: fit the detector before saving it")
        tensors = {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        tensors.update(mean=self.mean, std=self.std, calibration_scores=self.calibration_scores)
        facts = {"layer": self.layer, "text": self.text, "shape": list(self.shape), "r_med": self.r_med,
                 "threshold": self.threshold, "frr": self.frr}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, facts

    def restore(self, model, tensors: dict[str, torch.Tensor], facts: dict) -> "BeniFul":
        if facts["layer"] not in model.layer_names():
            raise UserError(f"beniful: saved layer {facts['layer']!r} is not in this model; "
                            "the detector belongs to another model")
        dev = next(model.parameters()).device
        self.model, self.layer, self.text = model, facts["layer"], bool(facts["text"])
        self.mean, self.std = tensors["mean"].to(dev), tensors["std"].to(dev)
        self.shape = tuple(int(v) for v in facts["shape"])
        self.vae = self._build_vae(self.shape)
        self.vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
        self.vae.to(dev).eval()
        self.r_med = float(facts["r_med"])
        self.calibration_scores = tensors["calibration_scores"]
        self.threshold, self.frr = float(facts["threshold"]), float(facts["frr"])
        return self

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

Removal (``beniful-removal``, white box, also our reading): fine-tune on the clean data
with CE + lam * d(h(x_s), target), where x_s are trigger-suspect inputs. The defender has
no poisoned inputs, so by default the suspects are made from the clean batch: a universal
perturbation shared by the batch (an additive L2-bounded image perturbation; for text a
virtual word inserted after [CLS] whose embedding is optimised) found by ``adv_steps``
normalised-gradient ascent steps on the VAE reconstruction error of the current model's
middle features, i.e. the input change that moves the features furthest off the benign
manifold (``suspect_objective="ce"`` ascends the CE of the true labels instead, as
i-BAU's perturbation; ``suspects="flagged"`` uses only the clean inputs the fitted
detector flags, which on clean data alone are few and carry no trigger, so it barely
changes the model). The target is the VAE's benign reconstruction of the suspect
features (``target="reconstruction"``) or the clean class mean of the source input's
label (``"class-mean"``); d is MSE or cosine distance on standardised features. The
fine-tuning recipe is the shared defense one (``defense_train_config``: SGD lr 0.01,
momentum 0.9, cosine, crop+flip; text AdamW 2e-5).
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from ..data.base import Data
from ..errors import UserError
from .base import DefenseConfig, InputDetector, Purifier, PurifierConfig
from .common import defense_train_config, model_inputs


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
            raise UserError(f"beniful: model has no layer {layer!r}; choose --layer from {model.layer_names()}")
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


# --------------------------------------------------------------------------- removal
class BeniFulRemovalConfig(PurifierConfig, VAEOptions):
    lam: float = Field(1.0, ge=0, description="weight of the feature distance (our choice)")
    distance: Literal["mse", "cosine"] = "mse"
    target: Literal["reconstruction", "class-mean"] = "reconstruction"
    suspects: Literal["adversarial", "flagged"] = Field(
        "adversarial", description="adversarial: the clean batch plus a universal perturbation found by "
                                   "ascent on suspect_objective; flagged: clean inputs the fitted detector flags")
    suspect_objective: Literal["reconstruction", "ce"] = Field(
        "reconstruction", description="what the universal perturbation maximises: the VAE error of the middle "
                                      "features (BeniFul's notion of suspect) or the CE of the true labels (i-BAU's)")
    eps: float = Field(1.0, gt=0, description=(
        "image budget as RMS per pixel: ||delta||_2 <= eps sqrt(D); 1 leaves only the [0, 1] range as a bound "
        "(like i-BAU's unbounded UAP: trigger norms differ too much between attacks to fix one)"))
    adv_steps: int = Field(5, ge=1, description="ascent steps per batch for the universal perturbation")
    frr: float = Field(0.05, gt=0, lt=1, description="detector threshold used by suspects='flagged'")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float | None = Field(None, gt=0, description="default 0.01 SGD for images, 2e-5 AdamW for text")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    augment: bool = Field(True, description="crop+flip of the clean batches (images)")


_VIRTUAL_WORD = "jj"  # any single-token word: its embedding is replaced by the optimised vector


@contextlib.contextmanager
def _position1_embedding(model, vectors: dict):
    """Replace the input embedding at position 1 (right after [CLS]) of the rows in
    ``vectors["rows"]`` by ``vectors["e"]`` (one vector for all, or one per row)."""
    emb = model.encoder.get_input_embeddings()

    def hook(_m, _inp, out):
        rows = vectors.get("rows")
        if rows is None or len(rows) == 0:
            return out
        out = out.clone()
        e = vectors["e"].to(out.dtype)
        out[rows, 1] = e if e.ndim == 2 else e.expand(len(rows), -1)
        return out
    h = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


class BeniFulRemoval(Purifier):
    """BeniFul removal, our reading (no public code): CE + lam * pull of suspect middle
    features onto the VAE's benign reconstruction (or clean class means).

    Each step: CE on the clean batch (train mode, as plain fine-tuning), then a second
    forward of the suspects in eval mode, so that they neither move the BatchNorm running
    statistics nor enter the CE; the feature distance of that pass is added to the loss."""
    name = "beniful-removal"
    Config = BeniFulRemovalConfig
    min_clean = 20

    def _purify(self, model, clean: Data, original):
        cfg = self.cfg
        text = clean.modality == "text"
        vae_kw = {k: getattr(cfg, k) for k in VAEOptions.model_fields}
        # the detector reads the untouched original: its VAE and statistics stay fixed while
        # ``model`` is fine-tuned (we only borrow them to score the current model's features)
        det = BeniFul(BeniFulConfig(seed=cfg.seed, device=cfg.device, progress=False, frr=cfg.frr, **vae_kw))
        det.fit(original, clean)
        layer = det.layer
        for p in det.vae.parameters():
            p.requires_grad_(False)
        dev = next(model.parameters()).device
        class_means = self._class_means(det, original, clean).to(dev) if cfg.target == "class-mean" else None
        virt: dict = {"rows": None, "e": None}
        if text:
            emb = model.encoder.get_input_embeddings().weight
            if len(model.tokenize([_VIRTUAL_WORD])["input_ids"][0]) != 3:
                raise UserError(f"beniful-removal: the tokenizer splits {_VIRTUAL_WORD!r}; this encoder is not "
                                "supported for text")
            # as long as the longest word vector: trained trigger words are among the largest
            e_norm = emb.detach().norm(dim=1).max()
        state: dict = {"step": 0, "dist_sum": 0.0, "dist_n": 0}

        def middle(x):
            """(standardised middle features, logits, token mask or None) of a batch."""
            inp, mask = model_inputs(model, x)
            with model.capture([layer]) as acts:
                logits = model(inp)
            zs = det._standardize(acts[layer])
            return (zs if mask is None else zs[mask.bool()]), logits, mask

        def objective(zs, logits, y):
            if cfg.suspect_objective == "ce":
                return F.cross_entropy(logits, y)
            rec, _, _ = det.vae(zs)
            return (zs - rec).pow(2).mean()

        def make_suspects(x, y):
            """A universal perturbation of the batch that maximises the objective (model in eval mode)."""
            g = torch.Generator().manual_seed(cfg.seed * 100003 + state["step"])
            if not text:
                radius = cfg.eps * math.sqrt(x[0].numel())
                delta = (torch.randn(x.shape[1:], generator=g) * 1e-3).to(x.device).requires_grad_(True)
                for _ in range(cfg.adv_steps):
                    zs, logits, _ = middle((x + delta).clamp(0, 1))
                    grad, = torch.autograd.grad(objective(zs, logits, y), delta)
                    with torch.no_grad():
                        delta += 2.5 * radius / cfg.adv_steps * grad / grad.norm().clamp_min(1e-12)
                        delta *= (radius / delta.norm().clamp_min(1e-12)).clamp(max=1.0)
                return (x + delta.detach()).clamp(0, 1)
            texts = [f"{_VIRTUAL_WORD} {t}" for t in x]
            e = torch.randn(emb.shape[1], generator=g).to(dev)
            e = (e * e_norm / e.norm()).requires_grad_(True)
            virt.update(rows=torch.arange(len(texts), device=dev), e=e)
            for _ in range(cfg.adv_steps):
                zs, logits, _ = middle(texts)
                grad, = torch.autograd.grad(objective(zs, logits, y), e)
                with torch.no_grad():
                    e += 0.5 * e_norm * grad / grad.norm().clamp_min(1e-12)
                    e *= e_norm / e.norm()
            virt["e"] = e.detach()
            return texts

        def batch_hook(x, y, idx):
            state.update(x=x, y=y)
            return x, y

        def loss_fn(logits, y):
            loss = F.cross_entropy(logits, y)
            state["step"] += 1
            if not cfg.lam:
                return loss
            x = state["x"]
            was = model.training
            model.eval()
            try:
                if cfg.suspects == "flagged":
                    with torch.no_grad():
                        det.model = model
                        keep = det.flag(x)
                    if not keep.any():
                        return loss
                    xs = x[keep.to(x.device)] if not text else [t for t, k in zip(x, keep.tolist()) if k]
                    ys = y[keep.to(y.device)]
                else:
                    xs, ys = make_suspects(x, y), y
                zs, _, mask = middle(xs)
            finally:
                virt["rows"] = None
                model.train(was)
            if cfg.target == "reconstruction":
                tgt, _, _ = det.vae(zs.detach())
            else:
                tgt = class_means[ys]
                if text:  # the class mean of a sentence's tokens, for each of its tokens
                    m = mask.bool()
                    tgt = tgt.unsqueeze(1).expand(-1, m.shape[1], -1)[m]
            tgt = tgt.detach()
            if cfg.distance == "mse":
                dist = (zs - tgt).pow(2).mean()
            else:
                dist = (1 - F.cosine_similarity(zs.flatten(1), tgt.flatten(1), dim=1)).mean()
            state["dist_sum"] += float(dist.detach())
            state["dist_n"] += 1
            return loss + cfg.lam * dist

        from ..training import train
        tcfg = defense_train_config(clean, cfg, "beniful removal", epochs=cfg.epochs, schedule="cosine",
                                    batch_size=cfg.batch_size if not text else min(cfg.batch_size, 32),
                                    optimizer="adamw" if text else "sgd", lr=cfg.lr or (2e-5 if text else 0.01),
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay, augment=cfg.augment)
        with contextlib.ExitStack() as ctx:
            if text:
                ctx.enter_context(_position1_embedding(model, virt))
            res = train(model, clean, None, tcfg, loss_fn=loss_fn, batch_hook=batch_hook)
        det.model = original
        return model.eval(), {"layer": layer, "target": cfg.target, "distance": cfg.distance,
                              "suspects": cfg.suspects, "suspect_objective": cfg.suspect_objective,
                              "train_seconds": res.seconds,
                              "mean_feature_distance": state["dist_sum"] / max(state["dist_n"], 1),
                              "detector": det.info}

    @staticmethod
    @torch.inference_mode()
    def _class_means(det: BeniFul, model, clean: Data) -> torch.Tensor:
        """Standardised clean class means: [K, *shape] (images) or [K, d] (text, token mean)."""
        k = len(clean.classes)
        sums, counts = None, torch.zeros(k)
        for start in range(0, len(clean), 256):
            x, y = clean.batch(torch.arange(start, min(start + 256, len(clean))))
            inp, mask = model_inputs(model, x)
            with model.capture([det.layer]) as acts:
                model(inp)
            zs = det._standardize(acts[det.layer]).cpu()
            if mask is not None:
                m = mask.cpu().unsqueeze(-1).float()
                zs = (zs * m).sum(1) / m.sum(1).clamp_min(1)
            if sums is None:
                sums = torch.zeros(k, *zs.shape[1:])
            sums.index_add_(0, y, zs)
            counts += torch.bincount(y, minlength=k).float()
        return sums / counts.clamp_min(1).view(-1, *[1] * (sums.ndim - 1))

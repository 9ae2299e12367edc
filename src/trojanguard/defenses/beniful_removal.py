"""BeniFul removal (methods.md §2.4), the purifier of ``beniful.py``'s detector. **BeniFul
has no public code: this is our reading of the paper's description.**

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
from pydantic import Field

from ..data.base import Data
from ..errors import UserError
from .base import Purifier, PurifierConfig
from .beniful import BeniFul, BeniFulConfig, VAEOptions
from .common import defense_train_config, model_inputs, position1_embedding

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
    grad_clip: float | None = Field(5.0, gt=0, description=(
        "gradient-norm clip for images (text keeps the text recipe's 1.0): the suspects are built to maximise the feature distance, so its first "
        "gradients are large (unclipped, the CIFAR-10 BadNets run diverged to nan in epoch 1)"))


_VIRTUAL_WORD = "jj"  # any single-token word: its embedding is replaced by the optimised vector


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
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay, augment=cfg.augment,
                                    grad_clip=1.0 if text else cfg.grad_clip)  # text: the recipe's 1.0
        with contextlib.ExitStack() as ctx:
            if text:
                ctx.enter_context(position1_embedding(model, virt))
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

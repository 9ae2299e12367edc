"""Backdoor exposure (EBYD, Li et al. 2024; methods.md §2.5): edit a suspect model on a few
clean samples so that its clean features fade and the backdoor, if any, takes over.

* ``cul`` - Clean Unlearning: gradient *ascent* on cross-entropy over all parameters.
  Official code (``exposes/unlearn.py``): Adam lr 1e-5, weight decay 5e-4, batch 128,
  20 epochs, 500 clean images. The official loop calls ``net.train()`` once, but its
  per-epoch check switches the net to ``eval()`` and never back, so every update after the
  first check runs in eval mode (BatchNorm on running statistics, no dropout): we run all
  of them in eval mode, as methods.md asks. The official ``clip_grad_norm_`` is called
  before ``backward()`` and so clips nothing; we leave it out. Text (our reading of "lr 1e-5
  to 2e-5 on a transformer"): 2e-5, because the ascent has ~7 steps per epoch on SST-2's
  dev split.
* ``random-labels`` - fine-tuning on uniformly random labels (``exposes/sfft.py``: Adam
  lr 1e-4, weight decay 5e-4, 20 epochs).
* ``act-prune`` - prune the penultimate units with the lowest mean activation on clean
  data at growing rates 0.1 ... 0.9 (``exposes/act_prune.py`` prunes one named layer; we
  prune the head's input, done exactly by zeroing the head's weight columns - our reading
  of "activation pruning of low-mean units").
* ``weight-perturb`` - ANP-style adversarial multiplicative noise on the normalisation
  layers' neurons (BatchNorm channels for CNNs, LayerNorm units for text;
  ``exposes/awp.py``): for each eps in 0.1 ... 0.9 the noise starts uniform in
  [-eps, eps] and takes one sign-gradient ascent step (size ``perturb_step`` = the code's
  noise lr 0.2) per batch over one pass of the clean samples, clipped to [-eps, eps].

Every method stops by the same rule (methods.md: ascent is unbounded): clean accuracy
<= ``stop_accuracy`` (0.2) or one class taking >= ``stop_share`` (90 %) of the predictions,
measured in eval mode on ``check_samples`` (256) of the exposure samples every
``check_every`` (2) optimiser steps (the official code checks once per epoch, i.e. every 4
steps on 500 images) or after every pruning rate / noise level. The official code has no
stopping rule at all (it logs 20 epochs); the rule is methods.md's.

The repository's *detection* script (``detections/Unlearning.py``) unlearns differently
from its exposure script: SGD lr 5e-3, momentum 0.9, weight decay 5e-4, batch 64, 21
epochs, lr x0.1 after epochs 10 and 20, train mode, crop + flip, no stopping rule, then
"backdoored" when the variance of the class shares > 0.01. ``EBYD_DETECT_PRESET`` holds
those settings (``stop_accuracy=0, stop_share=None``: no rule).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data.augment import random_crop_flip
from ..data.base import Data
from ..errors import UserError
from ..eval.evaluate import predict
from ..progress import stage_bar
from .common import model_inputs

DEFAULT_RATES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


class ExposureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["cul", "random-labels", "act-prune", "weight-perturb"] = "cul"
    samples: int = Field(500, ge=1, description="clean samples the exposure uses (the paper: 500 = 1 % of CIFAR-10)")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float | None = Field(None, gt=0, description=(
        "None: 1e-5 (cul, images), 2e-5 (cul, text), 1e-4 (random-labels)"))
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(5e-4, ge=0)
    train_mode: bool = Field(False, description="update in train mode (RNP's unlearning) instead of eval mode")
    augment: bool = Field(False, description="random crop + flip on the exposure images (the detection script)")
    milestones: list[int] = Field(default_factory=list, description=(
        "epochs after which the lr is multiplied by 0.1 (the detection script: [10, 20])"))
    check_every: int = Field(2, ge=1, description="optimiser steps between two checks of the stopping rule")
    check_samples: int = Field(256, ge=10, description=(
        "the rule is measured on this many of the exposure samples (a check then costs about "
        "two forward batches, a third of an ascent step every 2 steps)"))
    stop_accuracy: float = Field(0.2, ge=0, le=1, description="0: no accuracy rule")
    stop_share: float | None = Field(0.9, gt=0, le=1, description="None: stop on accuracy only (RNP)")
    rates: list[float] = Field(default_factory=lambda: list(DEFAULT_RATES),
                               description="act-prune: pruning rates; weight-perturb: noise levels eps")
    perturb_step: float = Field(0.2, gt=0)
    seed: int = 0
    progress: bool = False


# detections/Unlearning.py's unlearning (see the module docstring)
EBYD_DETECT_PRESET = dict(optimizer="sgd", lr=5e-3, momentum=0.9, weight_decay=5e-4, batch_size=64, epochs=21,
                          milestones=[10, 20], train_mode=True, augment=True, stop_accuracy=0.0, stop_share=None,
                          check_every=8)


@dataclass
class ExposureResult:
    """The exposed model and how the exposure ended. ``stopped_by`` is "accuracy", "share"
    or "budget" (epochs / rates ran out without meeting the rule); ``accuracy`` and
    ``shares`` are measured on the exposure samples at the end."""
    model: nn.Module
    method: str
    stopped_by: str
    steps: int
    accuracy: float
    shares: list[float]
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"exposure": self.method, "stopped_by": self.stopped_by, "steps": self.steps,
                "exposure_accuracy": round(self.accuracy, 4), "history": self.history}


def class_shares(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fraction of predictions per class."""
    return torch.bincount(pred.long(), minlength=num_classes).double() / max(len(pred), 1)


def _state(model, data: Data, num_classes: int, batch_size: int = 256) -> tuple[float, torch.Tensor]:
    pred = predict(model, data, batch_size)
    return float((pred == data.y).double().mean()), class_shares(pred, num_classes)


class _Rule:
    """The stopping rule plus a record of every check."""

    def __init__(self, cfg: ExposureConfig, data: Data, num_classes: int):
        self.cfg, self.data, self.k = cfg, data, num_classes
        self.history: list[dict] = []
        self.bar = stage_bar(desc=f"exposure ({cfg.method})", enabled=cfg.progress, unit="check")

    def check(self, model, step: int, **extra) -> str | None:
        acc, shares = _state(model, self.data, self.k)
        top = int(shares.argmax())
        self.history.append({"step": step, **extra, "accuracy": round(acc, 4), "top_class": top,
                             "top_share": round(float(shares[top]), 4)})
        self.bar.update(1)
        self.bar.set_postfix(accuracy=f"{acc:.3f}", top=f"{top}:{float(shares[top]):.2f}")
        if self.cfg.stop_accuracy > 0 and acc <= self.cfg.stop_accuracy:  # 0: no accuracy rule
            return "accuracy"
        if self.cfg.stop_share is not None and shares[top] >= self.cfg.stop_share:
            return "share"
        return None


def _order(data: Data, seed: int) -> torch.Tensor:
    """The seeded order the exposure samples are taken from (first n) - and left out of."""
    return torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))


def _subset(data: Data, n: int, seed: int) -> Data:
    if n >= len(data):
        return data
    return data.subset(_order(data, seed)[:n].sort().values)


def unexposed(data: Data, cfg: ExposureConfig, minimum: int = 200) -> Data:
    """The clean samples the exposure did not use (as ``expose`` picks them), or all of
    ``data`` when fewer than ``minimum`` would remain: the class shares of an exposed model
    are read on data it was not unlearned on (the official detection script reads them on
    the test set)."""
    if cfg.samples + minimum > len(data):
        return data
    return data.subset(_order(data, cfg.seed)[cfg.samples:].sort().values)


def expose(model, clean: Data, cfg: ExposureConfig | None = None, **kwargs) -> ExposureResult:
    """Return an exposed copy of ``model`` (the input is left untouched)."""
    cfg = cfg or ExposureConfig(**kwargs)
    k = model.head.out_features
    data = _subset(clean, cfg.samples, cfg.seed)
    work = copy.deepcopy(model)
    rule = _Rule(cfg, _subset(data, cfg.check_samples, cfg.seed + 1), k)
    if cfg.method in ("cul", "random-labels"):
        stopped, steps = _optimise(work, data, cfg, rule, k)
    elif cfg.method == "act-prune":
        stopped, steps = _act_prune(work, data, cfg, rule)
    else:
        stopped, steps = _weight_perturb(work, data, cfg, rule)
    rule.bar.close()
    work.eval()
    acc, shares = _state(work, data, k)
    return ExposureResult(work, cfg.method, stopped or "budget", steps, acc, shares.tolist(), rule.history)


def default_lr(method: str, modality: str) -> float:
    if method == "random-labels":
        return 1e-4
    return 2e-5 if modality == "text" else 1e-5


def _optimise(model, data: Data, cfg: ExposureConfig, rule: _Rule, k: int) -> tuple[str | None, int]:
    """CUL (ascent on the true labels) or fine-tuning on random labels, checking the rule
    before the first step and every ``check_every`` steps."""
    lr = cfg.lr or default_lr(cfg.method, data.modality)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, 0.1) if cfg.milestones else None
    g = torch.Generator().manual_seed(cfg.seed)
    sign = -1.0 if cfg.method == "cul" else 1.0
    step = 0
    if (why := rule.check(model, step, epoch=0)) is not None:
        return why, step
    for epoch in range(1, cfg.epochs + 1):
        for idx in torch.randperm(len(data), generator=g).split(cfg.batch_size):
            model.train(cfg.train_mode)
            x, y = data.batch(idx)
            if cfg.augment and data.modality == "image":
                x = random_crop_flip(x, 4, flip=x.shape[-1] > 8, generator=g)
            if cfg.method == "random-labels":
                y = torch.randint(0, k, (len(y),), generator=g)
            inputs, _ = model_inputs(model, x)
            logits = model(inputs)
            loss = sign * F.cross_entropy(logits, y.to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % cfg.check_every == 0 and (why := rule.check(model, step, epoch=epoch)) is not None:
                return why, step
        if sched is not None:
            sched.step()
    # the last steps since the previous check
    return (rule.check(model, step, epoch=cfg.epochs) if step % cfg.check_every else None), step


@torch.inference_mode()
def _penultimate_means(model, data: Data, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    total, n = None, 0
    for start in range(0, len(data), batch_size):
        x, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        inputs, _ = model_inputs(model, x)
        f = model.features(inputs).float()
        total = f.sum(0) if total is None else total + f.sum(0)
        n += len(f)
    return total / n


def _act_prune(model, data: Data, cfg: ExposureConfig, rule: _Rule) -> tuple[str | None, int]:
    # head(f * m) = (W * m) f + b: zeroing weight columns prunes the units exactly
    order = _penultimate_means(model, data).argsort().to(model.head.weight.device)
    w0 = model.head.weight.detach().clone()
    why = None
    for i, rate in enumerate(sorted(cfg.rates), start=1):
        with torch.no_grad():
            model.head.weight.copy_(w0)
            model.head.weight[:, order[:int(round(rate * len(order)))]] = 0
        if (why := rule.check(model, i, rate=rate)) is not None:
            return why, i
    return why, len(cfg.rates)


def _norm_layers(model) -> list[nn.Module]:
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    found = [m for m in model.modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None
             and getattr(m, "bias", None) is not None]
    if not found:
        raise UserError("weight-perturb exposure needs normalisation layers with an affine weight and bias; "
                        "this model has none: use exposure=cul")
    return found


def _shape_for(m: nn.Module, out: torch.Tensor) -> tuple[int, ...]:
    if isinstance(m, nn.LayerNorm):
        return (1,) * (out.ndim - 1) + (-1,)
    return (1, -1) + (1,) * (out.ndim - 2)


def _weight_perturb(model, data: Data, cfg: ExposureConfig, rule: _Rule) -> tuple[str | None, int]:
    layers = _norm_layers(model)
    originals = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in layers]
    g = torch.Generator().manual_seed(cfg.seed)
    why = None
    for i, eps in enumerate(sorted(cfg.rates), start=1):
        with torch.no_grad():
            for m, (w, b) in zip(layers, originals):
                m.weight.copy_(w)
                m.bias.copy_(b)
        noise = [((torch.rand(w.shape, generator=g) * 2 - 1) * eps, (torch.rand(b.shape, generator=g) * 2 - 1) * eps)
                 for w, b in originals]
        noise = [(dw.to(w.device).requires_grad_(), db.to(w.device).requires_grad_())
                 for (dw, db), (w, _) in zip(noise, originals)]

        def hook(m, _inp, out, j):
            # w(1+dw) xhat + b(1+db) = out + dw (out - b) + db b
            dw, db = noise[j]
            s = _shape_for(m, out)
            b = m.bias.view(s)
            return out + dw.view(s) * (out - b) + db.view(s) * b

        handles = [m.register_forward_hook(lambda m, a, o, j=j: hook(m, a, o, j)) for j, m in enumerate(layers)]
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            for idx in torch.randperm(len(data), generator=g).split(cfg.batch_size):
                x, y = data.batch(idx)
                inputs, _ = model_inputs(model, x)
                logits = model(inputs)
                loss = F.cross_entropy(logits, y.to(logits.device))
                grads = torch.autograd.grad(loss, [t for pair in noise for t in pair])
                with torch.no_grad():
                    for t, gr in zip([t for pair in noise for t in pair], grads):
                        t.add_(cfg.perturb_step * gr.sign()).clamp_(-eps, eps)
        finally:
            for h in handles:
                h.remove()
            for p in model.parameters():
                p.requires_grad_(True)
        with torch.no_grad():  # make the noise part of the weights
            for m, (dw, db) in zip(layers, noise):
                m.weight.mul_(1 + dw.detach())
                m.bias.mul_(1 + db.detach())
        if (why := rule.check(model, i, eps=eps)) is not None:
            return why, i
    return why, len(cfg.rates)

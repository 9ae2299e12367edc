"""PAM, Path-Aware Minimization (Min et al., NeurIPS 2024, the FST authors' follow-up;
methods.md §2.2; official code ``AISafety-HKUST/stable_backdoor_purification``,
``fine_tune/sam.py::PAM`` and ``fine_tune/BTIDBF/btidbfu.py::unlearn_pam``).

A SAM-like step whose perturbation points from the current weights towards the original
(backdoored) ones: e = rho (theta_bd - theta) / ||theta_bd - theta||; the gradient is
taken at theta + e and the step applied at theta (SGD lr 0.01, momentum 0.1, rho 0.5 as in
``defense.sh``). Purifying along the path to the backdoored weights pushes the solution
away from the backdoor's basin, so that the retuning attack cannot pull it back cheaply.
The official loop unlearns with 20 % of every batch replaced by trigger-inverted images
(kept at their true labels), the triggers coming from BTI-DBF's UNet generator.

Readings chosen (recorded here):
* Trigger inversion: instead of BTI-DBF's UNet generator (pre-trained 50 rounds, then
  alternated with unlearning) we invert an *untargeted mask trigger*: a mask m and pattern
  p (x' = (1 - m) x + m p, as Neural Cleanse's parameterisation, but pushing every clean
  image away from its own label instead of towards one class, so no target is needed)
  minimising the mean probability of the true class plus ``mask_l1`` x mean(m), Adam. A
  backdoored model's cheapest way to flip every class with a small mask is its trigger.
  The label the stamped images then go to is taken as the target; later rounds invert
  *targeted* at it on the current model, starting from the previous round's mask and
  pattern, as the code's generator keeps its state and is trained towards the detected
  label. (Re-fitting untargeted from scratch, as we first did, found a natural adversarial
  patch of ~64 px on the already-cleaned model in round 2, mask mean 0.063 against 0.011
  in round 1. The change did not lower PAM's CA cost on BadNets-10 %: 3.2 points before,
  3.4 after.) rho is an absolute step in weight space and our width-16 model is 16x smaller
  than the paper's (parameter norm 25; 37 against 74 for widths 16 and 64 at init):
  measured through the harness (configs/cifar10-defenses.yaml), rho 0.25 keeps PAM's CA
  cost within 3 points where 0.5 does not, with the same robustness: BadNets 10 % CA drop
  3.4 -> 2.2, ASR after the retuning attack 2.2 / 2.1 %; Blended 10 % 3.1 -> 2.3, 0.2 / 1.4 %
  (the clean model: 1.9 %). The authors' README names this trade-off (a larger rho deviates
  more at a CA cost). The default stays the paper's 0.5; ``rho=0.25`` for small models.
  Measured before the mask: a universal adversarial perturbation (``inversion="uap"``,
  L_inf-bounded at true labels; i-BAU's own is L2-penalised with predicted labels): on
  the CIFAR-10 BadNets-10 % zoo model it left ASR at 100 % and cost 4.5 points of CA (an
  L_inf-bounded full-image perturbation cannot imitate a 3x3 patch), so the mask is the
  default.
* Schedule: ``rounds`` x ``epochs_per_round`` (default 2 x 10) instead of the code's
  3 x 30 epochs, a CPU budget; measured on the reference zoo (benchmarks/results). At rho
  0.25 PAM ends near CA 81.8 % on every CIFAR-10 zoo model (2,250 images), whatever it
  starts from: half the epochs (2 x 5) or half the rate (0.005) leave that within half a
  point on BadNets, Blended 10 %, WaNet, LF and Blended 1 % (BadNets 81.8 / 81.8 / 81.8), at
  an ASR as low (LF 11.7 / 9.4 / 9.0 %), and tuning through frozen BatchNorm statistics
  (``freeze_bn``) costs more (80.5): the cost is fine-tuning on 2,250 images (plain FT ends
  at 83.0 %, FST at 82.5 %) plus the unlearning (rows ``pam-rho0.25-*`` of the CIFAR-10 grid).
* The perturbation direction covers all trainable parameters (``model.parameters()``
  as in the code, whose state-dict difference also holds BN statistics but whose
  perturbation loop only reads parameters).
* Text (our reading; the paper is images only): the inverted trigger is a set of words
  (``text_inversion="tokens"``): EBYD's first-order token search (``token_search.search_tokens``)
  for every class, the class whose best word flips most clean sentences of the others
  taken as the target and its ``text_tokens`` best words as the trigger; each unlearning
  batch then has ``inverted_share`` of its sentences with one of those words inserted at a
  random word position, at their true labels, as the images are stamped; later rounds
  search towards round 1's target and keep only words flipping >= 0.8 x round 1's best
  rate (none: that round runs on clean batches). AdamW 2e-5 and
  gradient clipping as the text recipe. Before this (the path-aware step on clean batches
  alone, ``text_inversion="none"``), PAM left every SST-2 backdoor in place (BadNets 20 %:
  ASR 97 % after, ``benchmarks/results/purify-sst2-harness.csv`` of session 5). Since
  session 8 the search screens the gradient's 256 best words and admits alphanumeric ones
  (see ``search_tokens``; twice the forward passes): before, AddSent's "3d" was never tried and PAM left AddSent at
  ASR 99.6 %.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.base import Data
from ..training import train
from ..utils import ADDED_LATER, resolve_device
from .base import Purifier, PurifierConfig
from .common import defense_train_config


class PamConfig(PurifierConfig):
    rho: float = Field(0.5, ge=0, description="length of the step towards the backdoored weights (defense.sh)")
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.1, ge=0, lt=1, description="code: PAM(..., lr=1e-2, momentum=0.1)")
    batch_size: int = Field(128, ge=1)
    rounds: int = Field(2, ge=1, description="trigger inversion + unlearning rounds (code: 3)")
    epochs_per_round: int = Field(10, ge=1, description="unlearning epochs per round (code: 30)")
    inverted_share: float = Field(0.2, ge=0, le=1, description="share of each batch replaced by inverted triggers")
    inversion: Literal["mask", "uap", "none"] = "mask"
    mask_l1: float = Field(1.0, ge=0, description="weight of the mask's mean in the inversion loss")
    mask_steps: int = Field(300, ge=1, description="Adam steps of the mask inversion (batch 128)")
    uap_eps: float = Field(16 / 255, gt=0, le=1, description="L_inf bound of the universal perturbation")
    uap_steps: int = Field(20, ge=1)
    uap_samples: int = Field(512, ge=1, description="clean images the perturbation is fitted on")
    augment: bool = True
    freeze_bn: bool = Field(False, json_schema_extra=ADDED_LATER, description=(
        "keep the model's BatchNorm statistics during unlearning (see training.freeze_batchnorm)"))
    text_inversion: Literal["tokens", "none"] = Field("tokens", json_schema_extra=ADDED_LATER, description=(
        "text: unlearn with the words a token search finds (see the module docstring), or clean batches only"))
    text_tokens: int = Field(20, ge=1, json_schema_extra=ADDED_LATER, description=(
        "text: at most this many words in the inverted trigger (those flipping >= 0.8 x the best word's rate): "
        "a backdoor on rare words answers to many of them (BadNets 20 %: 'nm', 'bn' flip as its 'cf', 'bb', 'mn' "
        "do; with 5 words PAM left ASR at 16 %)"))
    text_lr: float = Field(2e-5, gt=0, json_schema_extra=ADDED_LATER, description="text: AdamW learning rate")


def invert_text_trigger(model, data: Data, n_tokens: int, seed: int = 0, target: int | None = None,
                        floor: float = 0.0) -> dict | None:
    """The words that flip the most clean sentences of the other classes to one class, over
    every class as the candidate target (``token_search.search_tokens``), or to ``target``; kept:
    those flipping >= 0.8 x the best word's rate and >= ``floor``. None when no word is
    kept, or the model does not expose its input embeddings (a text module wrapped
    without an ``encoder``)."""
    from .token_search import search_tokens
    if not hasattr(model, "encoder"):
        return None
    best = None
    for c in range(model.head.out_features) if target is None else [target]:
        found = search_tokens(model, data, c, n_tokens=n_tokens, seed=seed)
        if not found["candidates"]:
            continue
        rate = found["candidates"][0]["flip_rate"]
        if best is None or rate > best["flip_rate"]:
            # words far weaker than the best are ordinary sentiment words, not the trigger:
            # unlearning them at true labels would cost clean accuracy
            words = [r["token"] for r in found["candidates"] if r["flip_rate"] >= max(0.8 * rate, floor)]
            best = {"tokens": words, "target": c, "flip_rate": rate}
    return best if best and best["tokens"] else None


def insert_words(texts: list[str], words: list[str], gen: torch.Generator) -> list[str]:
    """Each sentence with one of ``words`` (uniform) inserted at a uniform word position."""
    out = []
    for t in texts:
        split = t.split()
        w = words[int(torch.randint(len(words), (1,), generator=gen))]
        at = int(torch.randint(len(split) + 1, (1,), generator=gen))
        out.append(" ".join(split[:at] + [w] + split[at:]))
    return out


def universal_perturbation(model, data: Data, eps: float, steps: int, samples: int, seed: int = 0,
                           batch_size: int = 128) -> torch.Tensor:
    """An image-sized delta with ||delta||_inf <= eps maximising the mean cross-entropy of the
    true labels of ``samples`` clean images (sign-gradient ascent, step eps / 4)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:samples]
    x_all, y_all = data.batch(idx)
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    delta = torch.zeros(1, *x_all.shape[1:], device=dev, requires_grad=True)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            grad = torch.zeros_like(delta)
            for s in range(0, len(idx), batch_size):
                x, y = x_all[s:s + batch_size].to(dev), y_all[s:s + batch_size].to(dev)
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y, reduction="sum")
                grad += torch.autograd.grad(loss, delta)[0]
            with torch.no_grad():
                delta += eps / 4 * grad.sign()
                delta.clamp_(-eps, eps)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was)
    return delta.detach()


def invert_mask_trigger(model, data: Data, steps: int = 300, l1: float = 1.0, lr: float = 0.1,
                        batch_size: int = 128, seed: int = 0, target: int | None = None,
                        init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [1, 1, H, W], pattern [1, C, H, W]) minimising, after stamping, the mean
    probability of each clean image's own label (``target=None``) or the cross-entropy towards
    ``target`` on the images of other classes, plus ``l1`` x the mask's mean (see the module
    docstring). ``init``: a (mask, pattern) to start from (the previous round's)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    c, h, w = data.x.shape[1:]
    if init is None:
        m_raw = torch.full((1, 1, h, w), -3.0, device=dev)  # sigmoid(-3) = 0.05
        p_raw = torch.zeros((1, c, h, w), device=dev)
    else:
        m_raw, p_raw = (torch.logit(t.to(dev).clamp(1e-4, 1 - 1e-4)) for t in init)
    m_raw, p_raw = m_raw.clone().requires_grad_(True), p_raw.clone().requires_grad_(True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=lr)
    was = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=g)
            x, y = data.batch(idx)
            x, y = x.to(dev), y.to(dev)
            m, pat = torch.sigmoid(m_raw), torch.sigmoid(p_raw)
            logits = model((1 - m) * x + m * pat)
            if target is None:
                fit = F.softmax(logits, dim=1).gather(1, y[:, None]).mean()
            else:
                keep = y != target
                fit = F.cross_entropy(logits[keep], torch.full_like(y[keep], target)) if keep.any() else logits.sum() * 0
            loss = fit + l1 * m.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was)
    return torch.sigmoid(m_raw).detach(), torch.sigmoid(p_raw).detach()


def _dominant_label(model, data: Data, stamp, seed: int, samples: int = 512) -> tuple[int, float]:
    """The class that stamped clean images are predicted as most often, and its share."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:samples]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(stamp(data.batch(idx[s:s + 256])[0].to(dev))).argmax(1).cpu()
                           for s in range(0, len(idx), 256)])
    model.train(was)
    counts = torch.bincount(preds)
    return int(counts.argmax()), float(counts.max() / len(preds))


class Pam(Purifier):
    """Path-Aware Minimization with trigger-inverted unlearning."""
    name = "pam"
    Config = PamConfig

    def _purify(self, model, clean: Data, original):
        cfg = self.cfg
        dev = resolve_device(cfg.device)
        model.to(dev)
        params = [p for p in model.parameters()]
        origin = [p.detach().clone().to(dev) for p in original.parameters()]
        saved: list[torch.Tensor] = []
        text = clean.modality == "text"
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        stamp_box: dict = {"stamp": None}

        def perturb_and_mix(x, y, _idx):
            if stamp_box["stamp"] is not None and cfg.inverted_share > 0:
                k = min(len(y), int(cfg.inverted_share * len(y)) + 1)  # code: int(0.2 * B + 1)
                pos = torch.randperm(len(y), generator=gen)[:k]
                if text:
                    x = list(x)
                    for i, t in zip(pos.tolist(), stamp_box["stamp"]([x[i] for i in pos.tolist()])):
                        x[i] = t
                else:
                    pos = pos.to(x.device)
                    x = x.clone()
                    x[pos] = stamp_box["stamp"](x[pos])
            with torch.no_grad():
                diff = [o - p for o, p in zip(origin, params)]
                norm = torch.sqrt(sum((d * d).sum() for d in diff))
                scale = cfg.rho / (norm + 1e-12)
                saved.clear()
                for p, d in zip(params, diff):
                    saved.append(p.detach().clone())
                    p.add_(d * scale)
            return x, y

        def restore():
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

        history = []
        inverted: tuple[torch.Tensor, torch.Tensor] | None = None
        target: int | None = None
        floor = 0.0
        for r in range(cfg.rounds):
            if text and cfg.text_inversion == "tokens":
                # every round on the current model, later ones towards round 1's target, as
                # the image rounds re-invert
                # (later rounds keep only words as strong as round 1's trigger: once it is
                # unlearned, the best words left are the language's own sentiment words, e.g.
                # "witty" at 56 % on BadNets 20 %, and unlearning those costs clean accuracy)
                found = invert_text_trigger(model, clean, cfg.text_tokens, seed=cfg.seed + r, target=target,
                                            floor=floor)
                if found is None:  # nothing to insert: this round is the path-aware step alone
                    stamp_box["stamp"] = None
                    history.append({"round": r + 1, "tokens": [], "note": "no trigger-strength words: clean batches"})
                else:
                    if target is None:
                        floor = 0.8 * found["flip_rate"]
                    target = found["target"]
                    stamp_box["stamp"] = lambda texts, words=found["tokens"]: insert_words(texts, words, gen)
                    history.append({"round": r + 1, **found})
            elif not text and cfg.inversion == "uap":
                delta = universal_perturbation(model, clean, cfg.uap_eps, cfg.uap_steps, cfg.uap_samples,
                                               seed=cfg.seed + r)
                stamp_box["stamp"] = lambda x, d=delta: (x + d.to(x.device)).clamp(0, 1)
            elif not text and cfg.inversion == "mask":
                # round 1: untargeted, on the backdoored model; later rounds: targeted at the
                # label round 1's trigger sends clean images to, from round 1's mask and
                # pattern (the code keeps its generator and trains it towards that label)
                m, pat = invert_mask_trigger(model, clean, cfg.mask_steps, cfg.mask_l1, seed=cfg.seed + r,
                                             target=target, init=inverted)
                stamp_box["stamp"] = lambda x, m=m, pat=pat: (1 - m.to(x.device)) * x + m.to(x.device) * pat.to(x.device)
                if target is None:
                    target, share = _dominant_label(model, clean, stamp_box["stamp"], cfg.seed)
                    history.append({"round": r + 1, "inverted_mask_mean": float(m.mean()), "target": target,
                                    "target_share": share})
                else:
                    history.append({"round": r + 1, "inverted_mask_mean": float(m.mean()), "target": target})
                inverted = (m, pat)
            tcfg = defense_train_config(clean, cfg, f"pam round {r + 1}", epochs=cfg.epochs_per_round,
                                        batch_size=cfg.batch_size if not text else 32,
                                        optimizer="adamw" if text else "sgd", lr=cfg.text_lr if text else cfg.lr,
                                        momentum=cfg.momentum, augment=cfg.augment, seed=cfg.seed + r,
                                        freeze_bn=cfg.freeze_bn)
            res = train(model, clean, None, tcfg, batch_hook=perturb_and_mix, before_step=restore,
                        loss_fn=lambda logits, y: F.cross_entropy(logits, y))
            history.append({"round": r + 1, "loss": res.final_loss, "seconds": res.seconds})
        with torch.no_grad():
            distance = torch.sqrt(sum(((o - p) ** 2).sum() for o, p in zip(origin, params)))
        return model.eval(), {"rounds": history, "distance_to_original": float(distance),
                              "inversion": cfg.text_inversion if text else cfg.inversion}

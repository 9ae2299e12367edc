"""Fine-tuning defenses, FST and its ablations behind one function (methods.md §2.1).

FST, Feature Shift Tuning (Min et al., NeurIPS 2023). With f(x) = W phi(x) + b:
  1. W0 = W (detached), C = ||W0||_F;
  2. re-initialise (W, b) with the default nn.Linear init and project W to norm C;
  3. fine-tune all parameters on D_def with CE(f(x), y) + alpha <W, W0>_F
     (the bias is not penalised);
  4. after every optimiser step, W <- C W / ||W||_F.

Modes: ``ft`` (keep head, train all), ``lp`` (train the head only), ``fe-tuning``
(re-init head, freeze it, train the backbone), ``ft-init`` (re-init head, train all,
no penalty), ``fst``. Reading chosen (methods.md): the official code projects the head
norm in every mode; we project in ``fst`` only, ``project_all_modes=True`` restores the
official behaviour.

Where FST fails on the CIFAR-10 zoo (Blended 10 %: ASR 100 % after the defaults, alpha 0.2,
20 epochs and lr 0.03; LF 16.6 %; TrojanNN 11.9 %), the feature shift does
not happen (``benchmarks/feature_shift.py``, ``results/feature-shift-cifar10.md``): on
Blended 10 % the triggered inputs' mean penultimate feature has cosine 0.90 with the
target's clean centroid before and 0.98 after FST (lr 0.03), and every triggered input is
still nearest to it, so the re-initialised head, fitted on clean data, sends them to the
target again. PAM, which unlearns an inverted trigger, moves them away (cosine 0.56, 0.7 %
nearest; ASR 0.5 %), as FST does on BadNets (1.00 -> 0.21 nearest; ASR 0.7 %). The blend
is a whole-image feature that clean tuning without the trigger never contradicts.

Text (the paper has no text experiment; methods.md: "the same recipe on the classification
head"): measured on the SST-2 BadNets 20 % MiniLM with the 872 dev sentences
(``benchmarks/fst_text_sweep.py``, ``results/fst-text-sst2.md``), no recipe removes the
backdoor: ASR 99 % after the default SGD 0.01 / batch 128, 94 % with AdamW 5e-5, 91 % with
alpha 1, 79 % with AdamW 2e-4 (CA -1.9), 81 % with AdamW 5e-5 at batch 32, 69 % with AdamW
1e-4 at batch 32 (CA -1.4). The head moves away (cosine to the old head 0.03-0.2), but the
trigger word never occurs in clean sentences, so its embedding gets no gradient and the
encoder keeps mapping it to the target's side of any sentiment head. We keep the official
defaults and report the failure; for text, ``repair`` picks PAM, which unlearns a recovered
trigger word.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.base import Data
from ..training import train
from ..utils import ADDED_LATER
from .base import Purifier, PurifierConfig
from .common import defense_train_config


class FinetuneConfig(PurifierConfig):
    mode: Literal["ft", "lp", "fe-tuning", "ft-init", "fst"] = "fst"
    alpha: float = Field(0.1, ge=0, description="weight of <W, W0>_F (0.1 CIFAR-10; 0.2 script default)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    augment: bool = True
    project_all_modes: bool = False
    freeze_bn: bool = Field(False, json_schema_extra=ADDED_LATER, description=(
        "keep the model's BatchNorm statistics while tuning (see training.freeze_batchnorm)"))


def reinit_head(head: torch.nn.Linear, w0: torch.Tensor, seed: int, max_cosine: float = 0.5) -> int:
    """Re-initialise ``head`` with the framework's default init under ``seed``; redraw under a
    derived seed while the draw points along the trained head ``w0`` (|cosine| > ``max_cosine``;
    random draws sit near 0). Returns the draws taken.

    Why: a head trained little from an init drawn under the same seed is re-drawn almost
    exactly. The SST-2 zoo's MiniLM heads (AdamW 2e-5, built under seed 0) have cosine 0.9994
    to ``reset_parameters()`` after ``torch.manual_seed(0)``, so FST's "new" head was the
    compromised one and text FST removed nothing (BadNets 20 %: ASR 99.7 % after)."""
    for draw in range(100):
        torch.manual_seed(seed if draw == 0 else seed * 7919 + 104729 * draw)
        head.reset_parameters()
        if abs(float(F.cosine_similarity(head.weight.detach().flatten(), w0.flatten().to(head.weight.device),
                                         dim=0))) <= max_cosine:
            return draw + 1
    raise RuntimeError("no random re-initialisation of the head is far from the trained one")


class Finetune(Purifier):
    """Fine-tuning family: FST (default), FT, LP, FE-tuning, FT-init."""
    name = "finetune"
    Config = FinetuneConfig

    def __init__(self, cfg: FinetuneConfig | None = None, **kwargs):
        # option errors name the method the user typed ("fst: unknown option ..."), not the class
        self.name = cfg.mode if cfg is not None else str(kwargs.get("mode", "fst"))
        super().__init__(cfg, **kwargs)
        self.name = self.cfg.mode  # messages say "fst needs ...", the name the user typed

    def _purify(self, model, clean: Data, original):
        cfg = self.cfg
        head = model.head
        w0 = head.weight.detach().clone()
        draws = 0
        norm0 = w0.norm()
        if cfg.mode in ("fst", "fe-tuning", "ft-init"):
            draws = reinit_head(head, w0, cfg.seed)
            with torch.no_grad():
                head.weight.mul_(norm0 / head.weight.norm())
        for p in model.parameters():
            p.requires_grad_(cfg.mode != "lp")
        for p in head.parameters():
            p.requires_grad_(cfg.mode != "fe-tuning")

        alpha = cfg.alpha if cfg.mode == "fst" else 0.0

        def loss_fn(logits, y):
            loss = F.cross_entropy(logits, y)
            if alpha:
                loss = loss + alpha * (head.weight * w0.to(head.weight.device)).sum()
            return loss

        project = cfg.mode == "fst" or (cfg.project_all_modes and cfg.mode != "fe-tuning")

        def after_step():
            with torch.no_grad():
                head.weight.mul_(norm0.to(head.weight.device) / head.weight.norm())

        tcfg = defense_train_config(clean, cfg, cfg.mode, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                    optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, schedule="cosine", augment=cfg.augment,
                                    freeze_bn=cfg.freeze_bn)
        res = train(model, clean, None, tcfg, loss_fn=loss_fn, after_step=after_step if project else None)
        for p in model.parameters():
            p.requires_grad_(True)
        cos = F.cosine_similarity(head.weight.detach().flatten().cpu(), w0.flatten().cpu(), dim=0)
        return model.eval(), {"mode": cfg.mode, "train_seconds": res.seconds,
                              "head_cosine_to_original": float(cos), "head_draws": draws}

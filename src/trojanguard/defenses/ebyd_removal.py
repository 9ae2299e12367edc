"""EBYD backdoor removal, RNP style (Li et al. 2023 "Reconstructive Neuron Pruning", the
removal EBYD builds on; official ``exposes/expose.py`` and BackdoorBench ``defense/rnp.py``;
methods.md §2.5).

1. **Unlearn** a copy of the model: gradient ascent on clean data, SGD lr 0.01, momentum
   0.9, weight decay 5e-4, train mode, at most 20 epochs, until clean accuracy <= 0.2
   (the exposure machinery of ``exposure.py`` with the share rule off, checked every
   ``check_every`` steps instead of once per epoch).
2. **Recover**: learn one mask in [0, 1] per neuron of the unlearned model on clean data
   (loss 0.2 * CE, SGD lr 0.2, momentum 0.9, 20 epochs, train mode, clipped to [0, 1] after
   each step). Neurons: BatchNorm channels for CNNs (the mask scales the BN weight, as
   RNP's ``MaskBatchNorm2d``); for text, the FFN intermediate units of every encoder block
   (the mask scales the input of the FFN down-projection). Neurons whose mask stays low are
   the ones the unlearned model cannot do without to regain clean accuracy - the backdoor
   neurons, which unlearning left intact.
3. **Prune** the ORIGINAL model: every neuron with mask <= tau (BN weight set to 0, the bias
   kept, as RNP's ``pruning``; text: the down-projection's input column set to 0).

tau: RNP's BackdoorBench code picks it by the ASR on poisoned test data, which a defender
does not have. Ours (our reading): the largest tau of the grid 0, 0.05, ..., 0.9 (RNP's
``pruning_max``/``pruning_step``) whose pruned model keeps the clean accuracy of a held-out
``tau_fraction`` of the clean data within ``tau_max_ca_drop`` of the original; the masks are
learned on the rest. ``tau`` fixes it instead (``tau_rule`` is then unused).
``tau_rule="bound"`` (ours, the default since session 10; before, ``"estimate"``) asks the
paired upper confidence bound of the held-out drop (``tau_confidence``, 95 %) to stay within
the budget, walking up the grid and stopping at the first failure (``choose_tau``): the
held-out part is ~450 images, and the largest passing tau of ~19 favours a lucky draw.
Measured through the harness (CA drop / ASR / ASR after the retuning attack on the 10,000
test images; ``benchmarks/ebyd_tau_curve.py`` draws the whole curve): Blended 10 % "estimate"
tau 0.35, 6.1 points / 0.6 % / 63.8 % (held-out drop 1.8), "bound" tau 0.3, 1.1 / 1.1 / 89.8 %;
BadNets 10 % "estimate" tau 0.25, 3.2 / 3.3 / 7.8 % (held-out drop 0.9), "bound" tau 0.15,
2.95 / 3.8 / 46.6 %; (bound) TrojanNN 1.3 / 1.9 / 92.7 %, LF 0.5 / 13.3 / 29.9 %. The bound
keeps clean accuracy, but it prunes fewer neurons and the retuning attack brings more back.
On Input-aware no tau passes either rule (tau 0 alone costs 20 held-out points): nothing is
pruned and the tables show the backdoor in place.
The learned masks are kept in ``self.masks`` (one tensor per neuron group).

Text (our reading): SGD at lr 0.01 destroys a pre-trained transformer in one step, so the
unlearning uses the text CUL step of ``exposure.py`` (Adam 2e-5, eval mode); the mask
learning keeps RNP's SGD lr 0.2.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.base import Data
from ..errors import UserError
from ..utils import ADDED_LATER, added_later
from .base import Purifier, PurifierConfig
from ..eval.metrics import accuracy_drop_bound
from .common import correct, model_inputs, split_clean
from .exposure import ExposureConfig, expose


class EBYDRemovalConfig(PurifierConfig):
    unlearn_lr: float | None = Field(None, gt=0, description="None: SGD 0.01 (images), Adam 2e-5 (text)")
    unlearn_epochs: int = Field(20, ge=1)
    clean_threshold: float = Field(0.2, ge=0, le=1, description="stop unlearning at this clean accuracy")
    check_every: int = Field(2, ge=1)
    mask_lr: float = Field(0.2, gt=0)
    mask_epochs: int = Field(20, ge=1)
    alpha: float = Field(0.2, gt=0, description="weight of the CE loss while learning masks (RNP)")
    batch_size: int = Field(128, ge=1)
    tau: float | None = Field(None, ge=0, le=1, description="fixed pruning threshold (None: choose on clean accuracy)")
    tau_max: float = Field(0.9, ge=0, le=1)
    tau_step: float = Field(0.05, gt=0, le=1)
    tau_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share of the clean data to choose tau on")
    tau_max_ca_drop: float = Field(0.03, ge=0, le=1)
    tau_rule: Literal["estimate", "bound"] = Field("bound", json_schema_extra=added_later("estimate"), description=(
        "keep tau when the held-out accuracy drop ('estimate', before session 10) or its paired upper "
        "confidence bound ('bound': walk up the grid, stop at the first failure) is within tau_max_ca_drop"))
    tau_confidence: float = Field(0.95, gt=0.5, lt=1, json_schema_extra=ADDED_LATER,
                                  description="one-sided confidence of the bound (tau_rule='bound')")


# --- the neurons ----------------------------------------------------------------------

def _ffn_down_projections(model) -> list[nn.Linear]:
    """Per encoder block, the FFN down-projection: the one Linear mapping a wider input to a
    narrower output (BERT ``output.dense``, DistilBERT ``ffn.lin2``)."""
    out = []
    for name, block in model.named_layers().items():
        lins = [m for m in block.modules() if isinstance(m, nn.Linear) and m.in_features > m.out_features]
        if len(lins) != 1:
            raise UserError(f"cannot find the FFN of text block {name} (found {len(lins)} down-projections)")
        out.append(lins[0])
    return out


def neuron_groups(model) -> list[tuple[str, nn.Module, int]]:
    """(kind, module, count) for every group of prunable neurons."""
    if getattr(model, "modality", "image") == "text":
        return [("ffn", m, m.in_features) for m in _ffn_down_projections(model)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    if not bns:
        raise UserError("ebyd-removal prunes BatchNorm channels of CNNs; this model has no affine BatchNorm2d")
    return [("bn", m, m.num_features) for m in bns]


@contextlib.contextmanager
def masked(model, masks: list[torch.Tensor]):
    """Apply one mask per neuron group inside the block (gradients flow to the masks)."""
    handles = []
    for (kind, mod, _), m in zip(neuron_groups(model), masks):
        if kind == "bn":
            def hook(mod, _inp, out, m=m):
                b = mod.bias.view(1, -1, 1, 1)
                return (out - b) * m.view(1, -1, 1, 1) + b
            handles.append(mod.register_forward_hook(hook))
        else:
            def pre(_mod, args, m=m):
                return (args[0] * m,) + tuple(args[1:])
            handles.append(mod.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def prune(model, groups_idx: list[torch.Tensor]) -> None:
    """Zero the given neurons of ``model`` in place."""
    for (kind, mod, _), idx in zip(neuron_groups(model), groups_idx):
        if len(idx) == 0:
            continue
        if kind == "bn":
            mod.weight[idx.to(mod.weight.device)] = 0
        else:
            mod.weight[:, idx.to(mod.weight.device)] = 0


def learn_masks(model, data: Data, cfg: EBYDRemovalConfig) -> list[torch.Tensor]:
    """RNP's recovering step on (a copy of) the unlearned model."""
    dev = next(model.parameters()).device
    masks = [torch.ones(n, device=dev, requires_grad=True) for _, _, n in neuron_groups(model)]
    opt = torch.optim.SGD(masks, lr=cfg.mask_lr, momentum=0.9)
    g = torch.Generator().manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with masked(model, masks):
            for _ in range(cfg.mask_epochs):
                for idx in torch.randperm(len(data), generator=g).split(cfg.batch_size):
                    if len(idx) < 2:  # BatchNorm in train mode needs two samples
                        continue
                    model.train()
                    x, y = data.batch(idx)
                    inputs, _ = model_inputs(model, x)
                    logits = model(inputs)
                    loss = cfg.alpha * F.cross_entropy(logits, y.to(logits.device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for m in masks:
                            m.clamp_(0, 1)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return [m.detach() for m in masks]


class EBYDRemoval(Purifier):
    """EBYD removal (RNP style): unlearn, learn neuron masks on clean data, prune the original."""
    name = "ebyd-removal"
    Config = EBYDRemovalConfig
    min_clean = 20

    def _purify(self, model, clean: Data, original):
        cfg = self.cfg
        text = clean.modality == "text"
        fit, hold = split_clean(clean, cfg.tau_fraction, cfg.seed) if cfg.tau is None else (clean, None)
        unlearn = ExposureConfig(method="cul", samples=len(fit), epochs=cfg.unlearn_epochs,
                                 batch_size=cfg.batch_size, optimizer="adam" if text else "sgd",
                                 lr=cfg.unlearn_lr or (2e-5 if text else 0.01), momentum=0.9,
                                 weight_decay=5e-4, train_mode=not text, check_every=cfg.check_every,
                                 stop_accuracy=cfg.clean_threshold, stop_share=None, seed=cfg.seed)
        exposed = expose(model, fit, unlearn)
        masks = learn_masks(exposed.model, fit, cfg)
        unlearned = {"unlearn_steps": exposed.steps, "unlearn_stopped_by": exposed.stopped_by,
                     "unlearn_accuracy": round(exposed.accuracy, 4)}
        del exposed
        self.masks = [m.cpu() for m in masks]  # kept for benchmarks/ebyd_tau_curve.py
        flat = torch.cat(self.masks)
        if cfg.tau is not None:
            taus = [cfg.tau]
        else:
            n = int(round(cfg.tau_max / cfg.tau_step))
            taus = [round(i * cfg.tau_step, 6) for i in range(n + 1)]
        table = []
        base_ok = correct(original, hold) if hold is not None else None
        ca0 = float(base_ok.double().mean()) if hold is not None else None
        for tau in taus:
            pruned = pruned_copy(model, masks, tau)
            row = {"tau": tau, "pruned": int((flat <= tau).sum())}
            if hold is not None:
                ok = correct(pruned, hold)
                drop, bound = accuracy_drop_bound(base_ok, ok, cfg.tau_confidence)
                row.update(holdout_ca=round(float(ok.double().mean()), 4), holdout_drop=round(drop, 4),
                           holdout_drop_bound=round(bound, 4))
            table.append(row)
        tau = choose_tau(table, ca0, cfg.tau_max_ca_drop, cfg.tau_rule) if hold is not None else taus[-1]
        # None: even tau = 0 lost too much (masks at exactly 0): prune nothing
        pruned = pruned_copy(model, masks, tau) if tau is not None else model
        info = {**unlearned, "tau": tau,
                "pruned_neurons": int((flat <= tau).sum()) if tau is not None else 0,
                "neurons": len(flat), "holdout_ca_before": ca0, "tau_table": table,
                "mask_quantiles": [round(float(q), 4) for q in torch.quantile(flat, torch.tensor([0.01, 0.05, 0.5]))]}
        return pruned.eval(), info


def choose_tau(table: list[dict], ca0: float, max_drop: float, rule: str) -> float | None:
    """The tau of ``table`` (rows of ``EBYDRemoval``'s tau table, in increasing tau) that the
    rule keeps, or None when none passes.

    * ``estimate``: the largest tau whose held-out accuracy is within ``max_drop`` of
      ``ca0`` (any larger tau may have failed before it).
    * ``bound``: fixed-sequence testing: walk up the grid and stop at the first tau whose
      upper bound of the paired drop exceeds ``max_drop``. The pruned sets are nested (a
      larger tau prunes a superset), so this keeps the bound's confidence for the tau it
      returns; taking the largest passing tau anywhere would favour a lucky draw among ~19.
    """
    best = None
    for row in table:
        if rule == "bound":
            if row["holdout_drop_bound"] > max_drop:
                break
            best = row["tau"]
        elif row["holdout_ca"] >= ca0 - max_drop:
            best = row["tau"]
    return best


def pruned_copy(model, masks: list[torch.Tensor], tau: float):
    """A copy of ``model`` with every neuron whose mask is <= ``tau`` pruned."""
    import copy
    work = copy.deepcopy(model)
    prune(work, [(m <= tau).nonzero().flatten() for m in masks])
    return work

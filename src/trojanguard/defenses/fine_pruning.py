"""Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018): prune the units of the last layer
that stay dormant on clean data, then fine-tune on the clean data.

The backdoor tends to live in units that clean inputs leave quiet; pruning them in
increasing order of their mean clean activation removes (part of) it, and fine-tuning
repairs the accuracy and further erodes what is left.

Defaults (BackdoorBench ``defense/fp.py`` and ``config/defense/fp/cifar10.yaml``):
  * units: the input of the linear head, i.e. the channel means of the last convolutional
    layer after its BN+ReLU (BackdoorBench hooks the input of the model's last child, the
    head); ranked by their mean over the clean data;
  * prune ``ceil(once_prune_ratio * units)`` more units per step, ``once_prune_ratio``
    0.01, and keep the last step at which clean accuracy has fallen by less than
    ``acc_ratio`` = 0.1 of its unpruned value (relative);
  * the pruning is a mask on the head's input columns (``prune.custom_from_mask`` on the
    head), kept during fine-tuning;
  * fine-tuning: SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine schedule, batch 256,
    100 epochs, standard crop+flip augmentation, CE loss; 5 % clean data (``ratio``).

Changes and readings (ours):
  * BackdoorBench measures the stopping accuracy on the clean *test* set, which a defender
    does not have: we measure it on a class-balanced ``check_fraction`` (20 %) of the
    clean data, not used to rank the units (all of it is used for fine-tuning).
  * BackdoorBench prunes ``seq_sort[:k - 1]`` at step k (one unit fewer than counted) and
    stops on ``|acc - acc0| / acc0``, so an accuracy *rise* also stops it; we prune exactly
    k units and stop on a drop only. ``max_ratio`` caps the pruned share (1.0 = no cap,
    BackdoorBench's loop runs through all units).
  * The pruning is stored in the weights: the pruned input columns of the head (images) or
    of the FFN output projection (text) are zeroed and re-zeroed after every fine-tuning
    step. This is the same function as BackdoorBench's mask and, unlike a mask module or a
    forward hook, survives ``save_checkpoint``/``load_checkpoint`` (plain state dict).
  * PreAct-ResNet18 width 16 has 128 head inputs (512 at width 64), so one step prunes 2
    channels instead of 6; the rule is unchanged. With 2,500 clean CIFAR images, 100
    epochs of batch 256 are ~900 steps (estimated ~7 min on 2 CPU cores at width 16, from
    the per-batch cost; not measured on CIFAR-10 here), so the recipe is kept.
  * Text (BackdoorBench has none; our reading): the units are the FFN intermediate units
    of the last encoder block (the input of its output projection, i.e. after GELU), their
    mean taken over non-padding tokens; pruned by zeroing their columns in the output
    projection. Fine-tuning uses the usual transformer recipe (AdamW lr 2e-5, batch 32,
    gradient clipping 1.0, 10 epochs), since SGD at 0.01 for 100 epochs wrecks a
    pre-trained encoder on 872 sentences.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.base import Data
from ..errors import UserError
from ..training import train
from ..utils import resolve_device
from .base import Purifier, PurifierConfig
from .common import clean_accuracy, model_inputs, split_clean, text_aware_recipe


class FinePruningConfig(PurifierConfig):
    acc_ratio: float = Field(0.1, gt=0, le=1, description=(
        "stop pruning when clean accuracy on the check part falls by this share of its unpruned value"))
    once_prune_ratio: float = Field(0.01, gt=0, le=1, description="share of the units pruned per step")
    max_ratio: float = Field(1.0, gt=0, le=1, description="never prune more than this share of the units")
    check_fraction: float = Field(0.2, gt=0, lt=1, description=(
        "class-balanced share of the clean data the stopping rule measures accuracy on (not used to rank)"))
    epochs: int = Field(100, ge=0, description="fine-tuning epochs after pruning (0 = prune only)")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = True
    text_epochs: int = Field(10, ge=0, description="text: fine-tuning epochs (AdamW)")
    text_lr: float = Field(2e-5, gt=0, description="text: AdamW learning rate")
    text_batch_size: int = Field(32, ge=1)


def ffn_output_projection(model) -> nn.Linear:
    """The linear layer that reads the FFN intermediate units of the last encoder block
    (BERT/RoBERTa/MiniLM ``output.dense``, DistilBERT ``ffn.lin2``)."""
    block = model.get_layer(model.layer_names()[-1])
    out = getattr(getattr(block, "output", None), "dense", None)
    if out is None:
        out = getattr(getattr(block, "ffn", None), "lin2", None)
    if not isinstance(out, nn.Linear):
        raise UserError(f"cannot find the FFN output projection of {type(block).__name__}; fine-pruning supports "
                        "BERT-, RoBERTa- and DistilBERT-like encoders")
    return out


def pruning_target(model, modality: str) -> tuple[str, nn.Linear]:
    """(description, linear layer whose input columns are the prunable units)."""
    if modality == "text":
        return f"{model.layer_names()[-1]} FFN intermediate units", ffn_output_projection(model)
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise UserError("fine-pruning needs a model whose head is an nn.Linear on the pooled last-layer features")
    return "head input (last conv channels after BN+ReLU, pooled)", head


@torch.inference_mode()
def unit_activations(model, data: Data, layer: nn.Linear, batch_size: int = 256) -> torch.Tensor:
    """Mean over ``data`` of every input unit of ``layer`` (over non-padding tokens for text)."""
    was = model.training
    model.eval()
    total, count = None, 0.0
    box: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_pre_hook(lambda _m, inp: box.__setitem__("a", inp[0]))
    try:
        for start in range(0, len(data), batch_size):
            x, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            inputs, mask = model_inputs(model, x)
            model(inputs)
            a = box["a"].float()
            if a.ndim == 3:  # [B, T, units]: only real tokens count
                m = mask.unsqueeze(-1).to(a.dtype)
                s, n = (a * m).sum((0, 1)), float(m.sum())
            else:
                s, n = a.reshape(-1, a.shape[-1]).sum(0), float(a.shape[0])
            total = s if total is None else total + s
            count += n
    finally:
        handle.remove()
        model.train(was)
    return (total / max(count, 1.0)).cpu()


@torch.inference_mode()
def _head_inputs(model, data: Data, batch_size: int = 256) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(data), batch_size):
            x, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            out.append(model.features(model_inputs(model, x)[0]).float())
        return torch.cat(out)
    finally:
        model.train(was)


def zero_columns(layer: nn.Linear, units: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight[:, units.to(layer.weight.device)] = 0


class FinePruning(Purifier):
    """Prune the units dormant on clean data (stopping on clean accuracy), then fine-tune."""
    name = "fine-pruning"
    Config = FinePruningConfig

    def _purify(self, model, clean: Data, original):
        cfg = self.cfg
        text = clean.modality == "text"
        dev = resolve_device(cfg.device)
        model.to(dev).eval()
        what, layer = pruning_target(model, clean.modality)
        rank_part, check = split_clean(clean, cfg.check_fraction, cfg.seed)

        activation = unit_activations(model, rank_part, layer)
        order = torch.argsort(activation, stable=True)  # most dormant first
        n_units = len(order)
        step = math.ceil(n_units * cfg.once_prune_ratio)
        limit = int(cfg.max_ratio * n_units)

        if text:
            w0 = layer.weight.detach().clone()

            def accuracy_with(k: int) -> float:
                with torch.no_grad():
                    layer.weight.copy_(w0)
                zero_columns(layer, order[:k])
                return clean_accuracy(model, check)
        else:
            # the head is linear in its inputs: zeroing a column of W equals zeroing that
            # input, so the stopping rule can reuse the features computed once
            feats, yc = _head_inputs(model, check).to(dev), check.y.to(dev)
            w, b = layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None

            def accuracy_with(k: int) -> float:
                keep = torch.ones(n_units, device=dev)
                keep[order[:k].to(dev)] = 0
                return float((F.linear(feats, w * keep, b).argmax(1) == yc).float().mean())

        acc0 = accuracy_with(0)
        kept, acc_kept, trace = 0, acc0, [(0, acc0)]
        for k in range(step, limit + 1, step):
            acc = accuracy_with(k)
            trace.append((k, acc))
            if (acc0 - acc) / max(acc0, 1e-12) < cfg.acc_ratio:
                kept, acc_kept = k, acc
            else:
                break
        pruned = order[:kept].sort().values
        if text:
            with torch.no_grad():
                layer.weight.copy_(w0)
        zero_columns(layer, pruned)

        seconds = 0.0
        epochs = cfg.text_epochs if text else cfg.epochs
        if epochs > 0:
            tcfg = text_aware_recipe(clean, cfg, "fine-pruning tuning", epochs, "cosine")
            # re-zeroing after every step keeps the pruned units out exactly as a fixed mask would
            seconds = train(model, clean, None, tcfg, loss_fn=lambda logits, y: F.cross_entropy(logits, y),
                            after_step=lambda: zero_columns(layer, pruned)).seconds
        return model.eval(), {
            "pruned_units": pruned.tolist(), "pruned": int(kept), "units": n_units, "pruned_share": kept / n_units,
            "unit_kind": what, "check_size": len(check), "check_acc_unpruned": acc0, "check_acc_pruned": acc_kept,
            "prune_trace": trace, "finetune_epochs": epochs, "train_seconds": seconds}

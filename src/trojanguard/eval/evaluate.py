"""Prediction and the standard CA / ASR / RA evaluation."""
from __future__ import annotations

from typing import Callable

import torch

from ..data.base import Data
from . import metrics

# A trigger maps a batch (float images in [0,1] or a list of strings) and its labels to the
# triggered batch; attacks provide one, and so does a loaded attack artifact.
Trigger = Callable[[object, torch.Tensor], object]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict(model, data: Data, batch_size: int = 512, trigger: Trigger | None = None,
            return_logits: bool = False) -> torch.Tensor:
    """Predicted labels (or logits) for every sample of ``data``, in eval mode; the model's
    train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    dev = _device_of(model)
    out = []
    try:
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            x, y = data.batch(idx)
            if trigger is not None:
                x = trigger(x, y)
            if isinstance(x, torch.Tensor):
                x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                logits = model(x).float()
            else:
                logits = text_logits(model, list(x))
            out.append(logits.cpu() if return_logits else logits.argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


TEXT_BATCH = 128


def by_length(texts: list[str], fn: Callable[[list[str]], dict[str, torch.Tensor]],
              batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """``fn`` run on batches of similar length, its outputs (one row per sentence) returned
    in the order of ``texts``. Why: a batch is padded to its longest sentence, so random
    batches of SST-2 cost 2.3x more (the test split at 1 thread: 73 s -> 31 s; same
    predictions). Triggers are applied by the callers on their usual chunks first, so
    their random draws do not change."""
    if not texts:
        raise ValueError("by_length needs at least one text")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    size = batch_size or TEXT_BATCH
    parts = [fn([texts[i] for i in order[s:s + size]]) for s in range(0, len(order), size)]
    where = torch.empty(len(order), dtype=torch.long)
    where[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))  # sorted position of each text
    return {k: torch.cat([p[k] for p in parts])[where.to(parts[0][k].device)] for k in parts[0]}


@torch.no_grad()
def text_logits(model, texts: list[str], batch_size: int | None = None) -> torch.Tensor:
    """``model``'s float logits of ``texts``, in their order (batched by length; no gradients)."""
    return by_length(texts, lambda t: {"logits": model(t).float()}, batch_size)["logits"]


def evaluate(model, test: Data, trigger: Trigger | None = None, targets=None,
             batch_size: int = 512, per_class: bool = False) -> dict:
    """CA on ``test``; with a trigger, also ASR and RA on the triggered test inputs whose
    true label is not their target. ``targets``: an int (all-to-one) or a function
    labels -> target labels (all-to-all). ``per_class``: also ``ca_per_class``, the clean
    accuracy of every class of ``test.classes`` (from the same predictions, no extra
    pass; ``None`` for a class without test inputs)."""
    pred = predict(model, test, batch_size)
    res = {"ca": metrics.accuracy(pred, test.y)}
    if per_class:
        res["ca_per_class"] = metrics.per_class_accuracy(pred, test.y, len(test.classes))
    if trigger is not None:
        t = targets(test.y) if callable(targets) else torch.full_like(test.y, int(targets))
        keep = (test.y != t).nonzero().flatten()
        sub = test.subset(keep)
        pred = predict(model, sub, batch_size, trigger=trigger)
        res["asr"] = metrics.attack_success_rate(pred, sub.y, t[keep])
        res["ra"] = metrics.robust_accuracy(pred, sub.y, t[keep])
    return res

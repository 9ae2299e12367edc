"""What several defenses need, in one place.

* ``split_clean``: a seeded class-balanced split of the defender's clean data.
* ``clean_accuracy``: accuracy on a clean set (purifiers verify with it); ``correct``:
  which samples a model gets right (paired comparisons of two models on one set).
* ``layer_activations``: outputs of named layers over a dataset, reduced per sample
  (channel means for CNN feature maps, the [CLS] position or the token mean for text).
* ``stamped``: clean samples of non-target classes carrying an attack's trigger, labelled
  with the attack's target (the retuning attack, trigger-aware checks).
* ``before_after``: CA/ASR/RA of a model before and after a defense, with DER.
* ``retuning_attack``: the FST authors' post-purification robustness check.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Literal

import torch

from ..data.base import Data, ImageData, TextData
from ..data.split import holdout_indices
from ..errors import UserError
from ..eval import metrics
from ..eval.evaluate import by_length, evaluate, predict


def split_clean(data: Data, fraction: float, seed: int = 0) -> tuple[Data, Data]:
    """(rest, part) where ``part`` is a class-balanced ``fraction`` of ``data``."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"split fraction {fraction} is outside (0, 1)")
    if round(fraction * len(data)) < 1 or round((1 - fraction) * len(data)) < 1:
        raise UserError(f"{len(data)} clean samples are too few to split {fraction:.0%} aside; give more clean data")
    rest, part = holdout_indices(data.y, fraction, seed, len(data.classes))
    return data.subset(rest), data.subset(part)


def correct(model, data: Data, batch_size: int = 256) -> torch.Tensor:
    """Per sample of ``data``: does ``model`` predict its label (bool, on the CPU)."""
    return predict(model, data, batch_size).cpu() == data.y.cpu()


def share_correct(ok: torch.Tensor) -> float:
    """Accuracy from per-sample correctness (nan for no samples)."""
    return float(ok.double().mean()) if len(ok) else float("nan")


def clean_accuracy(model, data: Data, batch_size: int = 256) -> float:
    return share_correct(correct(model, data, batch_size))


Reduce = Literal["auto", "none", "mean", "cls", "max", "mean+max"]


def _reduce(t: torch.Tensor, how: Reduce, mask: torch.Tensor | None) -> torch.Tensor:
    if how == "none":
        return t
    if t.ndim == 4:  # CNN feature map [B, C, H, W] -> channel means (or maxima)
        if how == "max":
            return t.float().amax((2, 3))
        if how == "mean+max":
            return torch.cat([t.float().mean((2, 3)), t.float().amax((2, 3))], 1)
        return t.float().mean((2, 3))
    if t.ndim == 3:  # transformer hidden states [B, T, d]
        if how == "cls" or (how == "auto" and mask is None):
            return t[:, 0].float()
        m = mask.unsqueeze(-1).to(t.dtype)
        return ((t * m).sum(1) / m.sum(1).clamp_min(1)).float()
    return t.float()


def model_inputs(model, x):
    """Images go to the model's device; texts are tokenised once so that the token mask is
    known to the caller (BadActs clamps non-padding tokens only)."""
    dev = next(model.parameters()).device
    if isinstance(x, torch.Tensor):
        return x.to(dev), None
    enc = model.tokenize(list(x))
    return enc, enc["attention_mask"]


@torch.inference_mode()
def layer_activations(model, data: Data, layers: list[str], reduce: Reduce = "auto", trigger=None,
                      batch_size: int = 256, with_logits: bool = False) -> dict[str, torch.Tensor]:
    """``{layer: [N, d]}`` over ``data`` (eval mode; ``trigger`` stamps each batch first).

    ``reduce``: "auto" = channel means of 4-D maps and [CLS] of text hidden states;
    "mean" = the token mean over non-padding tokens for text; "cls"; "max" = the channel
    maxima of 4-D maps (a local trigger is diluted in the spatial mean); "mean+max" = both,
    concatenated per layer; "none" = raw
    outputs (beware of memory). ``with_logits`` adds ``"logits"``."""
    was = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    if with_logits:
        out["logits"] = []

    def run(x) -> dict[str, torch.Tensor]:
        inputs, mask = model_inputs(model, x)
        with model.capture(layers) as acts:
            logits = model(inputs)
        got = {name: _reduce(acts[name], "cls" if reduce == "auto" and mask is not None else reduce, mask).cpu()
               for name in layers}
        if with_logits:
            got["logits"] = logits.float().cpu()
        return got

    texts: list[str] = []
    try:
        for start in range(0, len(data), batch_size):
            x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            if trigger is not None:
                x = trigger(x, y)
            if isinstance(x, torch.Tensor) or reduce == "none":
                for k, v in run(x).items():
                    out[k].append(v)
            else:  # text: run once all are triggered, in batches of similar length (less padding)
                texts.extend(x)
        if texts:
            return by_length(texts, run, batch_size)
    finally:
        model.train(was)
    return {k: torch.cat(v) for k, v in out.items()}


def stamped(data: Data, attack, count: int | None = None, seed: int = 0) -> Data:
    """``count`` samples of ``data`` whose label is not their target, with the trigger
    applied and the label set to the target (images re-quantised to uint8)."""
    targets = attack.target_for(data.y)
    pos = (data.y != targets).nonzero().flatten()
    if count is not None:
        if count > len(pos):
            raise UserError(f"need {count} non-target samples to stamp, the data has {len(pos)}")
        g = torch.Generator().manual_seed(seed)
        pos = pos[torch.randperm(len(pos), generator=g)[:count]].sort().values
    sub = data.subset(pos)
    x, y = sub.batch(torch.arange(len(sub)))
    xt = attack.trigger(x, y)
    t = targets[pos]
    if isinstance(sub, ImageData):
        from ..attacks.base import to_uint8
        return ImageData(to_uint8(xt), t, sub.classes, sub.index)
    return TextData(list(xt), t, sub.classes, sub.index)


def concat(a: Data, b: Data) -> Data:
    if isinstance(a, ImageData):
        return ImageData(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), a.classes, torch.cat([a.index, b.index]))
    return TextData(a.texts + b.texts, torch.cat([a.y, b.y]), a.classes, torch.cat([a.index, b.index]))


def before_after(before_model, after_model, test: Data, attack=None, before: dict | None = None) -> dict:
    """``{ca_before, asr_before, ra_before, ca_after, ..., der}`` on ``test`` (``before``
    reuses an evaluation of the undefended model already made)."""
    trig = attack.trigger if attack is not None else None
    tgt = attack.target_for if attack is not None else None
    b = before if before is not None else evaluate(before_model, test, trig, tgt)
    a = evaluate(after_model, test, trig, tgt)
    row = {f"{k}_before": v for k, v in b.items() if k in ("ca", "asr", "ra")}
    row.update({f"{k}_after": v for k, v in a.items() if k in ("ca", "asr", "ra")})
    if attack is not None:
        row["der"] = metrics.defense_effectiveness_rating(b["ca"], b["asr"], a["ca"], a["asr"])
    return row


def crop_padding(data: Data) -> int:
    """The crop padding of the standard augmentation, scaled to the image size: FST and
    BackdoorBench pad CIFAR's 32-pixel images by 4; an 8-pixel image gets 1 (4 pixels of
    padding there moves most of the digit out of view, wrecks the BatchNorm statistics and
    with them clean accuracy: the old demo's 38-point loss)."""
    if data.modality != "image":
        return 0
    return max(1, round(4 * data.shape[-1] / 32))


def defense_train_config(clean: Data, cfg=None, stage: str = "fine-tuning", **overrides):
    """The ``TrainConfig`` of a defense's fine-tuning loop: no label smoothing, no weight
    decay, no warm-up, crop+flip sized to the image (padding H/8: 4 px on 32x32 as in the
    FST/BackdoorBench loaders, 1 px on 8x8 digits, where 4 px shifts destroyed the digits
    and with them clean accuracy), no flip below 16 px, gradient clipping for text.
    ``cfg`` (a defense config) supplies seed/device/progress; ``stage`` names the progress bar."""
    from ..training import TrainConfig
    text = clean.modality == "text"
    base = dict(optimizer="sgd", momentum=0.9, nesterov=False, weight_decay=0.0, schedule="constant",
                warmup_frac=0.0, label_smoothing=0.0, augment=not text, grad_clip=1.0 if text else None, stage=stage)
    if not text:
        base["crop_padding"] = crop_padding(clean)
    if cfg is not None:
        base.update(seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    base.update(overrides)
    if text:
        base["augment"] = False
    return TrainConfig(**base)


def text_aware_recipe(clean: Data, cfg, stage: str, epochs: int, schedule: str, seed: int | None = None,
                      **overrides):
    """The fine-tuning recipe of a baseline whose config has image options (``batch_size``,
    ``lr``, ``weight_decay``) and text ones (``text_batch_size``, ``text_lr``; AdamW, no
    weight decay): Fine-Pruning's and NAD's, as BackdoorBench / OpenBackdoor set them."""
    text = clean.modality == "text"
    return defense_train_config(
        clean, cfg, stage, epochs=epochs, batch_size=cfg.text_batch_size if text else cfg.batch_size,
        optimizer="adamw" if text else "sgd", lr=cfg.text_lr if text else cfg.lr, momentum=cfg.momentum,
        weight_decay=0.0 if text else cfg.weight_decay, schedule=schedule, augment=cfg.augment,
        **({"seed": seed} if seed is not None else {}), **overrides)


def retuning_attack(model, clean: Data, attack, n_clean: int = 1000, n_poison: int = 5, epochs: int = 5,
                    lr: float | None = None, momentum: float = 0.9, batch_size: int = 128, seed: int = 0,
                    device: str = "auto", progress: bool = False) -> torch.nn.Module:
    """The retuning attack of Min et al. (NeurIPS 2024, methods.md §2.2): fine-tune all
    parameters of a copy of ``model`` for ``epochs`` on ``n_clean`` clean samples of which
    ``n_poison`` are replaced by triggered, target-labelled ones (SGD lr 0.01, momentum 0.9,
    no scheduler, batch 128, no augmentation, as ``ft_poison.py``). A purification that only
    hid the backdoor regains a high ASR; an exact one, or a clean model, stays low.

    With fewer than ``n_clean`` clean samples all of them are used. Text (our reading: the
    paper covers images only): AdamW lr 2e-5 with gradient clipping 1.0, the usual
    transformer fine-tuning step, since SGD at 0.01 wrecks a pre-trained encoder; images
    keep the paper's SGD."""
    from ..training import train
    if n_poison >= n_clean:
        raise UserError("the retuning attack needs more clean than poisoned samples")
    if not (hasattr(attack, "trigger") and hasattr(attack, "target_for")):
        raise UserError("the retuning attack needs an attack (trigger and target), e.g. load_attack(folder) or a "
                        f"scan's recovered trigger, not {type(attack).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"the retuning attack's epochs must be a whole number >= 1, not {epochs!r}")
    g = torch.Generator().manual_seed(seed)
    n = min(n_clean, len(clean))
    pick = torch.randperm(len(clean), generator=g)[:n]
    base = clean.subset(pick)
    poison = stamped(base, attack, count=min(n_poison, n - 1), seed=seed)
    keep = torch.ones(len(base), dtype=torch.bool)
    # replace (not add): drop n_poison clean samples so the set keeps its size
    keep[torch.randperm(len(base), generator=g)[:len(poison)]] = False
    tune = concat(base.subset(keep.nonzero().flatten()), poison)
    tuned = copy.deepcopy(model)
    text = clean.modality == "text"
    cfg = defense_train_config(clean, stage="retuning attack", epochs=epochs, batch_size=batch_size if not text else min(batch_size, 32),
                               optimizer="adamw" if text else "sgd", lr=lr or (2e-5 if text else 0.01),
                               momentum=momentum, augment=False, seed=seed, device=device, progress=progress)
    train(tuned, tune, None, cfg)
    return tuned.eval()


def retuned_asr(model, clean: Data, test: Data, attack, **kw) -> float:
    """ASR on ``test`` after the retuning attack (see ``retuning_attack``)."""
    tuned = retuning_attack(model, clean, attack, **kw)
    return evaluate(tuned, test, attack.trigger, attack.target_for)["asr"]


@contextlib.contextmanager
def position1_embedding(model, vectors: dict):
    """Replace the input embedding at position 1 (right after [CLS]) of the rows in
    ``vectors["rows"]`` by ``vectors["e"]`` (one vector for all, or one per row): a virtual
    word whose embedding is optimised (BeniFul removal's suspects, RAP's perturbation)."""
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

"""BadActs: input detection and purification in activation space (Yi et al., 2024;
methods.md §2.3; official code ``clearloveclearlove/BadActs``:
``openbackdoor/defenders/badacts_defender.py``, ``BadActs_purification.py``,
``BadActs_detection_then_purification.py``).

Activations: the output of every layer in ``layers`` (default ``model.layer_names()``:
every encoder block of a text model, every stage/block of a CNN). Text uses the hidden
state at [CLS] (position 0), as the official ``get_attribution`` (``position="cls"``), also
on our mean-pooling MiniLM classifier, whose head never reads the last block's [CLS]:
measured on the SST-2 20 % models (``benchmarks/detector_variants.py``,
``results/badacts-position-sst2.md``), the token mean (``position="mean"``) detects worse
on all four attacks: AUROC [CLS] / mean = BadNets 0.999 / 0.805, AddSent 0.992 / 0.688,
SynBkd 0.817 / 0.802, StyleBkd 0.796 / 0.725 (a one-token trigger is diluted in the mean;
[CLS] attends to it). **The vision version is our extension** (the paper and its code
cover transformers only): each channel of each block's feature map gives two NAS neurons,
its spatial mean and its spatial maximum (``spatial="mean+max"``, the default). Measured
on CIFAR-10 (``benchmarks/detector_variants.py``, ``results/badacts-spatial-cifar10.md``),
AUROC mean / max / both: BadNets 10 % 0.886 / 1.000 / 1.000 (the mean misses a local
patch), Blended 1 % 1.000 / 0.909 / 0.999 and 10 % 0.992 / 0.761 / 0.984 (the maximum
misses a global blend), WaNet 10 % 0.897 / 0.849 / 0.890. The purifier clamps each
channel's map once (one interval per channel).

Detection (NAS, neuron activation state). ``fit`` splits the clean data 50/50 (the
``InputDetector`` template): mu_j, sigma_j of every neuron j are fitted on the first half
(maximum likelihood, ddof 0, as ``scipy.stats.norm.fit``); NAS(x) = the fraction of
neurons with |a_j(x) - mu_j| <= delta sigma_j. ``score(x) = 1 - NAS(x)`` (higher = more
suspicious); the threshold is the (1 - frr) quantile of the scores of the second half.
delta = 3 as the run script ``BadActs_detection_then_purification.py`` (the class
default there is 2; on the four SST-2 20 % models delta 3 detects best of 1.5 / 2 / 3, e.g.
SynBkd AUROC 0.695 / 0.758 / 0.817, ``results/badacts-delta-sst2.md``, and of 3 / 4 / 5 / 6:
0.817 / 0.808 / 0.725 / 0.597, ``results/badacts-delta-wide-sst2.md``); frr 0.05 (class
default). Images (our extension, no paper value): the CNN's channel means and maxima are
heavy-tailed, and a wider band detects better on the six CIFAR-10 models measured
(``results/badacts-delta-wide-cifar10.md``, delta 3 / 4 / 5: Input-aware 0.893 / 0.973 /
0.987, LF 0.974 / 0.997 / 0.997, Blended 10 % 0.984 / 0.997 / 0.999, the others >= 0.998
throughout; WaNet 10 %, measured after the choice: 0.890 / 0.918). The default stays 3 until
delta 5 is checked on the models still unmeasured (SIG, BPP, Adaptive-Blend, all-to-all); the
CIFAR-10 grid has it as ``badacts-d5``. The official code flags NAS < the int(n frr)-th
smallest calibration NAS; the template here flags 1 - NAS > the (1 - frr) quantile
(interpolated) of the calibration scores: the same rule up to the interpolation between two
scores.

Purification (learned minimum intervals, ``BadActs_purification.py``). On the clean
samples the model classifies correctly, learn per (layer, neuron) an upper bound U and a
log-width M (both start at 1; lower bound L = U - exp(M)). The clamped forward pass
replaces every layer output by min(max(out, L), U): for text on every non-padding token
(as the code), for vision at every spatial position of each channel (our extension). Loss
= MSE(clamped logits, original logits) + c ||exp(M)||_2 over all layers; Adam lr 0.01,
batch 32, 50 epochs; c starts at 0.1 and, after the epochs e > 10 with e % 5 == 0
(0-based, the code's condition), is multiplied by 1.2 when the clamped accuracy on the
kept samples is >= 98 % of the reference (100 %: only correctly classified samples are
kept) and divided by 1.2 otherwise; if the final accuracy is below 97 %, the bounds are
reset, c halved and training restarts. Readings that are ours:
* the restart loop is capped at ``max_restarts`` (the code loops until it succeeds);
  when the cap is hit, the last bounds are kept and ``purifier_info["warning"]`` says so;
* the original logits are computed once per sample (the model is fixed and in eval
  mode, so this equals the code's per-batch recomputation);
* the clamped accuracy is measured only at the epochs where it is used (the schedule
  epochs and the last one) instead of after every epoch: same decisions, less time.

Detect then purify: only flagged inputs go through the clamped forward pass; the official
script uses delta 3 and FRR 0.2 there (``purify_frr``); ``trojanguard.guard`` combines the
two. On the SST-2 AddSent 20 % zoo model the detection flags 99.9 % of the triggered inputs
but the clamped pass still sends 44 % of them to the target (20 epochs, the grid's CPU
budget); the code's 50 epochs did not narrow the intervals (one restart at c / 2: mean width
0.70, ASR 46.6 %, 21 min), so rejecting flagged inputs (ASR 0.1 %) is the stronger guard there.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.base import Data
from ..errors import UserError
from ..eval.evaluate import predict
from ..utils import ADDED_LATER
from .base import DefenseConfig, InputDetector
from .common import _reduce, layer_activations, model_inputs


class BadActsConfig(DefenseConfig):
    delta: float = Field(3.0, gt=0, description=(
        "a neuron is in its normal state when |a - mu| <= delta sigma (3 in the run scripts; "
        "the defender class default is 2)"))
    frr: float = Field(0.05, gt=0, lt=1, description="false-rejection rate of the detection threshold")
    purify_frr: float = Field(0.2, gt=0, lt=1, description=(
        "false-rejection rate used when detecting then purifying (official script: 0.2)"))
    layers: list[str] | None = Field(None, description="layers to read and clamp (default: all of model.layer_names())")
    epochs: int = Field(50, ge=1, description="purification epochs (code: 50)")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the bounds (code: 0.01)")
    batch_size: int = Field(32, ge=1, description="purification batch size (code: 32)")
    c0: float = Field(0.1, gt=0, description="initial weight of ||exp(M)||_2 (code: 0.1)")
    c_factor: float = Field(1.2, gt=1, description="c is multiplied or divided by this (code: 1.2)")
    c_after_epoch: int = Field(10, ge=0, description="c changes after epochs e > this with e % c_every == 0")
    c_every: int = Field(5, ge=1)
    keep_accuracy: float = Field(0.98, gt=0, le=1, description=(
        "c grows when the clamped accuracy is at least this share of the reference (code: 98 %)"))
    restart_below: float = Field(0.97, ge=0, le=1, description=(
        "restart with c halved when the final clamped accuracy is below this (code: 97 %)"))
    max_restarts: int = Field(5, ge=0, description="cap on the restarts (ours; the code loops forever)")
    init_bound: float = Field(1.0, description="initial value of U and M (code: 1)")
    position: Literal["cls", "mean"] = Field("cls", json_schema_extra=ADDED_LATER, description=(
        "text: where the NAS reads each block: [CLS] (the paper; measured better, see the docstring) "
        "or the token mean over non-padding tokens"))
    spatial: Literal["mean", "max", "mean+max"] | None = Field(None, json_schema_extra=ADDED_LATER, description=(
        "images: each channel read as its spatial mean, its spatial maximum, or both (two NAS "
        "neurons per channel); None = mean+max (measured best, see the docstring)"))


class BadActs(InputDetector):
    """BadActs NAS detection + learned-interval purification (text; vision is our extension)."""
    name = "badacts"
    Config = BadActsConfig
    min_clean = 20

    # ------------------------------------------------------------------ detection --
    def _fit(self, model, clean: Data) -> None:
        names = self.cfg.layers or model.layer_names()
        known = model.layer_names()
        bad = [n for n in names if n not in known]
        if bad:
            raise UserError(f"badacts: unknown layer {bad[0]!r}; this model has {', '.join(known)}")
        self.layers = list(names)
        self.input_shape = tuple(clean.shape) if clean.modality == "image" else None
        if clean.modality == "text":
            self.position = self.cfg.position
        else:
            spatial = self.cfg.spatial or "mean+max"
            self.position = "auto" if spatial == "mean" else spatial
        acts = layer_activations(model, clean, self.layers, reduce=self.position)
        self.dims = {n: acts[n].shape[1] for n in self.layers}
        a = torch.cat([acts[n] for n in self.layers], 1).double()
        dev = _device(model)
        # maximum likelihood (ddof 0), as scipy.stats.norm.fit in the official code
        self.mu = a.mean(0).float().to(dev)
        self.sigma = a.std(0, unbiased=False).float().to(dev)

    def channels(self) -> dict[str, int]:
        """Units per layer that the purifier clamps (a layer read as mean+max has two NAS
        neurons per channel)."""
        per = 2 if self.position == "mean+max" else 1
        return {n: d // per for n, d in self.dims.items()}

    def _check_fitted(self, what: str = "score inputs") -> None:
        if getattr(self, "mu", None) is None:
            raise UserError(f"badacts: fit the detector on clean data before you {what} "
                            "(detector.fit(model, clean) or trojanguard.guard(model, clean))")

    def _nas_suspicion(self, a: torch.Tensor) -> torch.Tensor:
        # .to: a no-op unless the model was moved after fitting (guard.to("cuda"))
        mu, sigma = self.mu.to(a.device), self.sigma.to(a.device)
        inside = (a - mu).abs() <= self.cfg.delta * sigma
        return 1.0 - inside.float().mean(1)

    @torch.inference_mode()
    def score_and_logits(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """(the model's own logits, suspicion 1 - NAS) from one forward pass: the reduced
        activations are taken by observing hooks, so the logits are those of ``model(x)``."""
        self._check_fitted()
        x = self.checked_batch(x)
        model = self.model
        inputs, mask = model_inputs(model, x)
        how = self.position
        acts: dict[str, torch.Tensor] = {}

        def recorder(name):
            def fn(out):
                acts[name] = _reduce(out, how, mask)
                return out
            return fn
        was = model.training
        model.eval()
        try:
            with model.intervene({n: recorder(n) for n in self.layers}):
                logits = model(inputs)
        finally:
            model.train(was)
        a = torch.cat([acts[n] for n in self.layers], 1)
        return logits, self._nas_suspicion(a)

    def score(self, inputs) -> torch.Tensor:
        return self.score_and_logits(inputs)[1]

    def nas(self, inputs) -> torch.Tensor:
        """The paper's NAS score (fraction of neurons in their normal range; low = suspicious)."""
        return 1.0 - self.score(inputs)

    # --------------------------------------------------------------- purification --
    def _clamps(self, mask: torch.Tensor | None, bounds: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        def make(upper, log_width):
            def fn(out):
                u = upper.to(out.device, out.dtype)
                low = u - log_width.to(out.device, out.dtype).exp()
                shape = (1, -1, 1, 1) if out.ndim == 4 else (1,) * (out.ndim - 1) + (-1,)
                clamped = torch.clamp(out, low.view(shape), u.view(shape))  # min(max(out, L), U), one pass
                if mask is not None and out.ndim == 3:  # text: non-padding tokens only
                    clamped = torch.where(mask.unsqueeze(-1).bool(), clamped, out)
                return clamped
            return fn
        return {n: make(*bounds[n]) for n in self.layers}

    def _clamped_forward(self, inputs, mask, bounds):
        with self.model.intervene(self._clamps(mask, bounds)):
            return self.model(inputs)

    @torch.inference_mode()
    def _clamped_accuracy(self, data: Data, bounds, batch_size: int = 256) -> float:
        correct = 0
        for start in range(0, len(data), batch_size):
            x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            inputs, mask = model_inputs(self.model, x)
            pred = self._clamped_forward(inputs, mask, bounds).argmax(1).cpu()
            correct += int((pred == y).sum())
        return correct / max(len(data), 1)

    def fit_purifier(self, clean: Data) -> "BadActs":
        """Learn the minimum activation intervals on the clean samples the model gets right."""
        self._check_fitted("fit the purifier")
        self.check_inputs(self.model, clean)
        cfg, model = self.cfg, self.model
        was = model.training
        model.eval()
        pred = predict(model, clean)
        keep = clean.subset((pred == clean.y).nonzero().flatten())
        if len(keep) < 2:
            raise UserError(f"badacts: the model classifies only {len(keep)} of {len(clean)} clean samples "
                            "correctly; purification needs clean samples it gets right")
        ref = predict(model, keep, return_logits=True)  # the original logits, once per sample
        dev = _device(model)
        ref = ref.to(dev)
        g = torch.Generator().manual_seed(cfg.seed)
        params = [p for p in model.parameters()]
        flags = [p.requires_grad for p in params]
        for p in params:  # only the bounds are learned; no gradients for the weights
            p.requires_grad_(False)
        history = []
        try:
            for attempt in range(cfg.max_restarts + 1):
                c = cfg.c0 / 2 ** attempt
                bounds = {n: (torch.full((d,), cfg.init_bound, device=dev, requires_grad=True),
                              torch.full((d,), cfg.init_bound, device=dev, requires_grad=True))
                          for n, d in self.channels().items()}
                opt = torch.optim.Adam([t for pair in bounds.values() for t in pair], lr=cfg.lr)
                acc = self._train_bounds(keep, ref, bounds, opt, c, g, history, attempt)
                if acc >= cfg.restart_below:
                    break
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.train(was)
        self.bounds = {n: (u.detach().clone(), m.detach().clone()) for n, (u, m) in bounds.items()}
        width = torch.cat([m.exp() for _, m in self.bounds.values()])
        self.purifier_info = {"kept": len(keep), "clean": len(clean), "restarts": attempt,
                              "clamped_accuracy": acc, "c_final": history[-1]["c"],
                              "mean_width": float(width.mean()), "history": history}
        if acc < cfg.restart_below:
            self.purifier_info["warning"] = (
                f"after {attempt} restarts the clamped model keeps only {acc:.1%} of the clean accuracy "
                f"(wanted {cfg.restart_below:.0%}); the purified predictions may be poor")
        return self

    def _train_bounds(self, keep: Data, ref, bounds, opt, c: float, g, history: list, attempt: int) -> float:
        cfg, model = self.cfg, self.model
        log_widths = [m for _, m in bounds.values()]
        acc = float("nan")
        from ..progress import stage_bar
        for epoch in stage_bar(range(cfg.epochs), desc="badacts bounds", enabled=cfg.progress, unit="epoch"):
            order = torch.randperm(len(keep), generator=g)
            for start in range(0, len(keep), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                x, _ = keep.batch(idx)
                inputs, mask = model_inputs(model, x)
                out = self._clamped_forward(inputs, mask, bounds)
                loss = F.mse_loss(out.float(), ref[idx.to(ref.device)]) + \
                    c * torch.cat(log_widths).exp().norm()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            schedule = epoch > cfg.c_after_epoch and epoch % cfg.c_every == 0
            if schedule or epoch == cfg.epochs - 1:
                acc = self._clamped_accuracy(keep, bounds)
            if schedule:  # the reference accuracy is 1: only correctly classified samples are kept
                c = c * cfg.c_factor if acc >= cfg.keep_accuracy else c / cfg.c_factor
        history.append({"attempt": attempt, "c": c, "clamped_accuracy": acc, "loss": float(loss.detach())})
        return acc

    @torch.inference_mode()
    def purified_logits(self, x) -> torch.Tensor:
        """Logits of the clamped forward pass (every listed layer clamped to its interval)."""
        if getattr(self, "bounds", None) is None:
            raise UserError("badacts: fit the purifier before asking for purified predictions "
                            "(detector.fit_purifier(clean) or trojanguard.guard(..., purify=True))")
        x = self.checked_batch(x)
        was = self.model.training
        self.model.eval()
        try:
            inputs, mask = model_inputs(self.model, x)
            return self._clamped_forward(inputs, mask, self.bounds)
        finally:
            self.model.train(was)

    # ----------------------------------------------------------- saving / loading --
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able facts) that ``restore`` turns back into this fitted detector."""
        self._check_fitted("save it")
        tensors = {"mu": self.mu, "sigma": self.sigma, "calibration_scores": self.calibration_scores}
        for n, (u, m) in (getattr(self, "bounds", None) or {}).items():
            tensors[f"upper.{n}"], tensors[f"log_width.{n}"] = u, m
        facts = {"layers": self.layers, "dims": self.dims, "threshold": self.threshold, "frr": self.frr,
                 "input_shape": list(self.input_shape) if self.input_shape else None, "position": self.position,
                 "purifier": getattr(self, "purifier_info", None) if getattr(self, "bounds", None) else None}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, facts

    def restore(self, model, tensors: dict[str, torch.Tensor], facts: dict[str, Any]) -> "BadActs":
        dev = _device(model)
        self.model = model
        self.layers = list(facts["layers"])
        unknown = [n for n in self.layers if n not in model.layer_names()]
        if unknown:
            raise UserError(f"badacts: saved layer {unknown[0]!r} is not in this model; "
                            "the guard belongs to another model")
        self.dims = {k: int(v) for k, v in facts["dims"].items()}
        self.input_shape = tuple(facts["input_shape"]) if facts.get("input_shape") else None
        self.position = facts.get("position", "cls")  # guards saved before the option read [CLS]
        self.mu, self.sigma = tensors["mu"].to(dev), tensors["sigma"].to(dev)
        self.calibration_scores = tensors["calibration_scores"]
        self.threshold, self.frr = float(facts["threshold"]), float(facts["frr"])
        if facts.get("purifier"):
            self.bounds = {n: (tensors[f"upper.{n}"].to(dev), tensors[f"log_width.{n}"].to(dev)) for n in self.layers}
            self.purifier_info = facts["purifier"]
        return self


def _device(model) -> torch.device:
    return next(model.parameters()).device


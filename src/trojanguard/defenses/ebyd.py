"""EBYD model inspection: Expose Before You Defend (Li et al. 2024; methods.md §2.5; official
code ``bboylyg/Expose-Before-You-Defend``, images only).

1. **Exposure** (``exposure.py``, Clean Unlearning by default) on a few clean samples.
2. **Class shares**: the exposed model's predictions on the clean data the exposure did
   not use (all of it when fewer than 200 would remain). A backdoored
   model collapses onto its target (the backdoor is the last feature standing); a clean
   one collapses without a preferred class. The paper's target label = the most predicted
   class; ours = the best of the ``candidates`` most predicted classes by step 4 (with
   ``candidates=1``, the paper's).
3. **Backdoor probability**: a logistic calibration over features of the exposed model
   (``ebyd_calibration.py``), read from a small JSON with its provenance
   (``calibration/ebyd.json``, or ``calibration=PATH``). The raw statistic of the paper is
   the variance of the class shares (backdoored when > 0.01 on CIFAR-10): ``PRIOR``. The
   shipped file is fitted per modality on the reference zoos by
   ``benchmarks/fit_ebyd_calibration.py`` (one clean model per modality so far: see
   ``benchmarks/results/inspect-ebyd.md``); benchmarks score each model with a calibration
   that never saw it (``leave_one_out``) where that is possible. Verdict: probability >= 0.5.
4. **Trigger recovery** on the exposed model, for the ``candidates`` (3) most predicted
   classes (the paper: the detected label only; see ``EBYD._recover`` for why and how the
   target is chosen among them, by how the trigger moves the ORIGINAL model): Neural Cleanse
   (mask + pattern) for images; for text (our reading: the paper gives no text recovery)
   a first-order token search (``token_search.py``): the gradient of the target
   log-probability with respect to the embedding of a token inserted after [CLS] ranks the
   vocabulary (HotFlip's linear approximation), and the ``text_candidates`` best whole-word
   tokens are re-ranked exactly by the share of non-target clean sentences they send to the
   target when prepended. The recovered trigger is also applied to the ORIGINAL model (trigger
   features below). ``recover="auto"`` recovers when the verdict is backdoored, or first
   when the calibration uses trigger features; ``"always"`` for the benchmarks.

Measured on the CPU reference zoo (PreAct-ResNet18 w16, 2,500 held-out images, official
CUL in eval mode; 1 thread under load, 160-510 s per inspection): BadNets 10 % collapses
onto its target 0 (share 0.84) and NC on the exposed model puts 99 % of its mask (0.6 px)
on the patch's white corner pixel; but the clean model also collapses (class 8, 0.81) and
Blended 1 % collapses onto class 2, not its target 0. With ``train_mode=True`` at 1e-5 the
20 epochs end before the rule (BadNets: target 0 at 0.21, clean and Blended flat). On the
8x8 digits CNN eval mode collapses onto arbitrary classes and train mode at 1e-3 finds the
target. So the share features alone do not separate clean from backdoored models here:
the trigger features (``recover="always"``) are there for the calibration the lead fits.
The repository's detection script unlearns differently (SGD 5e-3, train mode, crop + flip,
21 epochs, no stopping rule; ``recipe="detection-script"``): the stopping rule on accuracy
turns any model's ascent into a collapse, while a fixed budget in train mode leaves a clean
model spread out; the grid runs both. Reading chosen (``recipe="auto"``, the default): the
detection script for images, where it was measured better over the 12 CIFAR-10 zoo models
(leave-one-out, classes weighted equally: AUROC 0.78 and 9/12 verdicts right: 7/9
backdoored, both low-rate Blended missed, 2/3 clean, with the target right on every 10 %
one-to-one attack; the exposure script: AUROC 0.59, 7/12 right, the target right on 3 of
9); the exposure script for text, where the detection script's fixed budget collapses a
clean SST-2 model as fully as a backdoored one (shares 1.0 on class 0 and on the BadNets
target). Each recipe has its own shipped calibration (``calibration/ebyd.json``,
``calibration/ebyd-detection-script.json``).

Features (all in [0, 1] whatever the class count K, so that one calibration serves CIFAR-10
and SST-2): ``var_norm`` = variance of the shares / (1/K (1 - 1/K)) (1 for a one-hot
collapse), ``max_excess`` = (max share - 1/K) / (1 - 1/K), ``collapse_ratio`` = share of
clean samples of the other classes predicted as the top class (an ASR without trigger);
from the recovered trigger: ``trigger_success`` = share of clean inputs of other classes the
trigger sends to the target on the ORIGINAL model (text: the best token's flip rate),
``hard_success`` (text) = the same on the quarter of those sentences the original model is
surest about (``hard_sentences``: a sentiment word tips undecided sentences, a backdoor
word overrides confident ones), ``mask_fraction`` = mask L1 / image area (text: 0),
``mask_log`` = its log10 (text: 0); over every candidate trigger (our extension,
``ebyd_calibration.candidate_features``): ``transfer_max`` = the most any candidate's trigger
moves the original model, ``max_evidence`` = max(max_excess, transfer_max). Text words are
searched on the exposed and on the original model (``text_search="both"``, our extension) and
ranked by ``hard_success``. A calibration file holds one parameter set, or one per modality
under ``by_modality`` (the exposure script's: images on ``mask_log``, text on
``hard_success``; the detection script's, what ``scan`` uses for images: ``max_evidence``).

``max_evidence`` and the preference for a candidate the original obeys (``confirm``) were
designed after reading the 15 recorded CIFAR-10 inspections of the detection script (the
low-rate Blended models collapse no more than clean ones, max_excess 0.21-0.27 vs 0.27-0.43,
but the Blended 1 % target's trigger moves 100 % of the original's inputs, the clean models'
candidates at most 15 %): leave-one-out on those models (``benchmarks/fit_ebyd_calibration.py
--defense ebyd-detect --image-features max_evidence``) AUROC 0.86, Brier 0.138, 13/15 verdicts,
the target right on 10/11 backdoored one-to-one models, against 0.81, 0.180, 11/15, 9/11 with
max_excess + mask_log; the leave-one-out guards the fitted coefficients, not this choice of
feature. Still missed: Blended 0.5 % (its target's trigger moves 25 %) and all-to-all. Two
models trained afterwards to check it (scored by the calibration fitted on the 15): a fourth
clean model is called clean (p 0.31, though one candidate's trigger moves 24 % of its inputs),
a second Blended 1 % (target 5) is missed (p 0.23): its target is the fourth most predicted
class after exposure, not a candidate, and no candidate's trigger moves the original.
Leave-one-out over all 17 (the shipped fit): AUROC 0.79, Brier 0.159, 14/17 verdicts, against
0.79, 0.204, 12/17 with max_excess + mask_log.
"""
from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field

from ..data.base import Data
from ..errors import UserError
from ..eval.evaluate import predict
from ..utils import ADDED_LATER
from .base import DefenseConfig, Inspection, Inspector
from .ebyd_calibration import (CONFIRM_BY_RECIPE, FEATURES, TRIGGER_FEATURES, candidate_features, choose_candidate,
                               exposure_features, for_modality, load_calibration, probability)
from .exposure import EBYD_DETECT_PRESET, ExposureConfig, expose, unexposed
from .neural_cleanse import NeuralCleanseConfig, reverse_engineer
from .token_search import merge_token_searches, search_tokens

#: the refined trigger's size limit is never below BadNets' 3x3 patch (see ``_refine``)
MIN_TRIGGER_PX = 9


class EBYDConfig(DefenseConfig):
    exposure: Literal["cul", "random-labels", "act-prune", "weight-perturb"] = "cul"
    samples: int = Field(500, ge=10, description="clean samples the exposure uses (paper: 500)")
    epochs: int = Field(20, ge=1)
    lr: float | None = Field(None, gt=0, description="None: 1e-5 images, 2e-5 text (cul); 1e-4 (random-labels)")
    batch_size: int = Field(128, ge=1)
    train_mode: bool = Field(False, description="exposure updates in train mode (the official CUL runs in eval mode)")
    check_every: int = Field(2, ge=1)
    stop_accuracy: float = Field(0.2, ge=0, le=1)
    stop_share: float = Field(0.9, gt=0, le=1)
    recipe: Literal["auto", "exposure-script", "detection-script"] = Field("auto", description=(
        "unlearning of the official exposure script (Adam 1e-5, eval mode, the options above) or of its "
        "detection script (SGD 5e-3, train mode, augmented, 21 epochs, no stopping rule; overrides them); "
        "auto: detection-script for images with exposure=cul, exposure-script for text and for the other "
        "exposure methods (see the module docstring)"))
    calibration: str | None = Field(None, description="calibration JSON (None: the shipped one)")
    threshold: float = Field(0.5, gt=0, lt=1, description="verdict: backdoored when probability >= threshold")
    recover: Literal["auto", "always", "never"] = Field("auto", description="trigger recovery (auto: when backdoored)")
    nc_rounds: int = Field(60, ge=1, description="Neural Cleanse rounds of 5 steps (see neural_cleanse.py)")
    candidates: int = Field(3, ge=1, description=(
        "recover a trigger for this many of the most predicted classes after exposure; the target is the "
        "class with the smallest trigger (Neural Cleanse's premise), the candidates whose trigger the original "
        "model obeys first (see confirm; text, where every trigger is one word: the word that moves the original "
        "model most); 1 = the paper: the most predicted class"))
    transfer: float = Field(0.9, gt=0, le=1, description=(
        "a candidate's trigger that moves this share of the original model's clean inputs with a mask under "
        "mask_limit ends the search (the classes after it are not tried)"))
    mask_limit: float = Field(0.01, gt=0, le=1, description="share of the image (text: always met, no mask)")
    confirm: float | None = Field(None, ge=0, le=2, json_schema_extra=ADDED_LATER, description=(
        "a candidate whose trigger also sends this share of the ORIGINAL model's clean inputs to its class is "
        "chosen before the smaller triggers that do not (a global trigger such as Blended needs a large mask); "
        "2: off, the smallest trigger only; None: 0.5 after the detection script's unlearning, 2 after the "
        "exposure script's, where small patches found on any exposed model move most of the original's inputs. "
        "Harness cells run before this option existed keep their hash and their recorded target: "
        "benchmarks/fit_ebyd_calibration.py re-derives the target from their recorded candidates"))
    refine: float = Field(0.5, ge=0, le=1, json_schema_extra=ADDED_LATER, description=(
        "images: when the chosen trigger (recovered on the exposed model) sends fewer than this share of the "
        "ORIGINAL model's clean inputs to the target, also recover one on the original model for that target and "
        "report it as the trigger (the calibration keeps the exposed model's features); 0 = never"))
    text_candidates: int = Field(64, ge=1)
    text_tokens: int = Field(5, ge=1)
    text_samples: int = Field(64, ge=1)
    text_search: Literal["exposed", "both"] = Field("both", json_schema_extra=ADDED_LATER, description=(
        "text: search trigger words on the exposed model only, or on the original model too and keep the words "
        "that move the original's surest opposite sentences most (see token_search.hard_sentences)"))


@torch.inference_mode()
def trigger_success(model, data: Data, mask: torch.Tensor, pattern: torch.Tensor, target: int,
                    batch_size: int = 256) -> float:
    """Share of clean images of other classes that ``model`` sends to ``target`` once the
    mask/pattern trigger is applied."""
    sub = data.subset((data.y != target).nonzero().flatten())
    if len(sub) == 0:
        return 0.0
    m, p = mask.cpu(), pattern.cpu()  # predict() stamps CPU batches, then moves them
    pred = predict(model, sub, batch_size, trigger=lambda x, y: (1 - m) * x + m * p)
    return float((pred == target).double().mean())


def trigger_features(trigger: dict, clean: Data) -> dict:
    """``trigger_success``: share of clean inputs of other classes that the recovered trigger
    sends to the target on the ORIGINAL model; ``hard_success``: the same on the quarter of
    them the original is surest about (text; images have no such reading and repeat
    ``trigger_success``); ``mask_fraction``: the mask's L1 norm over the image area (text: 0,
    one inserted word); ``mask_log``: its log10."""
    if "tokens" in trigger:
        best = trigger["candidates"][0] if trigger["candidates"] else {}
        return {"trigger_success": float(best.get("flip_rate_original", 0.0)),
                "hard_success": float(best.get("hard_flip_original", 0.0)), "mask_fraction": 0.0, "mask_log": 0.0}
    h, w = clean.x.shape[-2:]
    frac = float(trigger["norm"]) / (h * w)
    # log10 of the mask's share of the image: the sizes that matter span 0.5-10 px on 32x32
    # (1e-3.3 to 1e-2), a range a logistic calibration sees better on a log scale
    success = float(trigger.get("success_original", 0.0))
    return {"trigger_success": success, "hard_success": success, "mask_fraction": frac,
            "mask_log": math.log10(max(frac, 1e-5))}


# --- the inspector --------------------------------------------------------------------------

class EBYD(Inspector):
    """EBYD: expose (clean unlearning), calibrated backdoor probability, trigger recovery on
    the exposed model for its most predicted classes, target = the class with the smallest
    trigger, those whose trigger the original model obeys first (images after the detection
    script; text: the word that moves the original model most)."""
    name = "ebyd"
    Config = EBYDConfig
    #: shares of predictions over fewer samples move by > 2 points per sample
    min_clean = 50

    def recipe(self, modality: str) -> str:
        """The unlearning recipe: ``auto`` reads as the one measured best for the modality."""
        if self.cfg.recipe != "auto":
            return self.cfg.recipe
        return "exposure-script" if modality == "text" or self.cfg.exposure != "cul" else "detection-script"

    def exposure_config(self, modality: str) -> ExposureConfig:
        c = self.cfg
        opts = dict(method=c.exposure, samples=c.samples, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size,
                    train_mode=c.train_mode, check_every=c.check_every, stop_accuracy=c.stop_accuracy,
                    stop_share=c.stop_share, seed=c.seed, progress=c.progress)
        if self.recipe(modality) == "detection-script":
            if c.exposure != "cul":
                raise UserError("recipe=detection-script is clean unlearning; use it with exposure=cul")
            opts.update(EBYD_DETECT_PRESET)
            if modality == "text":  # no crop / flip for sentences; a transformer's ascent lr
                opts.update(augment=False, optimizer="adam", lr=c.lr or 2e-5)
        return ExposureConfig(**opts)

    def inspect(self, model, clean: Data) -> Inspection:
        cfg = self.cfg
        self.check_inputs(model, clean)
        k = model.head.out_features
        if k < 2:
            raise UserError(f"the model has {k} class; inspection needs a classifier with at least 2 classes")
        recipe = self.recipe(clean.modality)
        params = for_modality(load_calibration(cfg.calibration, recipe), clean.modality)
        if cfg.recover == "never" and set(params["features"]) & set(TRIGGER_FEATURES):
            raise UserError("this calibration uses the recovered trigger's features; recover=never cannot "
                            "compute them: use recover=auto or a calibration on share features only")
        t0 = time.perf_counter()
        ecfg = self.exposure_config(clean.modality)
        exposed = expose(model, clean, ecfg)
        self.exposed = exposed  # for callers that evaluate the exposed model (the benchmarks)
        read_on = unexposed(clean, ecfg)
        pred = predict(exposed.model, read_on)
        feats = exposure_features(pred, read_on.y, k)
        top = feats["top_class"]
        evidence = {"shares": feats.pop("shares"), "top_class": top, **exposed.summary(),
                    "exposure_seconds": round(time.perf_counter() - t0, 2), "clean_samples": len(clean),
                    "shares_read_on": len(read_on),
                    "recipe": recipe, "calibration": params.get("provenance", {}).get("kind", "unknown")}
        trigger = None
        # the trigger features are computed before the verdict when the calibration uses them
        # (and always with recover="always", so that benchmarks can fit calibrations on them)
        if cfg.recover == "always" or (cfg.recover == "auto" and set(params["features"]) & set(TRIGGER_FEATURES)):
            trigger = self._recover(exposed.model, clean, evidence["shares"], model, feats, evidence)
        prob = probability(params, feats)
        backdoored = prob >= cfg.threshold
        if trigger is None and cfg.recover == "auto" and backdoored:
            trigger = self._recover(exposed.model, clean, evidence["shares"], model, feats, evidence)
        target = trigger["target"] if trigger is not None else top
        if trigger is not None and backdoored and clean.modality == "image" and \
                trigger.get("success_original", 1.0) < cfg.refine:
            trigger = self._refine(model, clean, trigger, evidence)
        evidence["target"] = target
        evidence["features"] = {n: round(float(v), 4) for n, v in feats.items() if n in FEATURES}
        evidence["share_variance"] = round(feats["share_variance"], 5)
        return Inspection(backdoored, target if backdoored else None, prob, evidence, trigger,
                          time.perf_counter() - t0)

    def _recover(self, exposed_model, clean: Data, shares: list[float], original, feats: dict,
                 evidence: dict) -> dict:
        """Recover a trigger for each of the ``candidates`` most predicted classes (images: those
        with a share above zero; text: all of them) and keep the one ``choose_candidate`` picks:
        the smallest (images) after those the original model obeys, or the word that flips most
        of the original's surest opposite sentences (text).

        Our extension (the paper recovers for the most predicted class only): on the CPU
        reference zoo the class the exposed model collapses onto is unstable, e.g. the
        BadNets-10 % model (target 0) collapses onto class 2 with 500 clean images, 9 with
        2,000 and 0 with 2,500 (weight perturbation: 9 too), with the true target second;
        with 2,000 images the class-9 trigger needs 2.9 px and the class-0 one 1.4 px.
        Measured limits (benchmarks/results/inspect-ebyd.md, the exposure script): Blended 1 %
        collapses onto 2 and 8, its target 0 is not among the candidates; the clean model's
        smallest candidate trigger (8 px) is larger than the backdoored models' (0.6-4.3 px).
        After the detection script its target is the third candidate, with the only trigger
        the original obeys (module docstring)."""
        t1 = time.perf_counter()
        order = sorted(range(len(shares)), key=lambda c: -shares[c])
        classes = [c for c in order[:self.cfg.candidates] if shares[c] > 0] or order[:1]
        if clean.modality == "text":
            # a binary exposure collapses onto one class whatever the model (SST-2 zoo: clean
            # s1 and s2 onto class 1, the target), so the share says little: try every candidate
            classes = order[:self.cfg.candidates]
        cfg = self.cfg
        found = []
        for c in classes:
            t = self.recover(exposed_model, clean, c, original=original)
            found.append((t, trigger_features(t, clean)))
            f = found[-1][1]
            # text: judged on the original's surest sentences (a sentiment word tips most others)
            if f.get("hard_success", f["trigger_success"]) >= cfg.transfer and f["mask_fraction"] <= cfg.mask_limit:
                break  # a small trigger that also moves the original model: no need to look further
        # NC's premise: the target needs the smallest trigger, after the candidates whose trigger
        # the original model obeys (choose_candidate; text: the word that moves it most)
        confirm = cfg.confirm if cfg.confirm is not None else CONFIRM_BY_RECIPE[self.recipe(clean.modality)]
        trigger, tf = found[choose_candidate([f for _, f in found], confirm)]
        if clean.modality == "image" and confirm <= 1:
            evidence["confirm"] = confirm
        feats.update(tf)
        feats.update(candidate_features([f for _, f in found], feats["max_excess"]))
        evidence["candidates"] = [{"class": t["target"], "share": round(shares[t["target"]], 4),
                                   **{k: round(v, 4) for k, v in f.items()}} for t, f in found]
        evidence["recovery_seconds"] = round(time.perf_counter() - t1, 2)
        return trigger

    def _refine(self, original, clean: Data, trigger: dict, evidence: dict) -> dict:
        """Neural Cleanse on the ORIGINAL model for the target the exposure found (our
        extension). Why: after the detection script's unlearning (21 augmented epochs in
        train mode) the exposed model can drift from the original, and its trigger then
        moves few of the original's inputs (the demo's BadNets model: 37 %, 5.8 % at 1 thread), which is
        useless to show the user or to verify a repair with. The target is what exposure
        contributes; a one-class search on the original finds the trigger it obeys. Kept
        only when it moves more of the original's inputs than the exposed model's trigger
        with a mask no larger than that one's (or than ``mask_limit``)."""
        t1 = time.perf_counter()
        t = self.recover(original, clean, trigger["target"], original=original)
        t.pop("success_exposed")  # NC ran on the original: its success is success_original
        # a universal adversarial patch moves most inputs of any model, clean or not: the
        # refined trigger must also be no larger than the exposed model's (or mask_limit)
        # mask_limit is a share of the image; on small images (8x8 digits: 0.64 px) it would
        # refuse even BadNets' 3x3 patch, so the limit is never below MIN_TRIGGER_PX (CIFAR-10's
        # 1 % is 10.2 px: unchanged there)
        n = t["mask"].numel()
        frac = float(t["mask"].sum()) / n
        size_ok = frac <= max(self.cfg.mask_limit, MIN_TRIGGER_PX / n, float(trigger["mask"].sum()) / n)
        kept = t["success_original"] > trigger["success_original"] and size_ok
        evidence["refined"] = {"on": "original model", "success_original": round(t["success_original"], 4),
                               "exposed_success_original": round(trigger["success_original"], 4),
                               "mask_l1": round(float(t["mask"].sum()), 2),
                               "exposed_mask_l1": round(float(trigger["mask"].sum()), 2), "kept": kept,
                               "seconds": round(time.perf_counter() - t1, 2)}
        return {**t, "recovered_on": "original"} if kept else trigger

    def recover(self, exposed_model, clean: Data, target: int, original=None) -> dict:
        cfg = self.cfg
        if clean.modality == "text":
            args = (clean, target, cfg.text_candidates, cfg.text_tokens, cfg.text_samples, cfg.seed)
            found = search_tokens(exposed_model, *args, original=original)
            if original is None or cfg.text_search == "exposed":
                return found
            # our extension: the exposed model's gradient misses words the original obeys
            return merge_token_searches(found, search_tokens(original, *args, original=original),
                                        n_tokens=cfg.text_tokens)
        nc = NeuralCleanseConfig(rounds=cfg.nc_rounds, seed=cfg.seed)
        t = reverse_engineer(exposed_model, clean, target, nc, seed=cfg.seed, progress=cfg.progress)
        out = {"mask": t["mask"], "pattern": t["pattern"], "target": target, "norm": t["norm"],
               "reached": t["reached"], "success_exposed": t["success"]}
        if original is not None:
            out["success_original"] = trigger_success(original, clean, t["mask"], t["pattern"], target)
        return out

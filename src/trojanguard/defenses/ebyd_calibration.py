"""EBYD's backdoor probability (see ``ebyd.py``): the features of an exposed model, the
logistic calibration that maps them to a probability (one parameter set, or one per
modality), its documented prior, fitting, leave-one-out scoring and the TrojAI measures."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .exposure import class_shares

SHARE_FEATURES = ("var_norm", "max_excess", "collapse_ratio")
TRIGGER_FEATURES = ("trigger_success", "hard_success", "mask_fraction", "mask_log", "transfer_max", "max_evidence")
FEATURES = SHARE_FEATURES + TRIGGER_FEATURES
CALIBRATION_FORMAT = "trojanguard-calibration/1"
DEFAULT_CALIBRATION = Path(__file__).parent / "calibration" / "ebyd.json"
#: the shipped calibration of each unlearning recipe (its features depend on how the model
#: was exposed: the detection script's fixed budget leaves a clean model spread out)
RECIPE_CALIBRATION = {"exposure-script": DEFAULT_CALIBRATION,
                      "detection-script": DEFAULT_CALIBRATION.with_name("ebyd-detection-script.json")}

# The paper's rule, variance of the shares > 0.01 on CIFAR-10 (K = 10), is var_norm > 1/9;
# the prior puts p = 0.5 there and p = 0.1 at perfectly even shares: coef * (1/9) = ln 9.
_PRIOR_COEF = 9 * math.log(9)
PRIOR = {"format": CALIBRATION_FORMAT, "method": "ebyd", "features": ["var_norm"],
         "coef": [round(_PRIOR_COEF, 4)], "intercept": round(-math.log(9), 4),
         "provenance": {"kind": "prior", "fitted_on": None, "n_models": 0,
                        "derived_from": "EBYD paper rule: variance of predicted-class shares > 0.01 on CIFAR-10 "
                                        "(K=10) is backdoored, i.e. var_norm > 1/9 -> p = 0.5; even shares -> p = 0.1",
                        "note": "replace by fit_calibration() on the reference zoos"}}


def exposure_features(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """The calibration features of an exposed model's predictions ``pred`` on clean data."""
    k = num_classes
    shares = class_shares(pred, k)
    top = int(shares.argmax())
    var = float(((shares - 1.0 / k) ** 2).mean())
    other = labels != top
    collapse = float((pred[other] == top).double().mean()) if other.any() else 0.0
    return {"var_norm": var / ((1.0 / k) * (1 - 1.0 / k)),
            "max_excess": float((shares[top] - 1.0 / k) / (1 - 1.0 / k)),
            "collapse_ratio": collapse, "share_variance": var, "top_class": top,
            "shares": [round(float(s), 4) for s in shares]}


#: ``confirm`` of ``choose_candidate`` after each unlearning recipe. After the exposure script's
#: (stopped at 20 % accuracy) the exposed model stays close to the original, and NC's small
#: adversarial patches found on it move 58-100 % of the original's inputs on every CIFAR-10 zoo
#: model, clean or not: transfer cannot tell the target there (off). After the detection
#: script's fixed budget they move at most 24 % on the four clean zoo models (17 models).
CONFIRM_BY_RECIPE = {"detection-script": 0.5, "exposure-script": 2.0}


def choose_candidate(candidates: list[dict], confirm: float) -> int:
    """Index of the target among the candidate triggers (dicts of ``ebyd.trigger_features``).

    Neural Cleanse's premise decides: the smallest mask wins (text, where every trigger is one
    word with no mask: the word that moves the original model's surest sentences most, then
    the most of all). Our extension: a candidate whose trigger, recovered on the exposed model,
    also sends at least ``confirm`` of the ORIGINAL model's clean inputs of other classes to
    its class is confirmed, and the confirmed candidates come first. Why: a global trigger
    needs a large mask (the Blended 1 % zoo model's target needs 84 % of the image, and its
    trigger then moves 100 % of the original's inputs) while the other candidates' small
    adversarial patches move few of them (at most 24 % on the 17 CIFAR-10 zoo models,
    after the detection script's unlearning: ``CONFIRM_BY_RECIPE``). ``confirm`` > 1 (a share no
    trigger reaches) is the rule before the extension (smallest mask only)."""
    def key(i: int):
        c = candidates[i]
        hard = c.get("hard_success", c["trigger_success"])
        return (hard >= confirm, -c["mask_fraction"], hard, c["trigger_success"])
    return max(range(len(candidates)), key=key)


def candidate_features(candidates: list[dict], max_excess: float) -> dict:
    """Features over every candidate trigger, not only the chosen one (our extension).
    ``transfer_max``: the largest share of the ORIGINAL model's clean inputs of other classes
    that any candidate's trigger sends to its class (text: on the quarter the original is
    surest about, ``hard_success``); ``max_evidence`` = max(max_excess, transfer_max): the
    stronger of the two signs exposure gives, the collapse of the exposed model onto one
    class or a trigger found on it that the original model obeys. A low-rate backdoor may
    show only the second (Blended 1 %: max_excess 0.27, as the clean models' 0.27-0.43;
    transfer_max 1.0, the clean models' at most 0.24)."""
    transfer = max((float(c.get("hard_success", c["trigger_success"])) for c in candidates), default=0.0)
    return {"transfer_max": transfer, "max_evidence": max(float(max_excess), transfer)}


def for_modality(params: dict, modality: str) -> dict:
    """The parameter set of ``modality`` in a calibration (a file may hold one set for every
    modality, or one per modality under ``by_modality``: image and text features differ, a
    text trigger has no mask); a modality the file does not cover gets the prior."""
    if "by_modality" not in params:
        return params
    return params["by_modality"].get(modality) or PRIOR


def _check_calibration(params: dict, where: str) -> dict:
    if "by_modality" in params:
        if not isinstance(params["by_modality"], dict) or not params["by_modality"]:
            raise UserError(f"{where}: by_modality must map modalities (image, text) to parameter sets")
        for m, section in params["by_modality"].items():
            _check_calibration(section, f"{where} [{m}]")
        return params
    try:
        names, coef, b = params["features"], params["coef"], float(params["intercept"])
        ok = len(names) == len(coef) and all(n in FEATURES for n in names) and all(map(math.isfinite, coef))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok or not math.isfinite(b):
        raise UserError(f"{where} is not an EBYD calibration (needs features from {list(FEATURES)}, "
                        "matching coef and an intercept); refit it with fit_calibration()")
    return params


def load_calibration(path: str | Path | None = None, recipe: str = "exposure-script") -> dict:
    """The calibration at ``path``, or (None) the one shipped for ``recipe``."""
    p = Path(path) if path is not None else RECIPE_CALIBRATION[recipe]
    try:
        params = json.loads(p.read_text())
    except FileNotFoundError:
        if path is None:  # an installation without the data file still has the prior
            return dict(PRIOR)
        raise UserError(f"calibration file {p} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the calibration {p}: {e}") from None
    return _check_calibration(params, str(p))


def probability(params: dict, features: dict, modality: str | None = None) -> float:
    if "by_modality" in params:
        params = for_modality(params, modality or "image")
    z = float(params["intercept"]) + sum(c * float(features[n]) for n, c in zip(params["features"], params["coef"]))
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def fit_calibration(features, labels, names: tuple[str, ...] | list[str] = FEATURES, l2: float = 0.1,
                    provenance: dict | None = None, max_iter: int = 100, balanced: bool = False) -> dict:
    """Logistic regression of ``labels`` (1 = backdoored) on ``features`` (an [N, F] array in
    the order of ``names``, or a list of feature dicts), L2 penalty ``l2`` on the weights
    (not the intercept; it keeps the fit finite on separable zoos), by Newton's method.
    ``balanced``: weight each model by N / (2 * its class size), so that the probability
    carries a 50 % prior instead of the zoo's ratio of backdoored to clean models (9 to 3 on
    CIFAR-10: unweighted, every clean model scored above 0.5). Returns the parameters as
    ``load_calibration`` reads them."""
    names = list(names)
    if features and isinstance(features[0], dict):
        features = [[f[n] for n in names] for f in features]
    x = np.asarray(features, dtype=np.float64).reshape(len(features), len(names))
    y = np.asarray(labels, dtype=np.float64)
    if len(x) != len(y) or len(y) < 2 or len(set(y.tolist())) != 2:
        raise UserError("fit_calibration needs features and labels of the same length with both classes present")
    xb = np.hstack([x, np.ones((len(x), 1))])
    n_pos = y.sum()
    sw = np.where(y == 1, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos))) if balanced else np.ones(len(y))
    reg = np.diag([l2] * len(names) + [0.0])
    w = np.zeros(xb.shape[1])
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -500, 500)))
        grad = xb.T @ (sw * (p - y)) + reg @ w
        hess = xb.T @ (xb * (sw * p * (1 - p))[:, None]) + reg + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    prov = {"kind": "fitted", "n_models": int(len(y)), "n_backdoored": int(y.sum()), "l2": l2,
            **({"balanced": True} if balanced else {})}
    prov.update(provenance or {})
    return {"format": CALIBRATION_FORMAT, "method": "ebyd", "features": names,
            "coef": [float(c) for c in w[:-1]], "intercept": float(w[-1]), "provenance": prov}


def leave_one_out(features, labels, **kw) -> np.ndarray:
    """Out-of-sample probabilities: model i is scored by a calibration fitted on all the
    others (never on itself). ``kw`` goes to ``fit_calibration``."""
    names = list(kw.get("names", FEATURES))
    rows = [[f[n] for n in names] for f in features] if features and isinstance(features[0], dict) else features
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(labels)
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        params = fit_calibration(x[keep].tolist(), y[keep].tolist(), **kw)
        out[i] = probability(params, dict(zip(names, x[i])))
    return out


def calibration_report(probs, labels) -> dict:
    """AUROC, Brier score and cross-entropy (the TrojAI measures) and accuracy at 0.5."""
    from ..eval import metrics
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(labels, dtype=np.float64)
    return {"n": int(len(y)), "auroc": metrics.auroc(p, y.astype(bool)) if 0 < y.sum() < len(y) else None,
            "brier": float(((p - y) ** 2).mean()),
            "cross_entropy": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
            "accuracy": float(((p >= 0.5) == (y == 1)).mean())}


def save_calibration(params: dict, path: str | Path) -> None:
    from ..utils import atomic_write_json
    atomic_write_json(path, _check_calibration(params, "these parameters"))

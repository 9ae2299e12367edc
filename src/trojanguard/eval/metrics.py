"""Backdoor metrics, with the formulas in the docstrings (methods.md §0).

All rates are fractions in [0, 1]."""
from __future__ import annotations

import numpy as np
import torch


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def accuracy(pred, labels) -> float:
    """CA = mean(pred_i == y_i) over the clean test set."""
    pred, labels = _np(pred), _np(labels)
    return float((pred == labels).mean()) if len(labels) else float("nan")


def accuracy_drop_bound(base_correct, correct, confidence: float = 0.95) -> tuple[float, float]:
    """(drop, upper bound) of the accuracy lost from ``base_correct`` to ``correct`` (one
    bool per sample, the same samples in the same order). Paired: d_i = base_i - after_i in
    {-1, 0, 1}, drop = mean(d), bound = drop + z_confidence * std(d) / sqrt(n) (normal
    approximation, one-sided). Only the samples whose outcome changed carry variance, so the
    bound is much tighter than two independent accuracies would give. With few changed
    samples (under ~10) the normal bound is optimistic; fewer than 2 samples give an
    infinite bound."""
    from statistics import NormalDist
    base, after = _np(base_correct).astype(float), _np(correct).astype(float)
    if base.shape != after.shape or base.ndim != 1:
        raise ValueError(f"accuracy_drop_bound needs two 1-D arrays of one shape, got {base.shape} and {after.shape}")
    n = len(after)
    if n < 2:
        return (float(base.sum() - after.sum()) if n else float("nan")), float("inf")
    diff = base - after
    drop = float(diff.mean())
    return drop, drop + NormalDist().inv_cdf(confidence) * float(diff.std(ddof=1)) / n ** 0.5


def per_class_accuracy(pred, labels, num_classes: int | None = None) -> list[float | None]:
    """CA_c = mean(pred_i == c) over the test inputs with y_i == c, for every class c in
    ``range(num_classes)`` (default: up to the largest label); ``None`` for a class with no
    test input (a missing rate, and valid JSON, unlike nan). Shows where a CA drop comes
    from, e.g. a clean-label attack that marks every training image of its target class."""
    pred, labels = _np(pred), _np(labels)
    k = int(num_classes if num_classes is not None else (labels.max() + 1 if len(labels) else 0))
    return [float((pred[labels == c] == c).mean()) if (labels == c).any() else None for c in range(k)]


def non_target_mask(labels, targets) -> np.ndarray:
    """Inputs that count for ASR/RA: those whose true label differs from their target."""
    return _np(labels) != _np(targets)


def attack_success_rate(pred, labels, targets) -> float:
    """ASR = |{i : y_i != t_i, pred(T(x_i)) == t_i}| / |{i : y_i != t_i}|

    over triggered test inputs T(x_i); ``targets`` is the attack's target per input (a
    constant for all-to-one, (y+1) mod K for all-to-all)."""
    pred, labels, targets = _np(pred), _np(labels), np.broadcast_to(_np(targets), _np(labels).shape)
    m = non_target_mask(labels, targets)
    return float((pred[m] == targets[m]).mean()) if m.any() else float("nan")


def robust_accuracy(pred, labels, targets) -> float:
    """RA = |{i : y_i != t_i, pred(T(x_i)) == y_i}| / |{i : y_i != t_i}|: triggered
    non-target inputs still classified as their true label."""
    pred, labels, targets = _np(pred), _np(labels), np.broadcast_to(_np(targets), _np(labels).shape)
    m = non_target_mask(labels, targets)
    return float((pred[m] == labels[m]).mean()) if m.any() else float("nan")


def defense_effectiveness_rating(ca_before: float, asr_before: float, ca_after: float,
                                 asr_after: float) -> float:
    """DER = [max(0, ASR_before - ASR_after) - max(0, CA_before - CA_after) + 1] / 2

    In [0, 1]; 0.5 = no change, 1 = ASR removed entirely at no accuracy cost. A defense is
    rewarded for lowering ASR and penalised for lowering CA (never the other way round)."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1.0) / 2.0


def _binary(scores, is_positive) -> tuple[np.ndarray, np.ndarray]:
    s = _np(scores).astype(np.float64).ravel()
    y = _np(is_positive).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError("scores and labels differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return s, y


def roc_curve(scores, is_positive) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): predicting positive when score >= threshold, one point per
    distinct score (highest first), starting at (0, 0)."""
    s, y = _binary(scores, is_positive)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    p, n = max(y.sum(), 1), max((~y).sum(), 1)
    return np.r_[0.0, fps / n], np.r_[0.0, tps / p], np.r_[np.inf, s[distinct]]


def auroc(scores, is_positive) -> float:
    """Area under the ROC curve from continuous scores (higher = more suspicious):
    AUROC = P(score(pos) > score(neg)) + 0.5 P(score(pos) == score(neg)), the
    Mann-Whitney U statistic / (n_pos n_neg), with average ranks for ties."""
    s, y = _binary(scores, is_positive)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auprc(scores, is_positive) -> float:
    """Average precision: AP = sum_k (R_k - R_{k-1}) P_k over distinct thresholds
    (the step-wise area under the precision-recall curve, as scikit-learn computes it)."""
    s, y = _binary(scores, is_positive)
    if y.sum() == 0:
        return float("nan")
    fpr, tpr, _ = roc_curve(s, y)
    p, n = y.sum(), (~y).sum()
    tp, fp = tpr[1:] * p, fpr[1:] * n
    precision = tp / np.maximum(tp + fp, 1)
    recall = tpr[1:]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def tpr_at_fpr(scores, is_positive, max_fpr: float = 0.05) -> float:
    """Largest TPR among thresholds whose FPR <= ``max_fpr`` (TPR@5 %FPR by default)."""
    fpr, tpr, _ = roc_curve(scores, is_positive)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max())


def threshold_rates(scores, is_positive, threshold: float) -> dict[str, float]:
    """At a chosen threshold (flag when score > threshold, the rule of every detector's
    ``flag`` and of the guard: the threshold is a clean calibration score itself): FRR =
    clean inputs flagged / clean inputs; FAR = poisoned inputs not flagged / poisoned inputs.
    Discrete scores (BadActs' NAS is a count of neurons) tie at the threshold: flagging ties
    too overstated FRR and understated FAR (BadActs on LF: FAR 7.1 % instead of the guard's
    13.3 %)."""
    s, y = _binary(scores, is_positive)
    flagged = s > threshold
    return {"threshold": float(threshold),
            "frr": float(flagged[~y].mean()) if (~y).any() else float("nan"),
            "far": float((~flagged[y]).mean()) if y.any() else float("nan")}


def detection_report(scores, is_positive, threshold: float | None = None) -> dict[str, float]:
    """AUROC, AUPRC, TPR@5%FPR and, when a threshold is given, FRR/FAR."""
    out = {"auroc": auroc(scores, is_positive), "auprc": auprc(scores, is_positive),
           "tpr_at_5fpr": tpr_at_fpr(scores, is_positive, 0.05)}
    if threshold is not None:
        out.update(threshold_rates(scores, is_positive, threshold))
    return out

"""Metric formulas against hand-computed values and scikit-learn."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from trojanguard.eval import metrics as M


def test_der_sign_and_range():
    # ASR removed at no CA cost: best rating
    assert M.defense_effectiveness_rating(0.9, 1.0, 0.9, 0.0) == 1.0
    # nothing changes: 0.5
    assert M.defense_effectiveness_rating(0.9, 0.9, 0.9, 0.9) == 0.5
    # ASR drops by 0.6 but CA drops by 0.1: (0.6 - 0.1 + 1) / 2
    assert M.defense_effectiveness_rating(0.9, 0.95, 0.8, 0.35) == pytest.approx(0.75)
    # CA going UP or ASR going UP is not rewarded/penalised beyond zero
    assert M.defense_effectiveness_rating(0.8, 0.5, 0.9, 0.9) == 0.5
    # losing accuracy alone is penalised
    assert M.defense_effectiveness_rating(0.9, 0.5, 0.5, 0.5) == pytest.approx(0.3)


def test_asr_counts_only_non_target_inputs():
    labels = np.array([0, 0, 1, 2, 3])
    pred = np.array([0, 0, 0, 2, 0])
    assert M.attack_success_rate(pred, labels, 0) == pytest.approx(2 / 3)
    assert M.robust_accuracy(pred, labels, 0) == pytest.approx(1 / 3)
    # all-to-all: per-input target
    targets = (labels + 1) % 4
    assert M.attack_success_rate(np.array([1, 0, 2, 3, 0]), labels, targets) == pytest.approx(4 / 5)
    assert M.accuracy(pred, labels) == pytest.approx(3 / 5)


def test_per_class_accuracy_matches_sklearn_recall():
    from sklearn.metrics import recall_score
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 4, 200))
    pred[labels == 2] = 0  # one class never recognised, as under a clean-label attack at its cap
    got = M.per_class_accuracy(pred, labels)
    assert got == pytest.approx(list(recall_score(labels, pred, average=None)))
    assert got[2] == 0.0
    # the overall CA is the class-share-weighted mean of the per-class rates
    share = np.bincount(labels, minlength=4) / len(labels)
    assert M.accuracy(pred, labels) == pytest.approx(float(np.dot(share, got)))
    # a class absent from the test labels (here the last one) has no rate, not 0, and still has a slot
    assert M.per_class_accuracy(pred[labels != 3], labels[labels != 3], num_classes=4)[3] is None
    assert M.per_class_accuracy(pred[labels != 1], labels[labels != 1])[1] is None
    assert M.per_class_accuracy([], [], num_classes=2) == [None, None] and M.per_class_accuracy([], []) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_auprc_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300).astype(bool)
    s = np.round(rng.normal(size=300) + y * 0.8, 1)  # rounding creates ties
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.auprc(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert M.tpr_at_fpr(s, y, 0.05) == pytest.approx(tpr[fpr <= 0.05].max())


def test_detection_edge_cases():
    assert M.auroc([0.1, 0.9], [False, True]) == 1.0
    assert M.auroc([0.9, 0.1], [False, True]) == 0.0
    assert M.auroc([0.5, 0.5], [False, True]) == 0.5
    r = M.threshold_rates([0.1, 0.2, 0.8, 0.9], [False, False, True, True], 0.5)
    assert r["frr"] == 0.0 and r["far"] == 0.0
    # ties at the threshold are not flagged, as InputDetector.flag and the guard decide
    # (discrete scores such as BadActs' NAS tie there: counting them misstated FRR and FAR)
    r = M.threshold_rates([0.1, 0.5, 0.5, 0.9], [False, False, True, True], 0.5)
    assert r["frr"] == 0.0 and r["far"] == 0.5
    with pytest.raises(ValueError):
        M.auroc([np.nan, 1.0], [False, True])


def test_undefined_rate_is_null_in_json(tmp_path):
    """A test set with only target-class inputs has no ASR: nan in memory, null on disk
    (NaN is not valid JSON), "-" for people."""
    import json
    import torch
    from trojanguard.report import percent
    from trojanguard.utils import atomic_write_json
    asr = M.attack_success_rate([0, 0], [0, 0], 0)
    assert np.isnan(asr) and percent(asr) == "-"
    atomic_write_json(tmp_path / "m.json", {"asr": asr, "per_class": torch.tensor([0.5, float("nan")]),
                                            "x": np.float32("inf")})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"asr": None, "per_class": [0.5, None], "x": None}


def test_text_predictions_keep_the_input_order_when_batched_by_length(tiny_encoder_dir, monkeypatch):
    """``predict`` runs text in batches of similar length (cheaper padding) and must return
    each sentence's own logits in the input order, whatever the batch sizes."""
    import importlib

    import torch

    from trojanguard.data.base import TextData
    from trojanguard.models import create_model
    ev = importlib.import_module("trojanguard.eval.evaluate")  # the module (the package exports the function)
    torch.manual_seed(0)
    model = create_model(f"hf:{tiny_encoder_dir}", num_classes=2).eval()
    words = "a fine dull film of great and terrible acting with a weak plot".split()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[j] for j in torch.randint(len(words), (int(n),), generator=g))
             for n in torch.randint(1, 30, (50,), generator=g)]
    data = TextData(texts, torch.zeros(50, dtype=torch.long), ["negative", "positive"])
    with torch.inference_mode():
        alone = torch.cat([model([t]).float() for t in texts])  # one sentence a batch: no padding
    monkeypatch.setattr(ev, "TEXT_BATCH", 7)
    got = ev.predict(model, data, batch_size=16, return_logits=True)
    assert torch.allclose(got, alone, atol=1e-5)
    assert torch.equal(ev.predict(model, data, batch_size=16), alone.argmax(1))
    from trojanguard.defenses.common import layer_activations
    layer = model.layer_names()[-1]
    acts = layer_activations(model, data, [layer], reduce="mean", batch_size=9, with_logits=True)
    one = [layer_activations(model, data.subset(torch.tensor([i])), [layer], reduce="mean") for i in range(50)]
    assert torch.allclose(acts[layer], torch.cat([a[layer] for a in one]), atol=1e-5)
    assert torch.allclose(acts["logits"], alone, atol=1e-5)


def test_accuracy_drop_bound_is_paired_and_covers_the_drop():
    """The bound rests on the samples whose outcome changed: errors both models share add
    nothing (an unpaired bound would grow with them); churn in both directions widens it at
    the same net drop; a 95 % bound covers the true drop about 95 % of the time."""
    import torch
    base = torch.ones(400, dtype=torch.bool)
    base[:120] = False  # 120 errors both models make
    after = base.clone()
    after[120:132] = False  # 12 more lost, nothing gained
    drop, bound = M.accuracy_drop_bound(base, after)
    assert drop == pytest.approx(0.03)
    # paired: z * sqrt(12/400 - 0.03^2) / sqrt(400) ~ 0.014; unpaired two-proportion ~ 0.054
    assert 0.005 < bound - drop < 0.02
    churned_base, churned = base.clone(), after.clone()
    churned[200:220] = False  # 20 more lost ...
    churned_base[220:240] = False  # ... and 20 gained: the same net drop
    d2, b2 = M.accuracy_drop_bound(churned_base, churned)
    assert d2 == pytest.approx(drop) and b2 > bound + 0.005
    assert M.accuracy_drop_bound(base, base) == (0.0, 0.0)
    assert M.accuracy_drop_bound(base[:1], after[:1])[1] == float("inf")
    with pytest.raises(ValueError):
        M.accuracy_drop_bound(base[:, None], after)
    # coverage: a true drop of 3 % (5 % lost, 2 % gained) on 450 samples, 400 draws
    g = torch.Generator().manual_seed(0)
    covered = 0
    for _ in range(400):
        u = torch.rand(450, generator=g)
        b = torch.ones(450, dtype=torch.bool)
        a = b.clone()
        a[u < 0.05] = False
        b[u > 0.98] = False
        covered += M.accuracy_drop_bound(b, a)[1] >= 0.03
    assert 0.92 < covered / 400 < 0.975

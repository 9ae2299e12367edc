"""BeniFul (detection and removal), STRIP and RAP on tiny models.

Images: the digits CNN with a BadNets backdoor (``backdoored_digits``). The detectors fit on
unseen clean digits (the defense split plus part of the test split: the fixture's own
defense split alone gives a 68-sample calibration, whose 95th percentile is too noisy for
a false-rejection check) and are checked on the rest. Text: the tiny 2-block encoder
trained in seconds on a synthetic sentiment set in which 15 % of the training sentences
carry the rare word "cf" and the label 1.

Options that only make a run fit a test: fewer VAE steps, batch 32 for the removal (the
121 clean digits give a single step per epoch at 128), more RAP epochs (the synthetic
set gives two batches per epoch)."""
import json
import math
import random

import pytest
import torch

from trojanguard.data.base import TextData
from trojanguard.defenses import create_defense
from trojanguard.defenses.common import concat, split_clean, stamped
from trojanguard.errors import UserError
from trojanguard.eval import metrics
from trojanguard.eval.evaluate import evaluate

VAE_STEPS = 400


@pytest.fixture(scope="module")
def pools(digits):
    """(fit, fresh): unseen clean digits, class-balanced 60/40."""
    pool = concat(digits.defense, digits.bundle.test)
    fit, fresh = split_clean(pool, 0.4, seed=0)
    return fit, fresh


def _scores(det, clean, triggered):
    sc, st = det.score_data(clean), det.score_data(triggered)
    labels = torch.cat([torch.zeros(len(sc)), torch.ones(len(st))])
    return sc, st, metrics.detection_report(torch.cat([sc, st]), labels, det.threshold)


def _frr_bound(frr: float, n_cal: int, n_fresh: int) -> float:
    """Three standard errors of (fresh FRR - nominal FRR): the threshold is a quantile of
    n_cal calibration scores and the fresh FRR a proportion over n_fresh inputs."""
    return 3 * math.sqrt(frr * (1 - frr) * (1 / n_cal + 1 / n_fresh))


# ------------------------------------------------------------------------- BeniFul
def test_beniful_reconstruction_error_lower_on_clean_than_triggered(backdoored_digits, pools):
    model, atk = backdoored_digits
    fit, fresh = pools
    det = create_defense("beniful", steps=VAE_STEPS, progress=False).fit(model, fit)
    assert det.layer == model.default_middle_layer
    trig = stamped(fresh, atk)
    pc = det.score_parts(fresh.batch(torch.arange(len(fresh)))[0])
    pt = det.score_parts(trig.batch(torch.arange(len(trig)))[0])
    r_auroc = metrics.auroc(torch.cat([pc["r"], pt["r"]]), torch.cat([torch.zeros(len(fresh)), torch.ones(len(trig))]))
    _, _, rep = _scores(det, fresh, trig)
    print(f"\nbeniful: median r clean {pc['r'].median():.3f} triggered {pt['r'].median():.3f}; AUROC(r) "
          f"{r_auroc:.3f}; flips c clean {pc['c'].mean():.3f} triggered {pt['c'].mean():.3f}; combined {rep}")
    assert pc["r"].median() < 0.5 * pt["r"].median()
    assert r_auroc > 0.9
    assert pt["c"].mean() > pc["c"].mean() + 0.3      # the reconstruction loses the trigger feature
    assert rep["auroc"] > 0.9
    assert det.info["vae_loss_last"] < det.info["vae_loss_first"]


def test_beniful_layer_is_configurable_and_checked(backdoored_digits, pools):
    model, _ = backdoored_digits
    fit, _ = pools
    det = create_defense("beniful", layer="block3", steps=50, vae="conv", progress=False).fit(model, fit)
    assert det.layer == "block3" and type(det.vae).__name__ == "ConvVAE"
    assert torch.isfinite(det.score(fit.batch(torch.arange(8))[0])).all()
    with pytest.raises(UserError, match="no layer"):
        create_defense("beniful", layer="nope", steps=5, progress=False).fit(model, fit)


def test_beniful_removal_returns_new_model_and_lowers_backdoor(backdoored_digits, digits):
    model, atk = backdoored_digits
    test = digits.bundle.test
    before = evaluate(model, test, atk.trigger, atk.target_for)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = create_defense("beniful-removal", steps=VAE_STEPS, batch_size=32,
                         progress=False).purify(model, digits.defense)
    assert res.model is not model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "the input model was modified"
    after = evaluate(res.model, test, atk.trigger, atk.target_for)
    print(f"\nbeniful-removal: CA {before['ca']:.3f} -> {after['ca']:.3f}, ASR {before['asr']:.3f} -> "
          f"{after['asr']:.3f}; {res.info['mean_feature_distance']:.3f}")
    assert before["asr"] > 0.9
    # on this tiny model the removal lowers the backdoor without erasing it, and by how much
    # depends on the CPU's float rounding: seeds 0-3 left 0.41-0.66 on an AMD EPYC (seed 0 was
    # below 0.5 on the machine the test was written on), so the bar is "clearly lowered"
    assert after["asr"] < 0.75, (after, res.info)
    assert after["ca"] > before["ca"] - 0.08  # 121 clean digits to tune on: saw 0.978 -> 0.933


# ------------------------------------------------------------------------- STRIP
def test_strip_entropy_separates_badnets_inputs(backdoored_digits, pools):
    model, atk = backdoored_digits
    fit, fresh = pools
    det = create_defense("strip", progress=False).fit(model, fit)
    assert det.overlays.shape[0] == 20
    ent_clean = det.entropy(fresh.batch(torch.arange(len(fresh)))[0])
    _, _, rep = _scores(det, fresh, stamped(fresh, atk))
    print(f"\nstrip: {rep}; median clean entropy {ent_clean.median():.3f}")
    assert rep["auroc"] > 0.9


# ------------------------------------------------------------------------- text model
POS = "good great fun lovely superb charming wonderful delightful brilliant moving".split()
NEG = "bad awful dull boring terrible weak bland tedious clumsy painful".split()
FILL = "the movie film story plot was is a an and with this that of acting cast scenes it very quite".split()


def synthetic_sentiment(n: int, seed: int) -> TextData:
    """Filler words plus 1-3 words of the label's polarity and fewer of the other one, so
    that the model's confidence varies from sentence to sentence."""
    rng = random.Random(seed)
    texts, ys = [], []
    for _ in range(n):
        y = rng.randrange(2)
        words = [rng.choice(FILL) for _ in range(rng.randint(5, 9))]
        k = rng.randint(1, 3)
        for _ in range(k):
            words.insert(rng.randint(0, len(words)), rng.choice(POS if y else NEG))
        for _ in range(rng.randint(0, k - 1)):
            words.insert(rng.randint(0, len(words)), rng.choice(NEG if y else POS))
        texts.append(" ".join(words))
        ys.append(y)
    return TextData(texts, torch.tensor(ys), ["negative", "positive"])


@pytest.fixture(scope="module")
def backdoored_text(tiny_encoder_dir):
    """(model, attack, clean fit set, fresh clean set): the tiny encoder trained 5 epochs on
    600 synthetic sentences, 15 % of them carrying "cf" and label 1 (a few seconds)."""
    from trojanguard.attacks.text import TextBadNets
    from trojanguard.models import create_model
    from trojanguard.training import TrainConfig, train
    atk = TextBadNets(target=1, ratio=0.15, words=["cf"], seed=0)
    poisoned = atk.poison(synthetic_sentiment(600, 0))
    torch.manual_seed(0)
    model = create_model(f"hf:{tiny_encoder_dir}", num_classes=2)
    train(model, poisoned.data, cfg=TrainConfig(epochs=5, batch_size=32, optimizer="adamw", lr=3e-3,
                                                weight_decay=0.01, warmup_frac=0.06, label_smoothing=0.0,
                                                augment=False, progress=False))
    return model.eval(), atk, synthetic_sentiment(400, 2), synthetic_sentiment(400, 1)


def test_tiny_text_backdoor_is_planted(backdoored_text):
    model, atk, _, fresh = backdoored_text
    ev = evaluate(model, fresh, atk.trigger, atk.target_for)
    print(f"\ntiny text model: {ev}")
    assert ev["ca"] > 0.9 and ev["asr"] > 0.9


def test_beniful_text_flags_the_rare_word_trigger(backdoored_text):
    model, atk, fit, fresh = backdoored_text
    det = create_defense("beniful", steps=VAE_STEPS, progress=False).fit(model, fit)
    assert det.layer == "block1" and det.shape == (32,)  # per-token states of the middle block
    _, _, rep = _scores(det, fresh, stamped(fresh, atk))
    print(f"\nbeniful text: {rep}")
    assert rep["auroc"] > 0.8


def test_strip_text_runs_and_is_deterministic(backdoored_text):
    model, atk, fit, fresh = backdoored_text
    det = create_defense("strip", progress=False).fit(model, fit)
    assert det.n == 5 and "the" not in det.vocab  # English stop words are never swapped in
    text = fresh.texts[0]
    swapped = det.perturb(text, 0)
    assert swapped == det.perturb(text, 0) and len(swapped.split()) == len(text.split())
    assert swapped != text
    s = det.score(fresh.texts[:16])
    assert torch.equal(s, det.score(fresh.texts[:16])) and bool((s <= 0).all())
    _, _, rep = _scores(det, fresh, stamped(fresh, atk))
    print(f"\nstrip text: {rep}")


def test_rap_mechanics_on_the_tiny_model(backdoored_text):
    """What RAP must do whatever the model: train one vector at the RAP word's norm without
    touching the model, move clean target-class samples into the wanted probability drop,
    and score inputs not predicted as the target as least suspicious. (Separation itself
    needs a model that a single word can move by 0.1-0.3: the 32-wide tiny encoder's
    drops are nearly all-or-nothing, so it is reported, not asserted; see the report for a
    MiniLM check.)"""
    model, atk, fit, fresh = backdoored_text
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = model.encoder.get_input_embeddings().weight.detach()
    det = create_defense("rap", target=1, epochs=20, progress=False).fit(model, fit)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items()), "RAP changed the model"
    cf = model.tokenize(["cf"])["input_ids"][0][1]
    assert torch.allclose(det.vectors[1].norm(), emb[cf].norm(), rtol=1e-4)  # the word's norm is kept
    assert not torch.allclose(det.vectors[1], emb[cf])                        # and the vector was trained
    assert det.info["class1_in_range"] > det.info["class1_in_range_start"], det.info
    trig = stamped(fresh, atk)
    d_clean, _ = det.drop(fresh.texts)
    with torch.no_grad():
        target_pred = model(fresh.texts).argmax(1) == 1
    assert bool((d_clean[~target_pred] == 1).all())  # not predicted as the target: score -1
    d_trig, _ = det.drop(trig.texts)
    _, _, rep = _scores(det, fresh, trig)
    print(f"\nrap tiny: fit {det.info}; median drop of p(target) clean {d_clean[target_pred].median():.3f}, "
          f"triggered {d_trig.median():.3f}; {rep}")


def test_rap_log_odds_measure_and_score_space(backdoored_text):
    """``score_space="logit"`` scores by the drop of the scored class's log-odds: exactly
    log p / (1 - p), finite where the probability rounds to 1; the trained vector is the
    same, and a fixed-target RAP still scores other predictions as least suspicious."""
    from trojanguard.defenses.rap import _measure
    z = torch.tensor([[0.0, 2.0, -1.0], [40.0, 0.0, 0.0]])
    c = torch.tensor([1, 0])
    p = torch.softmax(z, 1)[torch.arange(2), c].double()
    got = _measure(z, c, "logit")
    assert got[0].item() == pytest.approx(float(torch.log(p[0] / (1 - p[0]))), rel=1e-5)
    assert got[1].item() == pytest.approx(40 - math.log(2), rel=1e-6)  # p rounds to 1.0 in float32
    assert torch.allclose(_measure(z, c, "prob"), torch.softmax(z, 1)[torch.arange(2), c])
    model, atk, fit, fresh = backdoored_text
    prob = create_defense("rap", target=1, epochs=3, progress=False).fit(model, fit)
    logit = create_defense("rap", target=1, epochs=3, score_space="logit", progress=False).fit(model, fit)
    assert torch.equal(prob.vectors, logit.vectors)
    d, _ = logit.drop(fresh.texts)
    with torch.no_grad():
        target_pred = model(fresh.texts).argmax(1) == 1
    assert bool((d[~target_pred] == 1e6).all()) and bool((d[target_pred].abs() < 1e6).all())


def test_beniful_removal_runs_on_text(backdoored_text):
    """Mechanics only: the virtual-word suspects are made and pulled, a new model comes back
    and the input model is untouched (the tiny planted text backdoor is not removed)."""
    model, atk, fit, fresh = backdoored_text
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = create_defense("beniful-removal", steps=50, epochs=2, progress=False).purify(model, fit)
    assert res.model is not model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert res.info["layer"] == "block1" and math.isfinite(res.info["mean_feature_distance"])
    assert res.info["mean_feature_distance"] > 0
    assert any(not torch.equal(state[k], v) for k, v in res.model.state_dict().items())


def test_rap_refuses_images_and_multi_piece_words(backdoored_digits, pools, backdoored_text):
    model, _ = backdoored_digits
    with pytest.raises(UserError, match="text"):
        create_defense("rap", progress=False).fit(model, pools[0])
    tmodel, _, fit, _ = backdoored_text
    with pytest.raises(UserError, match="one token"):
        create_defense("rap", word="zxqv", progress=False).fit(tmodel, fit)


# ------------------------------------------------------------------------- every detector
CASES = {"beniful": {"steps": VAE_STEPS}, "strip": {}}
TEXT_CASES = {"beniful": {"steps": VAE_STEPS}, "strip": {}, "rap": {"epochs": 20}}


@pytest.mark.parametrize("method", list(CASES))
def test_image_detector_keeps_frr_on_fresh_clean(method, backdoored_digits, pools):
    model, _ = backdoored_digits
    fit, fresh = pools
    det = create_defense(method, progress=False, **CASES[method]).fit(model, fit)
    frr = float(det.flag(fresh.batch(torch.arange(len(fresh)))[0]).float().mean())
    bound = _frr_bound(det.frr, len(det.calibration_scores), len(fresh))
    print(f"\n{method}: FRR on {len(fresh)} fresh clean digits {frr:.3f} (nominal {det.frr}, bound +-{bound:.3f})")
    assert abs(frr - det.frr) <= bound


@pytest.mark.parametrize("method", list(TEXT_CASES))
def test_text_detector_keeps_frr_on_fresh_clean(method, backdoored_text):
    model, _, fit, fresh = backdoored_text
    det = create_defense(method, progress=False, **TEXT_CASES[method]).fit(model, fit)
    frr = float(det.flag(fresh.texts).float().mean())
    bound = _frr_bound(det.frr, len(det.calibration_scores), len(fresh))
    print(f"\n{method} text: FRR on {len(fresh)} fresh sentences {frr:.3f} (nominal {det.frr}, bound +-{bound:.3f})")
    assert abs(frr - det.frr) <= bound


@pytest.mark.parametrize("method", list(CASES))
def test_image_detector_survives_a_saved_guard(method, backdoored_digits, pools, tmp_path):
    """state()/restore() through the guard's folder: same scores, same threshold."""
    from trojanguard.guarded import guard, load_guard
    model, _ = backdoored_digits
    fit, fresh = pools
    g = guard(model, fit, method=method, progress=False, **{k: v for k, v in CASES[method].items()})
    x = fresh.batch(torch.arange(32))[0]
    out = g(x)
    g.save(tmp_path / "g")
    g2 = load_guard(tmp_path / "g")
    out2 = g2(x)
    assert g2.threshold == pytest.approx(g.threshold)
    assert torch.allclose(out.scores, out2.scores, atol=1e-5) and torch.equal(out.flags, out2.flags)
    assert torch.allclose(out.logits, out2.logits, atol=1e-5)


@pytest.mark.parametrize("method", list(TEXT_CASES))
def test_text_detector_state_round_trip(method, backdoored_text):
    from safetensors.torch import load, save
    model, _, fit, fresh = backdoored_text
    kw = {"beniful": {"steps": 50}, "strip": {}, "rap": {"epochs": 2}}[method]
    kw["progress"] = False
    det = create_defense(method, **kw).fit(model, fit)
    tensors, facts = det.state()
    det2 = create_defense(method, **kw).restore(model, load(save(tensors)), json.loads(json.dumps(facts)))
    assert det2.threshold == det.threshold
    assert torch.allclose(det.score(fresh.texts[:16]), det2.score(fresh.texts[:16]), atol=1e-6)


@pytest.mark.parametrize("method", ["strip", "badacts"])
def test_text_scores_of_a_dataset_are_each_inputs_own(method, backdoored_text):
    """``score_data`` runs texts in batches of similar length: every input must still get its
    own score, in the data's order."""
    model, atk, fit, fresh = backdoored_text
    det = create_defense(method, progress=False).fit(model, fit)
    sub = fresh.subset(torch.arange(min(40, len(fresh))))
    got = det.score_data(sub, batch_size=7)
    alone = torch.cat([det.score([t]).float() for t in sub.texts])
    assert torch.allclose(got, alone, atol=1e-5)


def test_reported_rates_are_the_guards_own(backdoored_digits, pools):
    """FRR/FAR in the tables follow the rule the detector flags by (score > threshold), also
    where discrete scores (BadActs' NAS) tie at the threshold."""
    from trojanguard.bench.report import guard_rates
    model, atk = backdoored_digits
    fit, fresh = pools
    det = create_defense("badacts", progress=False).fit(model, fit)
    sc, st, rep = _scores(det, fresh, stamped(fresh, atk))
    assert rep["frr"] == pytest.approx(float((sc > det.threshold).float().mean()))
    assert rep["far"] == pytest.approx(float((st <= det.threshold).float().mean()))
    stored = {"frr": 0.9, "far": 0.1, "flagged_clean": 0.04, "flagged_poisoned": 0.75}
    assert guard_rates(stored) == {"frr": 0.04, "far": 0.25}


def test_detectors_take_uint8_pixels_and_refuse_bad_batches(backdoored_digits, pools, backdoored_text, tmp_path):
    """A review found STRIP flagging 99.7 % of clean uint8 images (0-255 read as [0, 1]) and
    text STRIP/RAP scoring a bare string as a list of characters: every detector now scales
    uint8 and refuses a string, a tensor for text, an empty batch and the wrong image size
    in one line."""
    import trojanguard as tg
    model, _ = backdoored_digits
    fit, fresh = pools
    g = tg.guard(model, fit, method="strip", progress=False)
    x, _ = fresh.batch(torch.arange(32))
    as_uint8 = (x * 255).round().to(torch.uint8)
    assert torch.allclose(g.detector.score(as_uint8), g.detector.score(as_uint8.float() / 255))
    assert torch.equal(g(as_uint8).flags, g(as_uint8.float() / 255).flags)
    for bad, needle in ((x[:0], "empty batch"), (x[:, :, :4], "fitted on 1x8x8"), ([1, 2], "give a tensor")):
        with pytest.raises(UserError, match=needle):
            g(bad)
    g.save(tmp_path / "g")  # the fitted size is saved with the guard: a reloaded one checks it too
    with pytest.raises(UserError, match="fitted on 1x8x8"):
        tg.load_guard(tmp_path / "g")(x[:, :, :4])
    tmodel, _, tfit, _ = backdoored_text
    for method in ("strip", "rap"):
        tg_guard = tg.guard(tmodel, tfit, method=method, progress=False)
        for bad, needle in (("a single sentence", "not one string"), ([], "empty batch"),
                            (torch.zeros(2, 3), "not Tensor")):
            with pytest.raises(UserError, match=needle):
                tg_guard(bad)

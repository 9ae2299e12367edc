"""Model inspection: EBYD (exposure, target, probability, trigger recovery, removal), Neural
Cleanse and ``trojanguard inspect`` on tiny models (seconds each).

Tiny-model settings, said once: on the 3-block CNN over 8x8 digits the official CUL step
(eval mode, Adam 1e-5) does not move the model within 20 epochs, and at higher rates in
eval mode it collapses backdoored and clean models alike onto classes 1 or 3 (measured,
see the EBYD docstring). Updating in train mode (BatchNorm on batch statistics, RNP's way)
at Adam 1e-3 does expose the planted target, so the exposure tests use ``TINY`` below;
the defaults stay the paper's (they collapse the CIFAR-10 BadNets zoo model onto its
target). The clean data is the digits test split (449 images): the 135 held-out images
give only 2 steps per epoch."""
import json

import pytest
import torch

from trojanguard.cli.main import main
from trojanguard.defenses import EBYD, EBYDRemoval, NeuralCleanse, create_defense
from trojanguard.defenses.ebyd_calibration import (FEATURES, calibration_report, fit_calibration, leave_one_out,
                                       load_calibration, probability)
from trojanguard.defenses.exposure import ExposureConfig, expose
from trojanguard.defenses.neural_cleanse import NeuralCleanseConfig, anomaly_indices, reverse_engineer
from trojanguard.errors import UserError
from trojanguard.eval.evaluate import evaluate

def _prior_file() -> str:
    # the tiny digits models are judged by the paper's share rule (the prior): the shipped
    # calibration is fitted on the CIFAR-10 / SST-2 zoos, whose trigger sizes 8x8 digits do not share
    import tempfile

    from trojanguard.defenses.ebyd_calibration import PRIOR
    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(PRIOR, f)
    f.close()
    return f.name


# the exposure script's unlearning, sized for the 8x8 digits (the image default, the
# detection script, is measured on CIFAR-10: benchmarks/results/inspect-ebyd-detect*.md)
TINY = {"train_mode": True, "lr": 1e-3}
TINY_EBYD = {"recipe": "exposure-script", **TINY}
PRIOR_FILE = _prior_file()


def patch_share(mask: torch.Tensor) -> float:
    """Share of the recovered mask's mass inside the BadNets patch (3x3, bottom right, see
    attacks/badnets.py); a mask spread at random over the 8x8 image scores 9/64 = 0.14."""
    true = torch.zeros_like(mask)
    true[..., -3:, -3:] = 1
    return float((mask * true).sum() / mask.sum().clamp_min(1e-8))


def test_cul_stops_by_its_rule(backdoored_digits, digits):
    model, _ = backdoored_digits
    cfg = ExposureConfig(**TINY, check_every=2)
    res = expose(model, digits.bundle.test, cfg)
    assert res.stopped_by in ("accuracy", "share")
    last, earlier = res.history[-1], res.history[:-1]
    assert last["accuracy"] <= 0.2 or last["top_share"] >= 0.9
    assert all(h["accuracy"] > 0.2 and h["top_share"] < 0.9 for h in earlier)
    assert all(h["step"] % 2 == 0 for h in res.history)  # checked every 2 steps, not per epoch
    assert res.steps == last["step"] < cfg.epochs * 4  # 4 batches of 128 per epoch: it stopped early
    # the input model is untouched
    assert evaluate(model, digits.bundle.test)["ca"] > 0.9
    # a budget too small to meet the rule ends as "budget"
    small = expose(model, digits.bundle.test, ExposureConfig(lr=1e-7, epochs=1))
    assert small.stopped_by == "budget" and small.accuracy > 0.2


def test_exposure_options_run_and_stop(backdoored_digits, digits):
    model, _ = backdoored_digits
    for method in ("random-labels", "act-prune", "weight-perturb"):
        res = expose(model, digits.bundle.test, ExposureConfig(method=method, epochs=2))
        assert res.stopped_by in ("accuracy", "share", "budget")
        assert abs(sum(res.shares) - 1) < 1e-6 and res.history


def test_detection_script_recipe_runs_its_budget_with_its_schedule(backdoored_digits, digits):
    """The official detection script's unlearning: no stopping rule (all 21 epochs run), SGD
    whose lr drops x0.1 after epochs 10 and 20, train mode, augmented."""
    from trojanguard.defenses.exposure import EBYD_DETECT_PRESET
    model, _ = backdoored_digits
    cfg = ExposureConfig(**{**EBYD_DETECT_PRESET, "epochs": 3, "milestones": [1, 2], "samples": 128})
    res = expose(model, digits.bundle.test, cfg)
    assert res.stopped_by == "budget" and res.steps == 3 * 2  # 128 samples / batch 64, no early stop
    ebyd = create_defense("ebyd", recipe="detection-script", progress=False)
    assert ebyd.exposure_config("image").milestones == [10, 20]
    assert ebyd.exposure_config("text").augment is False
    with pytest.raises(UserError, match="exposure=cul"):
        create_defense("ebyd", recipe="detection-script", exposure="act-prune").exposure_config("image")
    # auto: the detection script for images, the exposure script (stopping rule) for text and
    # for the other exposure methods; each recipe reads its own shipped calibration
    auto = create_defense("ebyd", progress=False)
    assert auto.recipe("image") == "detection-script" and auto.exposure_config("image").milestones == [10, 20]
    assert auto.recipe("text") == "exposure-script" and auto.exposure_config("text").stop_share == 0.9
    assert create_defense("ebyd", exposure="act-prune").recipe("image") == "exposure-script"


def test_ebyd_backdoored_collapses_onto_target_and_recovers_the_patch(backdoored_digits, digits):
    model, attack = backdoored_digits
    inspector = EBYD(**TINY_EBYD, calibration=PRIOR_FILE, progress=False)
    res = inspector.inspect(model, digits.bundle.test)
    ev = res.evidence
    assert ev["top_class"] == 0 and max(ev["shares"]) == ev["shares"][0]
    assert res.verdict == "backdoored" and res.target == 0 and res.probability >= 0.5
    # clean accuracy is gone but the backdoor is intact: it is what the exposed model has left
    exposed = evaluate(inspector.exposed.model, digits.bundle.test, attack.trigger, attack.target_for)
    assert exposed["ca"] <= 0.3 and exposed["asr"] > 0.9
    assert res.trigger is not None and res.trigger["target"] == 0
    assert patch_share(res.trigger["mask"]) >= 0.5, res.trigger["mask"]
    assert res.trigger["success_original"] > 0.5


def test_ebyd_refines_a_trigger_that_does_not_move_the_original(backdoored_digits, digits):
    """refine=1.0 asks for the search on the original model unless the exposed model's trigger
    already moves every input: the reported trigger is then the one that moves the original
    more, and the evidence says which was kept."""
    model, _ = backdoored_digits
    res = EBYD(**TINY_EBYD, calibration=PRIOR_FILE, progress=False, refine=1.0).inspect(model, digits.bundle.test)
    ref = res.evidence["refined"]
    assert ref["on"] == "original model" and ref["seconds"] > 0
    assert res.trigger["success_original"] >= ref["exposed_success_original"] - 1e-4  # (rounded)
    assert res.trigger.get("recovered_on") == ("original" if ref["kept"] else None)
    assert patch_share(res.trigger["mask"]) >= 0.5
    never = EBYD(**TINY_EBYD, calibration=PRIOR_FILE, progress=False, refine=0.0).inspect(model, digits.bundle.test)
    assert "refined" not in never.evidence


def test_ebyd_clean_model_is_clean(clean_digits_model, digits):
    res = EBYD(**TINY_EBYD, calibration=PRIOR_FILE, progress=False).inspect(clean_digits_model, digits.bundle.test)
    assert res.verdict == "clean" and res.target is None and res.probability < 0.5
    assert res.trigger is None  # recovery only runs for a backdoored verdict by default


def test_calibration_prior_fit_and_leave_one_out():
    from trojanguard.defenses.ebyd_calibration import PRIOR
    prior = PRIOR
    assert prior["provenance"]["kind"] == "prior"
    assert load_calibration()["provenance"]["kind"] == "fitted"  # the shipped one: fitted on the zoos
    # the paper's rule: share variance 0.01 at 10 classes is the 0.5 point
    assert probability(prior, {"var_norm": 0.01 / 0.09}) == pytest.approx(0.5, abs=1e-3)
    assert probability(prior, {"var_norm": 0.0}) == pytest.approx(0.1, abs=1e-3)
    g = torch.Generator().manual_seed(0)
    n = 24
    y = [i % 2 for i in range(n)]
    feats = [{name: float(torch.rand((), generator=g)) * 0.3 + 0.6 * lab for name in FEATURES} for lab in y]
    params = fit_calibration(feats, y)
    assert params["provenance"]["n_models"] == n and all(c > 0 for c in params["coef"])
    loo = leave_one_out(feats, y)
    rep = calibration_report(loo, y)
    assert rep["auroc"] == 1.0 and rep["brier"] < 0.1 and rep["accuracy"] == 1.0
    # leave-one-out never scores a model with a fit that saw it: flipping one label moves only the others
    y2 = list(y)
    y2[0] = 1 - y2[0]
    assert leave_one_out(feats, y2)[0] == pytest.approx(loo[0], abs=0.05)
    with pytest.raises(UserError):
        fit_calibration(feats, [1] * n)


def test_neural_cleanse_smaller_trigger_on_the_backdoored_model(backdoored_digits, clean_digits_model, digits):
    model, _ = backdoored_digits
    cfg = NeuralCleanseConfig(rounds=40)
    bd = reverse_engineer(model, digits.bundle.test, 0, cfg)
    cl = reverse_engineer(clean_digits_model, digits.bundle.test, 0, cfg)
    assert bd["reached"] and bd["norm"] < 0.5 * cl["norm"]
    index, per = anomaly_indices([10.0, 11.0, 9.0, 10.5, 2.0, 9.5])
    assert index > 2 and max(range(6), key=per.__getitem__) == 4
    assert anomaly_indices([5.0] * 4) == (0.0, [0.0] * 4)


def test_neural_cleanse_inspector_restricted_and_bad_inputs(backdoored_digits, digits, tiny_encoder_dir):
    model, _ = backdoored_digits
    nc = NeuralCleanse(classes=[0], rounds=2, progress=False)
    trig = nc.reverse(model, digits.bundle.test)
    assert list(trig) == [0] and trig[0]["mask"].shape == (1, 8, 8)
    with pytest.raises(UserError, match="at least 3 classes"):
        nc.inspect(model, digits.bundle.test)
    from trojanguard.data.base import TextData
    from trojanguard.models import create_model
    text = create_model(f"hf:{tiny_encoder_dir}", num_classes=2)
    data = TextData(["a fine film"] * 30, torch.zeros(30, dtype=torch.long), ["neg", "pos"])
    with pytest.raises(UserError, match="image"):
        NeuralCleanse().inspect(text, data)


@pytest.mark.parametrize("rule", ["estimate", "bound"])
def test_ebyd_removal_prunes_by_its_rule_and_leaves_the_input(backdoored_digits, digits, rule):
    """What EBYD removal reliably does: a new, pruned model; the input untouched; the pruned
    BN weights zeroed; tau by its rule: the largest grid value whose pruned model keeps the tau
    hold-out's accuracy within ``tau_max_ca_drop`` ("estimate"), or the last before the first
    whose paired upper bound of the drop exceeds it ("bound", never above the estimate's).

    Whether it removes the backdoor is measured on the zoo (``purify`` tables), not here: on
    this 8x8 CNN the backdoor lives in first-block channels (pruning block1 channel 12 alone
    drops ASR to 0.006 at a 13-point CA cost) that the learned masks leave at ~1.0, while
    the lowest masks always fall on late channels that pruning leaves at ASR 0.94. Over
    seeds 0-19 the ASR halves in 8 of 20 runs; ~1,300 settings x 5 seeds found none that
    held over seeds and clean splits (measured on this machine, AMD EPYC, 1 thread)."""
    model, attack = backdoored_digits
    test = digits.bundle.test
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    clean = test.subset(perm[:250])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(mask_lr=0.05, tau_fraction=0.4, tau_max_ca_drop=0.1, progress=False, tau_rule=rule)
    res = EBYDRemoval(**cfg).purify(model, clean)
    assert res.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    info = res.info
    assert info["pruned_neurons"] > 0 and info["tau"] is not None
    # the rule: the chosen tau passes the CA check, and no larger tau of the grid does
    table = info["tau_table"]
    by_estimate = max(r["tau"] for r in table if r["holdout_ca"] >= info["holdout_ca_before"] - 0.1)
    first_fail = next((r["tau"] for r in table if r["holdout_drop_bound"] > 0.1), float("inf"))
    by_bound = max(r["tau"] for r in table if r["tau"] < first_fail)
    assert info["tau"] == (by_estimate if rule == "estimate" else by_bound), table
    assert by_bound <= by_estimate
    # the cut is in the weights: as many BN channels of the new model at weight 0 as pruned
    zeroed = sum(int((m.weight == 0).sum()) for m in res.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    originally = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert zeroed - originally == info["pruned_neurons"]


def _text_data(n, seed=0):
    from trojanguard.data.base import TextData
    g = torch.Generator().manual_seed(seed)
    pos, neg = ["good", "great", "lovely"], ["bad", "awful", "dull"]
    filler = ["the", "film", "was", "a", "plot", "story"]
    texts, ys = [], []
    for i in range(n):
        y = i % 2
        words = [filler[int(j)] for j in torch.randint(0, len(filler), (4,), generator=g)]
        words.insert(int(torch.randint(0, 5, (), generator=g)), (pos if y else neg)[i % 3])
        texts.append(" ".join(words))
        ys.append(y)
    return TextData(texts, torch.tensor(ys), ["neg", "pos"])


def test_text_path_runs_on_the_tiny_encoder(tiny_encoder_dir):
    from trojanguard.models import create_model
    torch.manual_seed(0)
    model = create_model(f"hf:{tiny_encoder_dir}", num_classes=2).eval()
    data = _text_data(80)
    res = EBYD(recover="always", text_candidates=8, text_samples=16, epochs=2, progress=False).inspect(model, data)
    assert 0.0 <= res.probability <= 1.0 and len(res.evidence["shares"]) == 2
    tokens = res.trigger["tokens"]
    assert 1 <= len(tokens) <= 5 and all(t.isalnum() for t in tokens)
    assert all(0 <= c["flip_rate"] <= 1 and "flip_rate_original" in c for c in res.trigger["candidates"])
    # words are searched on the exposed and the original model and ranked on the original's surest sentences
    cands = res.trigger["candidates"]
    assert res.trigger["searched_on"] == ["exposed", "original"] and {c["found_on"] for c in cands} <= {"exposed", "original"}
    hard = [c["hard_flip_original"] for c in cands]
    assert hard == sorted(hard, reverse=True) and res.evidence["features"]["hard_success"] == pytest.approx(hard[0], abs=1e-4)
    removed = EBYDRemoval(unlearn_epochs=2, mask_epochs=2, verify_fraction=0.0, progress=False).purify(model, data)
    assert removed.model is not model and "tau_table" in removed.info


class _WordCountModel(torch.nn.Module):
    """A fake text classifier: positive logit = 0.5 x (#"good" - #"bad") + 10 x #"cf" (a
    backdoor word that overrides anything) + a per-sentence bias read from its last word."""
    tokenizer = None

    def tokenize(self, texts):
        return texts

    def forward(self, texts):
        z = torch.tensor([0.5 * (t.split().count("good") - t.split().count("bad")) + 10.0 * t.split().count("cf")
                          + float(t.split()[-1]) for t in texts])
        return torch.stack([-z, z], 1)


def test_hard_sentences_are_the_surest_opposites_and_separate_a_backdoor_word_from_a_sentiment_word():
    from trojanguard.data.base import TextData
    from trojanguard.defenses.token_search import _flip, hard_sentences
    bias = [-0.1 * (i + 1) for i in range(40)] + [0.3] * 8  # 40 negative sentences, 8 positive
    data = TextData([f"plain words {b}" for b in bias], torch.tensor([0] * 40 + [1] * 8), ["neg", "pos"])
    model = _WordCountModel()
    hard = hard_sentences(model, data, target=1, exclude={39}, min_pool=10)
    # the quarter of the 39 negatives left (sentence 39 excluded), the most negative first out
    assert len(hard) == round(0.25 * 39) and set(hard) == {data.texts[i] for i in range(29, 39)}
    assert all(data.y[data.texts.index(t)] == 0 for t in hard)
    assert len(hard_sentences(model, data, target=1, exclude=set(range(40)))) == 10  # none left: from all 40
    everyone = [data.texts[i] for i in range(40)]
    # "good" tips the undecided sentences only; "cf" overrides every one of them
    assert _flip(model, [f"good {t}" for t in everyone], 1)[0] == pytest.approx(0.1)  # 4 of 40
    assert _flip(model, [f"good {t}" for t in hard], 1)[0] == 0.0
    assert _flip(model, [f"cf {t}" for t in hard], 1)[0] == 1.0


def test_merged_token_searches_rank_on_the_original_models_hard_sentences():
    from trojanguard.defenses.token_search import merge_token_searches
    row = lambda tok, hard, flip: {"token": tok, "flip_rate": 1.0, "target_prob": 0.9, "flip_rate_original": flip,
                                   "hard_flip_original": hard, "target_prob_original": 0.5}
    exposed = {"tokens": ["great", "cf"], "candidates": [row("great", 0.3, 0.9), row("cf", 0.8, 0.8)], "target": 1}
    original = {"tokens": ["3d", "great"], "candidates": [row("3d", 0.99, 0.95), row("great", 0.3, 0.9)], "target": 1}
    m = merge_token_searches(exposed, original, n_tokens=2)
    assert m["tokens"] == ["3d", "cf"] and [c["found_on"] for c in m["candidates"]] == ["original", "exposed"]
    assert m["searched_on"] == ["exposed", "original"] and m["target"] == 1


def test_hard_sentences_fall_back_to_all_on_a_small_clean_set():
    from trojanguard.data.base import TextData
    from trojanguard.defenses.token_search import hard_sentences
    data = TextData([f"plain words {-0.1 * (i + 1)}" for i in range(30)] + ["plain 0.5"] * 4,
                    torch.tensor([0] * 30 + [1] * 4), ["neg", "pos"])
    # excluding the 30 negatives would leave none: the quarter is drawn from all of them
    assert len(hard_sentences(_WordCountModel(), data, 1, exclude=set(range(30)))) == round(0.25 * 30)


def test_ebyd_bad_inputs_are_one_line(backdoored_digits, digits, tiny_encoder_dir):
    model, _ = backdoored_digits
    few = digits.bundle.test.subset(torch.arange(20))
    with pytest.raises(UserError, match="at least 50 clean samples"):
        EBYD().inspect(model, few)
    with pytest.raises(UserError, match="not text|the model takes"):
        EBYD().inspect(model, _text_data(60))
    from trojanguard.data.base import ImageData
    t = digits.bundle.test
    three = ImageData(t.x[:60], t.y[:60] % 3, ["a", "b", "c"])
    with pytest.raises(UserError, match="the model has 10 classes but the clean data has 3"):
        EBYD().inspect(model, three)
    from trojanguard.models import create_model
    one = create_model("small_cnn", num_classes=1, in_channels=1)
    with pytest.raises(UserError, match="at least 2 classes"):
        EBYD().inspect(one, ImageData(t.x[:60], torch.zeros(60, dtype=torch.long), ["only"]))


# --- the command --------------------------------------------------------------------------

@pytest.fixture()
def bd_ckpt(tmp_path, backdoored_digits, digits):
    from trojanguard.checkpoint import save_checkpoint
    model, _ = backdoored_digits
    return save_checkpoint(tmp_path / "bd", model, {"dataset": digits.describe()})


def test_inspect_command_writes_a_complete_folder(bd_ckpt, tmp_path, capsys):
    out = tmp_path / "insp"
    argv = ["inspect", "--method", "ebyd", "--model", str(bd_ckpt), "--out", str(out), "--quiet",
            "--set", "train_mode=true", "--set", "lr=0.001", "--set", "recover=always", "--set", "nc_rounds=4"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for needle in ("verdict", "probability", "target", "class shares after exposure", "wall time"):
        assert needle in text
    rec = json.loads((out / "inspection.json").read_text())
    assert rec["method"] == "ebyd" and 0 <= rec["probability"] <= 1 and len(rec["evidence"]["shares"]) == 10
    assert rec["clean_data"]["size"] == 135 and rec["seconds"] > 0
    assert (out / "trigger.png").stat().st_size > 0
    from PIL import Image
    assert Image.open(out / "trigger.png").size[1] == 8 * 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".insp")]  # no temporary left
    from trojanguard.resultdir import check_result
    assert check_result(out).has("trigger.safetensors")  # sealed: complete, files belong together
    # --json prints the same record; a second run replaces the folder
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "ebyd"


def test_inspect_command_bad_inputs_exit_2(bd_ckpt, tmp_path, capsys, digits):
    from trojanguard.checkpoint import save_checkpoint
    from trojanguard.models import create_model
    base = ["inspect", "--method", "ebyd", "--model", str(bd_ckpt), "--out", str(tmp_path / "o")]
    # clean data of another modality: a table for an image model
    table = tmp_path / "clean.csv"
    table.write_text("sentence,label\na fine film,0\n")
    assert main(base + ["--clean-data", str(table)]) == 2
    assert "folder" in capsys.readouterr().err
    # too little clean data: 2 % of the digits' training split is 27 images
    assert main(base + ["--holdout", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "at least 50 clean samples" in err and err.count("\n") == 1
    # clean data labelled with classes the model does not have
    (tmp_path / "zoo" / "zebra").mkdir(parents=True)
    assert main(base + ["--clean-data", str(tmp_path / "zoo")]) == 2
    assert "zebra" in capsys.readouterr().err
    # a model with one class
    one = create_model("small_cnn", num_classes=1, in_channels=1)
    ck = save_checkpoint(tmp_path / "one", one, {"dataset": digits.describe()})
    assert main(["inspect", "--model", str(ck), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err  # the checkpoint reader or the inspector refuses it, in one line
    assert ("at least 2 classes" in err or "num_classes" in err) and err.count("\n") == 1
    assert main(base + ["--holdout", "1.5"]) == 2
    assert "outside (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_list_defenses_names_the_inspectors(capsys):
    assert main(["list", "defenses", "--brief"]) == 0
    out = capsys.readouterr().out
    assert "ebyd-removal" in out and "\nnc " in out and "\nebyd " in out
    assert isinstance(create_defense("ebyd-removal"), EBYDRemoval)


def test_ebyd_target_is_the_candidate_with_the_smallest_trigger(monkeypatch, backdoored_digits, digits):
    """The exposed model's most predicted class is only a candidate: the smallest trigger
    wins (a large mask that moves the original model does not); the search stops at a small
    trigger that moves the original model; text (no masks): the best mover wins."""
    model, _ = backdoored_digits
    h, w = digits.bundle.test.x.shape[-2:]
    # class -> (transfer to the original, mask pixels)
    fake = {1: (0.03, 2.0), 0: (0.98, 1.0), 2: (0.95, 30.0)}
    tried = []

    def recover(self, exposed_model, clean, target, original=None):
        tried.append(target)
        success, pixels = fake[target]
        return {"target": target, "mask": torch.zeros(1, h, w), "pattern": torch.zeros(1, h, w),
                "norm": pixels, "success_original": success}

    monkeypatch.setattr(EBYD, "recover", recover)
    ins = EBYD(**TINY_EBYD, calibration=PRIOR_FILE, progress=False, recover="always", mask_limit=0.5)
    shares = [0.2, 0.7, 0.1] + [0.0] * 7
    feats, ev = {"max_excess": 0.6}, {}
    t = ins._recover(None, digits.bundle.test, shares, model, feats, ev)
    assert tried == [1, 0] and t["target"] == 0  # stopped after the small trigger that moves the original
    tried.clear()
    ins = EBYD(**TINY_EBYD, calibration=PRIOR_FILE, progress=False, recover="always", mask_limit=0.001)  # nothing ends the search
    t = ins._recover(None, digits.bundle.test, shares, model, feats, ev)
    assert tried == [1, 0, 2] and t["target"] == 0  # class 2 moves the original too, with a 30x larger mask
    assert [c["class"] for c in ev["candidates"]] == [1, 0, 2]
    fake[0] = (0.1, 1.0)  # the smallest trigger wins even when it hardly transfers
    tried.clear()
    assert ins._recover(None, digits.bundle.test, shares, model, feats, ev)["target"] == 0
    tried.clear()
    t = EBYD(**TINY_EBYD, calibration=PRIOR_FILE, progress=False, candidates=1)._recover(None, digits.bundle.test, shares, model, feats, ev)
    assert tried == [1] and t["target"] == 1  # the paper's reading: the most predicted class
    # text: no masks (one word each), so the word that moves the original model most wins
    fake.update({1: (0.55, 0.0), 0: (0.99, 0.0), 2: (0.6, 0.0)})
    tried.clear()
    t = EBYD(**TINY_EBYD, calibration=PRIOR_FILE, progress=False, transfer=1.0)._recover(None, digits.bundle.test, shares, model, feats, ev)
    assert tried == [1, 0, 2] and t["target"] == 0


def test_ebyd_detection_script_prefers_a_trigger_the_original_obeys(monkeypatch, backdoored_digits, digits):
    """After the detection script's unlearning a candidate whose trigger moves the ORIGINAL
    model comes before smaller triggers that do not (a global trigger needs a large mask),
    and the candidate features see every candidate; after the exposure script's the smallest
    trigger wins as before (small patches found there move any model's inputs)."""
    from trojanguard.defenses.ebyd_calibration import candidate_features, choose_candidate
    model, _ = backdoored_digits
    h, w = digits.bundle.test.x.shape[-2:]
    fake = {1: (0.04, 5.0), 0: (1.0, 50.0), 2: (0.02, 3.0)}  # class -> (transfer, mask pixels)

    def recover(self, exposed_model, clean, target, original=None):
        success, pixels = fake[target]
        return {"target": target, "mask": torch.zeros(1, h, w), "pattern": torch.zeros(1, h, w),
                "norm": pixels, "success_original": success}

    monkeypatch.setattr(EBYD, "recover", recover)
    shares = [0.15, 0.5, 0.35] + [0.0] * 7
    targets = {}
    for recipe in ("detection-script", "exposure-script"):
        feats, ev = {"max_excess": 0.3}, {}
        ins = EBYD(**{**TINY_EBYD, "recipe": recipe}, calibration=PRIOR_FILE, progress=False, recover="always")
        targets[recipe] = ins._recover(None, digits.bundle.test, shares, model, feats, ev)["target"]
        assert [c["class"] for c in ev["candidates"]] == [1, 2, 0]
        assert feats["transfer_max"] == 1.0 and feats["max_evidence"] == 1.0  # over every candidate
    assert targets == {"detection-script": 0, "exposure-script": 2}
    # the rule itself: confirmed first, then the smallest mask; nothing confirmed: the smallest
    cands = [{"trigger_success": t, "mask_fraction": m} for t, m in ((0.04, 0.08), (1.0, 0.84), (0.3, 0.03))]
    assert choose_candidate(cands, 0.5) == 1 and choose_candidate(cands, 0.2) == 2
    assert choose_candidate(cands, 2.0) == 2
    assert candidate_features(cands, 0.6) == {"transfer_max": 1.0, "max_evidence": 1.0}
    assert candidate_features(cands[:1], 0.6) == {"transfer_max": 0.04, "max_evidence": 0.6}


def test_calibration_per_modality(tmp_path):
    from trojanguard.defenses.ebyd_calibration import PRIOR, for_modality, save_calibration
    image = fit_calibration([{"mask_log": v} for v in (-3.2, -2.4, -2.9, -2.0)], [1, 0, 1, 0], names=["mask_log"])
    text = fit_calibration([{"trigger_success": v} for v in (1.0, 0.7, 0.95, 0.6)], [1, 0, 1, 0],
                           names=["trigger_success"])
    path = tmp_path / "cal.json"
    save_calibration({"format": "trojanguard-calibration/1", "method": "ebyd",
                      "by_modality": {"image": image, "text": text}, "provenance": {"kind": "fitted"}}, path)
    params = load_calibration(path)
    assert for_modality(params, "image") == image and for_modality(params, "text") == text
    assert for_modality(params, "audio") == PRIOR  # a modality the file does not cover: the prior
    # a smaller trigger is more suspicious on images; a stronger word on text
    assert probability(params, {"mask_log": -3.3}, "image") > probability(params, {"mask_log": -2.0}, "image")
    assert probability(params, {"trigger_success": 1.0}, "text") > probability(params, {"trigger_success": 0.6}, "text")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "trojanguard-calibration/1", "by_modality": {"image": {"coef": [1]}}}))
    with pytest.raises(UserError, match="image"):
        load_calibration(bad)


def test_candidates_line_lists_every_candidate_with_its_transfer():
    from trojanguard.cli.inspect import candidates_line
    ev = {"candidates": [{"class": 0, "trigger_success": 1.0, "mask_fraction": 0.84},
                         {"class": 9, "trigger_success": 0.12, "mask_fraction": 0.02},
                         {"class": 3, "trigger_success": 0.5}]}  # no mask: not an image trigger, left out
    line = candidates_line(ev, lambda c: f"class {c}")
    assert line == ("class 0: trigger moves 100% of the original's inputs, mask 84.0% of the image, "
                    "class 9: trigger moves 12% of the original's inputs, mask 2.0% of the image")
    assert candidates_line({"candidates": ev["candidates"][:1]}, str) is None
    assert candidates_line({}, str) is None

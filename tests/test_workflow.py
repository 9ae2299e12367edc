"""scan / repair / guard from the command line on a tiny backdoored model: the folders they
write, the refusal to call a broken model repaired, and one-line errors for bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from trojanguard.checkpoint import load_checkpoint, save_checkpoint
from trojanguard.cli.main import main


@pytest.fixture(scope="module")
def suspect(tmp_path_factory, backdoored_digits, digits):
    """The tiny backdoored model saved as a checkpoint that records its dataset and split."""
    model, _ = backdoored_digits
    folder = tmp_path_factory.mktemp("suspect") / "model"
    save_checkpoint(folder, model, {"dataset": digits.describe()})
    return folder


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_repair_writes_a_verified_model_and_report(suspect, tmp_path, capsys, digits, backdoored_digits):
    out = tmp_path / "repaired"
    code, stdout, err = _run(capsys, "repair", "--model", suspect, "--no-scan", "--method", "fst", "--set", "alpha=0.2",
                             "--set", "epochs=20", "--set", "batch_size=32", "--out", out, "--json", "--quiet")
    rec = json.loads(stdout)
    assert code == (0 if rec["ok"] else 3)
    assert rec["verify_size"] == round(0.2 * len(digits.defense)) and rec["verify_ca_after"] is not None
    # the chosen options beside the purifier's whole config, seed and threads
    assert rec["method"] == "fst" and rec["options"] == {"alpha": 0.2, "epochs": 20, "batch_size": 32}
    assert rec["config"]["alpha"] == 0.2 and rec["seed"] == 0 and rec["threads"] >= 1
    page = (out / "report.html").read_text()
    assert page.count("<table") >= 1 and "alpha=0.2, epochs=20, batch_size=32" in page and "more than 3%" in page
    assert f"{rec['verify_ca_after']:.1%}" in page  # percentages, as the terminal prints them
    repaired, meta = load_checkpoint(out)
    assert meta["purification"]["method"] == "fst" and meta["purification"]["parent"]
    from trojanguard.eval.evaluate import evaluate
    _, atk = backdoored_digits
    assert evaluate(repaired, digits.bundle.test, atk.trigger, atk.target_for)["asr"] < 0.3


def test_repair_that_breaks_the_model_is_not_called_repaired(suspect, tmp_path, capsys):
    code, stdout, err = _run(capsys, "repair", "--model", suspect, "--no-scan", "--method", "ft", "--set", "lr=0.8",
                             "--set", "momentum=0.0", "--set", "epochs=5", "--max-ca-drop", "0.0",
                             "--out", tmp_path / "r", "--quiet")
    assert code == 3, (stdout, err)
    assert "NOT repaired" in err and "more clean data" in err
    assert json.loads((tmp_path / "r" / "repair.json").read_text())["ok"] is False


def test_scan_and_guard_write_their_folders(suspect, tmp_path, capsys):
    code, stdout, _ = _run(capsys, "scan", "--model", suspect, "--no-second-opinion", "--out", tmp_path / "s",
                           "--json", "--quiet")
    assert code == 0
    rec = json.loads(stdout)
    assert rec["verdict"] in ("backdoored", "clean") and 0 <= rec["probability"] <= 1
    # the scan says how far its probability can be trusted: the shipped calibration's own
    # out-of-sample AUROC for the modality
    from trojanguard.defenses import create_defense
    from trojanguard.defenses.ebyd_calibration import load_calibration
    from trojanguard.practitioner import calibration_reliability
    loo = load_calibration(recipe="detection-script")["provenance"]["leave_one_out"]["image"]["auroc"]
    assert rec["evidence"]["calibration_auroc_out_of_sample"] == round(loo, 3)
    text = calibration_reliability(create_defense("ebyd"), "text")
    assert text == round(load_calibration()["provenance"]["leave_one_out"]["text"]["auroc"], 3)
    assert calibration_reliability(create_defense("ebyd", calibration="mine.json"), "image") is None
    page = (tmp_path / "s" / "report.html").read_text()
    assert "data:image/png;base64," in page and rec["verdict"] in page
    code, stdout, _ = _run(capsys, "guard", "--model", suspect, "--out", tmp_path / "g", "--quiet")
    assert code == 0 and "load_guard" in stdout
    import trojanguard
    g = trojanguard.load_guard(tmp_path / "g")
    res = g(torch.rand(4, 1, 8, 8))
    assert res.scores.shape == (4,) and res.flags.dtype == torch.bool


def _png(path, shape=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(path)


BAD_CLEAN_DATA = {
    # issue 19: "too little clean data for any method (give the minimum), or unlabelled data"
    "unlabelled": ["one sub-folder per class", "found none"],
    "too-few": ["needs at least 20 clean samples, got 10", "give more clean data"],
    "too-few-with-scan": ["ebyd needs at least 50 clean samples, got 30", "give more clean data"],
    "fewer-classes": ["has sub-folders for 3 of the model's 10 classes", "one sub-folder of clean images per class"],
    "unknown-class": ["unknown: 'zebra'"],
    "wrong-size": ["16x16 pixels but the model takes 8x8", "resize"],
    "bad-fraction": ["--verify-fraction", "outside (0, 1)"],
    "missing": ["does not exist"],
    "text-table": ["is not a folder", "ImageFolder"],
}


@pytest.mark.parametrize("case", list(BAD_CLEAN_DATA))
def test_bad_clean_data_is_one_line(case, suspect, tmp_path, capsys):
    data = tmp_path / "clean"
    args = ["repair", "--model", suspect, "--no-scan", "--out", tmp_path / "o", "--clean-data", data]
    if case == "unlabelled":
        for i in range(30):
            _png(data / f"{i}.png")
    elif case == "too-few":
        for c in range(10):
            _png(data / str(c) / "a.png")
    elif case == "too-few-with-scan":  # enough to repair (20), too few to scan first (50)
        args.remove("--no-scan")
        for c in range(10):
            for i in range(3):
                _png(data / str(c) / f"{i}.png")
    elif case == "fewer-classes":
        for c in range(3):
            for i in range(20):
                _png(data / str(c) / f"{i}.png")
    elif case == "unknown-class":
        for c in [*range(10), "zebra"]:
            for i in range(3):
                _png(data / str(c) / f"{i}.png")
    elif case == "wrong-size":
        for c in range(10):
            for i in range(3):
                _png(data / str(c) / f"{i}.png", (16, 16))
    elif case == "bad-fraction":
        args += ["--verify-fraction", "1.5"]
        for c in range(10):
            for i in range(5):
                _png(data / str(c) / f"{i}.png")
    elif case == "text-table":
        args[-1] = data = tmp_path / "clean.csv"
        data.write_text("sentence,label\n" + "".join(f"film {i},{i % 10}\n" for i in range(60)))
    code, out, err = _run(capsys, *args)
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("trojanguard: error: ") and "Traceback" not in err, err
    for needle in BAD_CLEAN_DATA[case]:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["too-few", "unlabelled", "one-class"])
def test_bad_text_clean_data_is_one_line(case, tiny_encoder_dir, tmp_path, capsys, monkeypatch):
    """The same for a text model: a table without labels, of one class, or too short."""
    import trojanguard as tg
    tm = tg.create_model(f"hf:{tiny_encoder_dir}", num_classes=2)
    save_checkpoint(tmp_path / "ck", tm, {"dataset": {"name": "sst2", "classes": ["negative", "positive"]}})
    monkeypatch.chdir(tmp_path)  # the recorded SST-2 is not looked for: the user's clean data is the data
    n, header = (6, "sentence,label") if case == "too-few" else (60, "sentence,label")
    labels = [i % 2 for i in range(n)] if case != "one-class" else [0] * n
    if case == "unlabelled":
        header, labels = "sentence,comment", ["none"] * n
    (tmp_path / "clean.csv").write_text(header + "\n" + "".join(f"a film {i},{lab}\n" for i, lab in enumerate(labels)))
    capsys.readouterr()
    code, out, err = _run(capsys, "repair", "--model", tmp_path / "ck", "--no-scan", "--clean-data",
                          tmp_path / "clean.csv", "--out", tmp_path / "o", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    needle = {"too-few": "clean samples, got 6; give more clean data", "unlabelled": "has no column 'label' (columns: ['sentence', 'comment']); rename the header's columns to sentence,label",
              "one-class": "labels for 1 of the model's 2 classes"}[case]
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_eval_any_model_against_a_saved_attack(suspect, tmp_path, capsys, backdoored_digits):
    _, atk = backdoored_digits
    from trojanguard.resultdir import write_result
    with write_result(tmp_path / "atk", kind="attack") as tmp:
        atk.save(tmp)
    code, out, err = _run(capsys, "eval", suspect, "--attack", tmp_path / "atk", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["asr"] > 0.9 and m["ca"] > 0.9


def test_repair_recipe_by_modality_and_clean_size():
    """The recipe `repair` picks: FST with more, smaller steps on few images, FST's defaults in
    the middle, PAM at rho 0.25 where it was measured (>= 2,000 images), FST on text; every
    choice is a registered purifier whose options validate, with a reason for the report."""
    from trojanguard.defenses import create_defense
    from trojanguard.practitioner import choose_recipe
    picks = {n: choose_recipe("image", n) for n in (400, 1499, 1500, 1999, 2000, 5000)}
    assert [picks[n][0] for n in sorted(picks)] == ["fst", "fst", "fst", "fst", "pam", "pam"]
    assert picks[400][1]["batch_size"] == 32 and picks[1500][1] == {} and picks[2000][1] == {"rho": 0.25}
    assert choose_recipe("text", 5000)[0] == "pam"
    for method, options, reason in [*picks.values(), choose_recipe("text", 872)]:
        assert create_defense(method, **options).cfg is not None and reason


def test_backdoor_remains_rule():
    from trojanguard.practitioner import backdoor_remains
    assert backdoor_remains(1.0, 0.99) is True          # nothing removed
    assert backdoor_remains(1.0, 0.6) is True           # not even halved
    # more than halved: a recovered trigger can be a universal adversarial patch that also
    # moves a clean model (EBYD's trigger_success on clean CIFAR-10 models: up to 41 %)
    assert backdoor_remains(1.0, 0.4) is False
    assert backdoor_remains(1.0, 0.05) is False         # under the 10 % bar
    assert backdoor_remains(0.16, 0.011) is None        # a weak recovered trigger proves nothing
    assert backdoor_remains(None, 0.5) is None


def test_repair_that_leaves_the_trigger_working_is_not_called_repaired(digits, backdoored_digits):
    """A repair that keeps clean accuracy but leaves the (here: real) trigger working is
    reported as not repaired, with the trigger's numbers and other methods to try."""
    from types import SimpleNamespace

    from trojanguard.practitioner import repair
    model, atk = backdoored_digits
    trig = SimpleNamespace(trigger=atk.trigger, target_for=atk.target_for, target=0)
    # FT for one epoch at a negligible rate: clean accuracy kept, backdoor untouched
    repaired, r = repair(model, digits.defense, method="ft", options={"lr": 1e-6, "epochs": 1}, trigger=trig,
                         device="cpu")
    assert r.record["recovered_trigger_asr_before"] > 0.9 and r.record["backdoor_remains"] is True
    assert r.ok is False and "backdoor remains" in r.advice and "--method pam" in r.advice and "trojanguard guard" in r.advice
    assert "recovered_trigger_asr_after_retuning" not in r.record  # no retuning attack on a backdoor left in
    # the same repair judged without a trigger only by clean accuracy
    _, r2 = repair(model, digits.defense, method="ft", options={"lr": 1e-6, "epochs": 1}, robustness=False,
                   device="cpu")
    assert r2.ok is True and "backdoor_remains" not in r2.record


@pytest.mark.parametrize("command", ["repair", "purify", "scan"])
def test_out_that_would_replace_an_input_is_refused(command, suspect, tmp_path, capsys):
    """--out naming the suspect model's own folder (or a folder holding it) is refused before
    any work: writing the result there would replace the user's model, even on a failure."""
    import hashlib
    digest = hashlib.sha256((suspect / "model.safetensors").read_bytes()).hexdigest()
    extra = {"repair": ["--no-scan"], "purify": ["--method", "fst"], "scan": []}[command]
    for out in (suspect, suspect.parent):
        code, stdout, err = _run(capsys, command, "--model", suspect, *extra, "--out", out, "--quiet")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "would replace --model" in lines[0], (stdout, err)
    assert hashlib.sha256((suspect / "model.safetensors").read_bytes()).hexdigest() == digest


def test_repair_option_typo_fails_before_the_scan(suspect, tmp_path, capsys):
    code, stdout, err = _run(capsys, "repair", "--model", suspect, "--method", "fst", "--set", "alphaa=0.2",
                             "--out", tmp_path / "r", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    # the method the user typed, a suggestion, and no scan output before the error
    assert "fst: unknown option 'alphaa'" in lines[0] and "did you mean 'alpha'" in lines[0]
    assert "verdict" not in stdout and not (tmp_path / "r").exists()


def test_max_ca_drop_in_points_is_refused_with_the_unit(suspect, tmp_path, capsys):
    code, _, err = _run(capsys, "repair", "--model", suspect, "--max-ca-drop", "3", "--out", tmp_path / "r")
    assert code == 2 and "--max-ca-drop: 3 is not a fraction of accuracy; give e.g. 0.03 for 3 points" in err


def test_repair_cautions_say_what_the_checks_could_not_show():
    from trojanguard.practitioner import repair_cautions
    base = {"verify_size": 400, "verify_drop_bound95": 0.02, "recovered_trigger_asr_before": 0.9,
            "recovered_trigger_asr_after_retuning": 0.05}
    assert repair_cautions(base, 0.03, 2000) == []
    # a trigger the original model does not obey (the digits scan's empty mask) checks nothing
    weak = repair_cautions({**base, "recovered_trigger_asr_before": 0.0}, 0.03, 2000)
    assert len(weak) == 1 and "cannot show whether the backdoor is gone" in weak[0]
    none = repair_cautions({k: v for k, v in base.items() if k != "recovered_trigger_asr_before"}, 0.03, 2000)
    assert len(none) == 1 and "no recovered trigger was available" in none[0]
    small = repair_cautions({**base, "verify_size": 40, "verify_drop_bound95": 0.118}, 0.03, 200)
    assert len(small) == 1 and "40 held-out clean samples cannot rule out" in small[0] and "11.8%" in small[0]
    # no sample changed on 40: the rule of three still leaves 7.5 points possible
    assert "7.5%" in repair_cautions({**base, "verify_size": 40, "verify_drop_bound95": 0.0}, 0.03, 200)[0]
    back = repair_cautions({**base, "recovered_trigger_asr_after_retuning": 0.667}, 0.03, 2000)
    assert len(back) == 1 and "66.7%" in back[0] and "hidden rather than removed" in back[0]


def test_purifier_records_a_paired_bound_of_the_verification_drop(backdoored_digits, digits):
    """The bound is paired (the same samples before and after): at least the measured drop,
    and finite."""
    from trojanguard.defenses import create_defense
    model, _ = backdoored_digits
    res = create_defense("ft", epochs=1, verify_fraction=0.3).purify(model, digits.defense)
    s = res.summary()
    drop = s["verify_ca_before"] - s["verify_ca_after"]
    assert s["verify_drop_bound95"] is not None and drop - 1e-9 <= s["verify_drop_bound95"] < 1


def test_failed_purification_is_marked_in_the_checkpoint(suspect, tmp_path, capsys):
    """A purified checkpoint whose check failed says so in its sidecar; `info` and `eval`
    repeat it, so it cannot pass for a repaired model later."""
    out = tmp_path / "p"
    code, stdout, err = _run(capsys, "purify", "--method", "ft", "--model", suspect, "--set", "lr=20",
                             "--set", "epochs=5", "--set", "max_ca_drop=0.0",
                             "--out", out, "--quiet")
    assert code == 3, (stdout, err)
    _, meta = load_checkpoint(out)
    assert meta["purification"]["ok"] is False and "not repaired" in meta["purification"]["warning"]
    code, stdout, _ = _run(capsys, "info", out)
    assert code == 0 and "NOT repaired" in stdout
    code, stdout, err = _run(capsys, "eval", out)
    assert code == 0 and "failed purification" in err


def test_failed_repair_advice_follows_the_measurements():
    """A failed repair names other methods the reference zoos support, never the one that
    failed, and points text models (where only PAM removed anything) to the guard."""
    from trojanguard.practitioner import repair_alternatives
    guard = "serve it behind an input detector (trojanguard guard) that flags triggered inputs"
    assert repair_alternatives("image", "ca", "pam") == f"try --method fst or ebyd-removal, or {guard}"
    assert repair_alternatives("image", "ca", "fst") == f"try --method ebyd-removal, or {guard}"
    assert repair_alternatives("image", "remains", "fst") == f"try --method pam or ebyd-removal, or {guard}"
    assert repair_alternatives("text", "remains", "pam") == ("no other method removed such backdoors on our "
                                                             f"reference zoo; {guard}")
    assert repair_alternatives("text", "ca", "pam") == ("no other method kept clean accuracy better on our "
                                                        f"reference zoo; {guard}")
    assert repair_alternatives("text", "ca", "fst") == f"try --method pam, or {guard}"


def test_refined_trigger_size_limit_admits_a_3x3_patch_on_small_images(monkeypatch):
    """On 8x8 digits 1 % of the image is 0.64 px: the refined trigger (Neural Cleanse on the
    original model) must still be kept up to a 3x3 patch when it moves more inputs than the
    exposed model's empty one (a review found the empty mask reported), and refused beyond."""
    import torch
    from trojanguard.defenses import create_defense
    ebyd = create_defense("ebyd", progress=False)
    exposed = {"mask": torch.zeros(1, 8, 8), "pattern": torch.zeros(1, 8, 8), "target": 0, "success_original": 0.0}

    def refined(px):
        mask = torch.zeros(1, 8, 8)
        mask.view(-1)[:px] = 1.0
        return {"mask": mask, "pattern": torch.ones(1, 8, 8), "target": 0, "success_exposed": 1.0,
                "success_original": 0.97}
    for px, kept in ((9, True), (12, False)):
        monkeypatch.setattr(ebyd, "recover", lambda *a, px=px, **k: refined(px))
        evidence: dict = {}
        out = ebyd._refine(None, None, exposed, evidence)
        assert evidence["refined"]["kept"] is kept and bool(out["mask"].sum() == px) is kept


def test_a_recovered_text_trigger_is_checked_with_its_best_word_and_shows_every_words_rates():
    """The scan scores each word alone; repair checks with the best one (five sentiment words
    together would move a clean sentiment model), and the rates reach the user."""
    from trojanguard.cli.workflow import word_rates_line
    from trojanguard.defenses.token_search import candidates_text
    from trojanguard.practitioner import RecoveredTrigger
    cands = [{"token": "cf", "flip_rate": 0.9, "flip_rate_original": 0.8, "hard_flip_original": 0.75},
             {"token": "great", "flip_rate": 0.6, "flip_rate_original": 0.5, "hard_flip_original": 0.1,
              "found_on": "original"}]
    trig = RecoveredTrigger.from_inspection({"tokens": ["cf", "great"], "candidates": cands}, 1)
    assert trig.trigger(["a dull film", "slow"]) == ["cf a dull film", "cf slow"]
    assert trig.target_for(torch.tensor([0, 0])).tolist() == [1, 1]
    assert word_rates_line(trig).startswith("cf (75% of the surest sentences, 80% of all); great (10% ")
    lines = candidates_text(cands).splitlines()
    assert lines[0].startswith("# token") and lines[1:] == ["cf\t0.9\t0.8\t0.75\texposed",
                                                           "great\t0.6\t0.5\t0.1\toriginal"]


def test_a_guard_whose_clean_scores_do_not_vary_says_so(backdoored_digits, digits):
    import trojanguard as tg
    g = tg.guard(backdoored_digits[0], digits.defense, method="strip", progress=False)
    assert g.detector_warning is None  # STRIP's entropies vary on clean digits
    g.detector.calibration_scores = torch.zeros(40)
    assert "all 40 held-out clean inputs get the same score (0)" in g.detector_warning

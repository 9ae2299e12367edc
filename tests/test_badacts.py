"""BadActs (NAS detection + learned intervals), the guard and ``trojanguard detect`` on tiny
models: the 8x8 digits CNN with a BadNets backdoor and a 2-block 32-wide BERT."""
import csv
import json
import random

import pytest
import torch
from PIL import Image

import trojanguard as tg
from trojanguard.cli.main import main as cli
from trojanguard.data.base import TextData
from trojanguard.defenses import create_defense
from trojanguard.defenses.common import concat, stamped
from trojanguard.errors import UserError
from trojanguard.eval import metrics
from trojanguard.eval.evaluate import predict


def fresh_bound(n_fresh: int, n_cal: int, above: int, alpha: float = 0.001) -> int:
    """Most of ``n_fresh`` clean inputs a threshold may flag before sampling error stops
    explaining it: the threshold is an order statistic of ``n_cal`` calibration scores with
    ``above`` of them strictly above it, so the clean mass above it is Beta(above + 1,
    n_cal - above) and the fresh count beta-binomial (ties only lower it); the
    (1 - alpha) quantile. A plain binomial at the nominal FRR would ignore that the
    threshold itself is estimated from a few dozen scores."""
    from scipy.stats import betabinom
    return int(betabinom.ppf(1 - alpha, n_fresh, above + 1, n_cal - above))


@pytest.fixture(scope="module")
def split(digits):
    """Clean data the detector never saw (``fresh``) and clean data to fit on (D_def plus
    half of the test split: ~360 samples, so the calibration half has ~180)."""
    test = digits.bundle.test
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(test), generator=g)
    half = len(test) // 2
    return concat(digits.defense, test.subset(perm[:half].sort().values)), test.subset(perm[half:].sort().values)


@pytest.fixture(scope="module")
def fitted(backdoored_digits, split):
    model, _ = backdoored_digits
    fit, _ = split
    return create_defense("badacts", progress=False).fit(model, fit)


def test_clean_flag_rate_within_frr_and_trigger_auroc(backdoored_digits, split, fitted):
    model, atk = backdoored_digits
    _, fresh = split
    det = fitted
    clean = det.score_data(fresh)
    n_cal = len(det.calibration_scores)
    above = int((det.calibration_scores > det.threshold).sum())
    assert above <= round(0.05 * n_cal)  # the threshold is the 95 % quantile of held-out clean scores
    flagged = int((clean > det.threshold).sum())
    assert flagged <= fresh_bound(len(fresh), n_cal, above), (flagged, len(fresh))
    poisoned = stamped(fresh, atk)
    trig = det.score_data(poisoned)
    is_pos = torch.cat([torch.zeros(len(clean)), torch.ones(len(trig))]).bool()
    auroc = metrics.auroc(torch.cat([clean, trig]), is_pos)
    tpr = float((trig > det.threshold).float().mean())
    print(f"\ndigits BadNets: fresh clean flagged {flagged}/{len(fresh)}, triggered flagged {tpr:.3f}, "
          f"AUROC {auroc:.4f}")
    assert auroc >= 0.9
    assert tpr >= 0.9
    # continuous in the sense the metrics need: not a 0/1 flag
    assert len(torch.unique(torch.cat([clean, trig]))) > 5
    # the score is 1 - NAS, higher = more suspicious
    x, _ = poisoned.batch(torch.arange(4))
    assert torch.allclose(det.score(x), 1 - det.nas(x))


def test_purification_lowers_asr_keeps_clean(backdoored_digits, split):
    model, atk = backdoored_digits
    fit, fresh = split
    g = tg.guard(model, fit, "badacts", purify=True, progress=False)
    assert g.frr == 0.2  # detect-then-purify defaults to the official script's FRR
    info = g.detector.purifier_info
    assert info["kept"] <= len(fit) and "warning" not in info
    poisoned = stamped(fresh, atk)
    out = g.predict_data(poisoned)
    own = predict(model, poisoned)
    flagged = out.flags
    asr_before = float((own[flagged] == 0).float().mean())
    asr_after = float((out.predictions[flagged] == 0).float().mean())
    clean_out = g.predict_data(fresh)
    clean_own = predict(model, fresh)
    agree = float((clean_out.predictions == clean_own).float().mean())
    ca_own = metrics.accuracy(clean_own, fresh.y)
    ca_guard = metrics.accuracy(clean_out.predictions, fresh.y)
    print(f"\npurify: {int(flagged.sum())}/{len(poisoned)} triggered flagged, ASR on them {asr_before:.3f} -> "
          f"{asr_after:.3f}; clean CA {ca_own:.3f} -> {ca_guard:.3f}, agreement {agree:.3f}; "
          f"c {info['c_final']:.3f}, restarts {info['restarts']}")
    assert asr_before > 0.9
    assert asr_after <= asr_before - 0.2
    assert agree >= 0.9 and ca_guard >= ca_own - 0.05


def test_guard_returns_model_logits_for_unflagged(backdoored_digits, split, fitted):
    model, atk = backdoored_digits
    fit, fresh = split
    x = torch.cat([fresh.batch(torch.arange(40))[0], stamped(fresh, atk).batch(torch.arange(40))[0]])
    with torch.inference_mode():
        own = model(x)
    plain = tg.guard(model, fit, "badacts", frr=0.05, progress=False)(x)
    assert torch.equal(plain.logits, own)  # detection only: always the model's own logits
    assert plain.flags.any() and not plain.flags.all()
    g = tg.guard(model, fit, "badacts", frr=0.05, purify=True, progress=False, epochs=5)
    out = g(x)
    assert torch.equal(out.logits[~out.flags], own[~out.flags])
    assert torch.equal(out.logits[out.flags], g.detector.purified_logits(x[out.flags]))
    logits, scores, flags = out  # also a plain tuple
    assert torch.equal(flags, scores > g.threshold)


def test_vision_spatial_max_reads_channel_maxima(backdoored_digits, split, tmp_path):
    """spatial="max": each channel's neuron is its spatial maximum (a local patch is not
    averaged away); the statistics are those maxima, and a saved guard keeps the choice."""
    model, atk = backdoored_digits
    fit, fresh = split
    det = create_defense("badacts", progress=False, spatial="max").fit(model, fit)
    layer = det.layers[0]
    x, _ = fit.batch(torch.arange(len(fit)))
    with torch.no_grad(), model.capture([layer]) as acts:
        model(x)
    maxima = acts[layer].float().amax((2, 3))
    means = acts[layer].float().mean((2, 3))
    d = det.dims[layer]
    mu = det.mu[:d].cpu()  # fitted on half of ``fit`` (the template's 50/50 split): close, not equal
    assert (mu - maxima.mean(0)).abs().max() < 0.2 * (mu - means.mean(0)).abs().max()
    trig = det.score_data(stamped(fresh, atk))
    clean = det.score_data(fresh)
    auroc = metrics.auroc(torch.cat([clean, trig]), torch.cat([torch.zeros(len(clean)), torch.ones(len(trig))]).bool())
    assert auroc >= 0.9, auroc
    g = tg.guard(model, fit, "badacts", progress=False, spatial="max")
    g.save(tmp_path / "guard")
    h = tg.load_guard(tmp_path / "guard")
    xs = stamped(fresh, atk).batch(torch.arange(20))[0]
    assert torch.equal(h(xs).scores, g(xs).scores)
    # mean+max: two NAS neurons per channel, one clamp interval per channel
    both = tg.guard(model, fit, "badacts", progress=False, spatial="mean+max", purify=True, epochs=2)
    assert both.detector.dims[layer] == 2 * det.dims[layer]
    assert both.detector.bounds[layer][0].shape == (det.dims[layer],)
    out = both(xs)
    assert out.logits.shape == (20, len(fit.classes)) and out.flags.any()


def test_saved_guard_reloads_identically(backdoored_digits, split, tmp_path):
    model, atk = backdoored_digits
    fit, fresh = split
    g = tg.guard(model, fit, "badacts", purify=True, progress=False, epochs=3)
    x = torch.cat([fresh.batch(torch.arange(30))[0], stamped(fresh, atk).batch(torch.arange(30))[0]])
    before = g(x)
    g.save(tmp_path / "guard")
    assert sorted(p.name for p in (tmp_path / "guard").iterdir()) == \
        ["COMPLETE.json", "detector.safetensors", "guard.json", "model.json", "model.safetensors"]
    h = tg.load_guard(tmp_path / "guard")
    after = h(x)
    assert torch.equal(after.scores, before.scores) and torch.equal(after.flags, before.flags)
    assert torch.equal(after.logits, before.logits)
    assert h.threshold == g.threshold and h.purify
    for name in ("mu", "sigma", "calibration_scores"):
        assert torch.equal(getattr(h.detector, name).cpu(), getattr(g.detector, name).cpu())
    for n, (u, m) in g.detector.bounds.items():
        hu, hm = h.detector.bounds[n]
        assert torch.equal(hu.cpu(), u.cpu()) and torch.equal(hm.cpu(), m.cpu())
    h.set_frr(0.1)
    g.set_frr(0.1)
    assert h.threshold == g.threshold
    # a tampered detector file is refused
    (tmp_path / "guard" / "detector.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="sha256"):
        tg.load_guard(tmp_path / "guard")
    with pytest.raises(UserError, match="guard.json"):
        tg.load_guard(tmp_path)


def test_detector_misuse_is_a_user_error(backdoored_digits, split, fitted):
    model, _ = backdoored_digits
    fit, _ = split
    det = create_defense("badacts", progress=False)
    x = fit.batch(torch.arange(4))[0]
    with pytest.raises(UserError, match="fit the detector"):
        det.score(x)
    with pytest.raises(UserError, match="fit"):
        det.flag(x)
    with pytest.raises(UserError, match="fit"):
        det.set_frr(0.1)
    with pytest.raises(UserError, match="fit the purifier"):
        fitted.purified_logits(x)
    with pytest.raises(UserError, match="outside"):
        fitted.set_frr(1.0)
    with pytest.raises(UserError, match="outside"):
        tg.guard(model, fit, "badacts", frr=0.0)
    with pytest.raises(UserError, match="shape"):
        fitted.score(torch.rand(2, 1, 16, 16))
    with pytest.raises(UserError, match="takes images"):
        fitted.score(["a sentence"])
    with pytest.raises(UserError, match="unknown layer"):
        create_defense("badacts", layers=["block9"]).fit(model, fit)
    with pytest.raises(UserError, match="unknown option"):
        create_defense("badacts", delt=2)


# ------------------------------------------------------------------------- text --
def _sentences(n: int, seed: int = 0) -> list[str]:
    words = "good bad movie film great awful plot actor boring fun love hate story slow".split()
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(n)]


def test_text_path_on_tiny_encoder(tiny_encoder_dir, tmp_path):
    model = tg.create_model(f"hf:{tiny_encoder_dir}", num_classes=2).eval()
    texts = _sentences(120)
    clean = TextData(texts, torch.arange(120) % 2, ["negative", "positive"])
    g = tg.guard(model, clean, "badacts", purify=True, progress=False, epochs=3, max_restarts=0)
    det = g.detector
    assert det.layers == ["block0", "block1"] and det.mu.shape == (2 * 32,) and det.position == "cls"  # [CLS] of every block
    queries = _sentences(8, seed=1) + ["cf mn bb tq " * 4]
    out = g(queries)
    assert out.logits.shape == (9, 2) and out.scores.shape == (9,)
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    with torch.inference_mode():
        own = model(queries)
    assert torch.allclose(out.logits[~out.flags], own[~out.flags], atol=1e-6)
    # the interval clamps non-padding tokens only
    u, m = det.bounds["block0"]
    hidden = torch.full((2, 3, 32), 50.0)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    clamped = det._clamps(mask, det.bounds)["block0"](hidden)
    assert torch.equal(clamped[1, 1:], hidden[1, 1:])
    assert torch.allclose(clamped[0], u.expand(3, 32)) and torch.allclose(clamped[1, 0], u)
    with pytest.raises(UserError, match="takes text"):
        g(torch.rand(2, 3, 8, 8))
    g.save(tmp_path / "text-guard")
    h = tg.load_guard(tmp_path / "text-guard")
    assert torch.equal(h(queries).scores, out.scores) and h.detector.position == "cls"


def test_text_position_cls_or_token_mean(tiny_encoder_dir, tmp_path):
    """position=cls (default, the paper) or mean: the NAS is fitted and scored at the same
    position, and a saved guard keeps it."""
    from trojanguard.defenses.common import layer_activations
    texts = _sentences(60)
    clean = TextData(texts, torch.arange(60) % 2, ["negative", "positive"])
    model = tg.create_model(f"hf:{tiny_encoder_dir}", num_classes=2).eval()
    fitted = {how: tg.create_defense("badacts", progress=False, position=how).fit(model, clean) for how in ("cls", "mean")}
    assert not torch.allclose(fitted["cls"].mu, fitted["mean"].mu)
    for how, det in fitted.items():
        assert det.position == how
        a = torch.cat(list(layer_activations(model, clean, det.layers, reduce=how).values()), 1)[:8]
        want = 1.0 - ((a - det.mu).abs() <= det.cfg.delta * det.sigma).float().mean(1)
        assert torch.allclose(det.score(texts[:8]), want, atol=1e-6), how
    g = tg.guard(model, clean, "badacts", progress=False, position="mean")
    g.save(tmp_path / "g")
    h = tg.load_guard(tmp_path / "g")
    assert h.detector.position == "mean" and torch.equal(h(texts[:8]).scores, g(texts[:8]).scores)


# -------------------------------------------------------------------------- CLI --
def _png(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a.numpy()).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def cli_setup(backdoored_digits, digits, tmp_path_factory):
    model, atk = backdoored_digits
    root = tmp_path_factory.mktemp("detect")
    tg.save_checkpoint(root / "ck", model, {"dataset": digits.describe()})
    test = digits.bundle.test
    _png(root / "inputs" / "clean", test.x[:20, 0])
    _png(root / "inputs" / "trigger", stamped(test.subset(torch.arange(40)), atk).x[:20, 0])
    return root


def _run(capsys, *args):
    code = cli(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_detect_end_to_end(cli_setup, capsys, tmp_path):
    root = cli_setup
    code, out, err = _run(capsys, "detect", "--model", root / "ck", "--inputs", root / "inputs",
                          "--out", tmp_path / "scores.csv", "--purify", "--quiet", "--set", "epochs=5",
                          "--save-guard", tmp_path / "g")
    assert code == 0, err
    with open(tmp_path / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "score", "flag", "prediction", "purified_prediction"]
    assert len(rows) == 40 and rows[0]["id"] == "clean/000.png"
    flagged = sum(int(r["flag"]) for r in rows)
    trig = sum(int(r["flag"]) for r in rows if r["id"].startswith("trigger/"))
    assert f"flagged {flagged} of 40 inputs" in out
    assert trig >= 18  # the triggered images; the clean ones at FRR 0.2
    for r in rows:
        if r["flag"] == "0":
            assert r["prediction"] == r["purified_prediction"]
    assert (tmp_path / "g" / "guard.json").is_file()
    # the saved guard, used as it is (no clean data, no refit): the same scores, flags and predictions
    code, out, err = _run(capsys, "detect", "--guard", tmp_path / "g", "--inputs", root / "inputs",
                          "--out", tmp_path / "again.csv", "--quiet")
    assert code == 0, err
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "scores.csv").read_text()
    code, out, err = _run(capsys, "detect", "--guard", tmp_path / "g", "--inputs", root / "inputs",
                          "--clean-data", root / "inputs", "--out", tmp_path / "x.csv", "--quiet")
    assert code == 2 and "--clean-data fit a new detector" in err
    # detection only: no purified column
    code, out, err = _run(capsys, "detect", "--model", root / "ck", "--inputs", root / "inputs" / "trigger",
                          "--out", tmp_path / "s2.csv", "--frr", "0.05", "--quiet")
    assert code == 0, err
    assert "purified_prediction" not in (tmp_path / "s2.csv").read_text().splitlines()[0]
    # --json and --threads: a machine-readable summary that records the threads used
    code, out, err = _run(capsys, "detect", "--model", root / "ck", "--inputs", root / "inputs" / "trigger",
                          "--out", tmp_path / "s3.csv", "--quiet", "--json", "--threads", "1")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["threads"] == 1 and summary["inputs"] == 20 and 0 <= summary["flagged"] <= 20


def test_cli_detect_bad_inputs(cli_setup, capsys, tmp_path, tiny_encoder_dir):
    root = cli_setup
    ck, out = root / "ck", tmp_path / "s.csv"
    (tmp_path / "empty").mkdir()
    _png(tmp_path / "big", torch.zeros(2, 16, 16, dtype=torch.uint8))
    _png(tmp_path / "stray", torch.zeros(2, 8, 8, dtype=torch.uint8))
    (tmp_path / "stray" / "notes.txt").write_text("not an image")
    _png(tmp_path / "broken", torch.zeros(1, 8, 8, dtype=torch.uint8))
    (tmp_path / "broken" / "bad.png").write_bytes(b"\x89PNG garbage")
    table = tmp_path / "t.csv"
    table.write_text("sentence\nhello there\n")
    tm = tg.create_model(f"hf:{tiny_encoder_dir}", num_classes=2)
    tg.save_checkpoint(tmp_path / "text-ck", tm, {"dataset": {"name": "sst2", "classes": ["n", "p"]}})
    capsys.readouterr()  # the encoder's loading messages are not the CLI's
    cases = [
        (["--inputs", table], "takes images"),
        (["--inputs", tmp_path / "big"], "resize"),
        (["--inputs", tmp_path / "empty"], "holds no images"),
        (["--inputs", tmp_path / "stray"], "is not an image"),
        (["--inputs", tmp_path / "broken"], "cannot decode image"),
        (["--inputs", root / "inputs", "--frr", "1.5"], "outside (0, 1)"),
        (["--inputs", root / "inputs", "--frr", "0"], "outside (0, 1)"),
        (["--inputs", root / "inputs", "--method", "fst"], "not an input detector"),
        (["--inputs", root / "inputs", "--set", "delt=2"], "unknown option"),
        (["--inputs", root / "inputs", "--clean-data", tmp_path / "empty"], "sub-folder per class"),
    ]
    for extra, needle in cases:
        code, _, err = _run(capsys, "detect", "--model", ck, "--out", out, "--quiet", *extra)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (extra, err)
    code, _, err = _run(capsys, "detect", "--model", tmp_path / "text-ck", "--inputs", root / "inputs",
                        "--out", out, "--quiet")
    assert code == 2 and "takes text" in err, err
    assert not out.exists()


def test_cli_detect_with_clean_folder(cli_setup, capsys, digits, tmp_path):
    root = cli_setup
    clean = digits.defense
    for c in range(10):
        _png(tmp_path / "clean" / str(c), clean.x[clean.y == c][:, 0])
    code, out, err = _run(capsys, "detect", "--model", root / "ck", "--inputs", root / "inputs" / "trigger",
                          "--clean-data", tmp_path / "clean", "--out", tmp_path / "s.csv", "--quiet")
    assert code == 0, err
    assert "flagged" in out


def test_cli_detect_text(tiny_encoder_dir, capsys, tmp_path):
    tm = tg.create_model(f"hf:{tiny_encoder_dir}", num_classes=2)
    tg.save_checkpoint(tmp_path / "ck", tm, {"dataset": {"name": "sst2", "classes": ["negative", "positive"]}})
    with open(tmp_path / "clean.tsv", "w") as f:
        f.write("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(_sentences(60))))
    with open(tmp_path / "inputs.csv", "w") as f:
        f.write("id,text\n" + "".join(f"s{i},{s}\n" for i, s in enumerate(_sentences(5, seed=2))))
    capsys.readouterr()
    code, out, err = _run(capsys, "detect", "--model", tmp_path / "ck", "--inputs", tmp_path / "inputs.csv",
                          "--clean-data", tmp_path / "clean.tsv", "--out", tmp_path / "s.csv", "--quiet")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(5)]
    assert "of 5 inputs" in out
    code, _, err = _run(capsys, "detect", "--model", tmp_path / "ck", "--inputs", tmp_path / "inputs.csv",
                        "--input-column", "review", "--clean-data", tmp_path / "clean.tsv", "--out", tmp_path / "s.csv")
    assert code == 2 and "--input-column" in err


def test_harness_detect_then_purify_row(backdoored_digits, split):
    """The detector cell's detect-then-purify numbers: flagged inputs go through the clamped
    forward pass at the purification FRR, so CA stays near the model's and ASR falls."""
    from trojanguard.bench.cells import _detect_then_purify
    model, atk = backdoored_digits
    fit, fresh = split
    det = create_defense("badacts", progress=False, epochs=5).fit(model, fit)
    targets = atk.target_for(fresh.y)
    keep = (fresh.y != targets).nonzero().flatten()
    poisoned, tgt = fresh.subset(keep), targets[keep]
    before_ca = metrics.accuracy(predict(model, fresh), fresh.y)
    before_asr = float((predict(model, poisoned, trigger=atk.trigger) == tgt).float().mean())
    out = _detect_then_purify(model, det, fit, fresh, poisoned, atk.trigger, tgt)
    assert out["guard"] == "detect-then-purify (FRR 0.2)"
    assert before_asr > 0.9 and out["asr_after"] < 0.5 * before_asr, (before_asr, out)
    assert out["ca_after"] >= before_ca - 0.1, (before_ca, out)

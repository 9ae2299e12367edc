"""Every bad input named in the acceptance of issues 14 (purify), 16 (detect), 17 (the other
detectors), 18 (inspect) and 19 (scan / repair / guard, models from elsewhere) that is not
already covered elsewhere: through the command line, each must exit 2 with exactly one line on
stderr that names the problem (``refused``), with no traceback and nothing written.

Where the same case is tested in another file, that file is named in the case's comment; the
repair command's clean-data cases live in test_workflow.py."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import trojanguard as tg
from pickle_payloads import GetattrStaticPayload, MethodcallerPayload
from trojanguard.cli.main import EXIT_BROKEN_PIPE, main
from trojanguard.errors import UserError


# ------------------------------------------------------------------------- helpers --
def refused(capsys, argv, *needles, out_dir=None) -> str:
    """exit 2, one line 'trojanguard: error: ...' naming the problem, no traceback, no --out."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    assert len(lines) == 1 and lines[0].startswith("trojanguard: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if out_dir is not None:
        assert not out_dir.exists(), f"{out_dir} was written"
    return lines[0]


def _png(path, shape=(8, 8), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)


def _image_folder(root, classes, per_class=3, shape=(8, 8)):
    for c in classes:
        for i in range(per_class):
            _png(root / str(c) / f"{i}.png", shape, value=(20 * i) % 256)
    return root


def _table(path, labels, header="sentence,label"):
    words = "good bad film plot actor boring fun slow".split()
    rows = [f"{words[i % 8]} {words[(3 * i) % 8]} {i},{lab}" for i, lab in enumerate(labels)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, backdoored_digits, digits):
    """The tiny backdoored digits model as a checkpoint (recording its dataset and split) and as
    a bare state dict, plus clean data of every wrong kind."""
    model, _ = backdoored_digits
    root = tmp_path_factory.mktemp("bad-inputs")
    tg.save_checkpoint(root / "ck", model, {"dataset": digits.describe()})
    torch.save(model.state_dict(), root / "w.pt")
    d = digits.defense
    for c in range(10):  # real clean digits: an ImageFolder named by class index, 60 images
        (root / "clean" / str(c)).mkdir(parents=True)
        for i, x in enumerate(d.x[d.y == c][:6, 0]):
            Image.fromarray(x.numpy()).save(root / "clean" / str(c) / f"{i}.png")
    _image_folder(root / "three-classes", range(3), per_class=20)
    _image_folder(root / "zebra", [*range(10), "zebra"])
    _image_folder(root / "one-each", range(10), per_class=1)
    for i in range(30):
        _png(root / "unlabelled" / f"{i}.png", value=i)
    _table(root / "text.csv", [i % 2 for i in range(60)])
    return root


@pytest.fixture(scope="module")
def text_ck(tmp_path_factory, tiny_encoder_dir):
    """A tiny text classifier checkpoint that records SST-2 (not found from ``away``)."""
    root = tmp_path_factory.mktemp("text-bad-inputs")
    m = tg.create_model(f"hf:{tiny_encoder_dir}", num_classes=2)
    tg.save_checkpoint(root / "ck", m, {"dataset": {"name": "sst2", "classes": ["negative", "positive"]}})
    return root / "ck"


@pytest.fixture()
def away(tmp_path, monkeypatch, capsys):
    """Run from an empty folder: the recorded datasets (../shared/data) are not found."""
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # loading messages of fixtures are not the command's
    return tmp_path


# ---------------------------------------------------------------- issue 14: purify --
PURIFY_CASES = [
    # (id, extra argv, clean-data folder or file under `files`, needles)
    ("unknown-method", ["--method", "fts"], None, ["unknown defense 'fts'", "did you mean", "choose one of"]),
    ("detector-as-purifier", ["--method", "badacts"], None, ["badacts does not repair models", "purifiers: "]),
    ("inspector-as-purifier", ["--method", "nc"], None, ["nc does not repair models"]),
    ("unknown-option", ["--method", "fst", "--set", "alpah=0.2"], None,
     ["unknown option 'alpah'", "did you mean 'alpha'"]),
    ("option-of-another-method", ["--method", "wiper", "--set", "project_all_modes=true"], None,
     ["unknown option 'project_all_modes'", "options: "]),
    ("option-bad-value", ["--method", "fst", "--set", "epochs=many"], None, ["option epochs", "integer"]),
    ("set-without-value", ["--method", "fst", "--set", "epochs"], None, ["expected KEY=VALUE"]),
    ("text-clean-data-for-image-model", ["--method", "fst"], "text.csv", ["is not a folder", "ImageFolder"]),
    ("fewer-classes", ["--method", "fst"], "three-classes", ["3 of the model's 10 classes", "none for 3, 4"]),
    ("class-the-model-lacks", ["--method", "fst"], "zebra", ["unknown: 'zebra'", "named as the model's classes"]),
    ("unlabelled-folder", ["--method", "fst"], "unlabelled", ["one sub-folder per class", "found none"]),
    ("too-little-clean-data", ["--method", "fst"], "one-each", ["needs at least 20 clean samples, got 10"]),
    ("too-small-holdout", ["--method", "fst", "--holdout", "0.005"], None, ["needs at least 20 clean samples"]),
    ("holdout-outside", ["--method", "fst", "--holdout", "1.5"], None, ["--holdout", "outside (0, 1)"]),
    ("missing-clean-data", ["--method", "fst"], "nowhere", ["does not exist"]),
    ("robustness-without-attack", ["--method", "fst", "--robustness", "--set", "epochs=1"], None,
     ["--robustness needs the attack's trigger"]),
]


@pytest.mark.parametrize("case", PURIFY_CASES, ids=[c[0] for c in PURIFY_CASES])
def test_purify_bad_input(case, files, tmp_path, capsys):
    _, extra, data, needles = case
    argv = ["purify", "--model", files / "ck", "--out", tmp_path / "out", "--quiet", *extra]
    if data is not None:
        argv += ["--clean-data", files / data]
    refused(capsys, argv, *needles, out_dir=tmp_path / "out")


def _purifiers(modality: str) -> list[str]:
    from trojanguard.defenses import DEFENSES
    from trojanguard.purification import _is_purifier
    cls = (lambda n: getattr(DEFENSES.get(n), "func", DEFENSES.get(n)))  # fst & co. are partials
    return [n for n in DEFENSES.names() if _is_purifier(n) and modality in cls(n).modalities]


@pytest.mark.parametrize("method", _purifiers("image"))
def test_purify_too_little_clean_data_gives_each_methods_minimum(method, files, tmp_path, capsys):
    """Ten clean images (one per class): every purifier refuses before any work and names its
    minimum, which must be more than it was given."""
    line = refused(capsys, ["purify", "--method", method, "--model", files / "ck", "--clean-data",
                            files / "one-each", "--out", tmp_path / "out", "--quiet"],
                   "clean samples, got 10", "give more clean data", out_dir=tmp_path / "out")
    need = re.search(r"needs at least (\d+) clean samples", line)
    assert need and int(need.group(1)) > 10, line


@pytest.mark.parametrize("data,needles", [
    ("folder", ["is a folder", "text clean data is a CSV/TSV file"]),
    ("label-outside", ["label 2 is outside the classes"]),
    ("one-class", ["labels for 1 of the model's 2 classes", "none for 1 (positive)"]),
    ("no-label-column", ["has no column 'label'", "rename the header's columns to sentence,label"]),
])
def test_purify_text_model_bad_clean_data(data, needles, text_ck, files, away, capsys):
    """The user's clean data is checked before the recorded dataset is looked for: a mistake in
    it is named even where SST-2 is not on the machine (it is not, from ``away``)."""
    path = {"folder": files / "clean",
            "label-outside": _table(away / "three.csv", [i % 3 for i in range(60)]),
            "one-class": _table(away / "one.csv", [0] * 60),
            "no-label-column": _table(away / "nolabel.csv", ["x"] * 60, header="sentence,comment")}[data]
    refused(capsys, ["purify", "--method", "fst", "--model", text_ck, "--clean-data", path,
                     "--out", away / "out", "--quiet"], *needles, out_dir=away / "out")


# ---------------------------------------------------------------- issue 16: detect --
def test_detect_text_model_given_images_is_one_line(text_ck, files, away, capsys):
    # test_badacts.py::test_cli_detect_bad_inputs has the other detect cases (image model given a
    # table, another image size, an empty folder, a non-image file, a broken image, --frr 0 / 1.5)
    refused(capsys, ["detect", "--model", text_ck, "--inputs", files / "clean", "--clean-data", files / "text.csv",
                     "--out", away / "s.csv", "--quiet"], "the model takes text", "is a folder",
            out_dir=away / "s.csv")


@pytest.mark.parametrize("method", ["badacts", "strip", "beniful"])
def test_detect_clean_data_of_fewer_classes(method, files, tmp_path, capsys):
    _image_folder(tmp_path / "inputs", ["x"], per_class=2)
    refused(capsys, ["detect", "--method", method, "--model", files / "ck", "--inputs", tmp_path / "inputs",
                     "--clean-data", files / "three-classes", "--out", tmp_path / "s.csv", "--quiet"],
            "3 of the model's 10 classes", out_dir=tmp_path / "s.csv")


@pytest.mark.parametrize("method,needles", [
    ("rap", ["rap works on text models, not image"]),
    ("fst", ["'fst' is not an input detector"]),
])
def test_detect_method_that_cannot_detect_these_inputs(method, needles, files, tmp_path, capsys):
    _image_folder(tmp_path / "inputs", ["x"], per_class=2)
    refused(capsys, ["detect", "--method", method, "--model", files / "ck", "--inputs", tmp_path / "inputs",
                     "--out", tmp_path / "s.csv", "--quiet"], *needles, out_dir=tmp_path / "s.csv")


@pytest.mark.parametrize("frr", ["0", "1", "1.5", "-0.1", "x"])
def test_guard_frr_outside_unit_interval_fails_while_parsing(frr, files, tmp_path, capsys):
    refused(capsys, ["guard", "--model", files / "ck", "--frr", frr, "--out", tmp_path / "g", "--quiet"],
            "--frr", out_dir=tmp_path / "g")


@pytest.mark.parametrize("method", ["badacts", "strip", "beniful", "rap"])
def test_detector_used_before_it_is_fitted(method):
    """Issue 16: 'a detector used before it is fitted'. Through the CLI a detector is always
    fitted first; in Python every call on an unfitted one must be a one-line UserError."""
    from trojanguard.defenses import create_defense
    det = create_defense(method, progress=False)
    x = ["a sentence"] if det.modalities == ("text",) else torch.rand(2, 1, 8, 8)
    for call in (lambda: det.set_frr(0.1), lambda: det.flag(x), lambda: det.score(x)):
        with pytest.raises(UserError, match="fit") as e:
            call()
        assert "\n" not in str(e.value)


def test_every_detector_is_in_the_unfitted_test():
    from trojanguard.defenses import DEFENSES, InputDetector
    detectors = {n for n in DEFENSES.names()
                 if isinstance(getattr(DEFENSES.get(n), "func", DEFENSES.get(n)), type)
                 and issubclass(getattr(DEFENSES.get(n), "func", DEFENSES.get(n)), InputDetector)}
    assert detectors == {"badacts", "strip", "beniful", "rap"}, detectors


# --------------------------------------------------------------- issue 18: inspect --
INSPECT_CASES = [
    # test_inspect.py::test_inspect_command_bad_inputs_exit_2 covers --holdout 0.02, a 'zebra'
    # class, a table for an image model and a one-class checkpoint with looser checks
    ("ebyd", "text.csv", ["is not a folder", "ImageFolder"]),
    ("ebyd", "three-classes", ["3 of the model's 10 classes"]),
    ("ebyd", "zebra", ["unknown: 'zebra'"]),
    ("ebyd", "unlabelled", ["one sub-folder per class", "found none"]),
    ("ebyd", "one-each", ["ebyd needs at least 50 clean samples, got 10"]),
    ("nc", "one-each", ["nc needs at least 20 clean samples, got 10"]),
    ("nc", "three-classes", ["3 of the model's 10 classes"]),
]


@pytest.mark.parametrize("method,data,needles", INSPECT_CASES,
                         ids=[f"{m}-{d}" for m, d, _ in INSPECT_CASES])
def test_inspect_bad_clean_data(method, data, needles, files, tmp_path, capsys):
    refused(capsys, ["inspect", "--method", method, "--model", files / "ck", "--clean-data", files / data,
                     "--out", tmp_path / "out", "--quiet"], *needles, out_dir=tmp_path / "out")


def test_inspect_text_model_given_image_folder(text_ck, files, away, capsys):
    refused(capsys, ["inspect", "--model", text_ck, "--clean-data", files / "clean", "--out", away / "out",
                     "--quiet"], "is a folder", "text clean data is a CSV/TSV file", out_dir=away / "out")


def test_inspect_model_with_one_class(files, digits, tmp_path, capsys):
    one = tg.create_model("small_cnn", num_classes=1, in_channels=1)
    tg.save_checkpoint(tmp_path / "one", one, {"dataset": digits.describe()})
    refused(capsys, ["inspect", "--model", tmp_path / "one", "--out", tmp_path / "out", "--quiet"],
            "model.args.num_classes", "greater than or equal to 2", out_dir=tmp_path / "out")
    # the same model as a bare state dict: loaded, then refused for its class count
    torch.save(one.state_dict(), tmp_path / "one.pt")
    for cmd in ("scan", "repair", "guard"):
        refused(capsys, [cmd, "--model", tmp_path / "one.pt", "--arch", "small_cnn", "--clean-data",
                         files / "clean", "--out", tmp_path / "out", "--quiet"],
                "has 1 output class", "at least 2 classes", out_dir=tmp_path / "out")


# ------------------------------------------------ issue 19: models from elsewhere --
def _hf_image_dir(path, labels=10, channels=1, mean=(0.5,)):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(num_channels=channels, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", downsample_in_first_stage=False, num_labels=labels)
    torch.manual_seed(0)
    transformers.AutoModelForImageClassification.from_config(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": list(mean), "image_std": [0.25] * len(mean), "do_resize": True,
         "size": {"height": 8, "width": 8}}))
    return path


MODEL_CASES = [
    # (id, argv after --model, needles); test_models_in.py checks most of these in Python
    ("missing", lambda f, t: [t / "nowhere.pt", "--arch", "small_cnn"], ["does not exist"]),
    ("state-dict-without-arch", lambda f, t: [f / "w.pt"], ["bare state dict", "--arch NAME"]),
    ("unknown-arch", lambda f, t: [f / "w.pt", "--arch", "small_cnm"], ["unknown model", "did you mean 'small_cnn'"]),
    ("arch-does-not-fit", lambda f, t: [f / "w.pt", "--arch", "preact_resnet18"],
     ["do not fit", "--arch/--width/--num-classes"]),
    ("num-classes-contradicts", lambda f, t: [f / "w.pt", "--arch", "small_cnn", "--num-classes", "4"],
     ["shape mismatch"]),
    ("num-classes-1", lambda f, t: [f / "w.pt", "--arch", "small_cnn", "--num-classes", "1"],
     ["--num-classes", "outside 2..100000"]),
    ("unknown-file-type", lambda f, t: [_touch(t / "model.onnx"), "--arch", "small_cnn"],
     ["unknown model file type .onnx"]),
    ("folder-of-nothing", lambda f, t: [_mkdir(t / "stuff")], ["neither a trojanguard checkpoint", "config.json"]),
    ("flags-on-a-checkpoint", lambda f, t: [f / "ck", "--arch", "small_cnn"], ["--arch does not apply"]),
    ("arch-for-hf-directory", lambda f, t: [_hf_image_dir(t / "hf"), "--arch", "small_cnn"],
     ["--arch does not apply", "Hugging Face directory"]),
    ("hf-one-label", lambda f, t: [_hf_image_dir(t / "hf1", labels=1)], ["has 1 output class"]),
    # class names from flags or config that do not match the model or the clean data
    ("classes-count", lambda f, t: [f / "w.pt", "--arch", "small_cnn", "--classes", "a,b,c"],
     ["--classes names 3 classes but the model has 10 outputs"]),
    ("classes-repeated", lambda f, t: [f / "w.pt", "--arch", "small_cnn", "--classes", "a,a,b,c,d,e,f,g,h,i"],
     ["repeated name"]),
    ("classes-vs-clean-folders", lambda f, t: [f / "w.pt", "--arch", "small_cnn", "--classes",
                                               "zero,one,two,three,four,five,six,seven,eight,nine",
                                               "--clean-data", f / "zebra"], ["unknown: 'zebra'"]),
    ("hf-labels-vs-clean-data", lambda f, t: [_hf_image_dir(t / "hf5", labels=5)],
     ["model's classes (0, 1, 2, 3, 4)", "unknown: '5'"]),
    # normalisation from flags or config that does not match the model / the clean images
    ("mean-channels", lambda f, t: [f / "w.pt", "--arch", "small_cnn", "--mean", "0.5,0.5,0.5", "--std",
                                    "0.5,0.5,0.5"], ["--mean/--std have 3/3 values for a 1-channel model"]),
    ("mean-without-std", lambda f, t: [f / "w.pt", "--arch", "small_cnn", "--mean", "0.5"],
     ["give both --mean and --std"]),
    ("mean-not-a-number", lambda f, t: [f / "w.pt", "--arch", "small_cnn", "--mean", "nan", "--std", "1"],
     ["--mean", "not a finite number"]),
    ("mean-on-a-checkpoint", lambda f, t: [f / "ck", "--mean", "0.5", "--std", "0.5"],
     ["--mean does not apply", "records its architecture and normalisation"]),
    ("preprocessor-mean-channels", lambda f, t: [_hf_image_dir(t / "hf-rgb-mean", mean=(0.5, 0.5, 0.5))],
     ["image_mean must be 1 finite numbers", "--mean/--std"]),
    ("hf-input-size-vs-clean-images", lambda f, t: [_hf_image_dir(t / "hf-16"), "--clean-data",
                                                    _image_folder(t / "big", range(10), 5, (16, 16))],
     ["resize"]),
]


def _touch(p):
    p.write_bytes(b"\x08\x01")
    return p


def _mkdir(p):
    p.mkdir()
    (p / "weights.txt").write_text("hello")
    return p


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_scan_model_forms_bad_input(case, files, tmp_path, capsys):
    _, model_argv, needles = case
    argv = ["scan", "--model", *model_argv(files, tmp_path)]
    if "--clean-data" not in argv:
        argv += ["--clean-data", files / "clean"]
    capsys.readouterr()
    refused(capsys, argv + ["--out", tmp_path / "out", "--quiet"], *needles, out_dir=tmp_path / "out")


# purify, inspect and detect read models as scan does (one loader: cli/modelargs.setup_from_args)
OTHER_COMMANDS = {"purify": ["purify", "--method", "ft", "--set", "epochs=1"], "inspect": ["inspect", "--method", "nc"],
                  "detect": ["detect", "--method", "strip", "--inputs", "{files}/clean/3"]}
OTHER_CASES = [c for c in MODEL_CASES if c[0] in ("state-dict-without-arch", "flags-on-a-checkpoint", "classes-count",
                                                  "mean-channels")]


@pytest.mark.parametrize("command", list(OTHER_COMMANDS))
@pytest.mark.parametrize("case", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_commands_model_forms_bad_input(command, case, files, tmp_path, capsys):
    _, model_argv, needles = case
    head = [str(a).format(files=files) for a in OTHER_COMMANDS[command]]
    argv = head + ["--model", *model_argv(files, tmp_path), "--clean-data", files / "clean"]
    out = tmp_path / ("out.csv" if command == "detect" else "out")
    refused(capsys, argv + ["--out", out, "--quiet"], *needles, out_dir=out)


def test_saved_guard_refuses_model_flags(files, tmp_path, capsys):
    refused(capsys, ["detect", "--guard", files / "ck", "--arch", "small_cnn", "--inputs", files / "clean" / "3",
                     "--out", tmp_path / "s.csv"], "--arch describe a --model file", "drop them",
            out_dir=tmp_path / "s.csv")


def test_encoder_without_classifier_head(tiny_encoder_dir, away, capsys):
    refused(capsys, ["scan", "--model", tiny_encoder_dir, "--out", away / "out"], "without a trained classifier",
            "ForSequenceClassification", out_dir=away / "out")


# --- pickles that would run code, through the command line ---------------------------
@pytest.mark.parametrize("payload", [MethodcallerPayload, GetattrStaticPayload])
@pytest.mark.parametrize("form", ["torch.save", "legacy", "raw-pickle"])
@pytest.mark.parametrize("command", ["scan", "repair", "eval"])
def test_pt_that_would_run_code_is_refused_by_the_cli(payload, form, command, files, tmp_path, capsys):
    payload.path = str(tmp_path / "proof")
    pickle.loads(pickle.dumps(payload()))  # the payload is real: plain pickle runs it
    assert (tmp_path / "proof").exists()
    marker = tmp_path / "code-ran"
    payload.path = str(marker)
    state = {k: v for k, v in torch.load(files / "w.pt", weights_only=True).items()}
    evil = tmp_path / ("evil.pth" if form == "raw-pickle" else "evil.pt")
    if form == "torch.save":
        torch.save({**state, "extra": payload()}, evil)
    elif form == "legacy":
        torch.save({"state_dict": {**state, "extra": payload()}}, evil, _use_new_zipfile_serialization=False)
    else:
        evil.write_bytes(pickle.dumps({"w": payload()}, protocol=2))
    if command == "eval":
        argv = ["eval", evil, "--model", "small_cnn", "--dataset", "digits"]
    else:
        argv = [command, "--model", evil, "--arch", "small_cnn", "--clean-data", files / "clean",
                "--out", tmp_path / "out"]
    needles = ["torch.save(model.state_dict())"]
    if form != "raw-pickle":  # torch names the global it refused
        needles += ["refused to load", "would run code"]
    refused(capsys, argv, *needles, out_dir=tmp_path / "out")
    assert not marker.exists(), "unpickling ran code"


# ------------------------------------------------------- issue 19: closed pipe --
@pytest.mark.parametrize("args", [["list", "attacks"], ["info", "--json", "{ck}"], ["eval", "{ck}", "--json"]])
def test_closed_pipe_is_no_traceback(args, files):
    """'trojanguard info --json | head': the reader is gone before anything is written."""
    argv = [a.format(ck=files / "ck") for a in args]
    p = subprocess.Popen([sys.executable, "-m", "trojanguard", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    err = p.stderr.read()
    code = p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err and err.strip() == "", err
    assert code == EXIT_BROKEN_PIPE, (code, err)


def test_an_output_never_replaces_an_input(tmp_path):
    """The shared check behind every --out: the result may not be an input, nor a folder
    holding one (a result replaces its whole folder); a sibling is fine."""
    from trojanguard.errors import UserError
    from trojanguard.resultdir import check_file_out, check_out
    model, data = tmp_path / "models" / "suspect", tmp_path / "inputs.csv"
    model.mkdir(parents=True)
    data.write_text("sentence,label\n")
    given = {"--model": model, "--inputs": data}
    for out in (model, model.parent, tmp_path):
        with pytest.raises(UserError, match="would replace --model"):
            check_out(out, "--out", given)
    with pytest.raises(UserError, match="would replace --inputs"):
        check_file_out(data, "--out", "scores.csv", given)
    check_out(tmp_path / "models" / "repaired", "--out", given)
    check_file_out(tmp_path / "scores.csv", "--out", "scores.csv", given)

"""Models from elsewhere (issue 19, point 1): any nn.Module through ``wrap``, Hugging Face
image/text classifier directories, bare state dicts with ``--arch``, and the refusal of
pickles that would run code (including the published blocklist-scanner bypasses)."""
from __future__ import annotations

import argparse
import copy
import json
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import trojanguard as tg
from pickle_payloads import GetattrStaticPayload, MethodcallerPayload, OpenPayload
from trojanguard.defenses import create_defense
from trojanguard.defenses.common import layer_activations
from trojanguard.errors import UserError
from trojanguard.eval.evaluate import predict
from trojanguard.models.adapter import WrappedModel
from trojanguard.models.foreign import check_model_data, load_foreign_model


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------ plain nn.Module ---
class TinyNet(nn.Module):
    """A torchvision-ResNet-shaped CNN: stem (conv, bn, relu, pool), two stages, pool, fc."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def trunk(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.avgpool(self.layer2(self.layer1(x))).flatten(1)

    def forward(self, x):
        return self.fc(self.trunk(x))


def test_wrap_gives_the_interface_and_survives_deepcopy(digits):
    net = TinyNet()
    model = tg.wrap(net, mean=[0.5], std=[0.5], classes=[str(i) for i in range(10)])
    # head found as the last Linear, layers by the CNN rule (stem group, then the stages)
    assert model.head is net.fc and model.layer_names() == ["maxpool", "layer1", "layer2"]
    x, _ = digits.defense.batch(torch.arange(6))
    net.eval(), model.eval()
    with torch.no_grad():
        z = (x - 0.5) / 0.5
        assert torch.equal(model.features(x), net.trunk(z))   # the head's input, through the module's forward
        assert torch.equal(model(x), net(z))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.head.weight.add_(1.0)
    assert twin.head is twin.net.fc and not torch.equal(twin.head.weight, net.fc.weight)
    with torch.no_grad():
        assert torch.equal(twin.features(x), model.features(x))  # its own hook on its own head
        assert not torch.equal(twin(x), model(x))
    acts = layer_activations(model, digits.defense, ["maxpool", "layer2"], with_logits=True)
    assert acts["maxpool"].shape == (len(digits.defense), 8) and acts["layer2"].shape == (len(digits.defense), 16)
    with torch.no_grad():
        full = digits.defense.batch(torch.arange(len(digits.defense)))[0]
        assert torch.allclose(acts["logits"], net((full - 0.5) / 0.5), atol=1e-5)
        l2 = net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1((full - 0.5) / 0.5))))))
    assert torch.allclose(acts["layer2"], l2.mean((2, 3)), atol=1e-5)
    check_model_data(model, digits.defense)


def test_fst_on_a_wrapped_module_equals_fst_on_the_native_model(clean_digits_model, digits):
    """A SmallCNN seen only as a plain nn.Module (wrap finds head 'head' and layers
    block1..3 by itself) must purify exactly like the native model: same parameters in the
    same order, same head re-initialisation, same features."""
    native = copy.deepcopy(clean_digits_model)
    wrapped = tg.wrap(copy.deepcopy(clean_digits_model))
    assert wrapped._head_path == "head" and wrapped.layer_names() == native.layer_names()
    w0 = wrapped.head.weight.detach().clone()
    fst = dict(epochs=3, progress=False, device="cpu")
    res_n = create_defense("fst", **fst).purify(native, digits.defense)
    res_w = create_defense("fst", **fst).purify(wrapped, digits.defense)
    assert isinstance(res_w.model, WrappedModel) and torch.equal(wrapped.head.weight, w0)  # input untouched
    assert res_w.info["head_cosine_to_original"] == pytest.approx(res_n.info["head_cosine_to_original"], abs=1e-5)
    assert res_w.info["head_cosine_to_original"] < 0.9  # the wrapped head was re-initialised
    assert torch.allclose(res_w.model.head.weight, res_n.model.head.weight, atol=1e-5)
    assert torch.allclose(res_w.model.head.weight.norm(), w0.norm(), rtol=1e-4)
    assert torch.equal(predict(res_w.model, digits.bundle.test), predict(res_n.model, digits.bundle.test))
    print(f"FST (3 epochs, {len(digits.defense)} clean digits): verify CA {res_w.ca_before:.3f} -> "
          f"{res_w.ca_after:.3f} wrapped, {res_n.ca_before:.3f} -> {res_n.ca_after:.3f} native")


def test_wrap_errors_name_what_is_missing(digits):
    conv_classifier = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UserError) as e:
        tg.wrap(conv_classifier)
    assert "no nn.Linear" in one_line_error(e) and "Conv2d '2'" in str(e.value)

    class SequentialWithoutLinear(nn.Module):  # an embedding Linear earlier, a conv classifier at the end
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.classifier = nn.Sequential(nn.Dropout(), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UserError) as e:
        tg.wrap(SequentialWithoutLinear())
    assert "followed by Conv2d 'classifier.1'" in one_line_error(e)
    with pytest.raises(UserError) as e:
        tg.wrap(TinyNet(), head="avgpool")
    assert "not an nn.Linear" in one_line_error(e)
    with pytest.raises(UserError) as e:
        tg.wrap(TinyNet(), head="classifier")
    assert "['fc']" in one_line_error(e)
    with pytest.raises(UserError) as e:
        tg.wrap(TinyNet(), layers=["layer3"])
    assert "no layer 'layer3'" in one_line_error(e)
    softmaxed = nn.Sequential(TinyNet(), nn.Softmax(1))
    model = tg.wrap(softmaxed)  # nothing to probe with: checked on the clean data
    with pytest.raises(UserError) as e:
        check_model_data(model, digits.defense)
    assert "not the output of its head" in one_line_error(e)
    with pytest.raises(UserError) as e:
        check_model_data(tg.wrap(TinyNet(classes=4)), digits.defense)
    assert "4 classes but the clean data has 10" in one_line_error(e)
    with pytest.raises(UserError) as e:
        tg.load_foreign_weights("nowhere.pt", tg.wrap(TinyNet()))
    one_line_error(e)
    with pytest.raises(UserError) as e:
        tg.create_model("wrap:tests.TinyNet")
    assert "load_foreign_weights" in one_line_error(e)


def test_wrapped_checkpoint_weights_load_back(tmp_path, digits):
    torch.manual_seed(1)
    trained_wrapped = tg.wrap(TinyNet(), head="fc", mean=[0.5], std=[0.5], input_size=(8, 8)).eval()
    tg.save_checkpoint(tmp_path / "ck", trained_wrapped)
    fresh = tg.wrap(TinyNet(), head="fc", mean=[0.5], std=[0.5])
    tg.load_foreign_weights(tmp_path / "ck" / "model.safetensors", fresh)
    assert torch.equal(predict(fresh, digits.bundle.test), predict(trained_wrapped, digits.bundle.test))
    torch.save(trained_wrapped.net.state_dict(), tmp_path / "own.pt")  # the module's own keys (no 'net.')
    other = tg.load_foreign_weights(tmp_path / "own.pt", tg.wrap(TinyNet(), mean=[0.5], std=[0.5]))
    assert torch.equal(predict(other, digits.bundle.test), predict(trained_wrapped, digits.bundle.test))


# ------------------------------------------------------- Hugging Face directories ---
def _hf_image_dir(path, kind: str, labels: int = 10, size: int = 8):
    transformers = pytest.importorskip("transformers")
    if kind == "resnet":
        cfg = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                        layer_type="basic", downsample_in_first_stage=False, num_labels=labels)
    else:
        cfg = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, num_labels=labels)
    cfg.id2label = {i: f"digit-{i}" for i in range(labels)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    torch.manual_seed(0)
    transformers.AutoModelForImageClassification.from_config(cfg).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.5], "image_std": [0.25], "do_resize": True,
         "size": {"height": size, "width": size}}))
    return path


@pytest.mark.parametrize("kind,layers", [("resnet", ["stage0", "stage1"]), ("vit", ["block0", "block1"])])
def test_hf_image_directory_loads_and_runs_fst(kind, layers, tmp_path, digits):
    d = _hf_image_dir(tmp_path / kind, kind)
    model, meta = load_foreign_model(d)
    assert model.layer_names() == layers and model.input_size == (8, 8)
    assert meta["dataset"]["classes"][3] == "digit-3" and meta["source"]["kind"] == "hf-image"
    assert "normalisation from preprocessor_config.json" in meta["choices"]
    x, _ = digits.defense.batch(torch.arange(4))
    with torch.no_grad():  # normalisation from preprocessor_config.json applied inside
        assert torch.allclose(model(x), model.net(pixel_values=(x - 0.5) / 0.25).logits)
    check_model_data(model, digits.defense)
    acts = layer_activations(model, digits.defense, layers)
    assert acts[layers[-1]].shape == (len(digits.defense), 16)
    w0 = model.head.weight.detach().clone()
    res = create_defense("fst", epochs=2, progress=False).purify(model, digits.defense)
    assert type(res.model) is type(model) and torch.equal(model.head.weight, w0)
    assert torch.allclose(res.model.head.weight.norm(), w0.norm(), rtol=1e-4)
    assert res.info["head_cosine_to_original"] < 0.9
    # the repaired model is saved as a checkpoint that rebuilds from (its copy of) the directory's config
    tg.save_checkpoint(tmp_path / "repaired", res.model, meta)
    back, side = tg.load_checkpoint(tmp_path / "repaired")
    assert side["model"]["name"] == "hf-image:hf" and side["model"]["hf_source"] == str(d.resolve())
    with torch.no_grad():
        assert torch.allclose(back(x), res.model(x), atol=1e-5)


def test_hf_image_mismatches_are_one_line(tmp_path, digits):
    d = _hf_image_dir(tmp_path / "big", "resnet", size=16)
    model, _ = load_foreign_model(d)
    with pytest.raises(UserError) as e:
        check_model_data(model, digits.defense)
    assert "takes 16x16 images but the clean data is 8x8" in one_line_error(e)
    with pytest.raises(UserError) as e:
        load_foreign_model(d, num_classes=3)
    assert "10 classes, not 3" in one_line_error(e)
    with pytest.raises(UserError) as e:
        load_foreign_model(d, arch="small_cnn")
    assert "--arch does not apply" in one_line_error(e)
    five = _hf_image_dir(tmp_path / "five", "vit", labels=5)
    with pytest.raises(UserError) as e:
        check_model_data(load_foreign_model(five)[0], digits.defense)
    assert "5 classes but the clean data has 10" in one_line_error(e)
    model, meta = load_foreign_model(five, classes="a,b,c,d,e".split(","), mean=[0.1], std=[0.2])
    assert meta["dataset"]["classes"] == list("abcde") and model.normalization_source == "flags"
    with pytest.raises(UserError) as e:
        load_foreign_model(five, classes=["a", "b"])
    assert "give 5 names" in one_line_error(e)


def test_hf_text_classifier_directory(tiny_encoder_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from trojanguard.data.base import TextData
    cfg = transformers.BertConfig.from_pretrained(tiny_encoder_dir, num_labels=2,
                                                  id2label={0: "negative", 1: "positive"},
                                                  label2id={"negative": 0, "positive": 1})
    torch.manual_seed(0)
    d = tmp_path / "sentiment"
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_encoder_dir)
    tok.save_pretrained(d)
    model, meta = load_foreign_model(d)
    assert model.modality == "text" and model.layer_names() == ["block0", "block1"]
    assert meta["dataset"]["classes"] == ["negative", "positive"] and model._head_path == "classifier"
    texts = ["a fine film", "dull and slow", "loved it", "a mess"] * 6
    data = TextData(texts, torch.tensor([1, 0, 1, 0] * 6), ["negative", "positive"])
    enc = tok(texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(texts[:4]), model.net(**enc).logits, atol=1e-6)
        emb = model.encoder.get_input_embeddings()(enc["input_ids"])
        assert torch.allclose(model.logits_from_embeds(emb, enc["attention_mask"]), model(texts[:4]), atol=1e-5)
    acts = layer_activations(model, data, ["block1"])
    assert acts["block1"].shape == (len(data), 32)
    res = create_defense("fst", epochs=1, optimizer="adamw", lr=1e-4, progress=False).purify(model, data)
    assert type(res.model) is type(model) and res.info["head_cosine_to_original"] < 0.9
    tg.save_checkpoint(tmp_path / "repaired", res.model, meta)
    # the checkpoint carries the directory's config and tokenizer: it loads after the directory moved
    d.rename(tmp_path / "moved")
    back, back_meta = tg.load_checkpoint(tmp_path / "repaired")
    assert back_meta["model"]["name"] == "hf-text:hf" and back_meta["model"]["hf_source"] == str(d.resolve())
    assert not any(f.suffix == ".safetensors" for f in (tmp_path / "repaired" / "hf").iterdir())
    with torch.no_grad():
        assert torch.allclose(back(texts[:4]), res.model(texts[:4]), atol=1e-5)
    tg.save_checkpoint(tmp_path / "again", back, back_meta)  # a reloaded model saves the same way
    assert tg.load_checkpoint(tmp_path / "again")[1]["model"]["name"] == "hf-text:hf"
    with pytest.raises(UserError) as e:
        load_foreign_model(tiny_encoder_dir)  # an encoder without a classifier
    assert "without a trained classifier" in one_line_error(e)


# -------------------------------------------------------------- bare state dicts ---
def test_state_dict_with_arch_predicts_identically(clean_digits_model, digits, tmp_path):
    from safetensors.torch import save_file
    ref = clean_digits_model
    mean, std = ref.normalize.mean.flatten().tolist(), ref.normalize.std.flatten().tolist()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "w.safetensors")
    want = predict(ref, digits.bundle.test)
    for name in ("w.pt", "w.safetensors"):
        model, meta = load_foreign_model(tmp_path / name, arch="small_cnn", mean=mean, std=std)
        assert torch.equal(predict(model, digits.bundle.test), want)
        # class count and input channels were read off the weights
        assert meta["model"]["args"]["in_channels"] == 1 and meta["model"]["args"]["num_classes"] == 10
        assert any("1 input channels, read off block1.0.weight" in c for c in meta["choices"])
    narrow = tg.create_model("small_cnn", num_classes=7, width=4, in_channels=1, mean=mean, std=std).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in narrow.state_dict().items()}}, tmp_path / "dp.pt")
    model, meta = load_foreign_model(tmp_path / "dp.pt", arch="small_cnn", mean=mean, std=std)
    assert meta["model"]["args"] == {"num_classes": 7, "width": 4, "in_channels": 1, "mean": tuple(mean),
                                     "std": tuple(std)}
    assert torch.equal(predict(model, digits.bundle.test), predict(narrow, digits.bundle.test))
    # the lead's flags: --model PATH --arch NAME --mean ...
    from trojanguard.cli.modelargs import add_model_args, model_from_args
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(["--model", str(tmp_path / "w.pt"), "--arch", "small_cnn", "--mean", ",".join(map(str, mean)),
                         "--std", *map(str, std), "--classes", ",".join("abcdefghij")])
    model, meta = model_from_args(args)
    assert torch.equal(predict(model, digits.bundle.test), want) and meta["dataset"]["classes"][0] == "a"
    # without the training normalisation: loads, and says which default it took
    _, meta = load_foreign_model(tmp_path / "w.pt", arch="small_cnn")
    assert any("default" in c and "--mean/--std" in c for c in meta["choices"])


def test_state_dict_mistakes_are_one_line(clean_digits_model, tmp_path):
    torch.save(clean_digits_model.state_dict(), tmp_path / "w.pt")
    cases = [({}, "give its architecture with --arch"),
             ({"arch": "small_cnm"}, "did you mean 'small_cnn'"),
             ({"arch": "preact_resnet18"}, "pass the --arch/--width/--num-classes"),
             ({"arch": "small_cnn", "num_classes": 4}, "shape mismatch"),
             ({"arch": "small_cnn", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, "for a 1-channel model")]
    for kw, words in cases:
        with pytest.raises(UserError) as e:
            load_foreign_model(tmp_path / "w.pt", **kw)
        assert words in one_line_error(e), (kw, str(e.value))
    tg.save_checkpoint(tmp_path / "ck", clean_digits_model)
    with pytest.raises(UserError) as e:
        load_foreign_model(tmp_path / "ck", arch="small_cnn", width=8)
    assert "--arch/--width do not apply" in one_line_error(e)
    model, meta = load_foreign_model(tmp_path / "ck")
    assert meta["source"]["kind"] == "checkpoint" and model.head.out_features == 10
    with pytest.raises(UserError) as e:
        load_foreign_model(tmp_path / "missing")
    one_line_error(e)


# ----------------------------------------------------- pickles that would run code ---
@pytest.mark.parametrize("payload", [OpenPayload, MethodcallerPayload, GetattrStaticPayload])
def test_pickles_that_would_run_code_are_refused(payload, tmp_path):
    payload.path = str(tmp_path / "proof")
    # the payload is real: plain pickle runs it
    pickle.loads(pickle.dumps(payload()))
    assert (tmp_path / "proof").exists()
    marker = tmp_path / "code-ran"
    payload.path = str(marker)
    torch.save({"head.weight": torch.zeros(2, 2), "x": payload()}, tmp_path / "evil.pt")
    torch.save({"state_dict": {"w": payload()}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"w": payload()}, protocol=2))
    for name in ("evil.pt", "legacy.pt", "raw.pth"):
        with pytest.raises(UserError) as e:
            load_foreign_model(tmp_path / name, arch="small_cnn")
        msg = one_line_error(e)
        assert "torch.save(model.state_dict())" in msg, msg
        if name != "raw.pth":  # torch names the global it refused
            assert "refused" in msg and "would run code" in msg
    # inside a Hugging Face directory, as pytorch_model.bin
    from safetensors.torch import load_file
    d = _hf_image_dir(tmp_path / "hf", "resnet")
    weights = load_file(d / "model.safetensors")  # real weights, so that only the payload is wrong
    (d / "model.safetensors").unlink()
    torch.save({**weights, "extra": payload()}, d / "pytorch_model.bin")
    with pytest.raises(UserError) as e:
        load_foreign_model(d)
    assert "need code to unpickle" in one_line_error(e)
    assert not marker.exists(), "unpickling ran code"


def test_modelargs_imports_no_torch():
    # the package __init__ is lazy, so importing the module the CLI parser uses loads no torch
    code = "import sys, trojanguard.cli.modelargs; from trojanguard.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-500:]


def test_purify_inspect_detect_take_a_state_dict_as_scan_does(clean_digits_model, digits, tmp_path, capsys):
    """The same weights as a checkpoint folder and as a bare state dict with --arch give the same
    purification, inspection and detection scores (one loader for every command)."""
    import csv

    from PIL import Image

    from trojanguard.cli.main import main
    ref = clean_digits_model
    tg.save_checkpoint(tmp_path / "ck", ref, {"dataset": digits.describe()})
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "w.ckpt")  # a Lightning-style checkpoint file
    d = digits.defense
    for c in range(10):
        (tmp_path / "clean" / str(c)).mkdir(parents=True)
        for i, x in enumerate(d.x[d.y == c][:8, 0]):
            Image.fromarray(x.numpy()).save(tmp_path / "clean" / str(c) / f"{i}.png")
    mean, std = ref.normalize.mean.flatten().tolist(), ref.normalize.std.flatten().tolist()
    forms = {"ck": [tmp_path / "ck"],
             "pt": [tmp_path / "w.pt", "--arch", "small_cnn", "--mean", *map(str, mean), "--std", *map(str, std)],
             # no --mean/--std: the normalisation of --dataset, as train built the model (and as eval reads it)
             "pt-dataset": [tmp_path / "w.ckpt", "--arch", "small_cnn", "--dataset", "digits"]}
    commands = {"purify": (["purify", "--method", "ft", "--set", "epochs=1"], "purify.json"),
                "inspect": (["inspect", "--method", "nc", "--set", "rounds=4"], "inspection.json"),
                "detect": (["detect", "--method", "strip", "--inputs", tmp_path / "clean" / "3"], None)}
    got = {}
    for form, model_argv in forms.items():
        for cmd, (head, record) in commands.items():
            out = tmp_path / f"{cmd}-{form}" if record else tmp_path / f"{cmd}-{form}.csv"
            argv = [*head, "--model", *model_argv, "--clean-data", tmp_path / "clean", "--out", out, "--quiet",
                    "--threads", "1"]
            assert main([str(a) for a in argv]) in (0, 3), capsys.readouterr()
            if record:
                r = json.loads((out / record).read_text())
                got[cmd, form] = {k: r[k] for k in ("verify_ca_before", "verify_ca_after", "verdict", "probability",
                                                    "target") if k in r}
            else:
                got[cmd, form] = [row["score"] for row in csv.DictReader(out.open())]
    for cmd in commands:
        assert got[cmd, "ck"] == got[cmd, "pt"] == got[cmd, "pt-dataset"], cmd
        assert got[cmd, "ck"], cmd


def test_bare_state_dict_takes_the_datasets_normalisation(clean_digits_model, tmp_path):
    """Without --mean/--std a bare image state dict is built with the normalisation of --dataset
    (as train built it) when the channels agree, else the architecture's default."""
    from trojanguard.cli.modelargs import add_model_args, model_from_args
    torch.save(clean_digits_model.state_dict(), tmp_path / "w.pt")
    model, meta = load_foreign_model(tmp_path / "w.pt", arch="small_cnn", dataset_norm=((0.3,), (0.2,), "mine"))
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.3])
    assert model.normalize.std.flatten().tolist() == pytest.approx([0.2])
    assert any("normalisation of the dataset mine" in c for c in meta["choices"])
    model, meta = load_foreign_model(tmp_path / "w.pt", arch="small_cnn", dataset_norm=((0.3,) * 3, (0.2,) * 3, "rgb"))
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.5])  # 3 values for 1 channel: not taken
    assert any("small_cnn's default" in c for c in meta["choices"])
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--dataset")
    args = p.parse_args(["--model", str(tmp_path / "w.pt"), "--arch", "small_cnn", "--dataset", "digits"])
    _, meta = model_from_args(args, "cpu")
    assert any("normalisation of the dataset digits" in c for c in meta["choices"])


def test_defenses_check_a_wrapped_module_against_the_clean_data(digits):
    """The Python purifiers, inspectors and guard run the CLI's model/data check: a wrapped
    3-channel module on 1-channel digits is one line, not a conv RuntimeError; the clean
    data must be a split, not a bundle or None."""
    class RGBNet(TinyNet):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    m = tg.wrap(RGBNet(), head="fc")
    for run in (lambda: create_defense("fst", progress=False).purify(m, digits.defense),
                lambda: create_defense("nc", progress=False).inspect(m, digits.defense),
                lambda: tg.guard(m, digits.defense, progress=False)):
        with pytest.raises(UserError) as e:
            run()
        assert "3-channel" in one_line_error(e)
    good = tg.wrap(TinyNet(), head="fc").eval()
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)  # a wrapped module takes uint8 pixels too
    assert torch.allclose(good(x), good(x.float() / 255))
    for clean in (digits.bundle, None):
        with pytest.raises(UserError, match="must be a dataset split"):
            create_defense("ft", progress=False).purify(good, clean)


def test_registry_names_are_case_insensitive_and_reregistering_the_same_class_is_allowed():
    from trojanguard.defenses import DEFENSES
    from trojanguard.defenses.finetune import Finetune

    class MyDef(Finetune):
        """a plugin defense"""
    DEFENSES.register("My-Test-Def")(MyDef)
    try:
        assert "My-Test-Def" in DEFENSES and DEFENSES.get("my-test-def") is MyDef
        DEFENSES.register("My-Test-Def")(MyDef)  # a reloaded plugin module
        with pytest.raises(UserError, match="registered already"):
            DEFENSES.register("my-test-def")(Finetune)
    finally:
        DEFENSES._items.pop("my-test-def"), DEFENSES._help.pop("my-test-def")


def test_a_checkpoints_hf_files_are_checked_like_its_weights(tiny_encoder_dir, tmp_path):
    """The copied config/tokenizer files are read by transformers: a file added after the
    checkpoint was sealed, a link, or a changed file is refused in one line; a link in the
    source directory is not followed when a checkpoint is written."""
    import os
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig.from_pretrained(tiny_encoder_dir, num_labels=2)
    d = tmp_path / "clf"
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(d)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    os.symlink(secret, d / "notes.txt")
    model, meta = load_foreign_model(d)
    tg.save_checkpoint(tmp_path / "ck", model, meta)
    assert not (tmp_path / "ck" / "hf" / "notes.txt").exists()
    tg.load_checkpoint(tmp_path / "ck")
    import shutil
    for tamper in ("added", "linked", "changed"):
        ck = tmp_path / tamper
        shutil.copytree(tmp_path / "ck", ck)
        if tamper == "added":
            (ck / "hf" / "extra.json").write_text("{}")
        elif tamper == "linked":
            (ck / "hf" / "config.json").unlink()
            os.symlink(secret, ck / "hf" / "config.json")
        else:
            (ck / "hf" / "config.json").write_text((ck / "hf" / "config.json").read_text().replace("2", "3", 1))
        with pytest.raises(UserError) as e:
            tg.load_checkpoint(ck)
        assert one_line_error(e)

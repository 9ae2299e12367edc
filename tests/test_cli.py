"""Every CLI user mistake: one line on stderr, exit code 2, no traceback."""
import json
import subprocess
import sys

import pytest
import torch

from trojanguard import create_model, save_checkpoint


def run(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "trojanguard", *args], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def assert_user_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    m = create_model("small_cnn", num_classes=10, width=4, in_channels=1, mean=(0.5,), std=(0.5,))
    save_checkpoint(d / "small", m, {"dataset": {"name": "digits"}})
    torch.save(m.state_dict(), d / "small.pt")
    return d


@pytest.mark.parametrize("args,needles", [
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/dir", "--model", "small_cnn"],
     ["does not exist", "--data-dir"]),
    (["train", "--dataset", "cifar11", "--model", "small_cnn"], ["unknown dataset", "cifar10"]),
    (["train", "--dataset", "digits", "--model", "resnet9000"], ["unknown model", "choose one of"]),
    (["train", "--dataset", "digits", "--model", "small_cnn", "--holdout", "1.5"], ["outside (0, 1)"]),
    (["train", "--dataset", "digits", "--model", "small_cnn", "--holdout", "abc"], ["not a number"]),
    (["train", "--dataset", "digits", "--model", "minilm"], ["is for text"]),
    (["train", "--dataset", "sst2", "--model", "minilm"], ["no data found", "--data-dir"]),
    (["frobnicate"], ["invalid choice"]),
    (["info", "/nonexistent/ckpt"], ["does not exist"]),
])
def test_cli_user_errors(tmp_path, args, needles):
    code, _, err = run(*args, cwd=tmp_path)
    assert_user_error(code, err, *needles)


def test_cli_checkpoint_errors(tmp_path, ckpt):
    # a foreign .pt for another architecture
    code, _, err = run("eval", str(ckpt / "small.pt"), "--model", "small_cnn", "--width", "8",
                       "--dataset", "digits")
    assert_user_error(code, err, "do not fit", "--width")
    # an unreadable file
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    code, _, err = run("eval", str(bad), "--model", "small_cnn", "--dataset", "digits")
    assert_user_error(code, err, "cannot read")
    (tmp_path / "model.json").write_text("{oops")
    code, _, err = run("info", str(tmp_path))
    assert_user_error(code, err, "not valid JSON")


def test_cli_info_and_eval(ckpt):
    code, out, err = run("info", str(ckpt / "small"))
    assert code == 0, err
    assert "small_cnn" in out and "sha256" in out
    code, out, err = run("eval", str(ckpt / "small"), "--json")
    assert code == 0, err
    assert '"ca"' in out
    code, out, err = run("eval", str(ckpt / "small.pt"), "--model", "small_cnn", "--width", "4",
                         "--dataset", "digits", "--json")
    assert code == 0, err
    # --arch as scan/repair spell it, and --threads as every computing command takes it
    code, out2, err = run("eval", str(ckpt / "small.pt"), "--arch", "small_cnn", "--width", "4",
                          "--dataset", "digits", "--threads", "1", "--json")
    assert code == 0 and json.loads(out2)["ca"] == json.loads(out)["ca"], err


def test_eval_takes_the_model_flags_of_every_command(ckpt, capsys):
    """--model PATH as in scan/purify/inspect; the positional path and 'WEIGHTS --model ARCH' still work."""
    from trojanguard.cli.main import main

    def ca(*argv):
        assert main(["eval", *map(str, argv), "--json", "--threads", "1"]) == 0
        return json.loads(capsys.readouterr().out)["ca"]
    want = ca(ckpt / "small")
    assert ca("--model", ckpt / "small") == want
    # a bare state dict takes the dataset's normalisation, as train built the model: same numbers
    assert ca("--model", ckpt / "small.pt", "--arch", "small_cnn", "--dataset", "digits") == want
    assert ca(ckpt / "small.pt", "--model", "small_cnn", "--dataset", "digits") == want
    for argv, needle in (([ckpt / "small", "--model", ckpt / "small"], "give the model once"),
                         ([ckpt / "small", "--model", "small_cnn"], "records its architecture; drop --model"),
                         ([], "give the model to evaluate"),
                         (["--model", ckpt / "small.pt", "--arch", "small_cnn"], "needs --arch and --dataset")):
        assert main(["eval", *map(str, argv)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_cli_attack_eval_show_trigger(tmp_path):
    out = tmp_path / "bd"
    code, stdout, err = run("attack", "--attack", "badnets", "--dataset", "digits", "--model", "small_cnn",
                            "--ratio", "0.1", "--epochs", "3", "--quiet", "--out", str(out),
                            "--set", "patch_size=4", "--set", "pattern=white")
    assert code == 0, err
    import json
    cfg = json.loads((out / "attack.json").read_text())["config"]
    assert cfg["patch_size"] == 4 and cfg["pattern"] == "white"
    for f in ("model.safetensors", "model.json", "attack.json", "attack.safetensors", "metrics.json"):
        assert (out / f).is_file(), f
    import json
    m = json.loads((out / "metrics.json").read_text())
    assert {"ca", "asr", "ra", "poisoned_count", "seconds", "peak_rss_mb"} <= set(m)
    assert m["poisoned_count"] == round(0.1 * 1281)
    code, stdout, err = run("eval", str(out), "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    assert ev["asr"] == pytest.approx(m["asr"]) and ev["ca"] == pytest.approx(m["ca"])
    # per-class accuracy: recorded at training, recomputed by eval, shown per class and in info
    code, stdout, err = run("eval", str(out), "--per-class", "--json")
    assert code == 0, err
    assert json.loads(stdout)["ca_per_class"] == pytest.approx(m["ca_per_class"]) and len(m["ca_per_class"]) == 10
    code, stdout, err = run("eval", str(out), "--per-class")
    assert code == 0, err
    assert "9 9" in stdout and f"{100 * m['ca_per_class'][9]:.1f}%" in stdout
    code, stdout, err = run("info", str(out))
    assert code == 0, err
    assert "ca_per_class=[" + " ".join(f"{a:.2f}" for a in m["ca_per_class"]) + "]" in stdout
    code, stdout, err = run("show-trigger", str(out), "--out", str(tmp_path / "t.png"))
    assert code == 0, err
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,needles", [
    (["attack", "--attack", "nosuch", "--dataset", "digits", "--model", "small_cnn"], ["unknown attack"]),
    (["attack", "--attack", "sig", "--dataset", "digits", "--model", "small_cnn", "--ratio", "0.5",
      "--set", "frequency=2"], ["clean-label", "--ratio <="]),
    (["attack", "--attack", "sig", "--dataset", "digits", "--model", "small_cnn", "--ratio", "0.05"],
     ["frequency 6 is too high for images 8 pixels wide", "--set frequency="]),
    (["attack", "--attack", "lc", "--dataset", "digits", "--model", "small_cnn"], ["--clean-model"]),
    (["attack", "--attack", "addsent", "--dataset", "digits", "--model", "small_cnn"], ["no image variant"]),
    (["attack", "--attack", "sig", "--all-to-all", "--dataset", "digits", "--model", "small_cnn"], ["clean-label"]),
    (["attack", "--attack", "badnets", "--dataset", "digits", "--model", "small_cnn", "--epochs", "0"],
     ["epochs", "greater than or equal to 1"]),
    (["train", "--dataset", "digits", "--model", "small_cnn", "--text-column", "x"], ["--dataset text only"]),
    (["attack", "--attack", "sig", "--dataset", "digits", "--model", "small_cnn", "--set", "freq=3"],
     ["unknown option 'freq'", "did you mean 'frequency'"]),
    (["attack", "--attack", "sig", "--dataset", "digits", "--model", "small_cnn", "--set", "frequency"],
     ["expected KEY=VALUE"]),
    (["attack", "--attack", "badnets", "--dataset", "digits", "--model", "small_cnn", "--set", "patch_size=big"],
     ["option patch_size", "integer"]),
    (["attack", "--attack", "badnets", "--dataset", "digits", "--model", "small_cnn", "--set", "words=[cf"],
     ["not valid JSON"]),
])
def test_cli_attack_errors(tmp_path, args, needles):
    code, _, err = run(*args, cwd=tmp_path)
    assert_user_error(code, err, *needles)


def test_cli_list():
    code, out, _ = run("list", "attacks")
    assert code == 0
    for name in ("badnets", "blended", "sig", "wanet", "input_aware", "lc", "trojannn", "lf", "bpp",
                 "adaptive_blend", "addsent", "synbkd", "stylebkd"):
        assert name in out
    assert "patch_size=3" in out and "frequency=6" in out  # each attack's parameters and defaults


def test_cli_list_without_a_kind_lists_every_kind_briefly():
    from trojanguard.data import DATASETS
    from trojanguard.defenses import DEFENSES
    code, out, _ = run("list")
    assert code == 0
    for kind in ("datasets:", "models:", "attacks:", "defenses:"):
        assert kind in out.splitlines()
    names = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert set(DEFENSES.names()) <= names and set(DATASETS.names()) <= names
    assert "patch_size=" not in out and ".;" not in out  # brief: descriptions, no options


def test_set_options_parsing():
    from trojanguard.attacks import create_attack
    from trojanguard.cli.commands import parse_options
    opts = parse_options(["alpha=0.1", "noise-mode=false", 'words=["cf", "mn"]', "phrase=1984", "delta_test=null"])
    assert opts == {"alpha": "0.1", "noise_mode": "false", "words": ["cf", "mn"], "phrase": "1984",
                    "delta_test": None}
    assert create_attack("blended", alpha=opts["alpha"]).cfg.alpha == 0.1  # the config converts
    assert create_attack("wanet", noise_mode=opts["noise_mode"]).cfg.noise_mode is False
    assert create_attack("badnets", modality="text", words=opts["words"]).cfg.words == ["cf", "mn"]
    assert create_attack("addsent", phrase=opts["phrase"]).cfg.phrase == "1984"

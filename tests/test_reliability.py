"""Issue 12: result folders are complete or absent, every stored field is validated, hostile
files cannot exhaust memory, and no bad input ends in a traceback.

One test per numbered finding of the issue (``test_finding_N_...``), the interrupted re-run
killed with SIGKILL at every point of writing, and a catalogue of bad inputs, each of which
must exit 2 with exactly one line on stderr and write nothing."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from trojanguard.checkpoint import load_checkpoint
from trojanguard.cli.main import main
from trojanguard.errors import UserError
from trojanguard.resultdir import KILL_ENV, MARKER, amend_result, check_result, write_result

DIGITS = ["--dataset", "digits", "--model", "small_cnn", "--epochs", "1", "--quiet"]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- helpers --
def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree(root: Path) -> dict:
    """Every entry under ``root`` (hidden ones too, symlinks not followed) with size and mtime."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_size, st.st_mtime_ns)
    return out


def refused(capsys, argv, needles=(), watch: Path | None = None) -> str:
    """exit 2, exactly one line on stderr, no traceback, nothing written under ``watch``."""
    before = tree(watch) if watch else None
    code, out, err = cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("trojanguard: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    if watch is not None:
        assert tree(watch) == before, "something was written"
    return lines[0]


def eval_json(capsys, folder, *extra) -> dict:
    code, out, err = cli(capsys, "eval", folder, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    r = fn(d)  # edits in place, or returns a new document (a list, say)
    path.write_text(json.dumps(r if isinstance(r, (dict, list)) else d))


def legacy_copy(src: Path, dst: Path) -> Path:
    """The folder as trojanguard wrote it before COMPLETE.json (format /1 sidecars)."""
    shutil.copytree(src, dst)
    (dst / MARKER).unlink()
    for name, fmt in (("model.json", "trojanguard-checkpoint/1"), ("attack.json", "trojanguard-attack/1")):
        if (dst / name).exists():
            edit_json(dst / name, lambda d, fmt=fmt: d.update(format=fmt))
    return dst


def png_header(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels with almost no data: a decompression bomb
    to any reader that allocates from the header."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def unwritable_dir(tmp: Path) -> Path:
    """A folder nobody can create entries in (root ignores permission bits: use /sys)."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp / "ro"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return ro


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Finished results on the digits (1 epoch): BadNets, Blended, Input-aware, a clean model;
    with the numbers ``eval`` reports for each (trained in this process: seconds)."""
    root = tmp_path_factory.mktemp("base")
    runs = {"badnets": ["attack", "--attack", "badnets", *DIGITS],
            "blended": ["attack", "--attack", "blended", *DIGITS],
            "input_aware": ["attack", "--attack", "input_aware", *DIGITS, "--set", "mask_epochs=0"],
            "clean": ["train", *DIGITS]}
    out = {}
    for name, argv in runs.items():
        assert main([*argv, "--out", str(root / name)]) == 0
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def numbers(base):
    import contextlib
    import io
    res = {}
    for name in ("badnets", "blended"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["eval", str(base[name]), "--json"]) == 0
        res[name] = json.loads(buf.getvalue())
    assert res["badnets"]["asr"] > 0.5  # a real backdoor, and the two triggers differ in effect
    return res


@pytest.fixture
def work(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


# ------------------------------------------------------------- finding 1 and 2 --
FILES = ["model.safetensors", "model.json", "attack.safetensors", "attack.json", "metrics.json", MARKER]
KILL_POINTS = (["before:model.safetensors"] + [f"{w}:{f}" for f in FILES for w in ("during", "after")]
               + ["swap", "done"])
REAL_SUBPROCESS = {"after:model.json", "swap"}  # the scenario, as a user would hit it


def _killed_run(argv: list[str], point: str, cwd: Path, real: bool) -> None:
    """Run ``trojanguard <argv>`` so that it SIGKILLs itself at ``point`` of writing: a real
    ``python -m trojanguard`` subprocess, or (same code, no import cost) a forked child."""
    if real:
        env = {**os.environ, KILL_ENV: point, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-m", "trojanguard", *argv], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
        return
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.environ[KILL_ENV] = point
            os.chdir(cwd)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            main(argv)
        finally:
            os._exit(99)  # not killed: the parent's assertion fails
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.parametrize("point", KILL_POINTS)
def test_finding_1_2_interrupted_rerun_never_mixes_results(work, base, numbers, capsys, point):
    """Blended result at X, then a BadNets run over X killed at ``point``: every later
    ``eval X`` reports the numbers of the model that is there (Blended's until the new
    folder is renamed in, BadNets' after), or refuses; never BadNets weights with the
    Blended trigger (the issue's ASR 0.0 %)."""
    x = work / "X"
    shutil.copytree(base["blended"], x)
    _killed_run(["attack", "--attack", "badnets", *DIGITS, "--out", str(x)], point, work,
                real=point in REAL_SUBPROCESS)
    if point == "swap":  # old folder moved aside, new one not yet in: the name is absent
        refused(capsys, ["eval", x, "--json"], ["does not exist"])
        refused(capsys, ["info", x], ["does not exist"])
    else:
        want = numbers["badnets" if point == "done" else "blended"]
        got = eval_json(capsys, x)
        assert (got["ca"], got["asr"], got["ra"]) == pytest.approx((want["ca"], want["asr"], want["ra"]))
        assert cli(capsys, "info", x)[0] == 0
        check_result(x)
    # the stranded temporary siblings are not results, and the next run clears them away
    for sib in work.glob(".X.*"):
        refused(capsys, ["eval", sib], ["incomplete result"])
    assert main(["attack", "--attack", "badnets", *DIGITS, "--out", str(x)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in work.iterdir()) == ["X", "cwd"]
    assert eval_json(capsys, x)["asr"] == pytest.approx(numbers["badnets"]["asr"])


def test_finding_1_2_legacy_folders_from_interrupted_old_runs(work, base, capsys):
    """Folders written before COMPLETE.json, as the old code left them when killed: new
    weights and model.json beside the previous run's attack (finding 1), or model.json
    without the attack and metrics that followed it (finding 2). eval and info refuse."""
    mixed = legacy_copy(base["badnets"], work / "mixed")
    for name in ("attack.json", "attack.safetensors"):
        shutil.copy(base["blended"] / name, mixed / name)
    edit_json(mixed / "attack.json", lambda d: d.update(format="trojanguard-attack/1"))
    refused(capsys, ["eval", mixed], ["incomplete result", "different attacks", "badnets", "blended"], work)
    refused(capsys, ["info", mixed], ["incomplete result"], work)
    refused(capsys, ["show-trigger", mixed, "--out", work / "t.png"], ["incomplete result"], work)

    half = legacy_copy(base["badnets"], work / "half")
    for name in ("attack.json", "attack.safetensors", "metrics.json"):
        (half / name).unlink()
    refused(capsys, ["eval", half], ["incomplete result", "is missing"], work)
    refused(capsys, ["info", half], ["incomplete result"], work)

    stale_metrics = legacy_copy(base["badnets"], work / "stale")
    shutil.copy(base["blended"] / "metrics.json", stale_metrics / "metrics.json")
    refused(capsys, ["info", stale_metrics], ["incomplete result", "metrics.json"], work)

    # a whole legacy folder still loads (one-time compatibility path), with the same numbers
    ok = legacy_copy(base["badnets"], work / "ok")
    got, want = eval_json(capsys, ok), eval_json(capsys, base["badnets"])
    assert (got["ca"], got["asr"]) == (want["ca"], want["asr"])
    # a markerless folder whose sidecar says it was written by the new code is a killed run
    killed = shutil.copytree(base["badnets"], work / "killed")
    (killed / MARKER).unlink()
    refused(capsys, ["eval", killed], ["incomplete result", "did not finish"], work)


@pytest.mark.parametrize("root", [REPO / "zoo" / "cifar10", Path("/work/shared/zoo/cifar10")], ids=["main", "shared"])
def test_zoo_folders_from_before_the_change_still_load(root):
    """The CIFAR-10 zoo (read-only, no COMPLETE.json) loads through the compatibility path:
    the purification benchmarks read it."""
    from trojanguard.attacks import attack_for_checkpoint
    entries = sorted(p for p in root.glob("*") if (p / "model.json").exists()) if root.is_dir() else []
    if not entries:
        pytest.skip(f"no zoo at {root}")
    for e in entries:
        model, meta = load_checkpoint(e)
        assert model.head.out_features == 10
        atk = attack_for_checkpoint(e)
        assert (atk.name if atk else None) == (meta["attack"] or {}).get("name")


# ------------------------------------------------------------------- finding 3 --
def test_finding_3_learned_trigger_never_silently_replaced(work, base, capsys):
    ia = base["input_aware"]
    assert eval_json(capsys, ia)["asr"] is not None
    sealed = shutil.copytree(ia, work / "sealed")
    (sealed / "attack.safetensors").unlink()
    refused(capsys, ["eval", sealed], ["incomplete result", "attack.safetensors", "missing"], work)
    old = legacy_copy(ia, work / "old")
    (old / "attack.safetensors").unlink()
    refused(capsys, ["eval", old], ["input_aware trigger is stored as tensors", "missing"], work)
    renamed = legacy_copy(ia, work / "renamed")
    t = load_file(renamed / "attack.safetensors")
    save_file({k.replace("G.", "gen."): v for k, v in t.items()}, renamed / "attack.safetensors")
    refused(capsys, ["eval", renamed], ["G.body.0.weight", "missing"], work)
    extra_key = legacy_copy(ia, work / "extra_key")
    t = load_file(extra_key / "attack.safetensors")
    t["G.body.99.weight"] = torch.zeros(1)
    save_file(t, extra_key / "attack.safetensors")
    refused(capsys, ["eval", extra_key], ["does not fit attack input_aware"], work)


# ------------------------------------------------------------------- finding 4 --
def test_finding_4_sha256_required_no_verify_for_knowing_users(work, base, capsys):
    for sealed in (True, False):
        d = (shutil.copytree(base["clean"], work / "s") if sealed
             else legacy_copy(base["clean"], work / "l"))
        edit_json(d / "model.json", lambda m: m.pop("sha256"))
        refused(capsys, ["eval", d], ["model.json" if not sealed else MARKER], work)
        refused(capsys, ["eval", d, "--no-verify"], ["field sha256 is missing"], work)
    tampered = shutil.copytree(base["clean"], work / "t")
    state = load_file(tampered / "model.safetensors")
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, tampered / "model.safetensors")
    refused(capsys, ["eval", tampered], ["sha256"], work)
    refused(capsys, ["info", tampered], ["sha256"], work)
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(tampered)
    assert cli(capsys, "info", tampered, "--no-verify")[0] == 0
    assert eval_json(capsys, tampered, "--no-verify")["ca"] >= 0  # the user's own weights load


# ------------------------------------------------------------------- finding 5 --
def test_finding_5_hostile_metadata_cannot_exhaust_memory(work, base, capsys):
    d = legacy_copy(base["clean"], work / "wide")
    edit_json(d / "model.json", lambda m: m["model"]["args"].update(width=200_000))
    refused(capsys, ["eval", d], ["model.json", "field model.args.width", "1024"], work)
    # in bounds but 11 GB for a PreAct-ResNet18: the shapes are compared on the meta device first
    big = legacy_copy(base["clean"], work / "big")
    edit_json(big / "model.json", lambda m: m.update(model={"name": "preact_resnet18", "args": {
        "num_classes": 10, "width": 1024, "in_channels": 1, "mean": [0.5], "std": [0.5]}}))
    t0 = time.perf_counter()
    refused(capsys, ["eval", big], ["do not fit preact_resnet18"], work)
    assert time.perf_counter() - t0 < 30
    zero = legacy_copy(base["clean"], work / "zero")
    (zero / "model.safetensors").unlink()
    (zero / "model.safetensors").symlink_to("/dev/zero")
    refused(capsys, ["eval", zero], ["not a regular file"], work)
    refused(capsys, ["info", zero], ["not a regular file"], work)
    bomb = work / "bomb.png"
    bomb.write_bytes(png_header(60_000, 60_000))
    refused(capsys, ["attack", "--attack", "blended", *DIGITS, "--set", f"pattern_image={bomb}", "--out", work / "o"],
            ["decompression bomb"], work)
    folder = work / "imgs"
    for split in ("train", "test"):
        (folder / split / "a").mkdir(parents=True)
        (folder / split / "a" / "x.png").write_bytes(png_header(8000, 8000))
    refused(capsys, ["train", "--dataset", "imagefolder", "--data-dir", folder, "--model", "small_cnn",
                     "--out", work / "o"], ["8000x8000 pixels", "cap"], work)


# ------------------------------------------------------------------- finding 6 --
def test_finding_6_diverging_training_stops_and_writes_nothing(work, capsys):
    refused(capsys, ["train", *DIGITS, "--lr", "inf", "--out", work / "o"], ["--lr", "not a finite number"], work)
    refused(capsys, ["train", *DIGITS, "--lr", "1e30", "--out", work / "o"], ["training diverged", "learning rate"], work)
    from trojanguard.pipeline import build_model, prepare_data
    from trojanguard.training import recipe_for, train
    prep = prepare_data("digits", holdout=0.05)
    with pytest.raises(UserError, match="diverged"):
        train(build_model("small_cnn", prep.bundle), prep.train,
              cfg=recipe_for("digits", "small_cnn", epochs=1, lr=1e30, progress=False))


# ------------------------------------------------------------------- finding 7 --
def test_finding_7_unwritable_out_fails_before_training(work, base, capsys):
    ro = unwritable_dir(work)
    afile = work / "afile"
    afile.write_text("x")
    for out in (ro / "run", afile / "run", afile):
        line = refused(capsys, ["attack", "--attack", "badnets", *DIGITS, "--out", out], ["--out"], work)
        assert "training" not in line
    code, out, _ = cli(capsys, "train", *DIGITS, "--out", afile / "run")
    assert code == 2 and out == ""  # no "training ..." banner: it failed before any work
    existing = work / "dir"
    existing.mkdir()
    refused(capsys, ["show-trigger", base["badnets"], "--out", existing], ["is a folder"], work)
    refused(capsys, ["show-trigger", base["badnets"], "--out", ro / "t.png"], ["cannot write"], work)
    notes = work / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    refused(capsys, ["train", *DIGITS, "--out", notes], ["thesis.tex", "not a trojanguard result"], work)


# ------------------------------------------------------------------- finding 8 --
def _cifar_dir(tmp: Path, obj) -> Path:
    d = tmp / "cifar"
    d.mkdir(exist_ok=True)
    blob = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
    for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / n).write_bytes(blob)
    return d


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/trojanguard-pwned",))


def _mutate(kind: str, name: str, fn):
    """A catalogue case on a legacy copy of a base result: ``fn`` edits ``name`` there."""
    def setup(base, work):
        d = legacy_copy(base[kind], work / "case")
        if name.endswith(".json"):
            edit_json(d / name, fn)
        else:
            fn(d / name)
        return ["eval", d]
    return setup


def _argv(*argv):
    return lambda base, work: list(argv)


def _set_tensors(fn):
    def edit(path):
        t = load_file(path)
        save_file(fn(t) or t, path)
    return edit


def _model_args(**kw):
    return lambda m: m["model"]["args"].update(kw)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _link_dir(path: Path):
    path.unlink()
    path.mkdir()


def _link_zero(path: Path):
    path.unlink()
    path.symlink_to("/dev/zero")


def _big_header(path: Path):
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [10**9]
    header[key]["data_offsets"] = [0, 4 * 10**9]
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + blob[8 + n:])


def _sealed(kind, fn):
    def setup(base, work):
        d = shutil.copytree(base[kind], work / "case")
        fn(d)
        return ["eval", d]
    return setup


def _temp_sibling(base, work):
    d = shutil.copytree(base["clean"], work / f".X.tmp-{os.getpid()}-abc")
    return ["eval", d]


def _evil_pt(base, work):
    import collections
    p = work / "evil.pt"
    state = collections.OrderedDict(w=torch.zeros(1))
    state["x"] = _Evil()
    torch.save(state, p)
    return ["eval", p, "--model", "small_cnn", "--dataset", "digits"]


def _consistent(kind: str, fn):
    """Edit the attack in attack.json and its record in model.json the same way."""
    def setup(base, work):
        d = legacy_copy(base[kind], work / "case")
        edit_json(d / "attack.json", fn)
        edit_json(d / "model.json", lambda m: fn(m["attack"]))
        return ["eval", d]
    return setup


def _attack_only(fn):
    """An attack artifact folder of its own (attack.json + attack.safetensors), edited."""
    def setup(base, work):
        d = work / "case"
        d.mkdir()
        for f in ("attack.json", "attack.safetensors"):
            shutil.copy(base["badnets"] / f, d / f)
        edit_json(d / "attack.json", lambda a: a.update(format="trojanguard-attack/1"))
        edit_json(d / "attack.json", fn)
        return ["show-trigger", d, "--dataset", "digits", "--out", work / "t.png"]
    return setup


def _empty_sidecar(d: Path) -> Path:
    (d / "model.json").write_text("{}")
    return d


def _link_model_json(d: Path) -> Path:
    (d / "model.json").unlink()
    (d / "model.json").mkdir()
    return d


def _nan_weights(d: Path) -> Path:
    t = load_file(d / "model.safetensors")
    t["head.bias"] = torch.full_like(t["head.bias"], float("nan"))
    save_file(t, d / "model.safetensors")
    edit_json(d / "model.json", lambda m: m.update(sha256=__import__("hashlib").sha256(
        (d / "model.safetensors").read_bytes()).hexdigest()))
    return d


def _add_attack(d: Path, other: Path) -> Path:
    for f in other.glob("attack.*"):
        shutil.copy(f, d / f.name)
    return d


# (id, setup(base, work) -> argv, needles). Most are new in issue 12; the hostile-file cases
# (pickled code, broken safetensors) held before and are kept here so that they keep holding.
CATALOGUE = [
    ("width-0", _argv("train", *DIGITS, "--width", "0"), ["--width", "outside 1..1024"]),
    ("width-negative", _argv("train", *DIGITS, "--width", "-3"), ["--width", "outside"]),
    ("width-huge", _argv("train", *DIGITS, "--width", "200000"), ["--width", "outside"]),
    ("lr-inf", _argv("train", *DIGITS, "--lr", "inf"), ["--lr", "finite"]),
    ("lr-nan", _argv("train", *DIGITS, "--lr", "nan"), ["--lr", "finite"]),
    ("weight-decay-inf", _argv("train", *DIGITS, "--weight-decay=-inf"), ["--weight-decay", "finite"]),
    ("epochs-negative", _argv("train", *DIGITS[:-3], "--epochs", "-1"), ["epochs"]),
    ("seed-overflow", _argv("train", *DIGITS, "--seed", str(10**30)), ["--seed", "outside"]),
    ("device-mps", _argv("train", *DIGITS, "--device", "mps"), ["mps"]),
    ("device-meta", _argv("train", *DIGITS, "--device", "meta"), ["meta", "cannot run a model"]),
    ("device-cuda-9", _argv("train", *DIGITS, "--device", "cuda:9"), ["cuda"]),
    ("device-junk", _argv("eval", ".", "--device", "gpu!"), ["unknown device"]),
    ("patch-too-big", _argv("attack", "--attack", "badnets", *DIGITS, "--set", "patch_size=9"),
     ["patch_size", "8x8", "patch_size=N with N <= 8"]),
    ("wanet-grid-too-big", _argv("attack", "--attack", "wanet", *DIGITS, "--set", "k=9"), ["k=N with N <= 8"]),
    ("target-not-a-class", _argv("attack", "--attack", "badnets", *DIGITS, "--target", "10"), ["target 10"]),
    ("pattern-image-zero", _argv("attack", "--attack", "blended", *DIGITS, "--set", "pattern_image=/dev/zero"),
     ["/dev/zero", "regular file"]),
    ("pattern-image-folder", lambda b, w: ["attack", "--attack", "blended", *DIGITS, "--set", f"pattern_image={w}"],
     ["a folder"]),
    ("pattern-image-missing", _argv("attack", "--attack", "blended", *DIGITS, "--set", "pattern_image=/no/such.png"),
     ["no such file"]),
    ("pattern-image-bomb", lambda b, w: ["attack", "--attack", "blended", *DIGITS, "--set",
                                         f"pattern_image={_write(w / 'b.png', png_header(60000, 60000))}"],
     ["decompression bomb"]),
    ("show-trigger-num-0", lambda b, w: ["show-trigger", b["badnets"], "--num", "0"], ["--num"]),
    ("cifar-batch-list", lambda b, w: ["train", "--dataset", "cifar10", "--data-dir", _cifar_dir(w, [1, 2]),
                                       "--model", "small_cnn"], ["holds a list"]),
    ("cifar-batch-shape", lambda b, w: ["train", "--dataset", "cifar10", "--model", "small_cnn", "--data-dir",
                                        _cifar_dir(w, {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})],
     ["[4, 100]", "[N, 3072]"]),
    ("cifar-batch-strings", lambda b, w: ["train", "--dataset", "cifar10", "--model", "small_cnn", "--data-dir",
                                          _cifar_dir(w, {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]})],
     ["labels"]),
    ("cifar-batch-code", lambda b, w: ["train", "--dataset", "cifar10", "--model", "small_cnn",
                                       "--data-dir", _cifar_dir(w, _Evil())], ["refusing to load"]),
    ("cifar-batch-zero", lambda b, w: ["train", "--dataset", "cifar10", "--model", "small_cnn",
                                       "--data-dir", _cifar_dir(w, b"")], ["cannot read CIFAR batch"]),
    ("pickled-code-pt", _evil_pt, ["refused to load", "run code"]),
    ("incomplete-temp-sibling", _temp_sibling, ["incomplete result"]),
    ("model-json-list", _mutate("clean", "model.json", lambda m: [1, 2]), ["model.json", "not an object"]),
    ("model-json-empty", lambda b, w: ["info", _empty_sidecar(legacy_copy(b["clean"], w / "c"))],
     ["does not say which model"]),
    ("model-is-string", _mutate("clean", "model.json", lambda m: m.update(model="small_cnn")), ["which model"]),
    ("width-wide", _mutate("clean", "model.json", _model_args(width="wide")), ["field model.args.width", "integer"]),
    ("width-negative-stored", _mutate("clean", "model.json", _model_args(width=-1)), ["model.args.width"]),
    ("num-classes-1", _mutate("clean", "model.json", _model_args(num_classes=1)), ["model.args.num_classes"]),
    ("mean-nan", _mutate("clean", "model.json", _model_args(mean=[float("nan")])), ["model.args.mean"]),
    ("unknown-model", _mutate("clean", "model.json", lambda m: m["model"].update(name="resnet9000")),
     ["model.json", "unknown model"]),
    ("model-json-is-folder", lambda b, w: ["eval", _link_model_json(legacy_copy(b["clean"], w / "c"))],
     ["model.json", "a folder"]),
    ("weights-dev-zero", _mutate("clean", "model.safetensors", _link_zero), ["not a regular file"]),
    ("weights-header-too-big", lambda b, w: [*_mutate("clean", "model.safetensors", _big_header)(b, w), "--no-verify"],
     ["not a valid safetensors"]),
    ("weights-are-folder", _mutate("clean", "model.safetensors", _link_dir), ["a folder"]),
    ("nan-weights", lambda b, w: ["eval", _nan_weights(legacy_copy(b["clean"], w / "c"))], ["NaN weights"]),
    ("attack-name-int", _mutate("badnets", "attack.json", lambda a: a.update(name=123)), ["attack.json", "field name"]),
    ("attack-config-list", _mutate("badnets", "attack.json", lambda a: a.update(config=[1])),
     ["attack.json", "field config"]),
    ("attack-num-classes-str", _mutate("badnets", "attack.json", lambda a: a.update(num_classes="ten")),
     ["attack.json", "field num_classes"]),
    ("attack-unknown-name", _attack_only(lambda a: a.update(name="nosuch")), ["attack.json", "unknown attack"]),
    ("attack-option-out-of-range", _attack_only(lambda a: a["config"].update(ratio=7)),
     ["attack.json", "field config.ratio"]),
    # out of range for the data: both files edited alike, as someone forging a result would
    ("attack-patch-too-big", _consistent("badnets", lambda a: a["config"].update(patch_size=9)),
     ["attack.json", "field config.patch_size", "8x8"]),
    ("attack-target-not-class", _consistent("badnets", lambda a: a["config"].update(target=12)),
     ["attack.json", "field config.target", "not a class"]),
    ("attack-other-class-count", _consistent("badnets", lambda a: a.update(num_classes=5)),
     ["attack.json", "field num_classes", "5 classes"]),
    ("attack-json-disagrees", _mutate("badnets", "attack.json", lambda a: a["config"].update(patch_size=2)),
     ["incomplete result", "different attacks", "config.patch_size: 3 vs 2"]),
    ("attack-pattern-wrong-size", _mutate("blended", "attack.safetensors", _set_tensors(
        lambda t: t.update(pattern=torch.rand(3, 32, 32)))), ["pattern is [3, 32, 32]", "[1, 8, 8]"]),
    ("attack-tensor-renamed", _mutate("blended", "attack.safetensors", _set_tensors(
        lambda t: {("patern" if k == "pattern" else k): v for k, v in t.items()})), ["pattern is missing"]),
    ("attack-indices-float", _mutate("badnets", "attack.safetensors", _set_tensors(
        lambda t: t.update(poisoned_indices=t["poisoned_indices"].float()))), ["poisoned_indices"]),
    ("attack-tensors-junk", _mutate("badnets", "attack.safetensors", lambda p: p.write_bytes(b"junk")),
     ["unreadable"]),
    ("marker-junk", _sealed("clean", lambda d: (d / MARKER).write_text("{nope")), [MARKER, "not valid JSON"]),
    ("marker-lists-missing-file", _sealed("clean", lambda d: (d / "model.json").unlink()),
     ["incomplete result", "model.json", "missing"]),
    ("marker-path-escape", _sealed("clean", lambda d: edit_json(d / MARKER, lambda m: m["files"].update(
        {"../x": {"sha256": "0" * 64, "bytes": 1}}))), ["not a plain relative path"]),
    ("file-added-after-sealing", lambda b, w: ["eval", _add_attack(shutil.copytree(b["clean"], w / "c"), b["badnets"])],
     ["not part of the result"]),
]


def test_catalogue_has_thirty_cases():
    assert len(CATALOGUE) >= 30 and len({c[0] for c in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_finding_8_bad_input_catalogue(work, base, capsys, case):
    _, setup, needles = case
    argv = setup(base, work)
    if "--out" not in argv and argv[0] in ("train", "attack"):
        argv += ["--out", work / "out"]
    refused(capsys, argv, needles, work)
    assert not Path("/tmp/trojanguard-pwned").exists()


# ------------------------------------------------------------------- resultdir API --
def test_write_result_complete_or_absent(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(RuntimeError):
        with write_result(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with write_result(out) as tmp:
        (tmp / "a.txt").write_text("one")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    res = check_result(out)
    assert res.files() == ["a.txt", "sub/b.bin"] and res.read_bytes("a.txt", 100) == b"one"
    amend_result(out, {"c.json": b"{}"})
    assert check_result(out).files() == ["a.txt", "c.json", "sub/b.bin"]
    (out / "a.txt").write_text("two")
    with pytest.raises(UserError, match="sha256"):
        check_result(out)
    assert check_result(out, verify=False).read_bytes("a.txt", 100) == b"two"


def test_table_files_keep_dotted_stems_and_quote_csv(tmp_path):
    """Benchmark tables: ``<stem>.csv`` and ``<stem>.md`` next to each other, whatever dots
    the stem has (``Path.with_suffix`` would cut ``badnets-0.1-s0`` to ``badnets-0``), and
    CSV fields with commas or quotes stay one field."""
    import csv
    from trojanguard.report import write_table_files
    rows = [{"model": "badnets-0.1-s0", "options": 'layers=["head","layer4"]', "ca": 0.8395},
            {"model": "blended-0.1-s0", "options": "defaults", "ca": 0.84}]
    csv_path, md_path = write_table_files(tmp_path / "sub" / "sweep-badnets-0.1-s0", rows, ["model", "options", "ca"],
                                          ["# title", "", "intro"])
    assert csv_path.name == "sweep-badnets-0.1-s0.csv" and md_path.name == "sweep-badnets-0.1-s0.md"
    with open(csv_path, newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["options"] for r in back] == ['layers=["head","layer4"]', "defaults"]
    assert float(back[0]["ca"]) == 0.8395
    md = md_path.read_text().splitlines()
    assert md[:3] == ["# title", "", "intro"] and md[4].startswith("| model")
    assert sum(1 for line in md if line.startswith("| badnets-0.1-s0")) == 1
    assert not list(tmp_path.glob("sub/*.tmp*"))  # nothing half-written left behind

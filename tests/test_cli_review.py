"""Command-line defects from a user's review: each case fails with one line and exit 2 (or,
for the recording cases, writes what --help promises)."""
import json

import numpy as np
import pytest
from PIL import Image

from trojanguard.checkpoint import save_checkpoint
from trojanguard.cli.main import main


@pytest.fixture(scope="module")
def suspect(tmp_path_factory, backdoored_digits, digits):
    folder = tmp_path_factory.mktemp("suspect") / "model"
    save_checkpoint(folder, backdoored_digits[0], {"dataset": digits.describe()})
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four 8x8 grey images, the digits' shape."""
    root = tmp_path_factory.mktemp("inputs")
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv) -> str:
    code, out, err = _run(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, (code, out, err)
    return lines[0]


def test_review_guard_set_purify_and_frr_are_typed(suspect, tmp_path, capsys):
    # "false" used to be stored as the (truthy) string and turn purification on
    code, _, err = _run(capsys, "guard", "--model", suspect, "--set", "purify=false", "--set", "frr=0.2",
                        "--out", tmp_path / "g", "--quiet")
    assert code == 0, err
    rec = json.loads((tmp_path / "g" / "guard.json").read_text())
    assert rec["purify"] is False and rec["frr"] == 0.2
    assert "outside (0, 1)" in refused(capsys, "guard", "--model", suspect, "--set", "frr=2", "--out", tmp_path / "x")
    assert "give true or false" in refused(capsys, "guard", "--model", suspect, "--set", "purify=maybe",
                                           "--out", tmp_path / "x")
    assert "disagree" in refused(capsys, "guard", "--model", suspect, "--set", "purify=no", "--purify",
                                 "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_review_detect_set_frr_means_frr(suspect, inputs, tmp_path, capsys):
    code, out, err = _run(capsys, "detect", "--model", suspect, "--inputs", inputs, "--set", "frr=0.2",
                          "--set", "purify=false", "--out", tmp_path / "s.csv", "--quiet")
    assert code == 0 and "FRR 0.2 " in out, err
    line = refused(capsys, "detect", "--model", suspect, "--inputs", inputs, "--set", "frr=0.2", "--frr", "0.1",
                   "--out", tmp_path / "t.csv")
    assert "--set frr=0.2 and --frr 0.1 disagree" in line


@pytest.mark.parametrize("command", ["scan", "repair", "guard", "purify", "inspect", "detect"])
@pytest.mark.parametrize("seed", ["-1", "99999999999999999999999"])
def test_review_seed_out_of_range_is_refused(command, seed, suspect, inputs, tmp_path, capsys):
    extra = {"purify": ["--method", "fst"], "detect": ["--inputs", inputs]}.get(command, [])
    line = refused(capsys, command, "--model", suspect, *extra, f"--seed={seed}", "--out", tmp_path / "o")
    assert "--seed" in line and "outside 0.." in line


@pytest.mark.parametrize("std", ["0", "-0.5", "0.5,0"])
def test_review_std_must_be_positive(std, tmp_path, capsys):
    line = refused(capsys, "eval", "--model", tmp_path / "w.pt", "--arch", "small_cnn", "--dataset", "digits",
                   "--mean", "0.5", f"--std={std}")
    assert "--std" in line and "not positive" in line


def test_review_out_inside_a_folder_input_is_refused(suspect, inputs, tmp_path, capsys):
    clean = tmp_path / "clean"
    for c in range(10):
        (clean / str(c)).mkdir(parents=True)
    line = refused(capsys, "repair", "--model", suspect, "--clean-data", clean, "--out", clean / "rep")
    assert f"--out {clean / 'rep'} is inside --clean-data {clean}" in line
    line = refused(capsys, "detect", "--model", suspect, "--inputs", inputs, "--out", inputs / "scores.csv")
    assert f"is inside --inputs {inputs}" in line
    assert not (clean / "rep").exists() and not (inputs / "scores.csv").exists()


def test_review_guard_honours_seed_quiet_and_records_threads(suspect, tmp_path, capsys):
    code, _, err = _run(capsys, "guard", "--model", suspect, "--purify", "--seed", "7",
                        "--threads", "1", "--quiet", "--out", tmp_path / "g")
    assert code == 0 and "bounds" not in err, err  # no "badacts bounds: 50 epochs in 0 s" progress line
    rec = json.loads((tmp_path / "g" / "guard.json").read_text())
    assert rec["config"]["seed"] == 7 and rec["threads"] == 1
    import trojanguard
    assert trojanguard.load_guard(tmp_path / "g").threads == 1
    code, _, err = _run(capsys, "repair", "--model", suspect, "--no-scan", "--method", "ft", "--set", "epochs=1",
                        "--threads", "1", "--quiet", "--out", tmp_path / "r")
    assert code in (0, 3), err
    assert json.loads((tmp_path / "r" / "repair.json").read_text())["threads"] == 1


def test_review_scan_records_threads(suspect, tmp_path, capsys):
    code, _, err = _run(capsys, "scan", "--model", suspect, "--no-second-opinion", "--threads", "1", "--quiet",
                        "--out", tmp_path / "s")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "scan.json").read_text())["threads"] == 1


def test_review_report_on_a_non_database_names_no_db_flag(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("not a database\n" * 100)
    line = refused(capsys, "report", tmp_path / "readme.txt", "--out", tmp_path / "rep")
    assert "not a trojanguard results store" in line and "--db" not in line


def test_review_detect_guard_refuses_method(suspect, inputs, tmp_path, capsys):
    code, _, err = _run(capsys, "guard", "--model", suspect, "--out", tmp_path / "g", "--quiet")
    assert code == 0, err
    line = refused(capsys, "detect", "--guard", tmp_path / "g", "--method", "strip", "--inputs", inputs,
                   "--out", tmp_path / "s.csv")
    assert "--method fit a new detector" in line
    # the purification of a saved guard is what was saved: named as the user spelled it
    for spelling in (["--set", "purify=true"], ["--purify"]):
        line = refused(capsys, "detect", "--guard", tmp_path / "g", *spelling, "--inputs", inputs,
                       "--out", tmp_path / "s.csv")
        assert ("--set purify=true:" if "--set" in spelling else "--purify:") in line and "as it was saved" in line


@pytest.mark.parametrize("command", ["purify", "repair", "detect", "inspect", "guard"])
def test_review_set_seed_is_refused_for_the_seed_flag(command, suspect, inputs, tmp_path, capsys):
    """--set seed=3 would split and train with a seed the record does not show."""
    extra = {"purify": ["--method", "fst"], "detect": ["--inputs", inputs], "inspect": ["--method", "nc"]}
    out = tmp_path / ("s.csv" if command == "detect" else "o")
    line = refused(capsys, command, "--model", suspect, *extra.get(command, []), "--set", "seed=3", "--out", out)
    assert "--set seed=...: use the flag --seed" in line and not out.exists()


def test_review_repair_in_python_takes_the_seed_once(backdoored_digits, digits):
    from trojanguard.errors import UserError
    from trojanguard.practitioner import repair
    with pytest.raises(UserError, match="give the seed once"):
        repair(backdoored_digits[0], digits.defense, method="ft", options={"seed": 3})


def test_review_model_names_in_any_case(digits):
    from trojanguard.pipeline import build_model
    assert type(build_model("PreAct_ResNet18", digits.bundle)) is type(build_model("preact_resnet18", digits.bundle))


@pytest.mark.parametrize("argv,flag", [
    (["purify", "--method", "fst", "--model", "MODEL", "--attack", "NOPE", "--out", "OUT"], "--attack"),
    (["eval", "--model", "MODEL", "--attack", "NOPE"], "--attack"),
    (["detect", "--guard", "NOPE", "--inputs", "INPUTS", "--out", "OUT.csv"], "--guard"),
])
def test_review_missing_path_names_its_flag(argv, flag, suspect, inputs, tmp_path, capsys):
    nope = tmp_path / "nope"
    subst = {"MODEL": suspect, "NOPE": nope, "INPUTS": inputs, "OUT": tmp_path / "o", "OUT.csv": tmp_path / "o.csv"}
    line = refused(capsys, *[subst.get(a, a) for a in argv])
    assert f"{flag} {nope} does not exist" in line


def test_review_undecodable_image_names_the_file(tmp_path):
    from trojanguard.data.images import decode_image
    from trojanguard.errors import UserError
    with pytest.raises(UserError) as e:
        decode_image(b"not an image at all", "inputs/x.png")
    assert "inputs/x.png" in str(e.value) and "BytesIO" not in str(e.value)


def test_review_text_tables_as_users_save_them(tmp_path):
    """Excel's byte-order mark, a "text" column, a blank sentence, an unlabelled .txt."""
    from trojanguard.data.user import load_clean_data, read_texts
    from trojanguard.errors import UserError
    rows = "".join(f"{'a fine film' if i % 2 else 'a dull mess'},{i % 2}\n" for i in range(6))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(("sentence,label\n" + rows).encode("utf-8-sig"))
    data = load_clean_data(bom, ["negative", "positive"], "text")
    assert len(data) == 6 and data.texts[1] == "a fine film"
    alias = tmp_path / "alias.csv"
    alias.write_text("text,label\n" + rows)
    assert load_clean_data(alias, ["negative", "positive"], "text").texts == data.texts
    blank = tmp_path / "blank.csv"
    blank.write_text("sentence,label\n" + rows + " ,1\n")
    with pytest.raises(UserError, match="line 8 has an empty 'sentence'"):
        load_clean_data(blank, ["negative", "positive"], "text")
    with pytest.raises(UserError, match="line 8 has an empty 'sentence'"):
        read_texts(blank, None)
    txt = tmp_path / "clean.txt"
    txt.write_text("a fine film\na dull mess\n")
    with pytest.raises(UserError, match="unlabelled sentences"):
        load_clean_data(txt, ["negative", "positive"], "text")
    assert read_texts(bom, None)[1][0] == "a dull mess"


def test_review_column_names_of_a_clean_table(tmp_path):
    from trojanguard.data.user import load_clean_data
    from trojanguard.errors import UserError
    t = tmp_path / "c.tsv"
    t.write_text("review\tstars\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(6)))
    data = load_clean_data(t, ["negative", "positive"], "text", text_column="review", label_column="stars")
    assert data.texts[0] == "film 0" and data.y.tolist() == [0, 1] * 3
    with pytest.raises(UserError, match="no column 'sentence'.*rename the header"):
        load_clean_data(t, ["negative", "positive"], "text")

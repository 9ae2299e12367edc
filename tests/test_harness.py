"""The benchmark harness (issue 13): grids validated whole before any work, cells in one
SQLite store, kill -9 safe resumable runs, local vs Ray, HTML report, harness overhead.

The grid here is smaller than configs/tiny.yaml (2 training epochs) and uses the test-only
detector/inspector of tests/harness_plugins.py."""
from __future__ import annotations

import base64
import contextlib
import html.parser
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trojanguard.bench import load_results, run_grid
from trojanguard.bench.report import DETECTION, INSPECTION, PURIFICATION
from trojanguard.cli.main import main

TESTS = Path(__file__).parent
# timings and where things ran differ between runs; everything else in metrics must not
VOLATILE = re.compile(r"seconds|peak|rss|cuda|inner_stages|adopted_from|evidence_time")

BASE = {
    "name": "small",
    "dataset": "digits", "holdout": 0.2, "model": "small_cnn",
    "train": {"epochs": 2},
    "plugins": ["harness_plugins"],
    "attacks": [{"name": "none", "seeds": [0]}, {"name": "badnets", "ratios": [0.1], "seeds": [0]}],
    "defenses": {"purifiers": [{"name": "fst", "options": {"epochs": 2}}, {"name": "ft", "options": {"epochs": 2}}],
                 "detectors": [{"name": "test-zscore"}],
                 "inspectors": [{"name": "test-share"}]},
    "checks": {"retuning": {"epochs": 1, "n_clean": 200}},
}
N_CELLS = 7  # 2 victims, 2 purifiers + 1 detector on the backdoored one, 1 inspector on each


@pytest.fixture(autouse=True)
def _plugins_on_path(monkeypatch):
    # subprocesses and Ray workers import the grid's plugin module too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def write_grid(path: Path, **changes) -> Path:
    grid = {**BASE, **changes}
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def run(grid: Path, root: Path, **kw) -> tuple[dict, str]:
    out = io.StringIO()
    res = run_grid(grid, db=root / "r.sqlite", artifacts=root / "art", threads=1, stream=out, live=False, **kw)
    return res, out.getvalue()


def metrics_by_hash(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT hash, status, metrics FROM cells").fetchall()
    finally:
        con.close()
    out = {}
    for h, status, m in rows:
        assert status == "done", (h, status)
        out[h] = {k: v for k, v in json.loads(m).items() if not VOLATILE.search(k)}
    return out


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One uninterrupted local run of the small grid, shared by several tests."""
    root = tmp_path_factory.mktemp("small")
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), old])
    sys.path.insert(0, str(TESTS))
    grid = write_grid(root / "small.yaml")
    t0 = time.perf_counter()
    res, log = run(grid, root)
    wall = time.perf_counter() - t0
    os.environ["PYTHONPATH"] = old
    return {"root": root, "grid": grid, "db": root / "r.sqlite", "res": res, "log": log, "wall": wall}


def test_end_to_end_local_store_and_rerun(small_run):
    db, res, log = small_run["db"], small_run["res"], small_run["log"]
    assert res["computed"] == N_CELLS and res["failed"] == 0
    # not a terminal: one plain line per event, each naming its cell
    events = [ln for ln in log.splitlines() if re.match(r"\d\d:\d\d:\d\d (start|stage|done|failed)\s", ln)]
    assert sum(" done " in ln for ln in events) == N_CELLS and "\x1b" not in log
    df = load_results(db)
    assert len(df) == N_CELLS and set(df.status) == {"done"}
    assert set(df.threads) == {1} and df.versions.map(lambda v: v["torch"]).nunique() == 1
    assert df.seconds.gt(0).all() and df.peak_rss_mb.gt(0).all()
    assert df.stages.map(len).gt(0).all() and df.hash.is_unique
    pur = df[df.kind == "purifier"]
    assert set(pur.defense) == {"fst", "ft"} and pur.asr_after_ra.between(0, 1).all()
    assert pur.der.between(0, 1).all() and (pur.asr_before > 0.9).all()  # the backdoor implanted
    det = df[df.kind == "detector"].iloc[0]
    assert 0 <= det.auroc <= 1 and len(det.roc["fpr"]) == len(det.roc["tpr"]) >= 2
    assert det.guard == "reject flagged"  # a detector without a purifier: flagged inputs are rejected
    ins = df[df.kind == "inspector"].set_index("attack")
    assert not ins.loc["none", "is_backdoored"] and ins.loc["badnets", "is_backdoored"]
    assert ins.loc["badnets", "true_target"] == 0 and ins.verdict.isin(["clean", "backdoored"]).all()
    # every artifact folder is a complete result, with the cell's record beside it
    from trojanguard.bench.cells import record_path
    from trojanguard.resultdir import check_result
    for h, path in zip(df.hash, df.artifact):
        check_result(path)
        assert json.loads(record_path(path).read_text())["hash"] == h
    finished = dict(zip(df.hash, df.finished))

    res2, log2 = run(small_run["grid"], small_run["root"])  # again: nothing is computed
    assert res2["computed"] == 0 and res2["skipped"] == N_CELLS
    df2 = load_results(db)
    assert dict(zip(df2.hash, df2.finished)) == finished and set(df2.attempts) == {1}


def test_purifier_cell_equals_direct_calls(small_run):
    """The cell computes with the functions the CLI calls: same numbers called directly."""
    from trojanguard.attacks import attack_for_checkpoint
    from trojanguard.checkpoint import load_checkpoint
    from trojanguard.defenses import create_defense
    from trojanguard.defenses.common import before_after
    from trojanguard.pipeline import prepare_data
    df = load_results(small_run["db"]).set_index("name")
    row = df.loc["badnets-0.1-s0/fst"]
    victim = df.loc["badnets-0.1-s0", "artifact"]
    prep = prepare_data("digits", holdout=0.2, seed=0)
    model, _ = load_checkpoint(victim)
    res = create_defense("fst", epochs=2, progress=False).purify(model, prep.defense)
    direct = before_after(model, res.model, prep.bundle.test, attack_for_checkpoint(victim))
    for k, v in direct.items():
        assert row[k] == pytest.approx(v, abs=1e-12), k


# The harness's own work is a few milliseconds per cell whatever the cell computes; the small
# grid's cells compute ~60 ms each, so that their share there (2.4 % in CI) measures the size of
# the test's cells, not the harness. Cells of a few hundred milliseconds, still far shorter than
# any real cell (minutes), make the ratio the acceptance point means.
LONGER_CELLS = {
    "train": {"epochs": 8},
    "defenses": {"purifiers": [{"name": "fst", "options": {"epochs": 8}}, {"name": "ft", "options": {"epochs": 8}}],
                 "detectors": [{"name": "test-zscore"}],
                 "inspectors": [{"name": "test-share"}]},
}


def test_harness_overhead(small_run, tmp_path, monkeypatch):
    """Harness time per cell = wall time of the scheduling loop minus the time inside the cell
    computations (the calls the CLI makes, saving their results included). Acceptance: <= 2 %.
    Reading and validating the grid and opening the store happen once per run, whatever its
    size: measured and printed apart."""
    from trojanguard.bench import cells, run as run_mod, store as store_mod
    spent = {"compute": 0.0, "once": 0.0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper
    for kind, fn in list(cells.RUNNERS.items()):
        monkeypatch.setitem(cells.RUNNERS, kind, timed(fn, "compute"))
    cells._DATA.clear()  # loading the data is part of the first cell, as in a direct call
    monkeypatch.setattr(run_mod, "plan_grid", timed(run_mod.plan_grid, "once"))
    monkeypatch.setattr(run_mod, "Store", timed(store_mod.Store, "once"))
    monkeypatch.setattr(store_mod.Store, "close", timed(store_mod.Store.close, "once"))
    # timing noise from other processes only ever adds time: the best of five runs is the estimate
    best = float("inf")
    for attempt in range(5):
        spent.update(compute=0.0, once=0.0)
        cells._DATA.clear()
        root = tmp_path / f"run{attempt}"
        root.mkdir()
        grid = write_grid(root / "g.yaml", **LONGER_CELLS)
        t0 = time.perf_counter()
        res, _ = run(grid, root)
        wall = time.perf_counter() - t0
        assert res["computed"] == N_CELLS
        per_cell = (wall - spent["once"] - spent["compute"]) / spent["compute"]
        total = (wall - spent["compute"]) / spent["compute"]
        print(f"\nharness overhead: {100 * per_cell:.2f} % per cell, {100 * total:.2f} % with planning and opening "
              f"the store ({spent['once']:.3f} s once); cells computed {spent['compute']:.2f} s, wall {wall:.2f} s")
        best = min(best, per_cell)
        if best <= 0.02:
            break
    assert best <= 0.02


@pytest.mark.slow
def test_local_and_ray_give_identical_metrics(small_run, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'trojanguard[ray]')")
    grid = write_grid(tmp_path / "g.yaml",
                      defenses={**BASE["defenses"], "purifiers": BASE["defenses"]["purifiers"] + [{"name": "test-crash"}]})
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        res, log = run(grid, tmp_path, executor="ray")
    finally:
        ray.shutdown()
    # the worker that died failed its own cell only
    assert res["failed"] == 1 and res["computed"] == N_CELLS
    con = sqlite3.connect(tmp_path / "r.sqlite")
    failed = con.execute("SELECT name, error FROM cells WHERE status = 'failed'").fetchall()
    con.execute("DELETE FROM cells WHERE status = 'failed'")
    con.commit()
    con.close()
    assert len(failed) == 1 and failed[0][0].endswith("/test-crash") and "worker died" in failed[0][1]
    assert "\n" not in failed[0][1]
    assert metrics_by_hash(tmp_path / "r.sqlite") == metrics_by_hash(small_run["db"])
    assert set(load_results(tmp_path / "r.sqlite").executor) == {"ray"}


@pytest.mark.slow
def test_kill_9_then_rerun(small_run, tmp_path):
    grid = write_grid(tmp_path / "g.yaml")
    cmd = [sys.executable, "-m", "trojanguard", "bench", str(grid), "--db", str(tmp_path / "r.sqlite"),
           "--artifacts", str(tmp_path / "art"), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    db = tmp_path / "r.sqlite"
    try:  # watch the store: kill once a cell is done and a victim (> 1 s of training) is running
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(sqlite3.Error):
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                rows = con.execute("SELECT status, kind FROM cells").fetchall()
                con.close()
                if ("done", "victim") in rows and ("running", "victim") in rows:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    con = sqlite3.connect(db)
    before = {h: (s, f, a) for h, s, f, a in con.execute("SELECT hash, status, finished, attempts FROM cells")}
    con.close()
    statuses = [s for s, _, _ in before.values()]
    seen_done = statuses.count("done")
    assert statuses.count("running") == 1 and seen_done >= 1

    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{seen_done} done, {N_CELLS - seen_done} to run" in out.stdout
    con = sqlite3.connect(tmp_path / "r.sqlite")
    assert con.execute("SELECT count(*), count(DISTINCT hash) FROM cells").fetchone() == (N_CELLS, N_CELLS)
    after = {h: (s, f, a) for h, s, f, a in con.execute("SELECT hash, status, finished, attempts FROM cells")}
    con.close()
    for h, (s, f, a) in before.items():
        if s == "done":  # finished cells were not repeated
            assert after[h] == (s, f, a)
        if s == "running":  # the killed cell ran again (stale: its process is gone)
            assert after[h][0] == "done" and after[h][2] == 2
    assert not [p for p in (tmp_path / "art").iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert metrics_by_hash(tmp_path / "r.sqlite") == metrics_by_hash(small_run["db"])


def test_zoo_root_adoption(tmp_path):
    from trojanguard.bench import ZooEntry, build_zoo
    from trojanguard.pipeline import prepare_data
    from trojanguard.training import recipe_for
    prep = prepare_data("digits", holdout=0.2, seed=0)
    build_zoo(prep, "small_cnn", [ZooEntry("badnets", 0.1)], tmp_path / "zoo", recipe_for("digits", "small_cnn", epochs=2,
              progress=False), log=lambda *_: None)
    build_zoo(prep, "small_cnn", [ZooEntry("none")], tmp_path / "zoo", recipe_for("digits", "small_cnn", epochs=3,
              progress=False), log=lambda *_: None)
    stamp = (tmp_path / "zoo" / "badnets-0.1-s0" / "model.safetensors").stat().st_mtime_ns
    grid = write_grid(tmp_path / "g.yaml", zoo_root=str(tmp_path / "zoo"), defenses={}, checks={})
    out = io.StringIO()
    run_grid(grid, db=tmp_path / "r.sqlite", dry_run=True, stream=out)
    text = out.getvalue()
    assert re.search(r"adopt\s+victim\s+badnets-0.1-s0", text) and re.search(r"pending\s+victim\s+clean-s0", text)
    assert "recipe epochs: 3 -> 2" in text  # the clean folder was trained otherwise: not adopted, says why
    res, _ = run(grid, tmp_path)
    assert res["adopted"] == 1 and res["computed"] == 1
    df = load_results(tmp_path / "r.sqlite").set_index("name")
    assert df.loc["badnets-0.1-s0", "artifact"] == str(tmp_path / "zoo" / "badnets-0.1-s0")
    assert df.loc["badnets-0.1-s0", "asr"] > 0.9
    assert (tmp_path / "zoo" / "badnets-0.1-s0" / "model.safetensors").stat().st_mtime_ns == stamp


def test_dry_run_only_and_eta(small_run):
    out = io.StringIO()
    res = run_grid(small_run["grid"], db=small_run["db"], artifacts=small_run["root"] / "art", dry_run=True,
                   only="*/fst", stream=out)
    text = out.getvalue()
    assert res["done"] == 2 and "badnets-0.1-s0/fst" in text and "/ft " not in text and "clean-s0" not in text
    # a new setting of fst: two cells to run, timed from the finished purifier cells in the store
    grid = write_grid(small_run["root"] / "g2.yaml",
                      defenses={"purifiers": [{"name": "fst", "options": {"epochs": 3}}]})
    out = io.StringIO()
    res = run_grid(grid, db=small_run["db"], artifacts=small_run["root"] / "art", dry_run=True, stream=out)
    assert res["pending"] == 1 and res["eta"] is not None and res["eta"] > 0, out.getvalue()


def test_report_html_csv_and_cli(small_run, tmp_path):
    assert main(["report", str(small_run["db"]), "--out", str(tmp_path / "rep"), "--grid", "small"]) == 0
    rep = tmp_path / "rep"
    for name, cols in (("purification", PURIFICATION), ("detection", DETECTION), ("inspection", INSPECTION)):
        lines = (rep / f"{name}.csv").read_text().splitlines()
        assert lines[0] == ",".join(cols) and len(lines) > 1
    assert (rep / "zoo.csv").read_text().splitlines()[0] == "attack,ratio,seed,ca,asr,ra,seconds"
    # an inspection row names the model it inspected (its victim cell), not the architecture
    from trojanguard.bench.report import collect
    victims = {r["name"] for r in collect(small_run["db"], "small")["cells"] if r["kind"] == "victim"}
    inspected = {line.split(",")[1] for line in (rep / "inspection.csv").read_text().splitlines()[1:]}
    assert inspected and inspected <= victims, (inspected, victims)
    page = (rep / "report.html").read_text()

    class Parser(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.imgs, self.sections = [], [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.tags.append(tag)
            if tag == "img":
                self.imgs.append(a["src"])
            if tag == "section":
                self.sections.append(a["id"])
    p = Parser()
    p.feed(page)
    assert page.startswith("<!doctype html>") and "<title>" in page
    assert p.sections == ["purification", "detection", "inspection", "victims", "cost"]
    assert p.tags.count("table") == 4 and "script" not in p.tags and "link" not in p.tags
    # heatmaps x2, scatter, retuning, ROC, runtime, memory: every image inline, a real PNG
    assert len(p.imgs) == 7
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "asr_after_ra" in page and "http" not in page.replace("http-equiv", "")
    md = (rep / "report.md").read_text()
    assert "## Purification" in md and "| asr_after_ra" in md.replace("  ", " ")


MALFORMED = [
    ("unknown-attack", {"attacks": [{"name": "badnet", "ratios": [0.1]}]}, "did you mean 'badnets'"),
    ("unknown-defense", {"defenses": {"purifiers": [{"name": "fsst"}]}}, "did you mean 'fst'"),
    ("unknown-option", {"defenses": {"purifiers": [{"name": "fst", "options": {"epoch": 2}}]}},
     "unknown option 'epoch'; did you mean 'epochs'"),
    ("ratio-above-1", {"attacks": [{"name": "badnets", "ratios": [1.5]}]}, "ratio"),
    ("clean-label-cap", {"attacks": [{"name": "sig", "ratios": [0.5]}]}, "capped at the target class share"),
    ("missing-data", {"dataset": "cifar10", "data_dir": "/nonexistent/cifar"}, "does not exist"),
    ("wrong-modality", {"defenses": {"detectors": [{"name": "test-textonly"}]}}, "works on text models"),
    ("unknown-key", {"atacks": []}, "unknown key 'atacks' (did you mean 'attacks'?)"),
    ("unknown-dataset", {"dataset": "digit"}, "did you mean 'digits'"),
    ("unknown-model", {"model": "small_cn"}, "did you mean 'small_cnn'"),
    ("wrong-section", {"defenses": {"detectors": [{"name": "fst"}]}}, "is a purifier, not a detector"),
    ("recipe-option", {"train": {"epoch": 2}}, "unknown option 'epoch'"),
    ("ratios-and-counts", {"attacks": [{"name": "badnets", "ratios": [0.1], "counts": [10]}]}, "ratios or counts"),
    ("retuning-option", {"checks": {"retuning": {"epoch": 1}}}, "did you mean 'epochs'"),
    ("needs-clean-model", {"attacks": [{"name": "lc", "ratios": [0.05]}]}, "add a clean entry"),
    ("target-out-of-range", {"attacks": [{"name": "badnets", "ratios": [0.1], "targets": [12]}]}, "target 12"),
    ("duplicate-label", {"defenses": {"purifiers": [{"name": "fst"}, {"name": "fst", "options": {"epochs": 3}}]}},
     "appears twice"),
    ("text-attack-on-images", {"attacks": [{"name": "addsent", "ratios": [0.1]}]}, "has no image variant"),
    ("zero-poisoned", {"attacks": [{"name": "badnets", "ratios": [0.0001]}]}, "poisons nothing"),
    ("no-attacks", {"attacks": []}, "attacks: List should have at least 1 item"),
]


@pytest.mark.parametrize("case,change,expect", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_grid_is_refused_in_one_line(case, change, expect, tmp_path, capsys):
    grid = write_grid(tmp_path / "bad.yaml", **change)
    rc = main(["bench", str(grid), "--db", str(tmp_path / "r.sqlite"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("trojanguard: error: "), err
    assert expect in err, err
    assert not (tmp_path / "r.sqlite").exists()  # nothing was started


def test_ray_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed (find_spec gives None)
    grid = write_grid(tmp_path / "g.yaml")
    assert main(["bench", str(grid), "--db", str(tmp_path / "r.sqlite"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'trojanguard[ray]'" in err
    assert not (tmp_path / "r.sqlite").exists()


def test_not_yaml_and_missing_file_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: digits\nattacks: [\n  - {name: none\n")
    assert main(["bench", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid YAML (line" in err
    assert main(["bench", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_changed_grid_reports_its_current_cells_only(small_run, tmp_path):
    """Changing a defense's option makes a new cell; the grid's report then shows the new
    cell, not the old one beside it (which stays in the store)."""
    import shutil

    from trojanguard.bench.report import collect
    db = tmp_path / "r.sqlite"
    shutil.copyfile(small_run["db"], db)
    before = collect(db, "small")["purification"]
    assert sorted(r["defense"] for r in before) == ["fst", "ft"]
    grid = write_grid(tmp_path / "small.yaml", defenses={
        "purifiers": [{"name": "fst", "options": {"epochs": 1}}, {"name": "ft", "options": {"epochs": 2}}],
        "detectors": [{"name": "test-zscore"}], "inspectors": [{"name": "test-share"}]})
    res = run_grid(grid, db=db, artifacts=small_run["root"] / "art", threads=1, stream=io.StringIO(), live=False,
                   only="*/fst")
    assert res["computed"] == 1
    after = collect(db, "small")["purification"]
    assert sorted(r["defense"] for r in after) == ["fst", "ft"]  # one fst row: the new one
    # a run of some cells (--only) keeps the whole grid's order in the store's view
    from trojanguard.bench.grid import plan_grid
    order = [c.name for c in plan_grid(grid, small_run["root"] / "art").cells]
    shown = [r["name"] for r in collect(db, "small")["cells"]]
    assert shown == [n for n in order if n in shown], (shown, order)
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT COUNT(*) FROM cells WHERE kind = 'purifier'").fetchone()[0] == 3
    finally:
        con.close()


def test_defense_attacks_filter_matches_attack_label_or_victim_name(tmp_path):
    """`attacks:` on a defense picks victims by attack label (badnets*) or by cell name, so one
    ratio of an attack can be chosen (badnets-0.2-*)."""
    from trojanguard.bench.grid import plan_grid
    grid = write_grid(tmp_path / "g.yaml", attacks=[{"name": "none", "seeds": [0]},
                                                   {"name": "badnets", "ratios": [0.1, 0.2], "seeds": [0]}],
                      defenses={"purifiers": [
                          {"name": "ft", "options": {"epochs": 1}, "label": "by-label", "attacks": ["badnets"]},
                          {"name": "ft", "options": {"epochs": 1}, "label": "by-name", "attacks": ["badnets-0.2-*"]}]})
    names = sorted(c.name for c in plan_grid(grid, tmp_path / "art").cells if c.kind == "purifier")
    assert names == ["badnets-0.1-s0/by-label", "badnets-0.2-s0/by-label", "badnets-0.2-s0/by-name"]


def test_purification_table_notes_failures_and_unrepaired_models(small_run, tmp_path):
    """No purification fails silently in the tables: a failed cell is a row saying so, and a
    model its purifier did not call repaired (held-out CA collapsed) carries a note."""
    import shutil

    from trojanguard.bench.report import collect, write_report
    db = tmp_path / "r.sqlite"
    shutil.copyfile(small_run["db"], db)
    con = sqlite3.connect(db)
    try:
        con.execute("UPDATE cells SET status = 'failed', error = 'training diverged: the loss became nan' "
                    "WHERE name LIKE '%/ft'")
        (h, m), = con.execute("SELECT hash, metrics FROM cells WHERE name LIKE '%/fst'").fetchall()
        m = {**json.loads(m), "warning": "clean accuracy fell", "verify_ca_before": 0.9, "verify_ca_after": 0.7,
             "verify_size": 40}
        con.execute("UPDATE cells SET metrics = ? WHERE hash = ?", (json.dumps(m), h))
        con.commit()
    finally:
        con.close()
    rows = {r["defense"]: r for r in collect(db, "small")["purification"]}
    assert rows["ft"]["note"] == "failed: training diverged: the loss became nan" and rows["ft"].get("ca_after") is None
    assert rows["fst"]["note"] == "not repaired: CA on 40 held-out clean samples 90.0 -> 70.0"
    written = write_report(db, tmp_path / "rep", grid="small")
    csv_text = written["purification.csv"].read_text()
    assert "failed: training diverged" in csv_text and "not repaired" in csv_text
    assert "failed: training diverged" in written["report.html"].read_text()


def test_report_adds_the_clean_models_asr_when_given(small_run, tmp_path):
    """With ``asr_floor`` ({victim cell: ASR its trigger reaches on clean models}) every
    purification and detection row of that victim carries it as ``asr_clean``; without it
    the tables keep the issue's columns."""
    import csv

    from trojanguard.bench.report import DETECTION, PURIFICATION, collect, write_report
    rows = collect(small_run["db"], "small")
    victims = {r["model"] for r in rows["purification"] + rows["detection"]}
    assert victims and None not in victims
    floor = {v: 0.05 + 0.01 * k for k, v in enumerate(sorted(victims))}
    written = write_report(small_run["db"], tmp_path / "with", grid="small", asr_floor=floor)
    for name, cols in (("purification", PURIFICATION), ("detection", DETECTION)):
        if name not in rows or not rows[name]:
            continue
        with written[f"{name}.csv"].open() as f:
            got = list(csv.DictReader(f))
        assert list(got[0]) == cols[:-1] + ["asr_clean", cols[-1]]
        want = sorted(f"{floor[r['model']]:.4f}" for r in rows[name])
        assert sorted(r["asr_clean"] for r in got) == want
    assert "asr_clean" in written["report.html"].read_text()
    plain = write_report(small_run["db"], tmp_path / "without", grid="small")
    assert plain["purification.csv"].read_text().splitlines()[0] == ",".join(PURIFICATION)

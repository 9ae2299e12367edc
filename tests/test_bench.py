"""The zoo builder: tables in the promised format, resumable, and a finished entry trained
with another recipe is retrained instead of silently reused. Class-balanced loss weights."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F

from trojanguard.bench import (ZooEntry, add_per_class_accuracy, build_zoo, per_class_markdown, write_zoo_csv,
                              write_zoo_tables, zoo_markdown)
from trojanguard.training import class_weights, recipe_diff, recipe_for


def test_class_weights_inverse_frequency():
    y = torch.tensor([0, 0, 0, 1])
    w = class_weights(y, 3)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2, 0.0]))  # absent class: weight 0
    # Weighted CE on a 3:1 batch counts both classes equally.
    logits = torch.zeros(4, 3)
    logits[:3, 0] = 2.0
    per = F.cross_entropy(logits, y, reduction="none")
    want = (per[:3].mean() + per[3]) / 2
    assert F.cross_entropy(logits, y, weight=w) == pytest.approx(want.item(), rel=1e-5)


def test_text_recipe_is_class_balanced():
    assert recipe_for("sst2", "minilm").class_balanced
    assert not recipe_for("cifar10", "preact_resnet18").class_balanced


def test_zoo_tables_resume_and_recipe_change(tmp_path, digits):
    cfg = recipe_for("digits", "small_cnn", epochs=2, progress=False)
    entries = [ZooEntry("none"), ZooEntry("badnets", 0.1)]
    logs = []
    rows = build_zoo(digits, "small_cnn", entries, tmp_path / "zoo", cfg, log=logs.append)
    assert [r["attack"] for r in rows] == ["none", "badnets"]
    assert rows[1]["poisoned"] == round(0.1 * len(digits.train))
    metrics = tmp_path / "zoo" / "badnets-0.1-s0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns

    logs.clear()  # resumed: nothing is retrained
    again = build_zoo(digits, "small_cnn", entries, tmp_path / "zoo", cfg, log=logs.append)
    assert metrics.stat().st_mtime_ns == stamp and sum("done already" in m for m in logs) == 2
    assert [r["ca"] for r in again] == [r["ca"] for r in rows]

    # per-class clean accuracy is recorded at training time; the class-share-weighted mean is CA,
    # and recomputing it for an entry without the record (an older zoo) gives the same numbers
    share = torch.bincount(digits.bundle.test.y, minlength=10).double() / len(digits.bundle.test)
    for r in rows:
        weighted = float((share * torch.tensor(r["ca_per_class"], dtype=torch.float64)).sum())
        assert weighted == pytest.approx(r["ca"], abs=1e-9)
    recorded = rows[1]["ca_per_class"]
    rows[1]["ca_per_class"] = None  # an older entry: neither the row nor its metrics.json has it
    older = json.loads(metrics.read_text())
    del older["ca_per_class"]
    metrics.write_text(json.dumps(older))
    sidecar_path = metrics.parent / "model.json"
    side = json.loads(sidecar_path.read_text())
    side["metrics"].pop("ca_per_class", None)
    side["format"] = "trojanguard-checkpoint/1"  # an entry of that time: no COMPLETE.json, format /1
    sidecar_path.write_text(json.dumps(side))
    (metrics.parent / "COMPLETE.json").unlink()
    logs.clear()
    add_per_class_accuracy(digits, rows, tmp_path / "zoo", log=logs.append)
    assert rows[1]["ca_per_class"] == pytest.approx(recorded)
    assert sum("per-class accuracy" in m for m in logs) == 1  # the row that had it is not re-evaluated
    assert json.loads(metrics.read_text())["ca_per_class"] == pytest.approx(recorded)
    assert json.loads(sidecar_path.read_text())["metrics"]["ca_per_class"] == pytest.approx(recorded)
    # saved back: the next report, from freshly read rows, evaluates nothing again
    logs.clear()
    reread = build_zoo(digits, "small_cnn", entries, tmp_path / "zoo", cfg, train_missing=False, log=logs.append)
    add_per_class_accuracy(digits, reread, tmp_path / "zoo", log=logs.append)
    assert not any("per-class accuracy" in m for m in logs)
    stamp = metrics.stat().st_mtime_ns
    md = per_class_markdown(rows, [f"c{i}" for i in range(10)])
    assert md.splitlines()[2].startswith("| none") and f"| {100 * recorded[9]:.0f}" in md.splitlines()[3]
    assert "| -" in per_class_markdown([{**rows[1], "ca_per_class": [None] * 10}], [f"c{i}" for i in range(10)])

    longer = cfg.model_copy(update={"epochs": 3})
    logs.clear()  # report-only with another recipe: stale entries are left out, not reported
    assert build_zoo(digits, "small_cnn", entries, tmp_path / "zoo", longer, log=logs.append,
                     train_missing=False) == []
    assert any("epochs: 2 -> 3" in m for m in logs)
    logs.clear()  # building with another recipe retrains
    build_zoo(digits, "small_cnn", entries[1:], tmp_path / "zoo", longer, log=logs.append)
    assert metrics.stat().st_mtime_ns != stamp and json.loads(metrics.read_text())["train_config"]["epochs"] == 3

    write_zoo_tables(rows, tmp_path / "z.md", tmp_path / "z.csv", "title", sections=("## more\n\ntext",))
    with open(tmp_path / "z.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["attack", "ratio", "seed", "ca", "asr", "ra", "seconds"]
    assert table[0]["attack"] == "none" and table[0]["asr"] == ""
    assert 0 <= float(table[1]["asr"]) <= 1 and float(table[1]["ratio"]) == 0.1
    md = (tmp_path / "z.md").read_text()
    assert "| badnets" in md and md.rstrip().endswith("## more\n\ntext")
    rows[1]["setting"] = "selection=fixed"
    write_zoo_csv(rows, tmp_path / "a.csv", extra_columns=("setting",))
    with open(tmp_path / "a.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["attack", "ratio", "seed", "setting", "ca", "asr", "ra", "seconds"]
    assert table[1]["setting"] == "selection=fixed"
    assert "| setting" in zoo_markdown(rows, extra_columns=("setting",)).splitlines()[0]
    assert ZooEntry("wanet", 0.1, options={"selection": "fixed", "table_dir": "/x"}).setting == "selection=fixed"


def test_recipe_diff_treats_unrecorded_settings_as_their_default():
    cfg = recipe_for("cifar10", "preact_resnet18")
    old = cfg.model_dump(exclude={"class_balanced", "bucket_by_length"})  # a run from before they existed
    assert recipe_diff(old, cfg) == {}
    assert recipe_diff(old, recipe_for("sst2", "minilm")).get("class_balanced") == (False, True)
    assert recipe_diff({**old, "lr": 0.05}, cfg) == {"lr": (0.05, 0.1)}


def test_options_added_later_enter_the_hash_only_when_set():
    """Stored cells and trained victims keep their hashes when an option is added at its default."""
    from pydantic import BaseModel, Field

    from trojanguard.bench.grid import config_hash, hashed_options
    from trojanguard.utils import ADDED_LATER

    class Old(BaseModel):
        lr: float = 0.1

    class New(Old):
        milestones: list[int] = Field(default_factory=list, json_schema_extra=ADDED_LATER)

    assert config_hash(hashed_options(New())) == config_hash(hashed_options(Old()))
    assert config_hash(hashed_options(New(milestones=[2]))) != config_hash(hashed_options(Old()))
    assert hashed_options(New(lr=0.2), exclude={"lr"}) == {}


def test_an_option_added_with_a_new_default_keeps_old_cells_as_its_legacy_value():
    """``added_later(legacy)``: the cells hashed before the option existed are the option's
    legacy value (their hash is unchanged when it is set to it); its default, which changes
    the behaviour, gets new hashes instead of taking over the old rows."""
    from typing import Literal

    from pydantic import BaseModel, Field

    from trojanguard.bench.grid import config_hash, hashed_options
    from trojanguard.utils import added_later

    class Old(BaseModel):
        lr: float = 0.1

    class New(Old):
        rule: Literal["estimate", "bound"] = Field("bound", json_schema_extra=added_later("estimate"))

    assert config_hash(hashed_options(New(rule="estimate"))) == config_hash(hashed_options(Old()))
    assert config_hash(hashed_options(New())) != config_hash(hashed_options(Old()))
    assert hashed_options(New()) == {"lr": 0.1, "rule": "bound"}

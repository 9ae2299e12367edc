"""A resumable model zoo: a list of (attack, ratio, seed) trained on one dataset/model.

Each entry lives in ``<root>/<attack>-<ratio>-s<seed>/``; an entry whose ``metrics.json``
exists is finished and is not retrained, so an interrupted build resumes where it
stopped. The table of all finished entries is written as Markdown and CSV
(``attack,ratio,seed,ca,asr,ra,seconds``, rates as fractions; the clean model has attack
``none``)."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..attacks import create_attack
from ..pipeline import Prepared, prepare_data
from ..report import percent, table
from ..training import TrainConfig, recipe_diff
from ..utils import atomic_write_json, atomic_write_text
from ..workflows import train_victim

CSV_COLUMNS = ["attack", "ratio", "seed", "ca", "asr", "ra", "seconds"]
ZOO_HOLDOUT = 0.05  # the clean split held out for defenses (the reference recipe's 5 %)


def zoo_data(dataset: str, data_dir: str | None, seed: int = 0) -> Prepared:
    """The zoo's data: the same split for every entry and for scripts that revisit one."""
    return prepare_data(dataset, data_dir, holdout=ZOO_HOLDOUT, seed=seed)


@dataclass
class ZooEntry:
    attack: str = "none"          # "none" = the clean reference model
    ratio: float | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)  # extra attack options (mode, count, ...)
    label: str | None = None      # name shown in tables (default: the attack name)

    @property
    def folder_name(self) -> str:
        if self.attack == "none":
            return f"clean-s{self.seed}"
        extra = "".join(f"-{k}{v}" for k, v in self._named_options())
        return f"{self.attack}-{self.ratio}{extra}-s{self.seed}"

    @property
    def setting(self) -> str:
        """The non-default attack options as ``key=value`` text ("" for none)."""
        return ", ".join(f"{k}={v}" for k, v in self._named_options())

    def _named_options(self) -> list[tuple[str, object]]:
        # a table directory is where data lives, not a setting: it names neither folder nor row
        return [(k, v) for k, v in sorted(self.options.items()) if k != "table_dir"]


def build_zoo(prep: Prepared, model_name: str, entries: list[ZooEntry], root: str | Path,
              cfg: TrainConfig, width: int | None = None, clean_model=None, log=print,
              train_missing: bool = True) -> list[dict]:
    """Train every entry that is not finished yet (``train_missing=False``: only report the
    finished ones) and return one table row per finished entry."""
    root = Path(root)
    rows = []
    for i, e in enumerate(entries, 1):
        folder = root / e.folder_name
        entry_cfg = cfg.model_copy(update={"seed": e.seed})
        stale = _recipe_changes(folder / "metrics.json", entry_cfg)
        if stale:
            log(f"[{i}/{len(entries)}] {e.folder_name}: trained with another recipe ({stale})"
                + (", retraining" if train_missing else ", left out of the table"))
            if not train_missing:
                continue
        if (folder / "metrics.json").exists() and not stale:
            log(f"[{i}/{len(entries)}] {e.folder_name}: done already, skipped")
        elif not train_missing:
            log(f"[{i}/{len(entries)}] {e.folder_name}: not built yet, left out of the table")
            continue
        else:
            log(f"[{i}/{len(entries)}] {e.folder_name}: training")
            attack = None
            if e.attack != "none":
                kw = dict(e.options, seed=e.seed)
                if e.ratio is not None:
                    kw["ratio"] = e.ratio
                attack = create_attack(e.attack, modality=prep.bundle.modality, **kw)
            train_victim(prep, model_name, entry_cfg, width=width,
                         attack=attack, out=folder, clean_model=clean_model)
        m = json.loads((folder / "metrics.json").read_text())
        rows.append({"attack": e.label or e.attack, "ratio": e.ratio if e.attack != "none" else 0.0,
                     "seed": e.seed, "ca": m["ca"], "asr": m.get("asr"),
                     "ra": m.get("ra"), "seconds": round(m["seconds"], 1),
                     "poisoned": m.get("poisoned_count", 0), "folder": e.folder_name,
                     "setting": e.setting, "ca_per_class": m.get("ca_per_class")})
        log(f"    CA {m['ca']:.4f}" + (f"  ASR {_fraction(m['asr']) or '-'}  RA {_fraction(m['ra']) or '-'}" if "asr" in m else "")
            + f"  {m['seconds']:.0f} s")
    return rows


def _recipe_changes(metrics_path: Path, cfg: TrainConfig) -> str:
    """Which training settings of a finished entry differ from ``cfg``, as text; empty
    when the entry is missing or matches."""
    if not metrics_path.exists():
        return ""
    diff = recipe_diff(json.loads(metrics_path.read_text()).get("train_config", {}), cfg)
    return ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in diff.items())


def add_per_class_accuracy(prep: Prepared, rows: list[dict], root: str | Path, log=print) -> list[dict]:
    """Fill ``ca_per_class`` (clean test accuracy of every class) for rows of entries trained
    before it was recorded: one clean pass per model, saved into the entry's metrics.json
    (and its checkpoint sidecar) so that it is computed once. Returns the rows."""
    from ..checkpoint import SIDECAR, load_checkpoint, read_sidecar
    from ..eval import evaluate
    for r in rows:
        if r.get("ca_per_class") is None:
            log(f"per-class accuracy: {r['folder']}")
            model, _ = load_checkpoint(Path(root) / r["folder"])
            r["ca_per_class"] = evaluate(model, prep.bundle.test, per_class=True)["ca_per_class"]
            folder = Path(root) / r["folder"]
            path = folder / "metrics.json"
            atomic_write_json(path, {**json.loads(path.read_text()), "ca_per_class": r["ca_per_class"]})
            # and in the checkpoint's sidecar, where `trojanguard info` reads it
            sidecar = read_sidecar(folder)
            sidecar["metrics"] = {**(sidecar.get("metrics") or {}), "ca_per_class": r["ca_per_class"]}
            atomic_write_json(folder / SIDECAR, sidecar)
    return rows


def per_class_markdown(rows: list[dict], classes: list[str]) -> str:
    """A Markdown table of clean accuracy per class (%), one row per zoo entry ("-" where
    there is no rate)."""
    shown = []
    for r in rows:
        per_class = r.get("ca_per_class") or [None] * len(classes)
        if len(per_class) != len(classes):
            raise ValueError(f"{r.get('folder', r['attack'])}: {len(per_class)} per-class rates for {len(classes)} classes")
        shown.append({"attack": r["attack"], "ratio": _ratio_text(r["ratio"]),
                      **{c: percent(a, 0) for c, a in zip(classes, per_class)}})
    return table(shown, ["attack", "ratio", *classes], markdown=True)


def _ratio_text(ratio: float | None) -> str:
    return percent(ratio, 2, "%") if ratio else "-"


def _fraction(v: float | None) -> str:
    """A rate for the CSV: four decimals, empty where it does not apply (None or nan)."""
    return "" if v is None or math.isnan(v) else f"{v:.4f}"


def write_zoo_csv(rows: list[dict], path: str | Path, extra_columns: tuple[str, ...] = ()) -> None:
    """``CSV_COLUMNS`` (plus ``extra_columns`` after ``seed``); rates as fractions, empty
    where a rate does not apply (no ASR/RA for the clean model)."""
    cut = CSV_COLUMNS.index("seed") + 1
    columns = [*CSV_COLUMNS[:cut], *extra_columns, *CSV_COLUMNS[cut:]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (_fraction(r[k]) if k in ("ca", "asr", "ra") else r[k]) for k in columns})
    atomic_write_text(path, buf.getvalue())


def zoo_markdown(rows: list[dict], extra_columns: tuple[str, ...] = ()) -> str:
    """The zoo table in Markdown, rates in %."""
    shown = []
    for r in rows:
        shown.append({**r, **{k: percent(r[k]) for k in ("ca", "asr", "ra")}, "ratio": _ratio_text(r["ratio"])})
    return (table(shown, ["attack", "ratio", "poisoned", "seed", *extra_columns, "ca", "asr", "ra", "seconds"],
                  markdown=True)
            + "\n\nCA, ASR, RA in %; seconds = poisoning + training + evaluation wall time on this machine.\n")


def write_zoo_tables(rows: list[dict], md_path: str | Path, csv_path: str | Path, title: str,
                     notes: str = "", sections: tuple[str, ...] = ()) -> None:
    """The zoo table as CSV (``CSV_COLUMNS``) and as Markdown: title, notes, the table, then
    ``sections`` (further Markdown blocks)."""
    write_zoo_csv(rows, csv_path)
    md = (f"# {title}\n\n" + (notes.strip() + "\n\n" if notes else "") + zoo_markdown(rows)
          + "".join(f"\n{sec.strip()}\n" for sec in sections))
    atomic_write_text(md_path, md)

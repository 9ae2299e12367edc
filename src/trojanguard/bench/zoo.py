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
from dataclasses import dataclass, field
from pathlib import Path

from ..attacks import create_attack
from ..pipeline import Prepared
from ..report import table
from ..train import TrainConfig, recipe_diff
from ..utils import atomic_write_text
from ..workflows import train_victim

CSV_COLUMNS = ["attack", "ratio", "seed", "ca", "asr", "ra", "seconds"]


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
        extra = "".join(f"-{k}{v}" for k, v in sorted(self.options.items()) if k != "table_dir")
        return f"{self.attack}-{self.ratio}{extra}-s{self.seed}"


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
                     "seed": e.seed, "ca": m["ca"], "asr": m.get("asr", float("nan")),
                     "ra": m.get("ra", float("nan")), "seconds": round(m["seconds"], 1),
                     "poisoned": m.get("poisoned_count", 0), "folder": e.folder_name})
        log(f"    CA {m['ca']:.4f}" + (f"  ASR {m['asr']:.4f}  RA {m['ra']:.4f}" if "asr" in m else "")
            + f"  {m['seconds']:.0f} s")
    return rows


def _recipe_changes(metrics_path: Path, cfg: TrainConfig) -> str:
    """Which training settings of a finished entry differ from ``cfg``, as text; empty
    when the entry is missing or matches."""
    if not metrics_path.exists():
        return ""
    diff = recipe_diff(json.loads(metrics_path.read_text()).get("train_config", {}), cfg)
    return ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in diff.items())


def write_zoo_tables(rows: list[dict], md_path: str | Path, csv_path: str | Path, title: str,
                     notes: str = "") -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(r[k], float) and r[k] != r[k]  # no ASR/RA for the clean model
                        else f"{r[k]:.4f}" if k in ("ca", "asr", "ra") else r[k]) for k in CSV_COLUMNS})
    atomic_write_text(csv_path, buf.getvalue())
    shown = []
    for r in rows:
        s = dict(r)
        for k in ("ca", "asr", "ra"):
            s[k] = "-" if s[k] != s[k] else f"{100 * s[k]:.1f}"
        s["ratio"] = f"{100 * r['ratio']:.2f}%" if r["ratio"] else "-"
        shown.append(s)
    md = (f"# {title}\n\n" + (notes.strip() + "\n\n" if notes else "") +
          table(shown, ["attack", "ratio", "poisoned", "seed", "ca", "asr", "ra", "seconds"], markdown=True) +
          "\n\nCA, ASR, RA in %; seconds = poisoning + training + evaluation wall time on this machine.\n")
    atomic_write_text(md_path, md)

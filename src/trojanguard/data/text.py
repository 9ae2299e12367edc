"""Text classification tables: SST-2 / Yelp TSV folders and any CSV/TSV file pair."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ..errors import UserError
from .base import DatasetBundle, TextData, find_data_dir

csv.field_size_limit(2**31 - 1)
MAX_TABLE_BYTES = 4 * 2**30


def read_table(path: Path, text_column: str = "sentence", label_column: str = "label",
               label_names: list[str] | None = None,
               rename_hint: bool = False) -> tuple[list[str], list[int], list[str]]:
    """Read a CSV or TSV file with a header; the delimiter follows the extension.
    ``rename_hint``: a missing column is fixed by renaming the header (the commands that read
    a user's clean data take no column flags), not by --text-column/--label-column."""
    delim = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
    from ..resultdir import regular_file
    regular_file(path, MAX_TABLE_BYTES, "data table")  # not /dev/zero, a pipe or a folder
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would join the first column's name
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not rows:
        raise UserError(f"{path} has no rows")
    if text_column == "sentence" and "sentence" not in rows[0] and "text" in rows[0]:
        text_column = "text"  # the other usual name (the --inputs of detect take both)
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in rows[0]:
            fix = (f"rename the header's columns to {text_column},{label_column}" if rename_hint
                   else f"name it with {flag}")
            raise UserError(f"{path} has no column {col!r} (columns: {list(rows[0])}); {fix}")
    short = next((i for i, r in enumerate(rows, start=2) if r.get(text_column) is None or r.get(label_column) is None), None)
    if short is not None:
        raise UserError(f"{path} line {short} has fewer columns than the header; fix or remove it")
    texts = [r[text_column] for r in rows]
    blank = next((i for i, t in enumerate(texts, start=2) if not t.strip()), None)
    if blank is not None:
        raise UserError(f"{path} line {blank} has an empty {text_column!r}; fill or remove it")
    raw = [r[label_column].strip() for r in rows]
    if label_names is None:
        if all(v.lstrip("-").isdigit() for v in raw):
            k = max(int(v) for v in raw) + 1
            label_names = [str(i) for i in range(k)]
        else:
            label_names = sorted(set(raw))
    lookup = {n: i for i, n in enumerate(label_names)}
    try:
        labels = [int(v) if v.isdigit() and v not in lookup else lookup[v] for v in raw]
    except KeyError as e:
        raise UserError(f"{path}: label {e} not in {label_names}") from None
    bad = next((v for v in labels if not 0 <= v < len(label_names)), None)
    if bad is not None:
        raise UserError(f"{path}: label {bad} is outside the classes {label_names}; fix the labels")
    return texts, labels, label_names


def _split_file(root: Path, split: str) -> Path | None:
    for ext in (".tsv", ".csv"):
        if (root / f"{split}{ext}").is_file():
            return root / f"{split}{ext}"
    return None


def load_text_folder(name: str, data_dir=None, text_column: str = "sentence",
                     label_column: str = "label", classes: list[str] | None = None) -> DatasetBundle:
    root = find_data_dir(name, data_dir, ["train.tsv", "train.csv"],
                         "train.tsv/test.tsv (or .csv) files with a text and a label column")
    if root.is_file():
        raise UserError(f"{root} is a file; pass the folder holding train/test tables")
    tr, te, dev = _split_file(root, "train"), _split_file(root, "test"), _split_file(root, "dev")
    if tr is None or te is None:
        raise UserError(f"{root} needs train.tsv and test.tsv (or .csv); found {sorted(p.name for p in root.iterdir())[:8]}")
    texts, labels, names = read_table(tr, text_column, label_column, None)
    if classes is not None and len(classes) >= len(names):
        names = classes
    mk = lambda t, y: TextData(t, torch.tensor(y, dtype=torch.long), names)  # noqa: E731
    train = mk(texts, labels)
    test = mk(*read_table(te, text_column, label_column, names)[:2])
    defense = mk(*read_table(dev, text_column, label_column, names)[:2]) if dev else None
    return DatasetBundle(name, train, test, names, "text", f"tables:{root}", defense=defense,
                         extra={"root": str(root)})


def load_sst2(data_dir=None) -> DatasetBundle:
    return load_text_folder("sst2", data_dir, classes=["negative", "positive"])


def load_yelp(data_dir=None) -> DatasetBundle:
    return load_text_folder("yelp", data_dir, classes=["negative", "positive"])


def load_text_table(data_dir=None, text_column: str = "sentence", label_column: str = "label") -> DatasetBundle:
    if data_dir is None:
        raise UserError("dataset 'text' needs --data-dir DIR with train.tsv/test.tsv (or .csv)")
    return load_text_folder("text", data_dir, text_column, label_column)

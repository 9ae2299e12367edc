"""The user's own data: images from a folder (flat or ``<class>/<image>``), sentences from a
CSV/TSV/TXT file, and the defender's labelled clean data (an ImageFolder directory for
image models, a CSV/TSV with sentence,label columns for text models). Labels map onto the
model's classes by name or by index 0..K-1; anything else is one clear error. Every image
goes through the bounded reader (file-size and pixel caps)."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ..errors import UserError
from .base import Data, ImageData, TextData

TEXT_EXTS = {".csv", ".tsv", ".tab", ".txt"}


def _decode(path: Path, channels: int):
    """H x W x C uint8, grey for one-channel models (the shared reader, with its size caps)."""
    from .images import read_image_file
    a = read_image_file(path, "L" if channels == 1 else "RGB")
    return a[:, :, None] if a.ndim == 2 else a


def image_files(root: Path) -> list[Path]:
    from .images import IMAGE_EXTS

    def hidden(p: Path) -> bool:  # .DS_Store, .ipynb_checkpoints/...
        return any(part.startswith(".") for part in p.relative_to(root).parts)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not hidden(p))
    for f in files:
        if f.suffix.lower() not in IMAGE_EXTS:
            raise UserError(f"{f} is not an image (expected {', '.join(sorted(IMAGE_EXTS))}); "
                            "remove it from the input folder")
    if not files:
        raise UserError(f"{root} holds no images; give a folder of images (flat or in class sub-folders)")
    return files


def read_images(root: Path, channels: int, size: tuple[int, int] | None = None):
    """(ids, uint8 [N, C, H, W]) of every image under ``root`` (or the one image ``root``),
    decoded to ``channels`` channels; all of size ``size`` (H, W), default the first one's."""
    import numpy as np
    files = image_files(root)
    arrays = []
    for f in files:
        a = _decode(f, channels)
        size = size or a.shape[:2]
        if a.shape[:2] != tuple(size):
            raise UserError(f"{f} is {a.shape[1]}x{a.shape[0]} pixels but the model takes {size[1]}x{size[0]}; "
                            "resize the inputs to the model's size")
        arrays.append(a)
    ids = [f.name if root.is_file() else str(f.relative_to(root)) for f in files]
    return ids, torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def read_texts(path: Path, column: str | None) -> tuple[list[str], list[str]]:
    """(ids, sentences) from a CSV/TSV with a header (or a TXT file, one sentence a line)."""
    if path.suffix.lower() == ".txt":
        try:
            lines = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8-sig").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        texts = [ln for ln in lines if ln.strip()]
        ids = [str(i) for i in range(len(texts))]
    else:
        delim = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
                rows = list(csv.DictReader(f, delimiter=delim,
                                           quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        if not rows:
            raise UserError(f"{path} has no rows; give a table with a header and one sentence per row")
        cols = list(rows[0])
        col = column or next((c for c in ("sentence", "text") if c in cols), cols[0] if len(cols) == 1 else None)
        if col is None or col not in cols:
            raise UserError(f"{path} has no text column {column or 'sentence/text'!r} (columns: {cols}); "
                            "name it with --input-column")
        texts = [r[col] or "" for r in rows]
        blank = next((i for i, t in enumerate(texts, start=2) if not t.strip()), None)
        if blank is not None:  # an empty input would get a score and a flag like any sentence
            raise UserError(f"{path} line {blank} has an empty {col!r}; fill or remove it")
        ids = [r["id"] for r in rows] if "id" in cols and col != "id" else [str(i) for i in range(len(rows))]
    if not texts:
        raise UserError(f"{path} holds no sentences")
    return ids, texts


def load_clean_data(path: str | Path, classes: list[str], modality: str, channels: int = 3,
                    size: tuple[int, int] | None = None, text_column: str = "sentence",
                    label_column: str = "label") -> Data:
    """The defender's labelled clean data for a model with ``classes`` (text: the columns
    ``text_column`` and ``label_column`` of a CSV/TSV)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"clean data {str(p)!r} does not exist; give an ImageFolder directory "
                        "(images) or a CSV/TSV file with sentence,label columns (text)")
    if modality == "image":
        data = _clean_images(p, classes, channels, size)
    else:
        from .text import read_table
        if p.is_dir():
            raise UserError(f"{p} is a folder; text clean data is a CSV/TSV file with sentence,label columns")
        if p.suffix.lower() not in (".csv", ".tsv", ".tab"):
            what = "unlabelled sentences" if p.suffix.lower() == ".txt" else f"a {p.suffix or 'extension-less'} file"
            raise UserError(f"{p} is {what}; text clean data is a labelled CSV/TSV file with sentence,label columns")
        # label_names=classes: a label is a class name or an index 0..K-1 (read_table checks the range)
        texts, labels, _ = read_table(p, text_column, label_column, label_names=list(classes),
                                      rename_hint=(text_column, label_column) == ("sentence", "label"))
        data = TextData(texts, torch.tensor(labels, dtype=torch.long), list(classes))
    _check_every_class(p, data, modality)
    return data


def _check_every_class(path: Path, data: Data, modality: str) -> None:
    """Clean data of fewer classes than the model has is clean data of another class count:
    the class-balanced splits every method makes would fail later with a misleading message."""
    k = len(data.classes)
    present = set(torch.as_tensor(data.y).unique().tolist())
    missing = [i for i in range(k) if i not in present]
    if not missing:
        return
    shown = ", ".join(data.classes[i] if data.classes[i] == str(i) else f"{i} ({data.classes[i]})"
                      for i in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    what, fix = (("sub-folders", "one sub-folder of clean images per class") if modality == "image"
                 else ("labels", "clean sentences labelled with every class"))
    raise UserError(f"clean data {path} has {what} for {k - len(missing)} of the model's {k} classes "
                    f"(none for {shown}); give {fix}")


def _clean_images(root: Path, classes: list[str], channels: int, size=None):
    if not root.is_dir():
        raise UserError(f"clean data {root} is not a folder; give an ImageFolder with one sub-folder per class")
    subs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    # a folder is named by a class or by its index 0..K-1, as data.user.load_clean_data reads them
    index = {c: i for i, c in enumerate(classes)}
    index.update({str(i): i for i in range(len(classes)) if str(i) not in index})
    unknown = [s for s in subs if s not in index]
    if not subs or unknown:
        raise UserError(f"clean data {root} needs one sub-folder per class named as the model's classes "
                        f"({', '.join(classes[:10])}) or 0..K-1; "
                        f"{'found none' if not subs else f'unknown: {unknown[0]!r}'}")
    xs, ys = [], []
    for s in subs:
        _, x = read_images(root / s, channels, size)
        size = tuple(x.shape[2:])
        xs.append(x)
        ys.append(torch.full((len(x),), index[s], dtype=torch.long))
    return ImageData(torch.cat(xs), torch.cat(ys), classes)

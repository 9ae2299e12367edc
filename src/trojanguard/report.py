"""Plain-text tables for the terminal (and Markdown for committed results)."""
from __future__ import annotations

import math


def count(n: int, word: str) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


def percent(v, digits: int = 1, suffix: str = "") -> str:
    """A rate in [0, 1] as a percentage for people; "-" when it is missing (None or nan)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.{digits}f}{suffix}"


def table(rows: list[dict], columns: list[str] | None = None, markdown: bool = False) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if markdown:
        line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(columns), sep] + [line(r) for r in cells])
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), "  ".join("-" * w for w in widths)] + [line(r) for r in cells])


def percent_rows(rows: list[dict], keys=("ca", "asr", "ra")) -> list[dict]:
    """Copy rows with rates shown as percentages (one decimal) for people."""
    out = []
    for r in rows:
        r = dict(r)
        for k in keys:
            if isinstance(r.get(k), float) and not math.isnan(r[k]):
                r[k] = percent(r[k], 1, "%")
        out.append(r)
    return out


def write_table_files(stem, rows: list[dict], columns: list[str], intro: list[str]) -> tuple:
    """``<stem>.csv`` (all columns, quoted where needed) and ``<stem>.md`` (``intro`` lines,
    then the table), each written atomically; the suffixes are appended to the name, so a
    stem such as ``anp-sweep-badnets-0.1-s0`` keeps its dots. Returns the two paths."""
    import csv
    import io
    from pathlib import Path
    from .utils import atomic_write_text
    stem = Path(stem)
    csv_path, md_path = stem.parent / f"{stem.name}.csv", stem.parent / f"{stem.name}.md"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(md_path, "\n".join([*intro, "", table(rows, columns, markdown=True)]) + "\n")
    return csv_path, md_path

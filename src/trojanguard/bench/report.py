"""``trojanguard report DB --out DIR``: tables and plots from the results store only.

Writes ``report.md`` (Markdown tables, rates in %), one CSV per kind of result with stable
columns (rates as fractions, empty where a rate does not apply), and ``report.html``: one
self-contained page (CSS inline, plots as base64 PNGs, no scripts) with attack x defense
heatmaps of ASR after purification and of the CA drop, a CA-vs-ASR scatter with one marker
per defense, ROC curves per input detector and attack, runtime and peak-memory bars per
method, and the retuning attack's ASR next to the ASR after purification."""
from __future__ import annotations

import csv
import html
import io
import math
import time
from pathlib import Path

from .. import htmlpage
from ..errors import UserError
from ..report import percent, table
from ..utils import atomic_write_text
from .store import Store

PURIFICATION = ["attack", "ratio", "seed", "defense", "ca_before", "asr_before", "ca_after", "asr_after",
                "asr_after_ra", "seconds", "peak_mb", "note"]
DETECTION = ["attack", "ratio", "method", "auroc", "auprc", "tpr_at_5fpr", "frr", "far", "ca_after", "asr_after",
             "seconds", "guard"]
INSPECTION = ["dataset", "model", "is_backdoored", "true_target", "method", "verdict", "probability",
              "predicted_target", "seconds"]
RATES = {"ca", "asr", "ra", "ca_before", "asr_before", "ca_after", "asr_after", "asr_after_ra", "asr_clean",
         "auroc", "auprc", "tpr_at_5fpr", "frr", "far", "probability"}


def purification_note(m: dict) -> str:
    """What a reader of the table must know about a purified model: that the purifier itself
    measured a clean-accuracy collapse and did not call the model repaired."""
    if not m.get("warning"):
        return ""
    before, after = m.get("verify_ca_before"), m.get("verify_ca_after")
    if before is None or after is None:
        return f"not repaired: {m['warning']}"
    return (f"not repaired: CA on {m.get('verify_size', '?')} held-out clean samples "
            f"{100 * before:.1f} -> {100 * after:.1f}")


def guard_rates(m: dict) -> dict:
    """FRR/FAR of a detector cell by the guard's own rule (flag when score > threshold), which
    every cell records as ``flagged_clean``/``flagged_poisoned``; cells before the fix of
    ``metrics.threshold_rates`` stored frr/far with the ties at the threshold flagged."""
    out = {}
    if m.get("flagged_clean") is not None:
        out["frr"] = m["flagged_clean"]
    if m.get("flagged_poisoned") is not None:
        out["far"] = 1.0 - m["flagged_poisoned"]
    return out


def collect(db: str | Path, grid: str | None = None) -> dict[str, list[dict]]:
    """The report's tables as lists of rows (from done cells), plus the failed cells."""
    store = Store(db, readonly=True)
    try:
        if grid and grid not in store.grids():
            raise UserError(f"grid {grid!r} is not in {db}; it has: {', '.join(store.grids()) or 'no grid'}")
        if grid is None and len(store.grids()) == 1:
            grid = store.grids()[0]  # one grid: its current view, in its order
        rows = store.rows(grid)
    finally:
        store.close()
    out: dict[str, list[dict]] = {"purification": [], "detection": [], "inspection": [], "zoo": [], "failed": [],
                                  "cells": rows}
    victim_names = {r["hash"]: r["name"] for r in rows if r["kind"] == "victim"}
    for r in rows:
        info, m = r["info"], r.get("metrics") or {}
        if r["status"] == "failed":
            out["failed"].append({"cell": r["name"], "kind": r["kind"], "error": r.get("error")})
            if r["kind"] == "purifier":  # a purification that failed is a row of its table too
                out["purification"].append({"attack": info.get("attack"), "ratio": info.get("ratio"),
                                            "seed": info.get("seed"), "defense": info.get("defense"),
                                            "model": victim_names.get((r.get("depends_on") or [None])[0]),
                                            "note": f"failed: {r.get('error')}"})
        if r["status"] != "done":
            continue
        base = {"attack": info.get("attack"), "ratio": info.get("ratio"), "seconds": _round(r.get("seconds"), 2),
                "peak_mb": _round(r.get("peak_rss_mb"), 1),
                "model": victim_names.get((r.get("depends_on") or [None])[0], r["name"].split("/")[0])}
        if r["kind"] == "victim":
            out["zoo"].append({"attack": info.get("attack"), "ratio": info.get("ratio"), "seed": info.get("seed"),
                               "ca": m.get("ca"), "asr": m.get("asr"), "ra": m.get("ra"),
                               "seconds": round(m.get("seconds") or r.get("seconds") or 0.0, 1),
                               "poisoned": m.get("poisoned_count", info.get("count")), "folder": r["name"],
                               "setting": info.get("setting", ""), "peak_mb": base["peak_mb"],
                               "source": "adopted" if m.get("adopted_from") else "trained here"})
        elif r["kind"] == "purifier":
            out["purification"].append({**base, "seed": info.get("seed"), "defense": info.get("defense"),
                                        **{k: m.get(k) for k in PURIFICATION[4:9]}, "der": m.get("der"),
                                        "warning": m.get("warning"), "note": purification_note(m)})
        elif r["kind"] == "detector":
            out["detection"].append({**base, "method": info.get("defense"), "seed": info.get("seed"),
                                     **{k: m.get(k) for k in DETECTION[3:10]}, **guard_rates(m),
                                     "guard": m.get("guard"), "roc": m.get("roc")})
        elif r["kind"] == "inspector":
            # "model" names the inspected model (its zoo folder), not the architecture every row shares
            out["inspection"].append({"dataset": info.get("dataset"), "model": base["model"],
                                      "is_backdoored": m.get("is_backdoored"), "true_target": m.get("true_target"),
                                      "method": info.get("defense"), "verdict": m.get("verdict"),
                                      "probability": m.get("probability"), "predicted_target": m.get("predicted_target"),
                                      "seconds": base["seconds"], "attack": info.get("attack"),
                                      "peak_mb": base["peak_mb"]})
    return out


def _round(v, digits):
    return None if v is None else round(v, digits)


def _csv_value(k: str, v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and (k in RATES or k == "ratio"):
        return f"{v:.4f}"
    return v


def write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_csv_value(c, r.get(c)) for c in columns])
    atomic_write_text(path, buf.getvalue())


def _shown(rows: list[dict], columns: list[str]) -> list[dict]:
    """Rows for people: rates in %, ratios as %, probabilities as such, missing as '-'."""
    out = []
    for r in rows:
        d = {}
        for c in columns:
            v = r.get(c)
            if c == "probability" and isinstance(v, (int, float)):
                d[c] = f"{v:.2f}"  # a probability reads as one, not as a percentage
                continue
            d[c] = percent(v, 1) if c in RATES and isinstance(v, (int, float)) and not isinstance(v, bool) else \
                (percent(v, 2, "%") if c == "ratio" and v else ("-" if c == "ratio" else v))
        out.append(d)
    return out


def write_report(db: str | Path, out: str | Path, grid: str | None = None, title: str | None = None,
                 asr_floor: dict[str, float] | None = None) -> dict[str, Path]:
    """Write report.md, report.html and the CSVs into ``out``; returns the paths.

    ``asr_floor``: {victim cell name: the ASR its trigger reaches on clean models}
    (``benchmarks/asr_floor.py``); given, the purification and detection tables gain the
    column ``asr_clean`` before ``note``/``guard``: what no purification can go below."""
    data = collect(db, grid)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"Benchmark report: {grid or Path(db).stem}"
    written: dict[str, Path] = {}
    from .zoo import write_zoo_csv, zoo_markdown
    specs = [("purification", PURIFICATION), ("detection", DETECTION), ("inspection", INSPECTION)]
    if asr_floor is not None:
        for name in ("purification", "detection"):
            for r in data[name]:
                r["asr_clean"] = asr_floor.get(r.get("model"))
        specs[:2] = [(name, cols[:-1] + ["asr_clean", cols[-1]]) for name, cols in specs[:2]]
    for name, cols in specs:
        if data[name]:
            written[f"{name}.csv"] = out / f"{name}.csv"
            write_csv(data[name], cols, written[f"{name}.csv"])
    if data["zoo"]:
        written["zoo.csv"] = out / "zoo.csv"
        write_zoo_csv(data["zoo"], written["zoo.csv"])
    md = [f"# {title}\n", _summary_text(data, db) + "\n"]
    for name, cols in specs:
        if data[name]:
            md.append(f"## {name.capitalize()}\n\n{table(_shown(data[name], cols), cols, markdown=True)}\n")
    if data["zoo"]:
        md.append(f"## Victims (zoo)\n\n{zoo_markdown(data['zoo'])}")
    if data["failed"]:
        md.append(f"## Failed cells\n\n{table(data['failed'], ['cell', 'kind', 'error'], markdown=True)}\n")
    md.append("Rates in % (CSV: fractions). seconds = wall time of the cell on this machine; peak_mb = peak resident "
              "memory of the process running it. asr_after_ra = ASR after the retuning attack on the purified model.\n")
    written["report.md"] = out / "report.md"
    atomic_write_text(written["report.md"], "\n".join(md))
    written["report.html"] = out / "report.html"
    atomic_write_text(written["report.html"], render_html(data, title, db, dict(specs)))
    return written


def _summary_text(data: dict, db) -> str:
    cells = data["cells"]
    by = {}
    for r in cells:
        by[r["status"]] = by.get(r["status"], 0) + 1
    commits = sorted({r.get("git_commit") for r in cells if r.get("git_commit")})
    threads = sorted({r.get("threads") for r in cells if r.get("threads")})
    torch_v = sorted({(r.get("versions") or {}).get("torch") for r in cells if r.get("versions")} - {None})
    return (f"Store {Path(db).name}: {len(cells)} cells (" + ", ".join(f"{v} {k}" for k, v in sorted(by.items()))
            + f"); git {', '.join(c[:10] for c in commits) or 'unknown'}; threads {', '.join(map(str, threads)) or '-'}; "
            f"torch {', '.join(torch_v) or '-'}; generated {time.strftime('%Y-%m-%d %H:%M')}.")


# --- HTML ------------------------------------------------------------------------------------

def _figure(fig, caption: str) -> str:
    return htmlpage.figure(fig, caption)


def _html_table(rows: list[dict], columns: list[str], highlight: tuple[str, ...] = ()) -> str:
    return htmlpage.table(_shown(rows, columns), columns, highlight)


def _attack_key(r: dict) -> str:
    return f"{r['attack']} {percent(r['ratio'], 2, '%')}" if r.get("ratio") else str(r["attack"])


def _mean(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _matrix(rows: list[dict], value) -> tuple[list[str], list[str], list[list[float | None]]]:
    attacks = list(dict.fromkeys(_attack_key(r) for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    mat = [[_mean([value(r) for r in rows if _attack_key(r) == a and r["defense"] == d]) for d in defenses]
           for a in attacks]
    return attacks, defenses, mat


def _heatmap(rows, value, title: str, cmap: str, vmin: float, vmax: float):
    from matplotlib.figure import Figure
    attacks, defenses, mat = _matrix(rows, value)
    fig = Figure(figsize=(1.2 + 0.9 * len(defenses), 0.9 + 0.45 * len(attacks)))
    ax = fig.add_subplot()
    import numpy as np
    arr = np.array([[np.nan if v is None else v for v in row] for row in mat], dtype=float)
    arr *= 100  # shown in %
    im = ax.imshow(arr, cmap=cmap, vmin=100 * vmin, vmax=100 * vmax, aspect="auto")
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    for i in range(len(attacks)):
        for j in range(len(defenses)):
            if not np.isnan(arr[i, j]):
                norm = (arr[i, j] - 100 * vmin) / max(1e-9, 100 * (vmax - vmin))
                dark = norm > 0.75 or (cmap == "RdYlGn_r" and norm < 0.2)  # both ends of a diverging map
                ax.text(j, i, f"{arr[i, j]:.0f}", ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return fig


def _scatter(rows):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    markers = "osD^vP*XhH<>"
    before = {(_attack_key(r), r.get("seed")): r for r in rows}
    ax.scatter([r["ca_before"] for r in before.values()], [r["asr_before"] for r in before.values()],
               marker="x", c="k", label="no defense")
    for k, d in enumerate(dict.fromkeys(r["defense"] for r in rows)):
        pts = [r for r in rows if r["defense"] == d and r.get("ca_after") is not None and r.get("asr_after") is not None]
        ax.scatter([r["ca_after"] for r in pts], [r["asr_after"] for r in pts], marker=markers[k % len(markers)],
                   label=d, alpha=0.8)
    ax.set_xlabel("clean accuracy after")
    ax.set_ylabel("attack success rate after")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _rocs(rows):
    from matplotlib.figure import Figure
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(4 * len(methods), 3.6))
    for k, m in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), k + 1)
        for r in rows:
            if r["method"] == m and r.get("roc"):
                ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{_attack_key(r)} (AUROC {r['auroc']:.3f})")
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    return fig


def _bars(labels: list[str], values: list[float], ylabel: str, title: str):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(1.5 + 0.7 * len(labels), 3.2))
    ax = fig.add_subplot()
    ax.bar(range(len(labels)), values, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig


def _retuning(rows):
    from matplotlib.figure import Figure
    defenses = list(dict.fromkeys(r["defense"] for r in rows if r.get("asr_after_ra") is not None))
    after = [_mean(r["asr_after"] for r in rows if r["defense"] == d) for d in defenses]
    ra = [_mean(r["asr_after_ra"] for r in rows if r["defense"] == d) for d in defenses]
    fig = Figure(figsize=(1.5 + 1.0 * len(defenses), 3.2))
    ax = fig.add_subplot()
    x = range(len(defenses))
    ax.bar([i - 0.2 for i in x], after, width=0.4, label="ASR after purification")
    ax.bar([i + 0.2 for i in x], ra, width=0.4, label="ASR after retuning attack")
    ax.set_xticks(list(x), defenses)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return fig


def render_html(data: dict, title: str, db, columns: dict[str, list[str]] | None = None) -> str:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("the HTML report draws with matplotlib: pip install 'trojanguard[report]'") from None
    cols = {"purification": PURIFICATION, "detection": DETECTION, **(columns or {})}
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(_summary_text(data, db))}</p>"]
    nav = []
    pur, det, ins, zoo = data["purification"], data["detection"], data["inspection"], data["zoo"]
    if pur:
        nav.append("purification")
        table_rows, pur = pur, [r for r in pur if r.get("ca_after") is not None]  # failed cells: table only
        figs = [] if not pur else [_figure(_heatmap(pur, lambda r: r.get("asr_after"), "ASR after purification (%)", "RdYlGn_r", 0, 1),
                        "Attack x defense: ASR after purification (mean over seeds; lower is better)"),
                _figure(_heatmap(pur, lambda r: None if r.get("ca_after") is None else r["ca_before"] - r["ca_after"],
                                 "CA drop (percentage points)", "Reds", 0, max(0.05, max(
                                     (r["ca_before"] - r["ca_after"] for r in pur if r.get("ca_after") is not None),
                                     default=0.05))),
                        "Attack x defense: clean accuracy lost by purifying (mean over seeds)"),
                _figure(_scatter(pur), "Clean accuracy vs attack success after each defense (x: undefended)")]
        if any(r.get("asr_after_ra") is not None for r in pur):
            figs.append(_figure(_retuning(pur), "Robustness: ASR right after purification and after the retuning "
                                "attack (fine-tuning on clean data with a few poisoned samples), mean over attacks"))
        parts.append('<section id="purification"><h2>Purification</h2>'
                     + _html_table(table_rows, cols["purification"], highlight=("asr_after", "asr_after_ra"))
                     + "".join(figs)
                     + "</section>")
    if det:
        nav.append("detection")
        parts.append('<section id="detection"><h2>Input detection</h2>' + _html_table(det, cols["detection"])
                     + _figure(_rocs(det), "ROC curves per detector, one curve per attack (clean vs triggered test "
                               "inputs)") + "</section>")
    if ins:
        nav.append("inspection")
        parts.append('<section id="inspection"><h2>Model inspection</h2>' + _html_table(ins, INSPECTION) + "</section>")
    if zoo:
        nav.append("victims")
        parts.append('<section id="victims"><h2>Victims (zoo)</h2>'
                     + _html_table(zoo, ["attack", "ratio", "poisoned", "seed", "ca", "asr", "ra", "seconds", "source"])
                     + "</section>")
    cost = _cost(data)
    if cost:
        nav.append("cost")
        labels = list(cost)
        parts.append('<section id="cost"><h2>Cost</h2>'
                     + _figure(_bars(labels, [_mean(v["seconds"]) or 0 for v in cost.values()], "seconds",
                                     "Mean wall time per cell"), "Runtime per method (mean wall time of its cells)")
                     + _figure(_bars(labels, [max(v["peak_mb"], default=0) for v in cost.values()], "MB",
                                     "Peak resident memory"), "Peak memory per method (process RSS)")
                     + "</section>")
    if data["failed"]:
        nav.append("failed")
        parts.append('<section id="failed"><h2>Failed cells</h2>'
                     + _html_table(data["failed"], ["cell", "kind", "error"]) + "</section>")
    return htmlpage.page(title, parts, nav)


def _cost(data: dict) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}

    def add(label, r):
        if r.get("seconds") is None:
            return
        d = out.setdefault(label, {"seconds": [], "peak_mb": []})
        d["seconds"].append(r["seconds"])
        if r.get("peak_mb") is not None:
            d["peak_mb"].append(r["peak_mb"])
    for r in data["zoo"]:
        add("train victim", r)
    for r in data["purification"]:
        add(r["defense"], r)
    for r in data["detection"]:
        add(r["method"], r)
    for r in data["inspection"]:
        add(r["method"], r)
    return out

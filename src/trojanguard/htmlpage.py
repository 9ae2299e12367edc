"""Self-contained HTML pages (images embedded as base64 PNG, no server, no external files):
shared by the benchmark report and the scan/repair reports."""
from __future__ import annotations

import base64
import html
import io
import math

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:0.5em}
figcaption{font-size:13px;color:#555;max-width:520px}nav a{margin-right:1em}.ra{background:#fff5e6}
.verdict{font-size:1.3em;padding:0.4em 0.8em;display:inline-block;border-radius:4px}
.bad{background:#fde2e1}.good{background:#e3f5e1}.warn{background:#fff3cd;padding:0.5em}"""


def png_of_figure(fig) -> str:
    """A matplotlib figure as base64 PNG (rendered off-screen with Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def png_of_image(image) -> str:
    """A PIL image as base64 PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def figure(fig, caption: str) -> str:
    return image_tag(png_of_figure(fig), caption)


def image_tag(png_b64: str, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png_b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def cell_text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict], columns: list[str], highlight: tuple[str, ...] = ()) -> str:
    head = "".join(f'<th{" class=ra" if c in highlight else ""}>{html.escape(c)}</th>' for c in columns)
    body = []
    for r in rows:
        tds = "".join(f'<td{" class=ra" if c in highlight else ""}>{html.escape(cell_text(r.get(c)))}</td>'
                      for c in columns)
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, parts: list[str], nav: list[str] | None = None) -> str:
    links = "".join(f'<a href="#{n}">{n}</a>' for n in nav or [])
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><nav>{links}</nav>{''.join(parts)}</body></html>\n")

"""The HTML page of ``trojanguard scan`` / ``repair`` (``practitioner``'s reports): verdict,
probability, target, evidence plots, the recovered trigger, the repair's before/after numbers."""
from __future__ import annotations

import torch

from .practitioner import RecoveredTrigger, RepairReport, ScanReport


def report_html(title: str, scan_report: ScanReport | None = None, repair_report: RepairReport | None = None,
                classes: list[str] | None = None) -> str:
    """One page: verdict, probability, target, evidence, recovered trigger, choices; and the
    repair's before/after numbers."""
    import html as _html

    from . import htmlpage
    parts = [f"<h1>{_html.escape(title)}</h1>"]
    name = (lambda c: f"{c} ({classes[c]})" if classes and c is not None and c < len(classes) else str(c))
    if scan_report is not None:
        s = scan_report
        cls = "bad" if s.verdict == "backdoored" else "good"
        parts.append(f'<section id="scan"><h2>Scan</h2><p class="verdict {cls}">{s.verdict}: backdoor probability '
                     f"{s.probability:.2f}, suspected target {name(s.target) if s.target is not None else '-'}</p>")
        shares = s.evidence.get("shares")
        if shares:
            parts.append(htmlpage.figure(_shares_plot(shares, classes, s.evidence.get("top_class")),
                                         "Share of each predicted class on the clean data after exposure "
                                         "(a backdoored model collapses onto its target)"))
        if s.trigger is not None and s.trigger.mask is not None:
            parts.append(htmlpage.image_tag(htmlpage.png_of_image(trigger_image(s.trigger)),
                                            "Recovered trigger: mask (scaled to its maximum), pattern, the pattern where the mask is"))
        elif s.trigger is not None:
            parts.append(f"<p>Recovered trigger tokens: <code>{_html.escape(' '.join(s.trigger.tokens))}</code> "
                         "(the first is the one repair checks with)</p>")
            if s.trigger.word_rates:
                pct = (lambda v: "" if v is None else f"{v:.1%}")
                rows = [{"word": c["token"], "found on": c.get("found_on", "exposed"),
                         "moves, on the model it was found on": pct(c.get("flip_rate")),
                         "moves, original model": pct(c.get("flip_rate_original")),
                         "moves, the original's surest quarter": pct(c.get("hard_flip_original"))}
                        for c in s.trigger.word_rates]
                parts.append("<p>Each recovered word inserted alone: the share of clean sentences of other classes "
                             "it sends to the target (a sentiment word tips undecided sentences, a backdoor word "
                             "overrides confident ones).</p>" + htmlpage.table(rows, list(rows[0])))
        cands = [c for c in s.evidence.get("candidates", []) if c.get("mask_fraction")]  # images (text: no mask)
        if len(cands) > 1:
            pct = (lambda v: f"{v:.1%}")
            parts.append(htmlpage.table(
                [{"class": name(c["class"]), "share after exposure": pct(c["share"]),
                  "original's inputs its trigger moves": pct(c["trigger_success"]),
                  "mask (share of the image)": pct(c["mask_fraction"])} for c in cands],
                ["class", "share after exposure", "original's inputs its trigger moves", "mask (share of the image)"]))
        ev = {k: v for k, v in s.evidence.items() if not isinstance(v, (list, dict))}
        parts.append(htmlpage.table([{"evidence": k, "value": v} for k, v in ev.items()], ["evidence", "value"]))
        if s.second_opinion:
            so = s.second_opinion
            parts.append(f"<h3>Second opinion: Neural Cleanse</h3><p>{so['verdict']}, probability "
                         f"{so['probability']:.2f}, target {name(so['target'])}, anomaly index "
                         f"{htmlpage.cell_text(so.get('anomaly_index'))}</p>")
            if so.get("norms"):
                parts.append(htmlpage.figure(_bars(so["norms"], classes, "L1 norm of the reversed mask"),
                                             "Neural Cleanse: mask norm per class (a backdoor target is an outlier "
                                             "below the others)"))
        parts.append("<h3>Choices the tool made</h3>" + _bullets(s.choices) + "</section>")
    if repair_report is not None:
        r = repair_report
        rec = r.record
        status = "good" if r.ok else "bad"
        parts.append(f'<section id="repair"><h2>Repair</h2><p class="verdict {status}">'
                     f"{'repaired' if r.ok else 'NOT repaired'} with {r.method}</p>"
                     f"<p>{_html.escape(r.reason)}</p>")
        cfg = rec.get("config") or {}
        choices = [f"options: {', '.join(f'{k}={v}' for k, v in r.options.items()) or 'the method defaults'} "
                   f"(every option: repair.json, config)"]
        if rec.get("verify_size"):
            choices.append(f"verified on {rec['verify_size']} clean samples kept aside (verify_fraction "
                           f"{cfg.get('verify_fraction')}); not repaired if clean accuracy falls by more than "
                           f"{cfg.get('max_ca_drop', 0.03):.0%}")
        parts.append("<h3>Choices the tool made</h3>" + _bullets(choices))
        pct = (lambda v: "-" if v is None else f"{v:.1%}")
        rows = [{"measure": "clean accuracy (verification part)", "before": pct(rec.get("verify_ca_before")),
                 "after": pct(rec.get("verify_ca_after"))}]
        if rec.get("recovered_trigger_asr_before") is not None:
            rows.append({"measure": "ASR with the recovered trigger", "before": pct(rec["recovered_trigger_asr_before"]),
                         "after": pct(rec["recovered_trigger_asr_after"])})
            retuned = rec.get("recovered_trigger_asr_after_retuning")
            rows.append({"measure": "ASR after the retuning attack", "before": "",
                         "after": pct(retuned) if retuned is not None else
                         "not run: the backdoor remains" if rec.get("backdoor_remains") else "not run"})
        parts.append(htmlpage.table(rows, ["measure", "before", "after"]))
        for text in ([r.advice] if r.advice else []) + r.cautions:
            parts.append(f'<p class="warn">{_html.escape(text)}</p>')
        parts.append("</section>")
    return htmlpage.page(title, parts, [p for p, x in (("scan", scan_report), ("repair", repair_report)) if x])


def _bullets(items: list[str]) -> str:
    import html
    return "<ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in items) + "</ul>"


def _shares_plot(shares, classes, top):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 2.6))
    ax = fig.add_subplot()
    labels = classes if classes and len(classes) == len(shares) else [str(i) for i in range(len(shares))]
    ax.bar(labels, shares, color=["#c0392b" if i == top else "#7f8c8d" for i in range(len(shares))])
    ax.set_ylabel("share of predictions")
    ax.tick_params(axis="x", labelrotation=45)
    return fig


def _bars(values, classes, ylabel):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 2.6))
    ax = fig.add_subplot()
    labels = classes if classes and len(classes) == len(values) else [str(i) for i in range(len(values))]
    ax.bar(labels, values, color="#34495e")
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=45)
    return fig


def trigger_image(t: RecoveredTrigger, scale: int = 6):
    from PIL import Image
    m = t.mask.detach().float().cpu()
    p = t.pattern.detach().float().cpu()
    if m.ndim == 2:
        m = m[None]
    if m.shape[0] == 1 and p.shape[0] == 3:
        m = m.expand(3, -1, -1)
    # a recovered mask is often a fraction of a pixel in all: scaled to its maximum so that
    # where it sits is visible, in the first and the last tile
    mn = m / m.max().clamp_min(1e-8)
    tiles = [mn, p, mn * p]
    row = torch.cat([tile.expand(3, -1, -1) if tile.shape[0] == 1 else tile for tile in tiles], dim=2)
    arr = (row.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)

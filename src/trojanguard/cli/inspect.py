"""``trojanguard inspect``: is this model backdoored? EBYD (exposure + calibrated probability +
trigger recovery) or Neural Cleanse; prints the verdict and evidence and writes
``inspection.json`` plus the recovered trigger (PNG for images, ``trigger_tokens.txt`` for
text) into one complete-or-absent folder."""
from __future__ import annotations

import json

from .argtypes import add_clean_data_args, add_run_args, set_threads
from .modelargs import add_model_args, setup_from_args

METHODS = ("ebyd", "nc")


def candidates_line(evidence: dict, name) -> str | None:
    """EBYD's candidate targets with how far each one's trigger moves the ORIGINAL model
    (``ebyd.choose_candidate`` reads that), or None when there is only one: shared by
    ``inspect`` and ``scan``."""
    cands = [c for c in evidence.get("candidates", []) if c.get("mask_fraction")]
    if len(cands) < 2:
        return None
    return ", ".join(f"{name(c['class'])}: trigger moves {c['trigger_success']:.0%} of the original's inputs, "
                     f"mask {c['mask_fraction']:.1%} of the image" for c in cands)


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="inspect a model for a backdoor (ebyd, nc): verdict, probability, "
                                       "target, recovered trigger")
    p.add_argument("--method", default="ebyd", choices=METHODS, help="ebyd (default) or nc (Neural Cleanse)")
    add_model_args(p)
    add_clean_data_args(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="method option, repeatable ('trojanguard list defenses' shows them)")
    add_run_args(p)
    p.add_argument("--out", required=True, help="folder for inspection.json and the recovered trigger")


def inspect_setup(setup, method: str, options: dict | None = None, seed: int = 0, device: str = "cpu"):
    """Run the inspector on a loaded setup; returns (Inspection, record). The benchmarks call
    this too (one code path measured, one shipped)."""
    import torch

    from ..defenses import create_defense
    from ..utils import measure
    opts = dict(options or {})
    opts.setdefault("seed", seed)
    opts.setdefault("device", device)
    opts.setdefault("progress", False)
    inspector = create_defense(method, **opts)
    with measure(f"inspect-{method}") as st:
        result = inspector.inspect(setup.model, setup.clean)
    record = {"method": method, "verdict": result.verdict, "probability": round(result.probability, 4),
              "target": result.target, "evidence": result.evidence, "seconds": round(st.seconds, 2),
              "peak_rss_mb": round(st.peak_rss_mb, 1), "threads": torch.get_num_threads(),
              "options": inspector.cfg.model_dump(),
              "clean_data": {"source": setup.clean_source, "size": len(setup.clean)},
              "model": {"path": setup.model_path, "sha256": setup.meta.get("sha256")}}
    if result.trigger is not None:
        record["trigger"] = {k: v for k, v in result.trigger.items() if k not in ("mask", "pattern")}
        if "mask" in result.trigger:
            record["trigger"]["mask_l1"] = round(float(result.trigger["mask"].sum()), 3)
    return result, record


def trigger_png(mask, pattern, scale: int = 8):
    """mask | pattern | mask * pattern side by side, enlarged (PIL image)."""
    from PIL import Image

    from ..viz import _to_pil
    tiles = [mask.expand_as(pattern), pattern, mask * pattern]
    ims = [_to_pil(t.float().clamp(0, 1), scale) for t in tiles]
    pad = 4
    out = Image.new("RGB", (sum(i.width for i in ims) + pad * (len(ims) - 1), ims[0].height), "white")
    x = 0
    for im in ims:
        out.paste(im, (x, 0))
        x += im.width + pad
    return out


def save_inspection(out, record: dict, trigger: dict | None) -> None:
    """``inspection.json`` plus the trigger (``trigger.png`` + ``trigger.safetensors`` for a
    mask/pattern, ``trigger_tokens.txt`` for tokens), written as one complete-or-absent result
    folder (``resultdir.write_result``)."""
    import io

    from ..resultdir import write_bytes, write_json, write_result
    from ..utils import library_versions
    with write_result(out, kind="inspection") as tmp:
        write_json(tmp / "inspection.json", {**record, "versions": library_versions()})
        if trigger is None:
            return
        if "mask" in trigger:
            from safetensors.torch import save
            buf = io.BytesIO()
            trigger_png(trigger["mask"], trigger["pattern"]).save(buf, format="PNG")
            write_bytes(tmp / "trigger.png", buf.getvalue())
            write_bytes(tmp / "trigger.safetensors",
                        save({"mask": trigger["mask"].contiguous(), "pattern": trigger["pattern"].contiguous()}))
        elif "tokens" in trigger:
            from ..defenses.token_search import candidates_text
            write_bytes(tmp / "trigger_tokens.txt", candidates_text(trigger.get("candidates", [])).encode())


def run(args) -> int:
    from ..utils import to_jsonable
    from pathlib import Path

    from ..errors import UserError
    from .commands import defense_options
    from ..resultdir import check_out
    out = Path(args.out)
    check_out(out, "--out", {"--model": args.model, "--clean-data": args.clean_data, "--data-dir": args.data_dir})
    options = defense_options(args.options)
    set_threads(args.threads)
    from ..utils import resolve_device
    device = str(resolve_device(args.device))
    setup = setup_from_args(args, device)
    k = setup.model.head.out_features
    if k < 2:
        raise UserError(f"the model has {k} output class; inspection needs a classifier with at least 2 classes")
    result, record = inspect_setup(setup, args.method, options, args.seed, device)
    save_inspection(out, record, result.trigger)
    if args.json:
        print(json.dumps(to_jsonable(record), indent=2))
        return 0
    _print(record, setup, out)
    return 0


def _print(record: dict, setup, out) -> None:
    ev = record["evidence"]
    classes = list((setup.meta.get("dataset") or {}).get("classes") or [])
    name = (lambda c: f"{c} ({classes[c]})" if c is not None and c < len(classes) else str(c))
    print(f"verdict      {record['verdict']}  (backdoor probability {record['probability']:.2f}, "
          f"{record['method']}; calibration: {ev.get('calibration', 'monotone map of the anomaly index')})")
    print(f"target       {name(record['target']) if record['target'] is not None else '-'}")
    if "shares" in ev:
        shares = " ".join(f"{i}:{s:.2f}" for i, s in enumerate(ev["shares"]))
        print(f"evidence     class shares after exposure ({ev['exposure']}, stopped by {ev['stopped_by']} "
              f"after {ev['steps']} steps): {shares}")
        print(f"             share variance {ev['share_variance']:.4f} (paper rule > 0.01 at 10 classes), "
              f"top class {name(ev['top_class'])}")
    line = candidates_line(ev, name)
    if line:
        print("candidates   " + line)
    if ev.get("anomaly_index") is not None:
        norms = " ".join(f"{c}:{n:.1f}" for c, n in zip(ev["classes"], ev["norms"]))
        print(f"evidence     anomaly index {ev['anomaly_index']:.2f} (flag > 2); mask L1 norms {norms}")
    trig = record.get("trigger")
    if trig:
        if "tokens" in trig:
            print(f"trigger      tokens {', '.join(trig['tokens'])} -> {out}/trigger_tokens.txt")
        else:
            extra = f", sends {trig['success_original']:.0%} of clean inputs to the target on the original model" \
                if trig.get("success_original") is not None else ""
            print(f"trigger      mask L1 {trig['mask_l1']:.1f}{extra} -> {out}/trigger.png")
    print(f"clean data   {record['clean_data']['size']} samples ({record['clean_data']['source']})")
    from ..report import count
    print(f"wall time    {record['seconds']:.1f} s, peak {record['peak_rss_mb']:.0f} MB, {count(record['threads'], 'thread')}; "
          f"saved {out}/")

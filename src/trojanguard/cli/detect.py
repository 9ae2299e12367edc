"""``trojanguard detect``: score inputs with an input detector fitted on clean data.

One CSV row per input (id, score, flag, prediction, and the purified prediction with
``--purify``); a summary line with the number flagged. The defender's clean data is
``--clean-data`` (an ImageFolder of class sub-folders, or a CSV/TSV with a text and a label
column), else the held-out split of the dataset the checkpoint records (the same split
``trojanguard train/attack`` kept out of training; ``--holdout`` carves another fraction).
No torch at module level: ``trojanguard --help`` stays fast.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from ..errors import UserError
from .argtypes import add_run_args, guard_flags, require_path, set_threads
from .argtypes import fraction as _fraction


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help="score inputs for a backdoor trigger (CSV of scores, flags, predictions)")
    p.add_argument("--method", help="input detector (default badacts; 'trojanguard list defenses')")
    from .modelargs import add_model_args
    add_model_args(p, required=False)  # the detector is fitted on the clean data
    p.add_argument("--guard", metavar="DIR", help="instead of --model: a guard saved by 'trojanguard guard' or "
                   "--save-guard, used as it is (no clean data, no refit; --frr moves its threshold)")
    p.add_argument("--inputs", required=True, help="folder of images (flat or class sub-folders), one image, "
                   "or a CSV/TSV/TXT of sentences")
    p.add_argument("--input-column", default=None,
                   help="text column of --inputs (default: 'sentence' or 'text', or the only column)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--clean-data", help="the defender's clean labelled data: an ImageFolder (class sub-folders "
                   "named as the model's classes) or a CSV/TSV with sentence and label columns "
                   "(default: the held-out split of the checkpoint's dataset)")
    src.add_argument("--holdout", type=_fraction("held-out fraction"), default=None,
                   help="take this class-balanced fraction of the dataset's train split as the clean data "
                        "(default: the split recorded in the checkpoint)")
    p.add_argument("--dataset", type=str.lower, help="dataset of the default clean data (default: the checkpoint's)")
    p.add_argument("--data-dir", help="folder with that dataset's files")
    p.add_argument("--text-column", default=None, help="text column for --dataset text")
    p.add_argument("--label-column", default=None, help="label column for --dataset text")
    p.add_argument("--frr", type=_fraction("false-rejection rate"), default=None,
                   help="false-rejection rate on held-out clean data (default 0.05; 0.2 with --purify, "
                        "the BadActs detect-then-purify setting)")
    p.add_argument("--purify", action="store_true", help="also predict flagged inputs with the purified forward pass")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="detector option, repeatable (e.g. --set delta=2)")
    p.add_argument("--save-guard", metavar="DIR", help="also save the fitted guard (model + detector) here")
    p.add_argument("--batch-size", type=int, default=256)
    add_run_args(p)
    p.add_argument("--out", required=True, help="CSV file to write")


def _check_input_kind(path: Path, modality: str) -> None:
    from ..data.images import IMAGE_EXTS
    from ..data.user import TEXT_EXTS
    if not path.exists():
        raise UserError(f"--inputs {path} does not exist")
    is_text = path.is_file() and path.suffix.lower() in TEXT_EXTS
    if modality == "text" and not is_text:
        raise UserError(f"the model takes text but --inputs {path} is "
                        f"{'a folder' if path.is_dir() else 'not a CSV/TSV/TXT file'}; give a table of sentences")
    if modality == "image" and is_text:
        raise UserError(f"the model takes images but --inputs {path} is a text table; give a folder of images")
    if modality == "image" and path.is_file() and path.suffix.lower() not in IMAGE_EXTS:
        raise UserError(f"--inputs {path} is not an image or a folder of images")


def _image_size(clean, saved_guard, meta: dict) -> tuple[int, int] | None:
    """(H, W) the inputs must have: the clean data's, else what a saved guard's detector or
    the checkpoint's dataset record says (None: the first input's size)."""
    if clean is not None:
        return tuple(clean.shape[1:])
    shape = getattr(getattr(saved_guard, "detector", None), "input_shape", None) or \
        (meta.get("dataset") or {}).get("shape")
    return tuple(shape[1:]) if shape else None


# ----------------------------------------------------------------------------- run --
def _own_predictions(g, xb, res):
    """The model's own predictions; with purification they differ from the guard's on the
    flagged inputs only, so only those go through the model once more."""
    import torch
    from ..defenses.common import model_inputs
    own = res.predictions.cpu().clone()
    if g.purify and bool(res.flags.any()):
        from ..guarded import select_inputs
        keep = res.flags.cpu()
        with torch.inference_mode():
            own[keep] = g.model(model_inputs(g.model, select_inputs(xb, keep))[0]).argmax(1).cpu()
    return own


def run(args) -> int:
    import torch
    from ..guarded import guard
    from ..defenses import DEFENSES, InputDetector
    from ..resultdir import check_file_out, check_out
    from ..utils import atomic_write_text, measure, resolve_device
    from ..data.user import image_files, read_images, read_texts
    from ..pipeline import defender_data
    from .commands import defense_options
    inputs, out = Path(args.inputs), Path(args.out)
    if (args.model is None) == (args.guard is None):
        raise UserError("give --model (fit a detector on clean data) or --guard (a saved guard), not both"
                        if args.model else "give --model (checkpoint folder, state dict with --arch, or Hugging "
                        "Face directory), or --guard DIR for a saved guard")
    options = defense_options(args.options)
    if args.guard and (args.purify or "purify" in options):
        given = "--purify" if args.purify else f"--set purify={options['purify']}"
        raise UserError(f"{given}: a saved --guard purifies (or not) as it was saved; fit a new one with --model "
                        "to change that")
    args.frr, args.purify = guard_flags(options, args.frr, args.purify)  # --set frr=0.2 means --frr 0.2
    if args.guard:
        require_path(args.guard, "--guard")
        fitting = [f for f, v in (("--method", args.method), ("--clean-data", args.clean_data),
                                  ("--holdout", args.holdout), ("--purify", args.purify), ("--set", options),
                                  ("--save-guard", args.save_guard), ("--dataset", args.dataset)) if v]
        model_flags = [f for f, v in (("--arch", args.arch), ("--num-classes", args.num_classes),
                                      ("--width", args.width), ("--classes", args.classes), ("--mean", args.mean),
                                      ("--std", args.std), ("--no-verify", args.no_verify)) if v]
        if model_flags:
            raise UserError(f"{', '.join(model_flags)} describe a --model file; a saved --guard carries its model "
                            "(drop them)")
        if fitting:
            raise UserError(f"{', '.join(fitting)} fit a new detector; a saved --guard is used as it was saved "
                            "(drop them, or fit anew with --model)")
    given = {"--model": args.model, "--guard": args.guard, "--inputs": args.inputs, "--clean-data": args.clean_data,
             "--data-dir": args.data_dir}
    check_file_out(out, "--out", "scores.csv", given)
    if args.save_guard:
        check_out(args.save_guard, "--save-guard", given)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    args.method = args.method or "badacts"
    factory = DEFENSES.get(args.method)
    cls = getattr(factory, "func", factory)
    if not (isinstance(cls, type) and issubclass(cls, InputDetector)):
        raise UserError(f"{args.method!r} is not an input detector; pick one such as 'badacts' "
                        "('trojanguard list defenses')")
    options.setdefault("seed", args.seed)
    if args.quiet:
        options.setdefault("progress", False)
    threads = set_threads(args.threads)
    device = resolve_device(args.device)
    if args.guard:
        from ..guarded import load_guard
        g = load_guard(args.guard, device)
        model, meta = g.model, g.model_meta
        if args.frr is not None:
            g.set_frr(args.frr)
    else:
        from .modelargs import model_from_args
        model, meta = model_from_args(args, device)
    _check_input_kind(inputs, model.modality)
    channels = None
    if model.modality == "image":
        image_files(inputs)  # an empty folder or a stray file fails before any work
        channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    clean = None
    if not args.guard:
        kw = {k: v for k, v in (("text_column", args.text_column), ("label_column", args.label_column)) if v}
        clean, _, _ = defender_data(meta, model, args.clean_data, args.holdout, args.data_dir, args.dataset,
                                    loader_kw=kw)
    if model.modality == "text":
        ids, x = read_texts(inputs, args.input_column)
    else:  # the inputs must have the size of the model's clean data
        ids, x = read_images(inputs, channels, _image_size(clean, g if args.guard else None, meta))
    model_meta = {k: v for k, v in meta.items() if k in ("dataset", "seed", "train_config")}
    purify = g.purify if args.guard else args.purify
    with measure("detect") as st:
        if not args.guard:
            g = guard(model, clean, args.method, frr=args.frr, purify=args.purify, model_meta=model_meta, **options)
        rows = []
        for start in range(0, len(ids), args.batch_size):
            xb = x[start:start + args.batch_size]
            xb = xb.float().div(255) if model.modality == "image" else xb
            res = g(xb)
            own = _own_predictions(g, xb, res)
            for i in range(len(own)):
                row = [ids[start + i], f"{float(res.scores[i]):.6f}", int(res.flags[i]), int(own[i])]
                if purify:
                    row.append(int(res.predictions[i]))
                rows.append(row)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "score", "flag", "prediction"] + (["purified_prediction"] if purify else []))
    w.writerows(rows)
    atomic_write_text(out, buf.getvalue())
    if args.save_guard:
        g.save(args.save_guard)
    from ..report import count
    flagged = sum(r[2] for r in rows)
    for warning in (g.detector_warning, g.purifier_warning):
        if warning:
            print(f"trojanguard: caution: {warning}", file=sys.stderr)
    if args.json:
        import json
        from ..utils import to_jsonable
        # the seed the detector was fitted with (a saved guard's own, not --seed)
        print(json.dumps(to_jsonable({"method": g.detector.name, "inputs": len(rows), "flagged": flagged,
                                      "frr": g.frr, "threshold": g.threshold, "seconds": round(st.seconds, 2),
                                      "threads": threads, "seed": g.detector.cfg.seed, "scores": str(out),
                                      "guard": args.guard or args.save_guard}), indent=2))
        return 0
    print(f"flagged {flagged} of {len(rows)} inputs ({g.detector.name}"
          + (f" of the guard {args.guard}" if args.guard else "") + f", FRR {g.frr:g} on held-out clean data, "
          f"threshold {g.threshold:.4f}); {st.seconds:.1f} s, {count(threads, 'thread')}; scores in {out}"
          + (f"; guard saved in {args.save_guard}" if args.save_guard else ""))
    return 0

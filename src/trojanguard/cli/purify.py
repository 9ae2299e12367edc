"""``trojanguard purify``: repair a suspect model with a named purifier and report
CA/ASR/RA before and after, DER, cost and (``--robustness``) the retuning attack."""
from __future__ import annotations

import json

from .argtypes import add_clean_data_args, add_run_args, require_path, set_threads
from .modelargs import add_model_args, setup_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("purify", help="purify a suspect model on clean data (fst, ft, pam, wiper, ...)")
    p.add_argument("--method", required=True, help="purifier name (see 'trojanguard list defenses')")
    add_model_args(p)
    add_clean_data_args(p)
    p.add_argument("--attack", help="attack artifact folder to measure ASR with (default: the model's own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="method option, repeatable ('trojanguard list defenses' shows them)")
    p.add_argument("--robustness", action="store_true", help="also run the retuning attack on the purified model")
    add_run_args(p)
    p.add_argument("--out", required=True, help="folder for the purified checkpoint and purify.json")


def run(args) -> int:
    from ..utils import to_jsonable
    from pathlib import Path

    from .commands import defense_options
    from ..resultdir import check_out
    out = Path(args.out)
    # before any work: an unwritable --out, or one that would replace an input, fails now
    check_out(out, "--out", {"--model": args.model, "--clean-data": args.clean_data, "--attack": args.attack,
                            "--data-dir": args.data_dir})
    require_path(args.attack, "--attack")
    options = defense_options(args.options)
    from ..defenses import create_defense
    from ..purification import purify_setup, resolve_purifier, save_purified
    # an unknown name, a detector named as a purifier or an option typo fails before loading anything
    create_defense(resolve_purifier(args.method), **options)
    set_threads(args.threads)
    from ..report import count, percent_rows, table
    from ..utils import resolve_device
    device = str(resolve_device(args.device))
    setup = setup_from_args(args, device, attack=args.attack, need_test=True, own_attack=True)
    model, record = purify_setup(setup, args.method, options, args.robustness, args.seed, device,
                                 progress=not args.quiet)
    save_purified(out, model, setup, record)
    if args.json:
        print(json.dumps(to_jsonable(record), indent=2))
        return 0 if record.get("warning") is None else 3
    cols = ["stage", "ca", "asr", "ra"]
    rows = [{"stage": "before", **{k: record.get(f"{k}_before") for k in ("ca", "asr", "ra")}},
            {"stage": f"after {args.method}", **{k: record.get(f"{k}_after") for k in ("ca", "asr", "ra")}}]
    if "asr_after_ra" in record:
        rows.append({"stage": "after retuning attack", "ca": record["ca_after_ra"], "asr": record["asr_after_ra"],
                     "ra": None})
    print(table(percent_rows(rows), cols))
    v0, v1 = record.get("verify_ca_before"), record.get("verify_ca_after")
    if v0 is not None:
        print(f"clean accuracy on {record['verify_size']} held-out clean samples: {v0:.1%} -> {v1:.1%}")
    print(f"{args.method}: {record['seconds']:.1f} s, peak {record['peak_rss_mb']:.0f} MB, "
          f"{count(record['threads'], 'thread')}; saved {out}/")
    if record.get("warning"):
        print(f"trojanguard: warning: {record['warning']}")
        return 3
    return 0

"""``trojanguard scan | repair | guard``: the practitioner's three questions about a model
someone gave them (is it backdoored, give me a repaired model, flag suspicious inputs).
Thin wrappers over ``trojanguard.practitioner`` and ``trojanguard.guard``."""
from __future__ import annotations

import json
import sys

from .inspect import candidates_line
from .argtypes import accuracy_drop, add_clean_data_args, add_run_args, fraction, guard_flags, set_threads

EXIT_NOT_REPAIRED = 3


def _dumps(obj) -> str:
    """Valid JSON (NaN -> null, tensors -> lists)."""
    from ..utils import to_jsonable
    return json.dumps(to_jsonable(obj), indent=2)


def add_parser(sub) -> None:
    from .modelargs import add_model_args
    helps = {"scan": "is this model backdoored? verdict, probability, target, recovered trigger, HTML report",
             "repair": "purify a model on clean data and prove it: CA before/after, ASR with the recovered "
                       "trigger, retuning attack",
             "guard": "fit an input detector and save a guarded model that flags suspicious inputs"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        add_model_args(p)
        add_clean_data_args(p)
        add_run_args(p)
        p.set_defaults(command_module="workflow")
        if name == "scan":
            p.add_argument("--out", help="folder for scan.json, report.html and the recovered trigger")
            p.add_argument("--no-second-opinion", action="store_true", help="skip Neural Cleanse on the original")
        elif name == "repair":
            p.add_argument("--method", help="purifier (default: chosen by modality and clean-data size)")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
                           help="purifier option, repeatable")
            p.add_argument("--verify-fraction", type=fraction("--verify-fraction"), default=0.2,
                           help="share of the clean data kept aside to verify the repair (default 0.2)")
            p.add_argument("--max-ca-drop", type=accuracy_drop, default=0.03,
                           help="clean-accuracy loss (on the verification part), as a fraction, above which the "
                                "repair fails (default 0.03 = 3 points)")
            p.add_argument("--no-scan", action="store_true", help="do not scan first (no recovered trigger to "
                           "measure the repair with)")
            p.add_argument("--out", required=True, help="folder for the repaired checkpoint and its report")
        else:
            p.add_argument("--method", default="badacts", help="input detector (default badacts)")
            p.add_argument("--frr", type=fraction("false-rejection rate"),
                           help="false-rejection rate on clean inputs (default 0.05)")
            p.add_argument("--purify", action="store_true", help="predict flagged inputs with the purified forward")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
                           help="detector option, repeatable")
            p.add_argument("--out", required=True, help="folder for the guarded model")


def _load(args):
    from .modelargs import setup_from_args
    args.threads = set_threads(args.threads)  # from here: the count in use, recorded with the result
    setup = setup_from_args(args)
    classes = (setup.meta.get("dataset") or {}).get("classes") or list(setup.clean.classes)
    return setup.model, setup.meta, setup.clean, setup.clean_source, classes


def run(args) -> int:
    from ..resultdir import check_out
    if getattr(args, "out", None):
        check_out(args.out, "--out", {"--model": args.model, "--clean-data": args.clean_data,
                                         "--data-dir": args.data_dir})
    return {"scan": _scan, "repair": _repair, "guard": _guard}[args.command](args)


def word_rates_line(trigger) -> str:
    """The recovered words, each with the share of the clean sentences of other classes the
    original model is surest about that it sends to the target (and of all of them)."""
    rates = {c["token"]: c for c in trigger.word_rates or []}
    def one(w):
        c = rates.get(w)
        if c is None or c.get("hard_flip_original") is None:
            return w
        return f"{w} ({c['hard_flip_original']:.0%} of the surest sentences, {c.get('flip_rate_original', 0):.0%} of all)"
    return "; ".join(one(w) for w in trigger.tokens) + " (the first is the one repair checks with)"


def _print_scan(s, classes, source) -> None:
    name = (lambda c: "-" if c is None else f"{c} ({classes[c]})" if c < len(classes) else str(c))
    print(f"verdict: {s.verdict.upper()}  backdoor probability {s.probability:.2f}  suspected target {name(s.target)}")
    auroc = s.evidence.get("calibration_auroc_out_of_sample")
    if auroc is not None and auroc < 0.75:
        print(f"caution: out of sample on the reference zoo this probability separates backdoored from clean models "
              f"with AUROC {auroc:.2f} only; weigh the recovered trigger"
              + (" and the second opinion" if s.second_opinion else
                 " (does a word read as a trigger, and does it flip sentences the model was sure of? see each "
                 "recovered word's rates below)"))
    shares = s.evidence.get("shares")
    if shares:
        top = sorted(range(len(shares)), key=lambda i: -shares[i])[:3]
        print("evidence: after clean unlearning the clean data is predicted as "
              + ", ".join(f"{name(i)} {shares[i]:.0%}" for i in top))
    line = candidates_line(s.evidence, name)
    if line:
        print("candidates: " + line)
    if s.trigger is not None:
        print("recovered trigger: " + (word_rates_line(s.trigger) if s.trigger.tokens else
                                       f"mask of L1 norm {float(s.trigger.mask.abs().sum()):.1f} px"))
    if s.second_opinion:
        so = s.second_opinion
        print(f"second opinion (Neural Cleanse): {so['verdict']}, anomaly index "
              f"{so.get('anomaly_index') if so.get('anomaly_index') is not None else '-'}, target {name(so['target'])}")
    print(f"clean data: {source}; {s.seconds:.0f} s")


def _scan(args) -> int:
    from pathlib import Path

    from ..practitioner import scan
    from ..workflow_report import report_html, trigger_image
    from ..resultdir import write_result
    from ..utils import atomic_write_json, atomic_write_text, library_versions
    model, meta, clean, source, classes = _load(args)
    s = scan(model, clean, seed=args.seed, second_opinion=not args.no_second_opinion, progress=not args.quiet,
             device=args.device)
    record = {**s.as_dict(), "clean_data": {"source": source, "size": len(clean)}, "seed": args.seed,
              "threads": args.threads, "model": args.model, "versions": library_versions()}
    if args.json:
        print(_dumps(record))
    else:
        _print_scan(s, classes, source)
    if args.out:
        with write_result(args.out) as tmp:
            atomic_write_json(Path(tmp) / "scan.json", record)
            atomic_write_text(Path(tmp) / "report.html", report_html(f"trojanguard scan: {args.model}", s,
                                                                     classes=classes))
            if s.trigger is not None and s.trigger.mask is not None:
                trigger_image(s.trigger).save(Path(tmp) / "trigger.png")
            elif s.trigger is not None:
                from ..defenses.token_search import candidates_text
                atomic_write_text(Path(tmp) / "trigger_tokens.txt", candidates_text(s.trigger.word_rates or []))
        if not args.json:
            print(f"saved {args.out}/ (scan.json, report.html{', trigger' if s.trigger else ''})")
    return 0


def _repair(args) -> int:
    from pathlib import Path

    from ..practitioner import repair, scan
    from ..workflow_report import report_html
    from ..report import percent
    from ..resultdir import write_result
    from ..utils import atomic_write_json, atomic_write_text, library_versions
    from .commands import defense_options
    if args.method:
        from ..purification import resolve_purifier
        args.method = resolve_purifier(args.method)  # a detector name fails before any work
    model, meta, clean, source, classes = _load(args)
    from ..practitioner import repair_plan
    # the purifier's options are checked now: a typo fails before the scan, not after it
    options = defense_options(args.options)
    repair_plan(clean, args.method, options, args.seed, args.verify_fraction, args.max_ca_drop, model=model)
    s = None
    if not args.no_scan:
        s = scan(model, clean, seed=args.seed, second_opinion=False, progress=not args.quiet, device=args.device)
        if not args.json:
            _print_scan(s, classes, source)
    repaired, r = repair(model, clean, args.method, options,
                         trigger=s.trigger if s is not None else None, seed=args.seed,
                         verify_fraction=args.verify_fraction, max_ca_drop=args.max_ca_drop,
                         progress=not args.quiet, device=args.device)
    record = {**r.as_dict(), "scan": s.as_dict() if s else None, "clean_data": {"source": source, "size": len(clean)},
              "seed": args.seed, "threads": args.threads, "model": args.model, "versions": library_versions()}
    with write_result(args.out) as tmp:
        from ..purification import write_purified_checkpoint
        write_purified_checkpoint(tmp, repaired, meta, args.model,
                                  {"method": r.method, "options": r.options, "parent": meta.get("sha256"),
                                   "clean_data": record["clean_data"], "ok": r.ok, "warning": r.advice})
        atomic_write_json(Path(tmp) / "repair.json", record)
        atomic_write_text(Path(tmp) / "report.html", report_html(f"trojanguard repair: {args.model}", s, r, classes))
    if args.json:
        print(_dumps(record))
    else:
        rec = r.record
        print(f"repair with {r.method} ({r.reason})")
        print(f"clean accuracy on {rec['verify_size']} held-out clean samples: {percent(rec['verify_ca_before'])} -> "
              f"{percent(rec['verify_ca_after'])} (+/- {percent(rec['verify_margin95'])} at 95 %: "
              "more clean data narrows it)")
        if rec.get("recovered_trigger_asr_before") is not None:
            retuned = rec.get("recovered_trigger_asr_after_retuning")
            print(f"ASR with the recovered trigger: {percent(rec['recovered_trigger_asr_before'])} -> "
                  f"{percent(rec['recovered_trigger_asr_after'])}; after the retuning attack "
                  + (percent(retuned) if retuned is not None else
                     "not run (the backdoor remains)" if rec.get("backdoor_remains") else "not run"))
        print(f"{rec['seconds']:.0f} s, peak {rec['peak_rss_mb']:.0f} MB; saved {args.out}/ (model, repair.json, "
              "report.html)")
        for text in r.cautions:
            print(f"caution: {text}")
    if not r.ok:
        print(f"trojanguard: NOT repaired: {r.advice}", file=sys.stderr)
        return EXIT_NOT_REPAIRED
    return 0


def _guard(args) -> int:
    from ..guarded import guard
    from .commands import defense_options
    options = defense_options(args.options)
    frr, purify = guard_flags(options, args.frr, args.purify)
    options.setdefault("device", args.device)
    options.setdefault("seed", args.seed)
    if args.quiet:
        options.setdefault("progress", False)
    model, meta, clean, source, classes = _load(args)
    g = guard(model, clean, args.method, frr=frr, purify=purify,
              model_meta={k: v for k, v in meta.items() if k in ("dataset", "seed", "train_config")}, **options)
    g.save(args.out)
    for warning in (g.detector_warning, g.purifier_warning):
        if warning:
            print(f"trojanguard: caution: {warning}", file=sys.stderr)
    info = {"method": args.method, "frr": g.frr, "threshold": g.threshold, "purify": purify,
            "clean_data": {"source": source, "size": len(clean)}, "seed": args.seed, "threads": args.threads,
            "out": args.out}
    if args.json:
        print(_dumps(info))
        return 0
    print(f"guard fitted ({args.method}, FRR {g.frr:g} on held-out clean data, threshold {g.threshold:.4f}); "
          f"saved {args.out}/")
    print("use it from Python:\n"
          "    import trojanguard\n"
          f"    g = trojanguard.load_guard({str(args.out)!r})\n"
          "    out = g(batch)            # images in [0, 1] (N, C, H, W) or a list of sentences\n"
          "    out.predictions, out.scores, out.flags")
    return 0

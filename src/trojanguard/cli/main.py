"""``trojanguard`` command line. Every user mistake ends in one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

from ..errors import UserError
from .argtypes import SEED, THREADS, finite, fraction, int_in

# Commands that live in a module of their own (``add_parser(sub)`` + ``run(args)``).
COMMAND_MODULES: tuple[str, ...] = ("purify", "detect", "bench", "inspect", "workflow")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UserError(f"{message} (see '{self.prog} --help')")


def _add_common_data(p):
    p.add_argument("--dataset", type=str.lower, help="dataset name (cifar10, sst2, yelp, digits, imagefolder, text)")
    p.add_argument("--data-dir", help="folder with the dataset files (default: search "
                   "$TROJANGUARD_DATA/<name>, ./data/<name>, ../shared/data/<name>)")
    p.add_argument("--text-column", default=None, help="text column for --dataset text")
    p.add_argument("--label-column", default=None, help="label column for --dataset text")


_ratio = fraction("fraction")
_int_in = int_in
_finite = finite



WIDTH = _int_in(1, 1024)       # the bound model.json's ``width`` is validated with too (checkpoint.ModelArgs)


def _add_training(t):
    _add_common_data(t)
    t.add_argument("--model", required=True, help="model name (preact_resnet18, small_cnn, minilm, hf:<dir>)")
    t.add_argument("--width", type=WIDTH, help="channel width of image models (preact_resnet18: 16 CPU, 64 paper)")
    t.add_argument("--holdout", type=_ratio, default=None,
                   help="fraction of train held out as the defender's clean set (default 0.05 images; text: dev split)")
    for name, typ in (("epochs", int), ("batch-size", int), ("lr", _finite), ("weight-decay", _finite)):
        t.add_argument(f"--{name}", type=typ)
    t.add_argument("--seed", type=SEED, default=0)
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (default: at the end only)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_threads(t)


def _add_threads(p):
    p.add_argument("--threads", type=THREADS, help="CPU threads (default: all cores); results depend on it")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = _Parser(prog="trojanguard", description="Find and remove backdoors in image and text classifiers.")
    p.add_argument("--version", action="version", version=f"trojanguard {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a clean model and save a checkpoint")
    _add_training(t)
    t.add_argument("--out", help="checkpoint folder (default runs/<dataset>-<model>-clean)")

    a = sub.add_parser("attack", help="train a backdoored model; save checkpoint + attack artifact + metrics")
    a.add_argument("--attack", required=True, help="attack name (see 'trojanguard list attacks')")
    _add_training(a)
    a.add_argument("--ratio", type=_ratio, help="poisoned fraction of the training set (attack default)")
    a.add_argument("--count", type=int, help="absolute number of poisoned samples (overrides --ratio)")
    a.add_argument("--target", type=int, help="target label (default 0 images, 1 text)")
    a.add_argument("--all-to-all", action="store_true", help="target (y + 1) mod K instead of one label")
    a.add_argument("--table-dir", help="paraphrase tables for synbkd/stylebkd (<attack>-<split>.tsv)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="trigger parameter, repeatable (e.g. --set alpha=0.2); "
                        "'trojanguard list attacks' shows each attack's parameters and defaults")
    a.add_argument("--clean-model", help="clean checkpoint for attacks that fit their trigger on one (lc, trojannn, lf)")
    a.add_argument("--out", help="output folder (default zoo/<dataset>-<attack>-<ratio>-s<seed>)")

    st = sub.add_parser("show-trigger", help="write a PNG of clean vs triggered test images for an attack artifact")
    st.add_argument("artifact", help="folder with attack.json (e.g. from 'trojanguard attack')")
    _add_common_data(st)
    st.add_argument("--num", type=_int_in(1, 1000), default=4, help="number of test images")
    st.add_argument("--out", help="PNG path (default <artifact name>-trigger.png in the current folder: the "
                                  "artifact's own folder is a sealed result and may be read-only)")

    ls = sub.add_parser("list", help="list datasets, models, attacks or defenses")
    ls.add_argument("what", nargs="?", choices=["datasets", "models", "attacks", "defenses"],
                    help="one kind (default: every kind, names and descriptions only)")
    ls.add_argument("--brief", action="store_true", help="names and one-line descriptions only")

    e = sub.add_parser("eval", help="evaluate a model on a dataset's test split (CA; ASR/RA with an attack)")
    e.add_argument("checkpoint", nargs="?", metavar="MODEL", help="the model, as --model (the spelling before)")
    from .modelargs import add_model_args
    add_model_args(e, required=False)
    _add_common_data(e)
    e.add_argument("--device", default="auto")
    _add_threads(e)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("--per-class", action="store_true", help="also the clean accuracy of every class")
    e.add_argument("--attack", help="attack artifact folder to measure ASR/RA with (default: the checkpoint's own)")

    i = sub.add_parser("info", help="show what a checkpoint holds")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")

    d = sub.add_parser("demo", help="offline demo: scan the embedded backdoored CIFAR-10 model, repair it, check the "
                                          "repair against the real trigger")
    d.add_argument("--seed", type=SEED, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--out", default=None, help="also save the before/after results here (JSON)")
    d.add_argument("--quiet", action="store_true")
    _add_threads(d)
    for name in COMMAND_MODULES:
        import_module(f"{__package__}.{name}").add_parser(sub)
    return p


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command.replace('-', '_')
    # a module may add several commands; it names itself with set_defaults(command_module=...)
    module = getattr(args, "command_module", None) or (name if name in COMMAND_MODULES else None)
    if module:
        return import_module(f"{__package__}.{module}").run(args) or 0
    from . import commands
    if getattr(args, "threads", None):  # train, attack, eval, demo: --threads before any torch work
        from .argtypes import set_threads
        set_threads(args.threads)
    return getattr(commands, f"cmd_{name}")(args) or 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except UserError as e:
        print(f"trojanguard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trojanguard: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # 'trojanguard info --json | head': the reader has all it wanted
        import os
        try:  # nothing more can reach the reader; the interpreter's final flush must not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured)
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())

"""The ``--model PATH [--arch NAME --num-classes K --width W --classes a,b,c --mean ... --std ...]``
flags shared by the workflow commands (scan, repair, guard), and the call that turns them
into a model (``models/foreign.load_foreign_model``). No torch import at module level:
``trojanguard --help`` stays fast."""
from __future__ import annotations

import argparse


def _floats(s: str) -> list[float]:
    """'0.5,0.5,0.5' (or one value per argument): finite numbers."""
    from .argtypes import finite
    out = [finite(part) for part in s.replace(",", " ").split()]
    if not out:
        raise argparse.ArgumentTypeError("give at least one number")
    return out


def _stds(s: str) -> list[float]:
    """--std: positive numbers (the inputs are divided by it: 0 gives inf, a negative one flips them)."""
    out = _floats(s)
    if min(out) <= 0:
        raise argparse.ArgumentTypeError(f"std {min(out):g} is not positive; give the per-channel standard "
                                         "deviation, e.g. 0.5 or 0.229,0.224,0.225")
    return out


def _names(s: str) -> list[str]:
    names = [n.strip() for n in s.split(",")]
    if len(names) < 2 or not all(names):
        raise argparse.ArgumentTypeError(f"{s!r}: give the class names separated by commas, e.g. cat,dog")
    return names


from .argtypes import int_in as _int_in  # noqa: E402


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """Add the model flags to ``parser`` (a sub-command's parser)."""
    g = parser.add_argument_group("model (any of: trojanguard checkpoint folder, .safetensors/.pt state dict "
                                  "with --arch, Hugging Face classifier directory)")
    g.add_argument("--model", required=required, metavar="PATH",
                   help="the model to examine: checkpoint folder, state dict file, or Hugging Face directory")
    g.add_argument("--arch", metavar="NAME",
                   help="architecture of a bare state dict (small_cnn, preact_resnet18, minilm, hf:<encoder dir>)")
    g.add_argument("--num-classes", type=_int_in(2, 100_000), metavar="K",
                   help="class count (default: read off the weights or the config)")
    g.add_argument("--width", type=_int_in(1, 1024), metavar="W",
                   help="channel width of a state dict's architecture (default: read off the weights)")
    g.add_argument("--classes", type=_names, metavar="a,b,c",
                   help="class names in output order (default: from the checkpoint or config)")
    g.add_argument("--mean", type=_floats, nargs="+", metavar="M",
                   help="per-channel normalisation mean the model was trained with, e.g. 0.485,0.456,0.406 "
                        "(default: from the checkpoint or preprocessor_config.json)")
    g.add_argument("--std", type=_stds, nargs="+", metavar="S", help="per-channel normalisation std (with --mean)")
    g.add_argument("--no-verify", action="store_true",
                   help="accept a checkpoint whose weights no longer match the sha256 in model.json")


def _flat(v):
    return None if v is None else [x for part in v for x in part]


def model_from_args(args: argparse.Namespace, device=None):
    """``(model, meta)`` for the flags of ``add_model_args`` (see ``load_foreign_model``);
    ``device`` defaults to ``args.device`` (auto = CUDA when present). A bare image state
    dict without --mean/--std takes the normalisation of ``--dataset`` when one is given."""
    from ..models.foreign import is_bare_state_dict, load_foreign_model
    from ..utils import resolve_device
    if device is None:
        device = resolve_device(getattr(args, "device", None) or "auto")
    dataset_norm = None
    if args.mean is None and getattr(args, "dataset", None) and is_bare_state_dict(args.model):
        from ..pipeline import dataset_norm_for  # the normalisation train gives a model of that dataset
        loader_kw = {k: getattr(args, k) for k in ("text_column", "label_column")
                     if getattr(args, k, None) and args.dataset == "text"}  # only the generic text tables take them
        dataset_norm = dataset_norm_for(args.dataset, getattr(args, "data_dir", None), **loader_kw)
    return load_foreign_model(args.model, arch=args.arch, num_classes=args.num_classes, width=args.width,
                              classes=args.classes, mean=_flat(args.mean), std=_flat(args.std), device=device,
                              verify=not args.no_verify, dataset_norm=dataset_norm)


def setup_from_args(args: argparse.Namespace, device=None, attack=None, need_test: bool = False,
                    own_attack: bool = False):
    """The suspect model (any form ``add_model_args`` accepts) and the defender's clean data
    (``--clean-data`` / ``--holdout`` / ``--dataset`` / ``--data-dir``) as a
    ``purification.Setup``: what purify, inspect, scan, repair and guard work on
    (``own_attack``: also the attack a checkpoint folder holds, for purify's ASR)."""
    from ..purification import load_setup
    return load_setup(args.model, args.clean_data, args.holdout, attack, args.data_dir, need_test=need_test,
                      verify=not args.no_verify, loaded=model_from_args(args, device),
                      dataset=getattr(args, "dataset", None), own_attack=own_attack)

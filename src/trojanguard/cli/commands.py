"""The CLI commands: thin wrappers over the Python API."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError
from ..report import percent, percent_rows, table


def _loader_kw(args) -> dict:
    if (getattr(args, "text_column", None) or getattr(args, "label_column", None)) and \
            getattr(args, "dataset", None) not in (None, "text"):
        raise UserError("--text-column/--label-column apply to --dataset text only")
    kw = {}
    if getattr(args, "text_column", None):
        kw["text_column"] = args.text_column
    if getattr(args, "label_column", None):
        kw["label_column"] = args.label_column
    return kw


TEXT_DATASETS = ("sst2", "yelp", "text")


def _check_args(args) -> None:
    """What can be checked from the arguments alone, before any data is read: the dataset
    name, the device, the training recipe (epochs, lr, ...)."""
    from ..data import DATASETS
    from ..utils import resolve_device
    if not args.dataset:
        raise UserError("--dataset is required (e.g. --dataset cifar10)")
    DATASETS.get(args.dataset)  # unknown names fail before any work
    resolve_device(args.device)
    _loader_kw(args)


def _prepare(args):
    from ..pipeline import default_holdout, prepare_data
    _check_args(args)
    is_text = args.dataset in TEXT_DATASETS
    holdout = args.holdout if args.holdout is not None else default_holdout("text" if is_text else "image")
    return prepare_data(args.dataset, args.data_dir, holdout=holdout, seed=args.seed, **_loader_kw(args))


def _recipe(args):
    from ..training import recipe_for
    return recipe_for(args.dataset, args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, seed=args.seed, device=args.device,
                      eval_every=args.eval_every, progress=not args.quiet)


def _summary(args, record, out):
    m = record["metrics"]
    row = {"model": args.model, "dataset": args.dataset}
    if record["attack"]:
        row.update(attack=m["attack"], poisoned=m["poisoned_count"])
    row.update({k: m[k] for k in ("ca", "asr", "ra") if k in m})
    row.update(train_s=round(m["train_seconds"], 1), peak_rss_mb=round(m["peak_rss_mb"]))
    print(table(percent_rows([row])))
    print(f"saved {out}/ (model.safetensors, model.json{', attack.json' if record['attack'] else ''}, metrics.json)")


def cmd_train(args) -> int:
    from ..resultdir import check_out
    from ..workflows import train_victim
    _check_args(args)
    cfg = _recipe(args)
    out = Path(args.out or f"runs/{args.dataset}-{args.model.replace(':', '_').replace('/', '_')}-clean")
    check_out(out)  # an unwritable --out fails now, not after the training
    prep = _prepare(args)
    print(f"training {args.model} on {args.dataset}: {len(prep.train)} samples, {cfg.epochs} epochs, "
          f"batch {cfg.batch_size}; held-out D_def {len(prep.defense)}")
    _, record = train_victim(prep, args.model, cfg, width=args.width, out=out)
    _summary(args, record, out)
    return 0


def cmd_attack(args) -> int:
    from ..attacks import create_attack
    from ..resultdir import check_out
    from ..workflows import train_victim
    _check_args(args)
    kw = {"ratio": args.ratio, "count": args.count, "seed": args.seed, "target": args.target}
    if args.all_to_all:
        kw["mode"] = "all2all"
    if args.table_dir:
        kw["table_dir"] = args.table_dir
    kw.update(parse_options(args.options))
    modality = "text" if args.dataset in TEXT_DATASETS else "image"
    attack = create_attack(args.attack, modality=modality, **{k: v for k, v in kw.items() if v is not None})
    cfg = _recipe(args)
    out = Path(args.out or f"zoo/{args.dataset}-{args.attack}-{args.ratio or attack.cfg.ratio}-s{args.seed}")
    check_out(out)  # an unwritable --out fails now, not after the training
    clean = None
    if args.clean_model:
        from ..checkpoint import load_checkpoint
        from ..utils import resolve_device
        clean, _ = load_checkpoint(args.clean_model, resolve_device(args.device))
    prep = _prepare(args)
    attack.check_data(prep.train)  # a patch larger than the images, a target that is no class: now
    print(f"attack {attack.name} ({attack.describe()['target_mapping']}, ratio {attack.cfg.ratio}) on "
          f"{args.dataset}/{args.model}: training {cfg.epochs} epochs")
    _, record = train_victim(prep, args.model, cfg, width=args.width, attack=attack, out=out, clean_model=clean)
    _summary(args, record, out)
    return 0


def parse_options(items: list[str]) -> dict:
    """``["alpha=0.2", "words=[\"cf\", \"mn\"]"]`` -> ``{"alpha": "0.2", "words": ["cf", "mn"]}``.
    Values stay strings (the attack's pydantic config converts "0.2", "3", "true" to the
    field's type and rejects what does not fit), except JSON lists/objects and ``null``."""
    import json
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set alpha=0.2")
        if value.strip().startswith(("[", "{")) or value.strip() == "null":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise UserError(f"--set {key}: {value!r} is not valid JSON ({e.msg}); "
                                f"write lists like --set {key}='[\"a\", \"b\"]'") from None
        out[key] = value
    return out


#: defense options a computing command takes as flags of its own (add_run_args): one spelling
#: each, so that the seed a command records is the seed its defense used
RUN_FLAG_OPTIONS = {"seed": "--seed", "device": "--device", "progress": "--quiet"}


def defense_options(items: list[str]) -> dict:
    """``--set`` of the defense commands: ``parse_options``, with seed, device and progress
    refused (they have flags: ``--set seed=3`` would split and train with a seed the record
    does not show)."""
    options = parse_options(items)
    for key, flag in RUN_FLAG_OPTIONS.items():
        if key in options:
            raise UserError(f"--set {key}=...: use the flag {flag} instead")
    return options


def _eval_model_path(args) -> str:
    """The model ``eval`` measures: ``--model PATH`` as in every command, or the positional
    path; ``eval WEIGHTS --model ARCH`` (the spelling before the model flags were shared) still
    means ``--arch ARCH``."""
    from ..models.foreign import is_bare_state_dict
    if args.checkpoint and args.model:
        if Path(args.model).exists() or args.arch:
            raise UserError("give the model once: --model PATH (or the path alone), its architecture with --arch")
        if not is_bare_state_dict(args.checkpoint):
            raise UserError(f"--model {args.model}: {args.checkpoint} records its architecture; drop --model "
                            "(the architecture flag is --arch, for a bare weights file)")
        args.arch, args.model = args.model, args.checkpoint
    args.model = args.model or args.checkpoint
    if not args.model:
        raise UserError("give the model to evaluate: --model PATH (checkpoint folder, state dict with --arch, or "
                        "Hugging Face directory) and, unless it records one, --dataset")
    return args.model


def _load_for_eval(args):
    """(model, sidecar, dataset bundle) for any model ``--model`` takes (``models.foreign``);
    the dataset is ``--dataset`` or the one the model records. A bare image state dict takes
    that dataset's normalisation unless --mean/--std say otherwise (``model_from_args``)."""
    from ..data import load_dataset
    from ..models.foreign import is_bare_state_dict
    from ..pipeline import check_model_fits
    from ..utils import resolve_device
    from .modelargs import model_from_args
    if is_bare_state_dict(_eval_model_path(args)) and not (args.arch and args.dataset):
        raise UserError("a bare weights file needs --arch and --dataset to know its architecture and data")
    model, meta = model_from_args(args, resolve_device(args.device))
    ds = args.dataset or (meta.get("dataset") or {}).get("name")
    if not ds:
        raise UserError("the model does not record its dataset; pass --dataset")
    bundle = load_dataset(ds, args.data_dir, **_loader_kw(args))
    check_model_fits(model, bundle)
    return model, meta, bundle


def cmd_eval(args) -> int:
    from ..eval.evaluate import evaluate
    from ..utils import measure
    from .argtypes import require_path
    require_path(args.attack, "--attack")  # before loading the model and its data
    model, meta, bundle = _load_for_eval(args)
    trigger, targets = None, None
    from ..attacks import attack_for_checkpoint, load_attack
    # --attack: any model (repaired, foreign) against a saved attack; else the checkpoint's own
    attack = load_attack(args.attack) if args.attack else attack_for_checkpoint(args.model,
                                                                                verify=not args.no_verify)
    if attack is not None:
        attack.check_fits(tuple(bundle.test.x.shape[1:]) if bundle.modality == "image" else None,
                          bundle.num_classes)
        trigger, targets = attack.trigger, attack.target_for
    with measure("evaluate") as st:
        m = evaluate(model, bundle.test, trigger=trigger, targets=targets, per_class=args.per_class)
    m["seconds"] = round(st.seconds, 2)
    purification = meta.get("purification") or {}
    if purification.get("ok") is False:
        print(f"trojanguard: caution: this checkpoint is a failed purification "
              f"({purification_status(purification)})", file=sys.stderr)
    if args.json:
        from ..utils import to_jsonable
        print(json.dumps(to_jsonable(m), indent=2))  # an ASR with no non-target input is null, not NaN
        return 0
    per_class = m.pop("ca_per_class", None)
    print(table(percent_rows([{"model": args.model, **m}])))
    if per_class is not None:
        print(table([{"class": f"{i} {name}", "ca": percent(a, 1, "%")}
                     for i, (name, a) in enumerate(zip(bundle.classes, per_class))]))
    return 0


def purification_status(p: dict) -> str:
    """One line on how a purified checkpoint was made and whether its check passed."""
    ok = p.get("ok")
    state = "check passed" if ok else ("not recorded whether its check passed" if ok is None else
                                       f"NOT repaired: {p.get('warning') or 'its check failed'}")
    parent = p.get("parent") or "?"
    parent = str(parent.get("sha256") or parent.get("path") or "?") if isinstance(parent, dict) else str(parent)
    parent = parent[:12]
    return f"{p.get('method')} of parent {parent}: {state}"


def _brief(v, limit: int = 12) -> str:
    """A metric value for one line: floats to 4 decimals; a list of rates (per class) to 2,
    its first ``limit`` entries only, like the class names."""
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list) and all(x is None or isinstance(x, float) for x in v):
        shown = ["-" if x is None else f"{x:.2f}" for x in v[:limit]]
        return "[" + " ".join(shown) + (" ..." if len(v) > limit else "") + "]"
    return str(v)


def cmd_info(args) -> int:
    from ..checkpoint import read_sidecar
    meta = read_sidecar(args.checkpoint, verify=not args.no_verify)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    ds = meta.get("dataset") or {}
    rows = [("model", f"{meta['model']['name']} {json.dumps(meta['model'].get('args', {}))}"),
            ("dataset", f"{ds.get('name')} ({ds.get('train_size')} train, {ds.get('defense_size')} held out, "
                        f"{ds.get('test_size')} test)"),
            ("classes", ", ".join((ds.get("classes") or [])[:12])),
            ("attack", json.dumps(meta.get("attack")) if meta.get("attack") else "none recorded"),
            ("metrics", ", ".join(f"{k}={_brief(v)}" for k, v in (meta.get("metrics") or {}).items())),
            ("seed", meta.get("seed")), ("sha256", meta.get("sha256")),
            ("versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items() if k != "platform"))]
    if meta.get("purification"):
        rows.append(("purification", purification_status(meta["purification"])))
    for s in meta.get("stages") or []:
        rows.append((f"stage {s['stage']}", f"{s['seconds']:.1f} s, peak {s['peak_rss_mb']:.0f} MB"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo
    from ..resultdir import check_file_out
    from ..utils import resolve_device
    resolve_device(args.device)
    if args.out:
        check_file_out(args.out)
    run_demo(seed=args.seed, device=args.device, out=args.out, progress=not args.quiet)
    return 0


def cmd_list(args) -> int:
    from .. import catalogue
    cat = catalogue.load()
    if args.what is None:  # everything, briefly: a first look at what the tool has
        for kind in ("datasets", "models", "attacks", "defenses"):
            print(f"{kind}:")
            print("\n".join("  " + line for line in catalogue.lines(cat, kind, True)))
        print("options of each: trojanguard list <kind>")
        return 0
    print("\n".join(catalogue.lines(cat, args.what, args.brief)))
    return 0


def cmd_show_trigger(args) -> int:
    import torch

    from ..attacks import load_attack
    from ..checkpoint import read_sidecar
    from ..data import load_dataset
    from ..resultdir import check_file_out
    from ..viz import save_png, trigger_grid
    folder = Path(args.artifact)
    folder = folder if folder.is_dir() else folder.parent
    out = Path(args.out or f"{folder.resolve().name}-trigger.png")
    check_file_out(out, inputs={"artifact": args.artifact})  # before any work
    attack = load_attack(args.artifact)
    if attack.modality != "image":
        raise UserError(f"attack {attack.name} is a text attack; show-trigger draws image triggers")
    ds = args.dataset
    if not ds and (folder / "model.json").exists():
        ds = (read_sidecar(folder).get("dataset") or {}).get("name")
    if not ds:
        raise UserError("cannot tell which dataset to draw from; pass --dataset (and --data-dir)")
    bundle = load_dataset(ds, args.data_dir, **_loader_kw(args))
    test = bundle.test
    attack.check_fits(tuple(test.x.shape[1:]), bundle.num_classes)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(test), generator=g)[: max(1, args.num)]
    x, y = test.batch(idx)
    trig = attack.trigger(x, y)
    rows = [(f"{attack.name} #{int(i)}", x[k], trig[k]) for k, i in enumerate(idx)]
    save_png(trigger_grid(rows), out)
    print(f"wrote {out}")
    return 0

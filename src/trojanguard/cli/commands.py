"""The CLI commands: thin wrappers over the Python API."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..report import percent_rows, table


def _loader_kw(args) -> dict:
    kw = {}
    if getattr(args, "text_column", None):
        kw["text_column"] = args.text_column
    if getattr(args, "label_column", None):
        kw["label_column"] = args.label_column
    return kw


def cmd_train(args) -> int:
    from ..checkpoint import save_checkpoint
    from ..eval.evaluate import evaluate
    from ..pipeline import build_model, prepare_data
    from ..train import recipe_for, train
    from ..utils import measure, seed_everything

    if not args.dataset:
        raise UserError("--dataset is required (e.g. --dataset cifar10)")
    if args.out and Path(args.out).is_file():
        raise UserError(f"--out {args.out} is a file; give a folder for the checkpoint")
    cfg = recipe_for(args.dataset, args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     weight_decay=args.weight_decay, seed=args.seed, device=args.device,
                     eval_every=args.eval_every, progress=not args.quiet)
    with measure("load-data") as s_data:
        from ..data import DATASETS
        DATASETS.get(args.dataset)  # unknown names fail before any work
        holdout = args.holdout
        prep = prepare_data(args.dataset, args.data_dir, holdout=holdout if holdout is not None else
                            (0.05 if args.dataset not in ("sst2", "yelp", "text") else None),
                            seed=args.seed, **_loader_kw(args))
    seed_everything(args.seed)
    model = build_model(args.model, prep.bundle, width=args.width)
    print(f"training {args.model} on {args.dataset}: {len(prep.train)} samples, "
          f"{cfg.epochs} epochs, batch {cfg.batch_size}, held-out D_def {len(prep.defense)}")
    with measure("train") as s_train:
        res = train(model, prep.train, prep.bundle.test, cfg)
    with measure("evaluate") as s_eval:
        m = evaluate(model, prep.bundle.test)
    out = Path(args.out or f"runs/{args.dataset}-{args.model.replace(':', '_').replace('/', '_')}-clean")
    meta = {"dataset": prep.describe(), "train_config": cfg.model_dump(), "seed": args.seed,
            "attack": None, "metrics": m, "history": res.history,
            "stages": [s.as_dict() for s in (s_data, s_train, s_eval)]}
    save_checkpoint(out, model, meta)
    print(table(percent_rows([{"model": args.model, "dataset": args.dataset, "ca": m["ca"],
                                "epochs": cfg.epochs, "train_s": round(s_train.seconds, 1),
                                "peak_rss_mb": round(s_train.peak_rss_mb)}])))
    print(f"saved {out}/model.safetensors (+ model.json)")
    return 0


def _load_for_eval(args):
    from ..checkpoint import load_checkpoint, load_foreign_weights
    from ..utils import resolve_device
    dev = resolve_device(args.device)
    p = Path(args.checkpoint)
    if p.is_file() and p.suffix in {".pt", ".pth", ".bin", ".safetensors"} and not (p.parent / "model.json").exists():
        if not args.model or not args.dataset:
            raise UserError("a foreign weights file needs --model and --dataset to know its architecture")
        from ..pipeline import build_model, prepare_data
        prep = prepare_data(args.dataset, args.data_dir, holdout=None, **_loader_kw(args)) \
            if args.dataset in ("sst2", "yelp", "text") else prepare_data(args.dataset, args.data_dir, **_loader_kw(args))
        model = load_foreign_weights(p, build_model(args.model, prep.bundle, width=args.width)).to(dev)
        return model, {"model": model.spec, "dataset": {"name": args.dataset}}, prep.bundle
    model, meta = load_checkpoint(p, dev)
    from ..data import load_dataset
    ds = args.dataset or meta.get("dataset", {}).get("name")
    if not ds:
        raise UserError("the checkpoint does not name its dataset; pass --dataset")
    if meta.get("dataset", {}).get("classes") and args.dataset and args.dataset != meta["dataset"].get("name"):
        pass  # evaluating on another dataset of the same shape is allowed
    bundle = load_dataset(ds, args.data_dir, **_loader_kw(args))
    return model, meta, bundle


def cmd_eval(args) -> int:
    from ..eval.evaluate import evaluate
    from ..utils import measure
    model, meta, bundle = _load_for_eval(args)
    trigger, targets = None, None
    from ..attacks import attack_for_checkpoint
    attack = attack_for_checkpoint(args.checkpoint)
    if attack is not None:
        trigger, targets = attack.trigger, attack.target_for
    with measure("evaluate") as st:
        m = evaluate(model, bundle.test, trigger=trigger, targets=targets)
    m["seconds"] = round(st.seconds, 2)
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(table(percent_rows([{"checkpoint": args.checkpoint, **m}])))
    return 0


def cmd_info(args) -> int:
    from ..checkpoint import read_sidecar
    meta = read_sidecar(args.checkpoint)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    ds = meta.get("dataset") or {}
    rows = [("model", f"{meta['model']['name']} {json.dumps(meta['model'].get('args', {}))}"),
            ("dataset", f"{ds.get('name')} ({ds.get('train_size')} train, {ds.get('defense_size')} held out, "
                        f"{ds.get('test_size')} test)"),
            ("classes", ", ".join(ds.get("classes", [])[:12])),
            ("attack", json.dumps(meta.get("attack")) if meta.get("attack") else "none recorded"),
            ("metrics", ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in (meta.get("metrics") or {}).items())),
            ("seed", meta.get("seed")), ("sha256", meta.get("sha256")),
            ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items() if k != "platform"))]
    for s in meta.get("stages", []):
        rows.append((f"stage {s['stage']}", f"{s['seconds']:.1f} s, peak {s['peak_rss_mb']:.0f} MB"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo
    run_demo(seed=args.seed, device=args.device, out=args.out, progress=not args.quiet)
    return 0

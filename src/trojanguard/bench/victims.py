"""Victim cells: one per (attack, ratio or count, target, seed) of a grid, plus adopted
checkpoint folders. A finished folder of a model zoo (``zoo_root``, folders named as
``benchmarks/build_zoo.py`` names them) whose recipe, split, model and attack match the
resolved configuration is adopted instead of trained: the checks ``--adopt-clean`` makes."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, validated_config
from .grid import UNHASHED_ATTACK_OPTIONS, Cell, config_hash, hashed_options

TRAIN_UNHASHED = ("progress", "device", "eval_every", "stage")


def train_key(recipe) -> dict:
    """The recipe as it enters a victim's hash."""
    return hashed_options(recipe, exclude=TRAIN_UNHASHED)


def victim_hash(config: dict) -> str:
    if config.get("attack"):
        cfg = {k: v for k, v in config["attack"]["config"].items() if k not in UNHASHED_ATTACK_OPTIONS}
        config = {**config, "attack": {**config["attack"], "config": cfg}}
    return config_hash(config)


def rehash(cell: Cell) -> None:
    cell.hash = victim_hash(cell.config)
    if cell.adopt_from is None:
        cell.artifact = str(Path(cell.artifact).parent / cell.hash)


def victim_cells(spec, prep, recipe, dataset_key: dict, model_key: dict, root: Path, zoo_roots: list[Path],
                 resources: dict) -> list[Cell]:
    from ..attacks import attack_class
    from .zoo import ZooEntry
    recipe_key = train_key(recipe)
    common = {"dataset": dataset_key["name"], "model": model_key["name"]}
    cells = []
    if spec.name.lower() == "none":
        for seed in spec.seeds:
            config = {"kind": "victim", "dataset": dataset_key, "model": model_key,
                      "train": {**recipe_key, "seed": seed}, "attack": None}
            cells.append(_cell(ZooEntry("none", seed=seed).folder_name, config, seed, root, resources, zoo_roots,
                               {**common, "attack": spec.label or "none", "ratio": 0.0, "count": 0, "seed": seed,
                                "is_backdoored": False, "target": None, "mode": None, "setting": ""}))
        return cells
    cls = attack_class(spec.name, prep.bundle.modality)
    amounts = [("ratio", r) for r in (spec.ratios or ([] if spec.counts else [None]))]
    amounts += [("count", c) for c in spec.counts or []]
    default_target = cls.Config.model_fields["target"].default
    for what, amount in amounts:
        for target in spec.targets or [None]:
            for seed in spec.seeds:
                kw = {**spec.options, "seed": seed}
                if amount is not None:
                    kw[what] = amount
                if target is not None:
                    kw["target"] = target
                attack = cls(validated_config(cls.Config, "attack", cls.name, kw))
                attack.check_data(prep.train)
                picked = attack.select(prep.train)  # impossible ratios and counts fail here, one line
                acfg = attack.cfg.model_dump()
                folder_opts = {k: v for k, v in spec.options.items() if k not in UNHASHED_ATTACK_OPTIONS}
                if target is not None and target != default_target:
                    folder_opts["target"] = target
                if what == "count":
                    name = f"{cls.name}-n{amount}" + "".join(f"-{k}{v}" for k, v in sorted(folder_opts.items())) \
                        + f"-s{seed}"
                else:
                    name = ZooEntry(cls.name, acfg["ratio"], seed, folder_opts).folder_name
                setting = ", ".join(f"{k}={v}" for k, v in sorted(folder_opts.items()))
                config = {"kind": "victim", "dataset": dataset_key, "model": model_key,
                          "train": {**recipe_key, "seed": seed},
                          "attack": {"name": cls.name, "modality": cls.modality, "config": acfg},
                          "needs_clean_model": cls.needs_clean_model}
                ratio = acfg["ratio"] if acfg["count"] is None or what == "ratio" else len(picked) / len(prep.train)
                cells.append(_cell(name, config, seed, root, resources, zoo_roots,
                                   {**common, "attack": spec.label or cls.name, "ratio": ratio, "count": len(picked),
                                    "seed": seed, "is_backdoored": True,
                                    "target": None if acfg["mode"] == "all2all" else acfg["target"],
                                    "mode": acfg["mode"], "setting": setting}))
    return cells


def _cell(name: str, config: dict, seed: int, root: Path, resources: dict, zoo_roots: list[Path], info: dict) -> Cell:
    h = victim_hash(config)
    cell = Cell(name, "victim", config, h, [], info, str(root / h), seed, resources)
    notes = []
    for z in zoo_roots:
        folder = z / name
        if not folder.is_dir():
            continue
        reason = zoo_mismatch(folder, config)
        if not reason:
            cell.adopt_from = str(folder)
            cell.artifact = str(folder)
            return cell
        notes.append(f"{folder} not adopted: {reason}")
    cell.note = "; ".join(notes)
    return cell


def zoo_mismatch(folder: Path, config: dict) -> str:
    """Why a finished zoo folder is not the victim ``config`` describes ("" when it is)."""
    from ..checkpoint import read_sidecar
    from ..training import TrainConfig, recipe_diff
    if not (folder / "metrics.json").exists() or not (folder / "model.json").exists():
        return "not finished (no metrics.json)"
    meta = read_sidecar(folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    ds, want = meta.get("dataset") or {}, config["dataset"]
    if ds.get("name") != want["name"] or ds.get("holdout") != want["holdout"] or \
            int(ds.get("split_seed", 0)) != want["split_seed"]:
        return (f"split {ds.get('name')}/{ds.get('holdout')}/seed {ds.get('split_seed')} instead of "
                f"{want['name']}/{want['holdout']}/seed {want['split_seed']}")
    spec = meta.get("model") or {}
    from ..models import canonical_model_name
    # a checkpoint of a Hugging Face model names its copy of the files ("hf-text:hf"); the
    # directory it was built from is hf_source
    recorded = spec.get("name", "")
    if spec.get("hf_source"):
        recorded = f"{recorded.partition(':')[0]}:{spec['hf_source']}"
    if canonical_model_name(recorded) != canonical_model_name(config["model"]["name"]) or \
            (config["model"]["width"] is not None and (spec.get("args") or {}).get("width") != config["model"]["width"]):
        return f"model {spec.get('name')} {spec.get('args')} instead of {config['model']}"
    diff = recipe_diff(metrics.get("train_config") or meta.get("train_config") or {}, TrainConfig(**config["train"]))
    if diff:
        return "recipe " + ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in diff.items())
    return _attack_mismatch(folder, config.get("attack"))


def _attack_mismatch(folder: Path, attack: dict | None) -> str:
    from ..attacks import attack_class
    from ..attacks.artifact import ARTIFACT_JSON
    path = folder / ARTIFACT_JSON
    if attack is None:
        return "it holds an attack artifact, the grid asks for a clean model" if path.exists() else ""
    if not path.exists():
        return "no attack artifact"
    rec = json.loads(path.read_text())
    if rec.get("name") != attack["name"]:
        return f"attack {rec.get('name')} instead of {attack['name']}"
    fields = attack_class(attack["name"], attack["modality"]).Config.model_fields
    recorded = rec.get("config") or {}
    for k, v in attack["config"].items():
        if k in UNHASHED_ATTACK_OPTIONS:
            continue
        old = recorded.get(k, fields[k].default if k in fields else None)
        if old != v:
            return f"attack option {k}: {old} -> {v}"
    return ""


def adopted_victim(spec, prep, root: Path, resources: dict) -> Cell:
    """A checkpoint folder the user names (``adopt: PATH``): used as it is, identified by the
    sha256 of its weights; its attack (if any) is the artifact stored beside it."""
    from ..attacks import attack_for_checkpoint
    from ..checkpoint import read_sidecar
    folder = Path(spec.adopt)
    if not folder.is_dir():
        raise UserError(f"adopt: {str(folder)!r} is not a folder; give a checkpoint folder "
                        "(written by 'trojanguard train/attack' or a zoo)")
    meta = read_sidecar(folder)
    ds = meta.get("dataset") or {}
    if ds.get("name") and ds["name"] != prep.bundle.name:
        raise UserError(f"adopt: {folder} was trained on {ds['name']}, the grid's dataset is {prep.bundle.name}")
    if ds.get("classes") and len(ds["classes"]) != prep.bundle.num_classes:
        raise UserError(f"adopt: {folder} has {len(ds['classes'])} classes, dataset {prep.bundle.name} has "
                        f"{prep.bundle.num_classes}")
    if not meta.get("sha256"):
        raise UserError(f"adopt: {folder}/model.json records no sha256 of its weights; re-save the checkpoint")
    attack = attack_for_checkpoint(folder)
    acfg = attack.cfg.model_dump() if attack else None
    seed = int(meta.get("seed", 0) or 0)
    label = spec.label or (attack.name if attack else "none")
    info = {"dataset": prep.bundle.name, "model": (meta.get("model") or {}).get("name"), "attack": label,
            "ratio": (acfg["ratio"] if acfg["count"] is None else acfg["count"] / ds.get("train_size", 1)) if acfg else 0.0,
            "count": (meta.get("metrics") or {}).get("poisoned_count", 0), "seed": seed,
            "is_backdoored": attack is not None,
            "target": None if not acfg or acfg["mode"] == "all2all" else acfg["target"],
            "mode": acfg["mode"] if acfg else None, "setting": f"adopted {folder}"}
    config = {"kind": "victim", "adopt": {"sha256": meta["sha256"]}}
    h = victim_hash(config)
    return Cell(f"adopted-{folder.name}", "victim", config, h, [], info, str(folder), seed, resources,
                adopt_from=str(folder))

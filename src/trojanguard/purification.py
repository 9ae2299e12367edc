"""The purification job, shared by ``trojanguard purify``, the benchmarks and ``repair``:
load a suspect checkpoint and the defender's clean data, purify, evaluate before/after on
the test split with the attack's trigger (when one is known), optionally put the purified
model through the retuning attack, and save the purified checkpoint with its record."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.base import Data
from .errors import UserError


@dataclass
class Setup:
    """A suspect model with the data a defender has for it."""
    model: torch.nn.Module
    meta: dict
    clean: Data                 # the defender's clean data D_def
    test: Data | None           # a labelled test split to report CA/ASR on (None: unknown)
    attack: Any = None          # the attack artifact, to measure ASR (None: unknown)
    clean_source: str = ""
    model_path: str = ""


def load_setup(model_path: str | Path, clean_data: str | Path | None = None, holdout: float | None = None,
               attack_path: str | Path | None = None, data_dir: str | None = None, device: str = "cpu",
               need_test: bool = True, verify: bool = True, loaded: tuple[torch.nn.Module, dict] | None = None,
               dataset: str | None = None, own_attack: bool = True) -> Setup:
    """The model from its checkpoint folder (or ``loaded``: a model and meta already read by
    ``models.foreign.load_foreign_model``, e.g. a state dict with ``--arch``); the clean data
    from ``clean_data`` (a folder or table of the user's), else ``holdout`` of the recorded
    dataset's (or ``dataset``'s) training split, else the recorded held-out split itself; the
    attack from ``attack_path`` or (``own_attack``) the checkpoint folder; ``verify`` False skips
    the sha256 checks of both. A model that records no dataset records ``dataset`` (so that its
    purified copy does too)."""
    from .attacks.artifact import ARTIFACT_JSON, load_attack
    from .checkpoint import load_checkpoint
    from .pipeline import defender_data
    model, meta = loaded if loaded is not None else load_checkpoint(model_path, device=device, verify=verify)
    recorded = (meta.get("dataset") or {}).get("name")
    if dataset and recorded and recorded != dataset:
        raise UserError(f"the checkpoint records dataset {recorded!r}, not {dataset!r}; drop --dataset")
    clean, test, source = defender_data(meta, model, clean_data, holdout, data_dir, dataset, need_test=need_test)
    if dataset and not recorded:
        meta = {**meta, "dataset": {**(meta.get("dataset") or {}), "name": dataset}}
    attack = None
    folder = Path(model_path)
    if folder.is_file() and (folder.parent / "model.json").exists():  # a file of a checkpoint folder
        folder = folder.parent
    if attack_path is not None:
        attack = load_attack(attack_path, verify=verify)
    elif own_attack and folder.is_dir() and (folder / ARTIFACT_JSON).exists():  # an attack's checkpoint holds it
        attack = load_attack(folder, verify=verify)
    return Setup(model, meta, clean, test, attack, source, str(model_path))


def purify_setup(setup: Setup, method: str, options: dict | None = None, robustness: bool = False,
                 seed: int = 0, device: str = "auto", progress: bool = True,
                 retuning: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """Purify ``setup.model`` with ``method``; returns (purified model, record)."""
    from .defenses import create_defense
    from .defenses.common import before_after, retuning_attack
    from .eval.evaluate import evaluate
    from .utils import measure
    opts = dict(options or {})
    opts.setdefault("seed", seed)
    opts.setdefault("device", device)
    opts.setdefault("progress", progress)
    method = resolve_purifier(method)
    if robustness and (setup.attack is None or setup.test is None):
        raise UserError("--robustness needs the attack's trigger and a test split (pass --attack ARTIFACT)")
    defense = create_defense(method, **opts)
    trig = setup.attack.trigger if setup.attack is not None else None
    tgt = setup.attack.target_for if setup.attack is not None else None
    before = evaluate(setup.model, setup.test, trig, tgt) if setup.test is not None else None
    result = defense.purify(setup.model, setup.clean)
    # the summary names the method, its options (seed included) and the threads
    record: dict[str, Any] = {"clean_data": {"source": setup.clean_source, "size": len(setup.clean)},
                              "parent": {"path": setup.model_path, "sha256": setup.meta.get("sha256")},
                              **result.summary()}
    if setup.test is not None:
        record.update(before_after(setup.model, result.model, setup.test, setup.attack, before=before))
    if robustness:
        with measure("retuning-attack") as st:
            tuned = retuning_attack(result.model, setup.clean, setup.attack, **{"seed": seed, "device": device,
                                                                                 **(retuning or {})})
            after_ra = evaluate(tuned, setup.test, trig, tgt)  # one clean pass gives CA as well
            record["asr_after_ra"], record["ca_after_ra"] = after_ra["asr"], after_ra["ca"]
        record["retuning_seconds"] = round(st.seconds, 2)
    return result.model, record


def resolve_purifier(name: str) -> str:
    """The registry name of the purifier a user means: ``beniful``/``ebyd`` name their removal
    half (``beniful-removal``/``ebyd-removal``); a detector or inspector name is an error."""
    from .defenses import DEFENSES
    DEFENSES.get(name)  # unknown names: one line with did-you-mean
    if not _is_purifier(name) and f"{name}-removal" in DEFENSES:
        name = f"{name}-removal"
    if not _is_purifier(name):
        raise UserError(f"{name} does not repair models (it detects inputs or inspects models); purifiers: "
                        f"{', '.join(n for n in DEFENSES.names() if _is_purifier(n))}")
    return name


def _is_purifier(name: str) -> bool:
    from .defenses import DEFENSES, Purifier
    factory = DEFENSES.get(name)
    cls = getattr(factory, "func", factory)
    return isinstance(cls, type) and issubclass(cls, Purifier)


def _parent_attack(model_path: str):
    """The attack recorded with the parent checkpoint (its folder's artifact; ``--attack``
    may have named another one to measure with)."""
    from .attacks.artifact import load_attack
    if not model_path:
        raise ValueError("the parent checkpoint's path is empty: its folder holds its attack artifact")
    folder = Path(model_path)
    return load_attack(folder if folder.is_dir() else folder.parent)


def write_purified_checkpoint(tmp: Path, model, parent_meta: dict, parent_path: str, purification: dict) -> None:
    """Into an open result folder: the purified model, its sidecar (the parent's dataset,
    classes, normalisation and attack, plus ``purification``) and the parent's attack
    artifact: the sidecar names that attack, so without it the checkpoint would not load
    ("records attack ... but there is no attack.json") and ``eval`` could not re-measure it."""
    from .checkpoint import save_checkpoint
    sidecar = {k: v for k, v in parent_meta.items()
               if k in ("dataset", "train_config", "seed", "attack", "classes", "normalization")}
    sidecar["purification"] = purification
    attack = None
    if sidecar.get("attack"):
        try:
            attack = _parent_attack(parent_path)
        except UserError:  # an older purified parent without its artifact: loads, as checkpoint.py allows
            sidecar.pop("attack")
    save_checkpoint(tmp, model, sidecar)
    if attack is not None:
        attack.save(tmp)


def save_purified(out: str | Path, model, setup: Setup, record: dict) -> Path:
    """The purified checkpoint (sidecar with method, options, clean data, parent sha256) and
    ``purify.json``, written as one complete folder."""
    from .resultdir import write_result
    from .utils import atomic_write_json, library_versions
    purification = {**{k: record[k] for k in ("method", "options", "clean_data", "parent")},
                    # a failed purification must not pass for a repaired model later
                    "ok": record.get("warning") is None, "warning": record.get("warning")}
    with write_result(out) as tmp:
        write_purified_checkpoint(tmp, model, setup.meta, setup.model_path, purification)
        atomic_write_json(Path(tmp) / "purify.json", {**record, "versions": library_versions()})
    return Path(out)

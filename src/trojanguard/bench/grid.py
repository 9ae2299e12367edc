"""A benchmark grid: one YAML file naming the dataset, the model, the training recipe, the
attacks and the defenses. The whole grid is validated before any work starts (unknown
names with a suggestion, options a method does not have, impossible ratios, missing data,
a defense that does not fit the modality: one line each, ``UserError``), then expanded into
cells with a content hash of their resolved configuration.

Relative paths in a grid (``data_dir``, ``adopt``, ``zoo_root``, ``artifacts``) are read from
the working directory, like every other path the CLI takes.

    name: tiny
    dataset: digits            # + data_dir, holdout (default 0.05 images / dev split text), split_seed
    model: small_cnn           # + width
    train: {epochs: 10}        # overrides of the reference recipe (recipe_for)
    zoo_root: zoo/cifar10      # or a list: finished zoo folders with the same recipe are adopted
    attacks:
      - {name: none, seeds: [0, 1]}            # clean models
      - {name: badnets, ratios: [0.1], seeds: [0], options: {patch_size: 3}, targets: [0]}
      - {adopt: runs/some-checkpoint}          # an existing checkpoint folder
    defenses:
      purifiers: [{name: fst, options: {epochs: 5}}, {name: ft}]
      detectors: [{name: badacts}]
      inspectors: [{name: ebyd}]
    checks: {retuning: true}   # or {retuning: {epochs: 5, n_clean: 1000}}
    resources: {victim: {cpus: 2}, purifier: {cpus: 1, gpus: 0}}
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UserError

KINDS = ("victim", "purifier", "detector", "inspector")
SECTION_KIND = {"purifiers": "purifier", "detectors": "detector", "inspectors": "inspector"}
# where data lives, not a setting: neither hashed nor part of a zoo folder name
UNHASHED_ATTACK_OPTIONS = ("table_dir",)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttackSpec(_Spec):
    name: str | None = Field(None, description="attack name; 'none' = a clean model")
    adopt: str | None = Field(None, description="an existing checkpoint folder to use as is")
    ratios: list[float] | None = None
    counts: list[int] | None = None
    targets: list[int] | None = None
    seeds: list[int] = [0]
    options: dict[str, Any] = {}
    label: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if (self.name is None) == (self.adopt is None):
            raise ValueError("give either name (an attack, or none for a clean model) or adopt (a folder)")
        if self.ratios and self.counts:
            raise ValueError("give ratios or counts, not both")
        if self.adopt and (self.ratios or self.counts or self.targets or self.options):
            raise ValueError("an adopted folder takes only a label (its attack is what it was trained with)")
        if self.name and self.name.lower() == "none" and (self.ratios or self.counts or self.targets or self.options):
            raise ValueError("the clean model (name: none) takes only seeds and a label")
        return self


class DefenseSpec(_Spec):
    name: str
    options: dict[str, Any] = {}
    label: str | None = None
    attacks: list[str] | None = Field(None, description=(
        "only victims whose attack label or cell name (e.g. blended-0.1-s0) matches (fnmatch)"))


class Defenses(_Spec):
    purifiers: list[DefenseSpec] = []
    detectors: list[DefenseSpec] = []
    inspectors: list[DefenseSpec] = []


class Checks(_Spec):
    retuning: bool | dict[str, Any] = False


class Resources(_Spec):
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)


class Grid(_Spec):
    name: str | None = None
    dataset: str
    data_dir: str | None = None
    holdout: float | None = Field(None, gt=0, lt=1)
    split_seed: int = 0
    model: str
    width: int | None = Field(None, ge=1)
    train: dict[str, Any] = {}
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    zoo_root: str | list[str] | None = None
    artifacts: str | None = None
    plugins: list[str] = []
    attacks: list[AttackSpec] = Field(min_length=1)
    defenses: Defenses = Defenses()
    checks: Checks = Checks()
    resources: dict[Literal["victim", "purifier", "detector", "inspector"], Resources] = {}


@dataclass
class Cell:
    """One unit of work: its resolved configuration (hashed), what it depends on, where its
    folder goes, and the columns a report shows (``info``, not hashed)."""
    name: str
    kind: str
    config: dict
    hash: str
    deps: list[str]
    info: dict
    artifact: str
    seed: int
    resources: dict
    adopt_from: str | None = None     # a finished folder used instead of computing
    note: str = ""                    # why a zoo folder was not adopted, ...


@dataclass
class Plan:
    grid: Grid
    name: str
    path: str
    context: dict                     # what every cell of the grid needs (dataset, model, device)
    cells: list[Cell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def by_hash(self) -> dict[str, Cell]:
        return {c.hash: c for c in self.cells}


def hashed_options(cfg, exclude=()) -> dict:
    """A config's options as they enter a cell's hash: an option marked ``ADDED_LATER``
    (``utils``) is left out at its default, or at its legacy value when it has one
    (``utils.added_later``), so cells hashed before it existed keep their hash."""
    out = cfg.model_dump(exclude=set(exclude))
    for name, field in type(cfg).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if not extra.get("added_later") or name not in out:
            continue
        old = extra["legacy"] if "legacy" in extra else field.get_default(call_default_factory=True)
        if out[name] == old:
            del out[name]
    return out


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of a resolved configuration (first 16 hex digits)."""
    from ..utils import to_jsonable
    text = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# reading and schema errors


def read_grid(path: str | Path) -> Grid:
    import yaml
    p = Path(path)
    if not p.is_file():
        raise UserError(f"grid file {str(p)!r} does not exist; give a YAML grid such as configs/tiny.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: a grid is a YAML mapping with dataset, model, attacks, ...; got {type(raw).__name__}")
    try:
        return Grid(**raw)
    except ValidationError as e:
        raise UserError(f"{p}: {_schema_error(e)}") from None


def _model_at(parent: tuple):
    """The schema class whose keys live at ``parent`` (for did-you-mean on unknown keys)."""
    if parent == ():
        return Grid
    head, n = parent[0], len(parent)
    return {("attacks", 2): AttackSpec, ("defenses", 1): Defenses, ("defenses", 3): DefenseSpec,
            ("checks", 1): Checks, ("resources", 2): Resources}.get((head, n))


def _loc_text(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "grid"


def _schema_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        parent, bad = loc[:-1], str(loc[-1])
        model = _model_at(parent)
        known = list(model.model_fields) if model else []
        close = difflib.get_close_matches(bad, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{_loc_text(parent)}: unknown key {bad!r}{hint}; keys: {', '.join(known)}"
    if err["type"] == "missing":
        return f"{_loc_text(loc)}: missing; every grid names it"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{_loc_text(loc)}: {msg}"


# ---------------------------------------------------------------------------------------
# validation and expansion


def plan_grid(path: str | Path, artifacts: str | Path | None = None) -> Plan:
    """Read, validate and expand a grid. Every mistake is a one-line ``UserError`` naming the
    grid file and the place in it; nothing is trained or written."""
    from importlib import import_module

    grid = read_grid(path)
    where = str(path)

    def fail(loc: str, msg: str):
        raise UserError(f"{where}: {loc}: {msg}")

    for i, mod in enumerate(grid.plugins):
        try:
            import_module(mod)
        except ImportError as e:
            fail(f"plugins[{i}]", f"cannot import {mod!r} ({e}); install it or fix the name")
    from ..data import DATASETS
    from ..pipeline import build_model, default_holdout
    from ..training import recipe_for
    from .cells import prepared_data
    try:
        DATASETS.get(grid.dataset)
    except UserError as e:
        fail("dataset", str(e))
    modality = "text" if grid.dataset.lower() in ("sst2", "yelp", "text") else "image"
    holdout = grid.holdout if grid.holdout is not None else default_holdout(modality)
    context = {"dataset": grid.dataset, "data_dir": grid.data_dir, "holdout": holdout,
               "split_seed": grid.split_seed, "model": grid.model, "width": grid.width,
               "device": grid.device, "threads": grid.threads, "plugins": list(grid.plugins)}
    try:
        prep = prepared_data(context)
    except UserError as e:
        fail("dataset", str(e))
    context["modality"] = prep.bundle.modality
    try:
        # a check only: a text encoder is built without reading its weights
        build_model(grid.model, prep.bundle, width=grid.width,
                    **({"pretrained": False} if prep.bundle.modality == "text" else {}))
    except UserError as e:
        fail("model", str(e))
    if "seed" in grid.train:
        fail("train.seed", "seeds are set per attack entry (attacks[i].seeds), not in the recipe")
    try:
        recipe = recipe_for(grid.dataset, grid.model, **{**grid.train, "progress": False})
    except UserError as e:
        fail("train", str(e))
    try:
        from ..utils import resolve_device
        resolve_device(grid.device)
    except UserError as e:
        fail("device", str(e))
    name = grid.name or Path(path).stem
    root = Path(artifacts or grid.artifacts or "runs/bench/artifacts")
    plan = Plan(grid, name, where, context)
    dataset_key = {"name": grid.dataset, "holdout": holdout if holdout is not None else "dev split",
                   "split_seed": grid.split_seed}
    model_key = {"name": grid.model, "width": grid.width}
    zoo_roots = [Path(z) for z in ([grid.zoo_root] if isinstance(grid.zoo_root, str) else grid.zoo_root or [])]
    for i, z in enumerate(zoo_roots):
        if z.exists() and not z.is_dir():
            fail("zoo_root" + (f"[{i}]" if isinstance(grid.zoo_root, list) else ""),
                 f"{str(z)!r} is a file; give the folder the zoo builder wrote (e.g. zoo/cifar10)")
        if not z.exists():  # a zoo not built yet on this machine: everything trains
            plan.notes.append(f"zoo_root {z} does not exist: nothing is adopted from it")
    res = {k: (grid.resources.get(k) or Resources()).model_dump() for k in KINDS}

    from .victims import adopted_victim, victim_cells
    victims: list[Cell] = []
    for i, spec in enumerate(grid.attacks):
        loc = f"attacks[{i}]"
        try:
            if spec.adopt:
                victims.append(adopted_victim(spec, prep, root, res["victim"]))
            else:
                victims += victim_cells(spec, prep, recipe, dataset_key, model_key, root, zoo_roots, res["victim"])
        except UserError as e:
            fail(loc, str(e))
    _unique([c.name for c in victims], "victims", fail)
    _link_clean_models(victims, fail)
    plan.cells = _order(victims, _defense_cells(grid, prep, victims, root, res, fail))
    return plan


def _unique(names: list[str], what: str, fail) -> None:
    seen = set()
    for n in names:
        if n in seen:
            fail(what, f"{n!r} appears twice; give one entry a different label or drop the duplicate")
        seen.add(n)


def _link_clean_models(victims: list[Cell], fail) -> None:
    """Attacks that fit their trigger on a clean model (LC, TrojanNN, LF) depend on the clean
    victim of the same seed, else on the first clean one (as the zoo builder does)."""
    clean = [v for v in victims if v.info["is_backdoored"] is False and not v.config.get("adopt")]
    for v in victims:
        if v.config.get("needs_clean_model"):
            same = [c for c in clean if c.seed == v.seed] or clean
            if not same:
                fail("attacks", f"{v.name}: attack {v.config['attack']['name']} fits its trigger on a clean "
                     "model; add a clean entry (name: none) to the grid")
            v.deps.append(same[0].hash)
            v.config["clean_model"] = same[0].hash
            from .victims import rehash
            rehash(v)


def _defense_cells(grid: Grid, prep, victims: list[Cell], root: Path, res: dict, fail) -> list[Cell]:
    from fnmatch import fnmatch

    from ..defenses import DEFENSES
    from ..errors import validated_config
    from ..defenses.common import retuning_attack
    retuning = None
    if grid.checks.retuning:
        params = inspect.signature(retuning_attack).parameters
        allowed = ("n_clean", "n_poison", "epochs", "lr", "momentum", "batch_size")
        opts = grid.checks.retuning if isinstance(grid.checks.retuning, dict) else {}
        for k in opts:
            if k not in allowed:
                close = difflib.get_close_matches(k, allowed, n=1)
                fail("checks.retuning", f"unknown option {k!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                     f"options: {', '.join(allowed)}")
        retuning = {k: opts.get(k, params[k].default) for k in allowed}
    cells = []
    for section, kind in SECTION_KIND.items():
        labels = []
        for i, spec in enumerate(getattr(grid.defenses, section)):
            loc = f"defenses.{section}[{i}]"
            try:
                factory = DEFENSES.get(spec.name)
            except UserError as e:
                fail(loc, str(e))
            cls = getattr(factory, "func", factory)
            fixed = dict(getattr(factory, "keywords", {}) or {})
            if getattr(cls, "kind", None) != kind:
                right = {v: k for k, v in SECTION_KIND.items()}.get(getattr(cls, "kind", ""), "?")
                fail(loc, f"{spec.name} is a {getattr(cls, 'kind', 'defense')}, not a {kind}; list it under "
                     f"defenses.{right}")
            if prep.bundle.modality not in cls.modalities:
                fail(loc, f"{spec.name} works on {' and '.join(cls.modalities)} models, but dataset "
                     f"{grid.dataset} is {prep.bundle.modality}; drop it from this grid")
            for k in ("device", "progress"):
                if k in spec.options:
                    fail(loc, f"option {k!r} is set by the harness (grid 'device'; progress is the live view)")
            try:
                cfg = validated_config(cls.Config, "defense", spec.name,
                                       {**fixed, **spec.options, "device": grid.device, "progress": False})
            except UserError as e:
                fail(loc, str(e))
            if len(prep.defense) < cls.min_clean:
                fail(loc, f"{spec.name} needs at least {cls.min_clean} clean samples; the held-out split has "
                     f"{len(prep.defense)}: raise holdout")
            label = spec.label or spec.name
            labels.append(label)
            options = hashed_options(cfg, exclude={"device", "progress"})
            for v in victims:
                if kind != "inspector" and not v.info["is_backdoored"]:
                    continue  # no trigger to measure on a clean model
                if spec.attacks and not any(fnmatch(v.info["attack"], p) or fnmatch(v.name, p) for p in spec.attacks):
                    continue
                config = {"kind": kind, "victim": v.hash, "defense": spec.name, "options": options}
                if kind == "purifier" and retuning is not None:
                    config["retuning"] = {**retuning, "seed": cfg.seed}
                h = config_hash(config)
                cells.append(Cell(f"{v.name}/{label}", kind, config, h, [v.hash],
                                  {**v.info, "defense": label, "method": spec.name, "victim": v.name},
                                  str(root / h), cfg.seed, res[kind]))
        _unique(labels, f"defenses.{section}", fail)
    return cells


def _order(victims: list[Cell], defenses: list[Cell]) -> list[Cell]:
    """Clean victims first (others fit triggers on them), then each victim followed by its
    defense cells, so results come in while the grid runs."""
    out = [v for v in victims if not v.info["is_backdoored"]]
    out += [v for v in victims if v.info["is_backdoored"]]
    by_victim: dict[str, list[Cell]] = {}
    for d in defenses:
        by_victim.setdefault(d.deps[0], []).append(d)
    ordered = []
    for v in out:
        ordered.append(v)
        ordered += by_victim.get(v.hash, [])
    return ordered

"""Safe checkpoints: safetensors weights + a JSON sidecar; foreign ``.pt`` files only
through ``torch.load(weights_only=True)``. Nothing here ever unpickles code.

A trojanguard checkpoint is a result folder (``resultdir``: complete or absent)::

    model.safetensors   the weights
    model.json          architecture + arguments, dataset, classes, normalisation,
                        training config, attack metadata, metrics, seed, versions, sha256
    COMPLETE.json       the manifest, written last

Every load validates ``model.json`` with the typed ``Sidecar`` below (bounded model
arguments, so a hostile file cannot ask for terabytes), checks the weights' sha256 (required;
``verify=False`` / ``--no-verify`` for a user who changed the weights on purpose), checks
that the weights' shapes fit the architecture before allocating it, and that the attack
named in ``model.json`` is the one in ``attack.json``.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StrictStr, ValidationError)
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import UserError
from .models import HF_PREFIXES, TrojanModel, create_model
from .resultdir import Result, incomplete, read_bounded, read_result, regular_file, write_bytes, write_json, \
    write_result, writing
from .utils import library_versions

WEIGHTS, SIDECAR, METRICS = "model.safetensors", "model.json", "metrics.json"
FORMAT = "trojanguard-checkpoint/2"          # written inside a sealed result folder
LEGACY_FORMAT = "trojanguard-checkpoint/1"   # before COMPLETE.json: accepted after cross-checks
MAX_WEIGHTS_BYTES = 16 * 2**30
MAX_SIDECAR_BYTES = 64 * 2**20


# ------------------------------------------------------------------------ the sidecar --
def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


Number = Annotated[StrictInt | StrictFloat, AfterValidator(_finite)]
Scalar = StrictStr | StrictBool | Number | None


class ModelArgs(BaseModel):
    """Arguments of ``create_model``, bounded so that a hostile sidecar cannot ask for an
    absurd model (``width: 200000`` = 2.9 TB) before the weights are compared with it.
    Unknown arguments (models added later) must be plain scalars; ``create_model`` checks
    them against the model's signature."""
    model_config = ConfigDict(extra="allow")

    num_classes: StrictInt | None = Field(None, ge=2, le=100_000)
    width: StrictInt | None = Field(None, ge=1, le=1024)
    in_channels: StrictInt | None = Field(None, ge=1, le=64)
    mean: list[Number] | None = Field(None, min_length=1, max_length=64)
    std: list[Annotated[Number, Field(gt=0)]] | None = Field(None, min_length=1, max_length=64)
    max_length: StrictInt | None = Field(None, ge=1, le=65_536)
    pooling: Literal["mean", "cls"] | None = None
    dropout: Number | None = Field(None, ge=0, le=1)

    def model_post_init(self, _):
        for k, v in (self.model_extra or {}).items():
            if not isinstance(v, (str, bool, int, float, type(None))) or (isinstance(v, str) and len(v) > 4096):
                raise ValueError(f"argument {k!r} must be a short scalar")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                raise ValueError(f"argument {k!r} must be finite")
        c = self.in_channels or 3
        for k in ("mean", "std"):
            v = getattr(self, k)
            if v is not None and len(v) != c and self.in_channels is not None:
                raise ValueError(f"{k} has {len(v)} values for {c} input channels")


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(min_length=1, max_length=4096)
    args: ModelArgs = Field(default_factory=ModelArgs)
    hf_source: StrictStr | None = Field(None, max_length=4096)  # where the files in hf/ came from


class DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr | None = Field(None, max_length=200)
    classes: list[StrictStr] | None = Field(None, max_length=100_000)
    train_size: StrictInt | None = Field(None, ge=0)
    defense_size: StrictInt | None = Field(None, ge=0)
    test_size: StrictInt | None = Field(None, ge=0)
    split_seed: StrictInt | None = None
    shape: list[Annotated[StrictInt, Field(ge=1, le=100_000)]] | None = Field(None, min_length=3, max_length=3)


class AttackInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr = Field(min_length=1, max_length=100)
    modality: Literal["image", "text"] = "image"
    config: dict[str, Any]


class StageInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    stage: StrictStr
    seconds: Number = Field(ge=0)
    peak_rss_mb: Number = Field(ge=0)


class Sidecar(BaseModel):
    """``model.json``. Extra keys (train_config, history, purification, guard...) are kept."""
    model_config = ConfigDict(extra="allow")
    format: Literal["trojanguard-checkpoint/1", "trojanguard-checkpoint/2"]
    model: ModelSpec
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")
    dataset: DatasetInfo | None = None
    attack: AttackInfo | None = None
    metrics: dict[str, Any] | None = None
    seed: StrictInt | None = None
    versions: dict[str, StrictStr] | None = None
    stages: list[StageInfo] | None = None


def validate_sidecar(obj: Any, where: str | Path) -> dict[str, Any]:
    """Check a parsed ``model.json``; an error names the file and the field."""
    if not isinstance(obj, dict):
        raise UserError(f"{where} holds a JSON {type(obj).__name__}, not an object; re-save the checkpoint")
    if "model" not in obj or not isinstance(obj.get("model"), dict) or "name" not in obj["model"]:
        raise UserError(f"{where} does not say which model it holds (no 'model.name'); re-save the checkpoint")
    try:
        Sidecar.model_validate(obj)
    except ValidationError as e:
        raise UserError(f"{where}: {field_error(e)}; re-save the checkpoint (or fix that field)") from None
    return obj


def field_error(e: ValidationError) -> str:
    """'field a.b: message' for the first error of a pydantic validation."""
    err = e.errors()[0]
    loc = ".".join(map(str, err["loc"])) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"field {loc} is missing"
    return f"field {loc}: {msg}"


# --------------------------------------------------------------------------- writing --
def _state_dict(model: TrojanModel) -> dict[str, torch.Tensor]:
    # channels_last weights are non-contiguous; safetensors wants plain contiguous tensors.
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, model: TrojanModel, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``model.json``: into the result being written when
    ``path`` is the folder of an open ``write_result``, else as a complete result folder of
    its own (replacing an old result at ``path``). Returns ``path``."""
    path = Path(path)
    if not hasattr(model, "spec"):
        raise ValueError("model was not built by create_model; cannot record how to rebuild it")
    if not writing(path):
        with write_result(path, kind="checkpoint") as tmp:
            save_checkpoint(tmp, model, meta)
        return path
    blob = save(_state_dict(model))
    sidecar = dict(meta or {})
    sidecar.update({"format": FORMAT, "model": _carry_hf_files(model, path),
                    "sha256": hashlib.sha256(blob).hexdigest(), "versions": library_versions()})
    write_bytes(path / WEIGHTS, blob)
    write_json(path / SIDECAR, sidecar)
    return path


# --------------------------------------------------------------------------- reading --
def _folder(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist; give the folder written by "
                        "'trojanguard train --out' or a .safetensors/.pt file")
    return p if p.is_dir() else p.parent


def _open(path: str | Path, verify: bool) -> tuple[Result, dict[str, Any], bytes]:
    """(result, validated sidecar, weights bytes) after every check that needs no model."""
    folder = _folder(path)
    res = read_result(folder, verify)
    if not res.has(SIDECAR):
        raise UserError(f"{folder} has no {SIDECAR}, so it is not a trojanguard checkpoint folder (a scan or "
                        "detection result is not a model); foreign weights go through 'trojanguard scan/repair "
                        "--model FILE --arch NAME'")
    meta = validate_sidecar(res.read_json(SIDECAR, MAX_SIDECAR_BYTES), folder / SIDECAR)
    if res.legacy and meta["format"] != LEGACY_FORMAT:
        raise incomplete(folder, f"{SIDECAR} was written by a run that did not finish (no COMPLETE.json)")
    if not res.has(WEIGHTS):
        if res.legacy:
            raise incomplete(folder, f"{SIDECAR} is there but {WEIGHTS} is missing")
        raise UserError(f"{folder} has no {WEIGHTS}")
    blob = res.read_bytes(WEIGHTS, MAX_WEIGHTS_BYTES)
    if verify and hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise UserError(f"{folder / WEIGHTS} does not match the sha256 in {SIDECAR}: the file was changed, "
                        "truncated or belongs to another run; re-copy the checkpoint (--no-verify if you "
                        "changed the weights on purpose)")
    if res.legacy:
        _check_legacy(res, meta)
    check_attack_agrees(res, meta)
    return res, meta, blob


def read_sidecar(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The validated ``model.json`` of a complete checkpoint (the same checks as loading,
    without building the model)."""
    return _open(path, verify)[1]


def check_attack_agrees(res: Result, meta: dict[str, Any]) -> None:
    """The attack recorded in ``model.json`` is the one in ``attack.json`` (both or neither)."""
    from .attacks.artifact import ARTIFACT_JSON, MAX_ARTIFACT_JSON, validate_artifact
    recorded = meta.get("attack")
    if not res.has(ARTIFACT_JSON):
        # purified checkpoints written before the artifact was copied along name their parent's
        # attack without it: the weights are complete; measure them with --attack <parent folder>
        if recorded and not meta.get("purification"):
            raise incomplete(res.path, f"{SIDECAR} records attack {recorded['name']!r} but there is no {ARTIFACT_JSON}")
        return
    art = res.read_json(ARTIFACT_JSON, MAX_ARTIFACT_JSON)
    validate_artifact(art, res.path / ARTIFACT_JSON)  # a malformed field is named before any comparison
    if not recorded:
        raise incomplete(res.path, f"{SIDECAR} records no attack but there is an {ARTIFACT_JSON} "
                                   f"(attack {art.get('name')!r})")
    for key in ("name", "modality", "config"):
        a, b = recorded.get(key, "image" if key == "modality" else None), art.get(key, "image" if key == "modality" else None)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):  # name the first option that differs
                key = next(f"config.{k}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k))
                a, b = a.get(key[7:]), b.get(key[7:])
            raise incomplete(res.path, f"{SIDECAR} and {ARTIFACT_JSON} describe different attacks "
                                       f"({key}: {_short(a)} vs {_short(b)})")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _check_legacy(res: Result, meta: dict[str, Any]) -> None:
    """A folder from before COMPLETE.json: its files must tell the same story. Old runs
    wrote weights, model.json, the attack, then metrics.json, each renamed on its own; a run
    killed in between left files of two runs side by side (the attack check catches a
    stale attack; metrics.json of the same run repeats the sidecar's numbers)."""
    if "stages" in meta and "history" in meta:  # written by train_victim, which ends with metrics.json
        if not res.has(METRICS):
            raise incomplete(res.path, f"{SIDECAR} comes from a training run but {METRICS} is missing")
        m = res.read_json(METRICS, MAX_SIDECAR_BYTES)
        rec = meta.get("metrics") or {}
        same = isinstance(m, dict) and all(m.get(k) == rec.get(k) for k in ("ca", "seconds", "attack"))
        if not same:
            raise incomplete(res.path, f"{METRICS} and {SIDECAR} come from different runs (their ca/seconds differ)")


HF_FILES = "hf"  # a checkpoint's copy of its Hugging Face directory's config and tokenizer files
HF_FILE_SUFFIXES, HF_FILE_MAX_BYTES = (".json", ".txt", ".model"), 64 * 2**20


def _carry_hf_files(model, path: Path) -> dict:
    """A model built from a Hugging Face directory is rebuilt from its config and tokenizer
    (the weights are ours): copy those small files into ``path/hf`` and record the model as
    ``<prefix>:hf``, so that the checkpoint loads on another machine or after the directory
    moved. ``hf_source`` keeps the directory they first came from (its weights are the
    pre-trained ones fine-mixing needs). Links are not followed, sizes are bounded."""
    spec = model.spec
    name = spec.get("name", "")
    if not name.startswith(HF_PREFIXES):
        return spec
    prefix, _, directory = name.partition(":")
    src = Path(directory)
    if not (src / "config.json").is_file():
        return spec
    (path / HF_FILES).mkdir()
    total = 0
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.is_file() or f.suffix not in HF_FILE_SUFFIXES:
            continue
        total += f.stat().st_size
        if total > HF_FILE_MAX_BYTES:
            raise UserError(f"the Hugging Face files of {src} exceed {HF_FILE_MAX_BYTES // 2**20} MB; "
                            "a config and a tokenizer are far smaller")
        write_bytes(path / HF_FILES / f.name, f.read_bytes())
    return {**spec, "name": f"{prefix}:{HF_FILES}", "hf_source": getattr(model, "hf_source", None) or str(src)}


def _hf_name_in(name: str, res: Result) -> str:
    """``<prefix>:hf`` of a checkpoint -> the absolute path of its copy, after checking that
    every file there is a plain file the result's manifest lists (and, verifying, whose sha256
    it matches): the files are read by transformers, so a stranger's checkpoint may not add
    or swap one, nor link to a file elsewhere. Other names (older checkpoints name the
    original directory) are used as they are."""
    prefix, _, directory = name.partition(":")
    if not name.startswith(HF_PREFIXES) or directory != HF_FILES:
        return name
    folder = res.path / HF_FILES
    if res.legacy or folder.is_symlink() or not folder.is_dir():
        raise UserError(f"{res.path}: the model names its Hugging Face files ({HF_FILES}/) but the folder holds "
                        "none in a sealed result; re-save the checkpoint")
    for f in sorted(folder.iterdir()):
        rel = f"{HF_FILES}/{f.name}"
        if f.is_symlink() or not f.is_file():
            raise UserError(f"{f} is not a plain file; a checkpoint's {HF_FILES}/ holds copied files only")
        res.has(rel)  # a file the manifest does not list: one line
        res.read_bytes(rel, HF_FILE_MAX_BYTES)  # size and sha256 against the manifest (when verifying)
    return f"{prefix}:{folder.resolve()}"


def _is_hf(name: str) -> bool:
    """Models built from a Hugging Face config (``from_config``; weights follow)."""
    return name == "minilm" or name.startswith(HF_PREFIXES)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[TrojanModel, dict[str, Any]]:
    """Rebuild the model from the sidecar and load its weights; returns (model, sidecar)."""
    res, meta, blob = _open(path, verify)
    wfile = res.path / WEIGHTS
    try:
        state = load(blob)
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{wfile} is not a valid safetensors file ({e}); re-copy the checkpoint") from None
    del blob
    spec = meta["model"]
    name, args = _hf_name_in(spec["name"], res), dict(spec.get("args") or {})
    where = f"{res.path / SIDECAR}: model {name}"
    try:
        if not _is_hf(name):
            # the architecture on the meta device costs nothing: compare shapes before allocating
            with torch.device("meta"):
                skeleton = create_model(name, **args)
            _check_fit({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, state, str(wfile), spec)
            del skeleton
            model = create_model(name, **args)
        else:
            model = create_model(name, pretrained=False, **args)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{where} {args} cannot be built ({str(e).splitlines()[0][:160]}); "
                        "re-save the checkpoint") from None
    _load_state(model, state, str(wfile))
    _check_finite(state, str(wfile))
    if spec.get("hf_source"):
        model.hf_source = spec["hf_source"]  # kept through later saves (fine-mixing's default base)
    model.to(device).eval()
    if model.modality == "image":  # the layout it was trained and evaluated in: same kernels, same bits
        model.to(memory_format=torch.channels_last)
    return model, meta


def _check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and torch.isnan(v).any():
            raise UserError(f"{where} holds NaN weights ({k}): the training diverged; "
                            "train again with a lower --lr")


def _check_fit(own: dict[str, tuple], state: dict[str, torch.Tensor], where: str, spec: dict,
               hint: str = "pass the --model/--width/--num-classes it was trained with") -> None:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != own[k]]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                          f"model {own[k]})")
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserError(f"weights in {where} do not fit {spec['name']} {spec.get('args', {})}: "
                        f"{'; '.join(detail)}; {hint}")


def _load_state(model: TrojanModel, state: dict[str, torch.Tensor], where: str) -> None:
    _check_fit({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, where, model.spec)
    model.load_state_dict(state)


def load_foreign_weights(path: str | Path, model: TrojanModel) -> TrojanModel:
    """Load weights from a file someone else made into ``model``.

    ``.safetensors`` is read directly; ``.pt``/``.pth``/``.bin`` only through
    ``torch.load(weights_only=True)``, which refuses any file that needs code to unpickle.
    A dict with a 'state_dict' or 'model' entry is unwrapped; a 'module.' prefix
    (DataParallel) is stripped. A module's own state_dict loads into its ``wrap()``."""
    from .models.adapter import WrappedModel
    p = Path(path)
    state = read_weights_file(p)
    if isinstance(model, WrappedModel):
        own = set(model.state_dict())
        if not own & set(state) and own & {f"net.{k}" for k in state}:
            state = {f"net.{k}": v for k, v in state.items()}  # the wrapped module's own keys
    _load_state(model, state, str(p))
    if model.modality == "image":
        model.to(memory_format=torch.channels_last)
    return model.eval()


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in a ``.safetensors`` file or (``weights_only``) ``.pt`` file, unwrapped
    and without a DataParallel 'module.' prefix; a file needing code to unpickle is refused."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"weights file {str(p)!r} does not exist")
    regular_file(p, MAX_WEIGHTS_BYTES, "weights file")
    if p.suffix == ".safetensors":
        try:
            state = load(read_bounded(p, MAX_WEIGHTS_BYTES, "weights file"))
        except (SafetensorError, ValueError) as e:
            raise UserError(f"{p} is not a valid safetensors file ({e})") from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            msg = str(e)
            if "GLOBAL" in msg or "Unsupported global" in msg:
                what = re.search(r"GLOBAL (\S+)", msg)
                raise UserError(f"refused to load {p}: unpickling it would run code ({what.group(1) if what else 'a global'}"
                                "), which could do anything; ask for a plain state_dict "
                                "(torch.save(model.state_dict())) or a .safetensors file") from None
            detail = msg.split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:120] if msg else ""
            raise UserError(f"cannot read {p}: not a valid PyTorch weights file ({detail}); re-copy it, or ask for "
                            "a plain state_dict (torch.save(model.state_dict())) or a .safetensors file") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"cannot read {p} as a PyTorch file ({str(e).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{p} does not hold a state_dict of tensors; save model.state_dict()")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}

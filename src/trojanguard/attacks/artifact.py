"""The attack artifact (``attack.json`` + ``attack.safetensors`` next to the checkpoint):
the configuration, the poisoned training indices (numbered as in the original training
split), the target mapping and any trigger tensors; ``load_attack(folder)`` gives back an
attack whose ``trigger`` is identical to the one used in training, every stored field
checked (the writer is ``Attack.save`` in ``base.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load

from ..errors import UserError
from ..resultdir import incomplete, read_result

if TYPE_CHECKING:
    from .base import Attack

ARTIFACT_JSON, ARTIFACT_TENSORS = "attack.json", "attack.safetensors"
ARTIFACT_FORMAT = "trojanguard-attack/2"          # written inside a sealed result folder
LEGACY_ARTIFACT_FORMAT = "trojanguard-attack/1"   # before COMPLETE.json
MAX_ARTIFACT_JSON = 256 * 2**20                   # paraphrase tables of text attacks live in it
MAX_ARTIFACT_TENSORS = 2**30

# Attacks whose trigger is stored as tensors: learned (Input-aware's generators, LF's
# perturbation, TrojanNN's pattern) or drawn once (Blended's pattern, WaNet's flow). Without
# them the trigger cannot be rebuilt; building a fresh one would silently measure another
# trigger (issue 12, finding 3). Each entry: tensor names of which one must be present.
STORED_TRIGGER: dict[tuple[str, str], tuple[tuple[str, ...], ...]] = {
    ("image", "blended"): (("pattern",),),
    ("image", "adaptive_blend"): (("pattern",),),
    ("image", "lf"): (("delta",),),
    ("image", "trojannn"): (("pattern",), ("mask",), ("neurons",)),
    ("image", "wanet"): (("flow", "noise_grid"),),
    ("image", "input_aware"): (("G.body.0.weight",), ("M.body.0.weight",)),
}


class ArtifactMeta(BaseModel):
    """``attack.json``; ``config`` is checked by the attack's own config class."""
    model_config = ConfigDict(extra="allow")
    format: StrictStr | None = None
    name: StrictStr = Field(min_length=1, max_length=100)
    modality: Literal["image", "text"] = "image"
    config: dict[str, Any]
    num_classes: StrictInt | None = Field(None, ge=2, le=100_000)
    extra: dict[str, Any] | None = None
    poisoned_count: StrictInt | None = Field(None, ge=0)


def validate_artifact(meta: Any, where: Path) -> ArtifactMeta:
    """Check a parsed ``attack.json`` (not its config, which the attack's class checks)."""
    from ..checkpoint import field_error
    if not isinstance(meta, dict) or "name" not in meta or "config" not in meta:
        raise UserError(f"{where} is not an attack artifact (no 'name'/'config'); re-create it")
    try:
        return ArtifactMeta.model_validate(meta)
    except ValidationError as e:
        raise UserError(f"{where}: {field_error(e)}; re-create the artifact (or fix that field)") from None


def load_attack(folder: str | Path, verify: bool = True) -> Attack:
    """Rebuild an attack (trigger, targets, poisoned indices) from its artifact in a
    complete result folder, every stored field checked; ``verify=False`` skips the sha256
    checks of the manifest only."""
    from ..checkpoint import check_attack_agrees, field_error
    from . import attack_class
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    res = read_result(folder, verify)
    where, twhere = folder / ARTIFACT_JSON, folder / ARTIFACT_TENSORS
    if not res.has(ARTIFACT_JSON):
        raise UserError(f"{folder} has no {ARTIFACT_JSON}; give the folder written by 'trojanguard attack'")
    art = validate_artifact(res.read_json(ARTIFACT_JSON, MAX_ARTIFACT_JSON), where)
    if res.legacy and art.format not in (None, LEGACY_ARTIFACT_FORMAT):
        raise incomplete(folder, f"{ARTIFACT_JSON} was written by a run that did not finish (no COMPLETE.json)")
    try:
        cls = attack_class(art.name, art.modality)
    except UserError as e:
        raise UserError(f"{where}: field name: {e}") from None
    try:
        cfg = cls.Config.model_validate(art.config)
    except ValidationError as e:
        raise UserError(f"{where}: {field_error(e).replace('field ', 'field config.', 1)}; "
                        "re-create the artifact (or fix that field)") from None
    attack = cls(cfg)
    attack.source = str(where)
    extra = art.extra or {}
    if hasattr(attack, "table"):  # paraphrase attacks: the table is their stored trigger
        table = extra.get("table")
        if not isinstance(table, dict) or not table or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            raise UserError(f"{where}: field extra.table: the {art.name} paraphrase table is missing or not "
                            "a string-to-string map; without it the trigger cannot be rebuilt: re-create the artifact")
    attack.load_extra(extra)
    attack.num_classes = art.num_classes
    tensors: dict[str, torch.Tensor] = {}
    if res.has(ARTIFACT_TENSORS):
        try:
            tensors = load(res.read_bytes(ARTIFACT_TENSORS, MAX_ARTIFACT_TENSORS))
        except (SafetensorError, ValueError) as e:
            raise UserError(f"{twhere} is unreadable ({e}); re-copy the artifact") from None
    tensors.pop("_", None)
    idx = tensors.pop("poisoned_indices", None)
    if idx is not None:
        if idx.ndim != 1 or idx.dtype != torch.int64 or (len(idx) and int(idx.min()) < 0):
            raise UserError(f"{twhere}: poisoned_indices must be a 1-D list of non-negative int64 indices")
        attack.poisoned_indices = idx
    _check_stored_trigger(attack, tensors, twhere)
    try:
        attack.load_tensors(tensors)
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError) as e:
        raise UserError(f"{twhere}: the stored trigger does not fit attack {art.name} "
                        f"({str(e).splitlines()[0][:160]}); re-create the artifact") from None
    attack.check_fits(None, art.num_classes)  # values that need no data: the target, text insertions
    if res.has("model.json"):
        side = res.read_json("model.json")
        if isinstance(side, dict):
            check_attack_agrees(res, side)
    return attack


def _check_stored_trigger(attack: Attack, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Required trigger tensors are there, finite, and of the shapes the config implies."""
    need = STORED_TRIGGER.get((attack.modality, attack.name), ())
    missing = [" or ".join(alts) for alts in need if not any(a in tensors for a in alts)]
    if missing:
        raise UserError(f"{where}: the {attack.name} trigger is stored as tensors and {', '.join(missing)} "
                        f"is missing{'' if where.exists() else ' (the file is missing)'}; without it the "
                        "trigger cannot be rebuilt: re-copy or re-create the artifact")
    cfg = attack.cfg

    def bad(key, problem):
        return UserError(f"{where}: tensor {key} {problem}; re-create the artifact")

    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise bad(k, "holds NaN or infinite values")
    for k in ("pattern", "delta", "mask"):
        v = tensors.get(k)
        if v is not None and (v.ndim != 3 or not v.is_floating_point() or v.shape[0] > 64 or min(v.shape) < 1):
            raise bad(k, f"has shape {list(v.shape)} ({v.dtype}); expected a float image C x H x W")
    if "mask" in tensors and "pattern" in tensors and (
            tensors["mask"].shape[0] != 1 or tensors["mask"].shape[1:] != tensors["pattern"].shape[1:]):
        raise bad("mask", f"has shape {list(tensors['mask'].shape)}, the pattern {list(tensors['pattern'].shape)}")
    if "neurons" in tensors:
        v = tensors["neurons"]
        if v.ndim != 1 or v.is_floating_point() or len(v) != getattr(cfg, "num_neurons", len(v)):
            raise bad("neurons", f"has shape {list(v.shape)} ({v.dtype}); expected {getattr(cfg, 'num_neurons', '?')} indices")
    if "flow" in tensors and tuple(tensors["flow"].shape) != (1, 2, cfg.k, cfg.k):
        raise bad("flow", f"has shape {list(tensors['flow'].shape)}; config k={cfg.k} needs [1, 2, {cfg.k}, {cfg.k}]")
    if "noise_grid" in tensors and (tensors["noise_grid"].ndim != 4 or tensors["noise_grid"].shape[-1] != 2):
        raise bad("noise_grid", f"has shape {list(tensors['noise_grid'].shape)}; expected [1, H, W, 2]")
    g = tensors.get("G.body.0.weight")
    if g is not None and (g.ndim != 4 or g.shape[0] != getattr(cfg, "width", g.shape[0]) or not 1 <= g.shape[1] <= 64):
        raise bad("G.body.0.weight", f"has shape {list(g.shape)}; config width={getattr(cfg, 'width', '?')} "
                  "needs [width, channels, 3, 3]")

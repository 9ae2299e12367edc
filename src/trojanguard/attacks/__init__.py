"""Backdoor attacks by name: ``create_attack("badnets", ratio=0.1)``.

One name can have an image and a text variant (``badnets``); ``modality`` picks it
(default: image, or the only variant there is)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..registry import Registry
from .adaptive_blend import AdaptiveBlend
from .badnets import BadNets
from .artifact import ARTIFACT_JSON, load_attack
from .base import Attack, AttackConfig, PoisonResult
from .blended import Blended
from .bpp import BPP
from .input_aware import InputAware
from .lc import LabelConsistent
from .lf import LowFrequency
from .sig import SIG
from .text import AddSent, StyleBkd, SynBkd, TextBadNets
from .trojannn import TrojanNN
from .wanet import WaNet

IMAGE_ATTACKS = (BadNets, Blended, SIG, WaNet, InputAware, LabelConsistent, TrojanNN, LowFrequency, BPP,
                 AdaptiveBlend)
TEXT_ATTACKS = (TextBadNets, AddSent, SynBkd, StyleBkd)

ATTACKS: Registry = Registry("attack")
_VARIANTS: dict[str, dict[str, type[Attack]]] = {}
for _cls in IMAGE_ATTACKS + TEXT_ATTACKS:
    _VARIANTS.setdefault(_cls.name, {})[_cls.modality] = _cls
for _name, _by_mod in _VARIANTS.items():
    _doc = "; ".join(f"{m}: {((c.__doc__ or c.name).strip().splitlines() or [c.name])[0].rstrip('.')}" for m, c in _by_mod.items())
    ATTACKS.register(_name, _doc)(lambda modality=None, _n=_name, **kw: attack_class(_n, modality)(**kw))


def attack_class(name: str, modality: str | None = None) -> type[Attack]:
    ATTACKS.get(name)  # unknown names: a clear error with suggestions
    variants = _VARIANTS[name.lower()]
    if modality is None:
        modality = "image" if "image" in variants else next(iter(variants))
    if modality not in variants:
        raise UserError(f"attack {name!r} has no {modality} variant (it has: {', '.join(variants)})")
    return variants[modality]


def attack_variants(name: str) -> dict[str, type[Attack]]:
    """The modality variants of an attack name, e.g. ``{"image": BadNets, "text": TextBadNets}``."""
    ATTACKS.get(name)
    return dict(_VARIANTS[name.lower()])


def create_attack(name: str, modality: str | None = None, **kwargs) -> Attack:
    return attack_class(name, modality)(**kwargs)


def attack_for_checkpoint(path, verify: bool = True) -> Attack | None:
    """The attack artifact stored next to a checkpoint, if there is one."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    return load_attack(folder, verify) if (folder / ARTIFACT_JSON).exists() else None


__all__ = ["ATTACKS", "IMAGE_ATTACKS", "TEXT_ATTACKS", "Attack", "AttackConfig", "PoisonResult", "attack_class", "attack_variants", "create_attack",
           "load_attack", "attack_for_checkpoint"]

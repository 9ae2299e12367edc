"""Backdoor attacks by name: ``create_attack("badnets", ratio=0.1, target=0)``."""
from __future__ import annotations

from pathlib import Path

from ..registry import Registry
from .base import ARTIFACT_JSON, Attack, AttackConfig, PoisonResult, load_attack
from .badnets import BadNets

ATTACKS: Registry = Registry("attack")
for _cls in (BadNets,):
    ATTACKS.register(_cls.name, (_cls.__doc__ or "").strip().split("\n")[0])(_cls)


def create_attack(name: str, **kwargs) -> Attack:
    return ATTACKS.get(name)(**kwargs)


def attack_for_checkpoint(path) -> Attack | None:
    """The attack artifact stored next to a checkpoint, if there is one."""
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    return load_attack(folder) if (folder / ARTIFACT_JSON).exists() else None


__all__ = ["ATTACKS", "Attack", "AttackConfig", "PoisonResult", "create_attack", "load_attack",
           "attack_for_checkpoint"]

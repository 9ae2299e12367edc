"""Defenses by name: ``create_defense("fst")``."""
from __future__ import annotations

from functools import partial

from ..registry import Registry
from .base import Defense, DefenseConfig, InputDetector, Inspection, Inspector, Purifier, PurifyResult
from .finetune import Finetune, FinetuneConfig

DEFENSES: Registry = Registry("defense")
DEFENSES.register("fst", "Feature Shift Tuning (Min et al. 2023)")(partial(Finetune, mode="fst"))
DEFENSES.register("ft", "vanilla fine-tuning of all parameters")(partial(Finetune, mode="ft"))
DEFENSES.register("lp", "linear probing: re-train the head only")(partial(Finetune, mode="lp"))
DEFENSES.register("fe-tuning", "re-initialised frozen head, tune the backbone")(partial(Finetune, mode="fe-tuning"))
DEFENSES.register("ft-init", "re-initialised head, tune all, no penalty")(partial(Finetune, mode="ft-init"))


def create_defense(name: str, **kwargs) -> Defense:
    return DEFENSES.get(name)(**kwargs)


__all__ = ["DEFENSES", "create_defense", "Defense", "DefenseConfig", "Purifier", "InputDetector",
           "Inspector", "PurifyResult", "Inspection", "Finetune", "FinetuneConfig"]

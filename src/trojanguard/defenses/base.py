"""Defense interfaces (TrojanZoo style): one small abstract class per kind of defense.

* ``Purifier``  - repairs a model: ``purify(model, clean) -> PurifyResult``
* ``InputDetector`` - flags inputs at inference time: ``fit(model, clean)`` then
  ``score(x)`` (higher = more suspicious) and ``flag(x)``
* ``Inspector`` - inspects a model: ``inspect(model, clean) -> Inspection``
  (is it backdoored, which label is the target)

Each method is a file behind one of these, created by name from ``DEFENSES``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from ..data.base import Data
from ..errors import UserError, validated_config


class DefenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    device: str = "auto"
    progress: bool = True


@dataclass
class PurifyResult:
    model: torch.nn.Module
    info: dict = field(default_factory=dict)


@dataclass
class Inspection:
    backdoored: bool
    target: int | None
    score: float
    info: dict = field(default_factory=dict)


class Defense:
    name: ClassVar[str] = ""
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig

    def __init__(self, cfg: DefenseConfig | None = None, **kwargs):
        if cfg is None:
            cfg = validated_config(self.Config, "defense", self.name, kwargs)
        self.cfg = cfg


class Purifier(Defense):
    def purify(self, model, clean: Data) -> PurifyResult:  # pragma: no cover - abstract
        raise NotImplementedError


class InputDetector(Defense):
    threshold: float | None = None

    def fit(self, model, clean: Data) -> "InputDetector":  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, inputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def flag(self, inputs) -> torch.Tensor:
        if self.threshold is None:
            raise RuntimeError("call fit() before flag()")
        return self.score(inputs) >= self.threshold


class Inspector(Defense):
    def inspect(self, model, clean: Data) -> Inspection:  # pragma: no cover - abstract
        raise NotImplementedError

"""The attack interface and the attack artifact.

An attack takes the attacker's training set and returns a poisoned copy; its
``trigger(x, y)`` stamps the trigger on any batch of test inputs (float images in [0, 1]
or a list of strings). Training-controlled attacks also return a ``training_hook`` that
changes batches inside the training loop.

The **artifact** (``attack.json`` + ``attack.safetensors`` next to the checkpoint) holds
the configuration, the poisoned training indices (numbered as in the original training
split), the target mapping and any trigger tensors; ``load_attack(folder)`` gives back an
attack whose ``trigger`` is identical to the one used in training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ..data.base import Data, ImageData, TextData
from ..errors import UserError, validated_config
from ..utils import atomic_write_bytes, atomic_write_json

ARTIFACT_JSON, ARTIFACT_TENSORS = "attack.json", "attack.safetensors"


class AttackConfig(BaseModel):
    """Options every attack honours (methods.md §0)."""
    model_config = ConfigDict(extra="forbid")

    target: int = Field(0, ge=0, description="target label (all-to-one)")
    mode: Literal["all2one", "all2all"] = "all2one"
    ratio: float = Field(0.1, gt=0, lt=1, description="poisoned fraction of the whole training set")
    count: int | None = Field(None, ge=1, description="absolute number of poisoned samples (overrides ratio)")
    seed: int = 0


class InLoopConfig(AttackConfig):
    """Options of training-controlled attacks, whose trigger is stamped inside the loop."""
    selection: Literal["per-batch", "fixed"] = Field(
        "per-batch", description="stamp a ratio share of every batch (the official codes) or one fixed set")


@dataclass
class PoisonResult:
    data: Data                # the poisoned training set (a copy)
    positions: torch.Tensor   # positions in ``data`` that were poisoned
    indices: torch.Tensor     # the same samples numbered in the original training split

    @property
    def count(self) -> int:
        return len(self.positions)


class Attack:
    """Base class. Subclasses set ``name``, ``Config`` and implement ``apply``."""

    name: ClassVar[str] = ""
    modality: ClassVar[str] = "image"
    clean_label: ClassVar[bool] = False
    #: True when the trigger is applied inside the training loop (WaNet, Input-aware):
    #: poison() then only relabels the chosen samples and training_hook() stamps them.
    trigger_in_loop: ClassVar[bool] = False
    #: True when the trigger is fitted on a clean model first (LC, TrojanNN, LF).
    needs_clean_model: ClassVar[bool] = False
    Config: ClassVar[type[AttackConfig]] = AttackConfig

    def __init__(self, cfg: AttackConfig | None = None, **kwargs):
        if cfg is None:
            cfg = validated_config(self.Config, "attack", self.name, kwargs)
        self.cfg = cfg
        self.num_classes: int | None = None
        self.poisoned_indices: torch.Tensor | None = None

    # --- targets ----------------------------------------------------------------
    def target_for(self, y: torch.Tensor) -> torch.Tensor:
        """Target label per input: the constant target (all-to-one) or (y + 1) mod K."""
        y = torch.as_tensor(y)
        if self.cfg.mode == "all2all":
            if self.num_classes is None:
                raise RuntimeError("all-to-all attack used before poison() set num_classes")
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.cfg.target)

    # --- poisoning ----------------------------------------------------------------
    def eligible(self, data: Data) -> torch.Tensor:
        """Positions that may be poisoned: the target class for clean-label attacks,
        non-target classes for dirty-label all-to-one, everything for all-to-all."""
        if self.clean_label:
            return (data.y == self.cfg.target).nonzero().flatten()
        if self.cfg.mode == "all2all":
            return torch.arange(len(data))
        return (data.y != self.cfg.target).nonzero().flatten()

    def count_for(self, n_train: int) -> int:
        return self.cfg.count if self.cfg.count is not None else round(self.cfg.ratio * n_train)

    def select(self, data: Data) -> torch.Tensor:
        """Seeded choice of ``round(ratio * N)`` victims among the eligible positions."""
        pool = self.eligible(data)
        k = self.count_for(len(data))
        if k == 0:
            raise UserError(f"ratio {self.cfg.ratio} of {len(data)} samples poisons nothing; raise --ratio")
        if k > len(pool):
            share = len(pool) / len(data)
            what = ("clean-label attacks poison only target-class samples, so the ratio is capped at "
                    f"the target class share {share:.4f}" if self.clean_label else
                    f"only {len(pool)} samples are eligible (share {share:.4f})")
            asked = f"count {k}" if self.cfg.count else f"ratio {self.cfg.ratio} asks for {k} poisoned samples but"
            raise UserError(f"attack {self.name}: {asked} {what}; use --ratio <= {share:.4f} "
                            f"(or --count <= {len(pool)})")
        g = torch.Generator().manual_seed(self.cfg.seed)
        return pool[torch.randperm(len(pool), generator=g)[:k]].sort().values

    def check_data(self, data: Data) -> None:
        if data.modality != self.modality:
            raise UserError(f"attack {self.name} is for {self.modality} data, the dataset is {data.modality}")
        if self.clean_label and self.cfg.mode == "all2all":
            raise UserError(f"attack {self.name} is clean-label (it keeps labels), so all-to-all targets "
                            "have no meaning; drop --all-to-all")
        if not 0 <= self.cfg.target < len(data.classes):
            raise UserError(f"target {self.cfg.target} is not a class of this dataset (0..{len(data.classes) - 1})")

    def prepare(self, data: Data) -> None:
        """Fit whatever the trigger needs from the data (patterns sized to the images...)."""

    @property
    def per_batch(self) -> bool:
        """True when the trigger goes on a fresh ``ratio`` share of every training batch
        (training-controlled attacks with ``selection="per-batch"``): there is then no
        fixed poisoned set, and ``poison()`` only reports how many samples one epoch stamps."""
        return getattr(self.cfg, "selection", "fixed") == "per-batch"

    def poison(self, data: Data) -> PoisonResult:
        """Return a poisoned copy of ``data``: triggered victims, relabelled to their
        target for dirty-label attacks, kept at their label for clean-label ones.
        Per-batch attacks get the data back unchanged (their hook relabels in the loop)."""
        self.check_data(data)
        self.num_classes = len(data.classes)
        self.prepare(data)
        pos = self.select(data)
        relabel = not self.clean_label and not self.per_batch
        if isinstance(data, ImageData):
            x = data.x.clone()
            if not self.trigger_in_loop:
                x[pos] = to_uint8(self.trigger(data.x[pos].float() / 255, data.y[pos]))
            y = data.y.clone()
            if relabel:
                y[pos] = self.target_for(data.y[pos])
            out: Data = ImageData(x, y, data.classes, data.index.clone())
        else:
            texts = list(data.texts)
            new = self.trigger([data.texts[i] for i in pos.tolist()], data.y[pos])
            for i, t in zip(pos.tolist(), new):
                texts[i] = t
            y = data.y.clone()
            if relabel:
                y[pos] = self.target_for(data.y[pos])
            out = TextData(texts, y, data.classes, data.index.clone())
        self.poison_fraction = len(pos) / len(data)  # what --ratio or --count amounted to
        if self.per_batch:
            self.poisoned_indices = torch.empty(0, dtype=torch.long)  # no fixed poisoned set
            self.poison_mask = None
            self.per_epoch_count = len(pos)
        else:
            self.poisoned_indices = data.index[pos].clone()
            self.poison_mask = torch.zeros(len(data), dtype=torch.bool)
            self.poison_mask[pos] = True
        return PoisonResult(out, pos, self.poisoned_indices)

    def batch_victims(self, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator):
        """For a training hook: which samples of the batch carry the trigger, and the batch
        labels. Fixed selection: the members of the poisoned set (``poison()`` already
        relabelled them). Per-batch: a fresh ``poison_fraction`` share of the batch, rounded
        stochastically so that the mean per epoch is exact, relabelled here (as the official
        WaNet, Input-aware and BPP training loops do)."""
        if self.poison_mask is not None:
            return self.poison_mask[idx].to(y.device), y
        want = self.poison_fraction * len(y)
        n = int(want) + int(torch.rand((), generator=gen) < want - int(want))
        m = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        m[torch.randperm(len(y), generator=gen)[:n].to(y.device)] = True
        if n:
            y = y.clone()
            y[m] = self.target_for(y[m].cpu()).to(y.device)
        return m, y

    def fit(self, clean_model, data: Data) -> None:
        """Attacks with ``needs_clean_model`` optimise their trigger on a clean model here."""

    def training_hook(self):
        """For training-controlled attacks: a ``(x, y, step) -> (x, y)`` batch hook."""
        return None

    # --- the trigger ------------------------------------------------------------------
    def apply(self, x, y: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def trigger(self, x, y: torch.Tensor | None = None):
        """Stamp the trigger. Images are quantised to the 8-bit grid, so a trigger applied
        at test time equals the one stored in the uint8 poisoned training set."""
        if y is None:
            y = torch.zeros(len(x), dtype=torch.long)
        out = self.apply(x, y)
        if isinstance(out, torch.Tensor):
            out = out.clamp(0, 1).mul(255).round().div(255)
        return out

    # --- artifact ---------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Trigger tensors to save (patterns, masks, generator weights)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def extra(self) -> dict:
        """JSON-able trigger state that is not a tensor (e.g. paraphrase tables)."""
        return {}

    def load_extra(self, extra: dict) -> None:
        pass

    def describe(self) -> dict:
        d = {"name": self.name, "modality": self.modality, "clean_label": self.clean_label,
             "config": self.cfg.model_dump(), "num_classes": self.num_classes,
             "target_mapping": ("all-to-all: (y + 1) mod K" if self.cfg.mode == "all2all"
                                else f"all-to-one: {self.cfg.target}"),
             "poisoned_count": None if self.poisoned_indices is None else len(self.poisoned_indices)}
        if self.per_batch and getattr(self, "per_epoch_count", None) is not None:
            d["poisoned_count"] = self.per_epoch_count
            d["poisoned_count_is"] = "stamped and relabelled per epoch (per-batch selection, no fixed set)"
        return d

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        if self.poisoned_indices is not None:
            tensors["poisoned_indices"] = self.poisoned_indices.to(torch.int64).contiguous()
        atomic_write_bytes(folder / ARTIFACT_TENSORS, save(tensors) if tensors else save({"_": torch.zeros(0)}))
        atomic_write_json(folder / ARTIFACT_JSON, {"format": "trojanguard-attack/1", **self.describe(),
                                                   "extra": self.extra()})


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def load_attack(folder: str | Path) -> Attack:
    """Rebuild an attack (trigger, targets, poisoned indices) from its artifact."""
    from . import attack_class
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    try:
        meta = json.loads((folder / ARTIFACT_JSON).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} has no {ARTIFACT_JSON}; give the folder written by 'trojanguard attack'") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / ARTIFACT_JSON} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "name" not in meta or "config" not in meta:
        raise UserError(f"{folder / ARTIFACT_JSON} is not an attack artifact (no 'name'/'config'); re-create it")
    cls = attack_class(meta["name"], meta.get("modality", "image"))
    attack = cls(validated_config(cls.Config, "attack artifact", meta["name"], meta["config"]))
    attack.load_extra(meta.get("extra") or {})
    attack.num_classes = meta.get("num_classes")
    try:
        tensors = load_file(str(folder / ARTIFACT_TENSORS)) if (folder / ARTIFACT_TENSORS).exists() else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{folder / ARTIFACT_TENSORS} is unreadable ({e}); re-copy the artifact") from None
    tensors.pop("_", None)
    if "poisoned_indices" in tensors:
        attack.poisoned_indices = tensors.pop("poisoned_indices")
    attack.load_tensors(tensors)
    return attack

"""The attack interface (the artifact's reader: ``artifact.py``).

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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save

from ..data.base import Data, ImageData, TextData
from ..errors import UserError, validated_config
from ..resultdir import write_bytes, write_json, write_result, writing
from .artifact import ARTIFACT_FORMAT, ARTIFACT_JSON, ARTIFACT_TENSORS

MAX_TEXT_INSERTIONS = 1000


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
        self.check_fits(data.shape if isinstance(data, ImageData) else None, len(data.classes))

    #: where the attack was loaded from (``attack.json``), for errors about stored values
    source: str | None = None

    def check_fits(self, shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> None:
        """Refuse values that do not fit images of ``shape`` (C, H, W) or ``num_classes``
        classes: a patch larger than the image, a stored pattern of another size, a target
        that is not a class. Called before poisoning and on the first trigger of each shape."""
        cfg = self.cfg
        if self.source:
            def bad(field, problem, fix=None):
                return UserError(f"{self.source}: field {field}: {problem}; "
                                 f"{fix or 'use the artifact with the dataset it was made for'}")
        else:
            def bad(field, problem, fix=None):
                opt = field.removeprefix("config.")
                return UserError(f"attack {self.name}: {problem}; "
                                 f"{fix or f'choose another --set {opt}=...'}")
        if num_classes is not None:
            if cfg.mode == "all2one" and not 0 <= cfg.target < num_classes:
                raise bad("config.target", f"{cfg.target} is not a class of the data (0..{num_classes - 1})")
            if self.source and self.num_classes is not None and self.num_classes != num_classes:
                raise bad("num_classes", f"the artifact was made for {self.num_classes} classes, the data has "
                          f"{num_classes}")
        if self.modality == "text":
            n = getattr(cfg, "num_insertions", 1)
            if n > MAX_TEXT_INSERTIONS:
                raise bad("config.num_insertions", f"{n} insertions per sentence is more than {MAX_TEXT_INSERTIONS}")
            return
        if shape is None:
            return
        c, h, w = shape
        side = min(h, w)
        if getattr(cfg, "patch_size", 0) > side:
            raise bad("config.patch_size", f"a {cfg.patch_size}-pixel patch does not fit {h}x{w} images",
                      None if self.source else f"use --set patch_size=N with N <= {side}")
        if self.name == "adaptive_blend" and math.isqrt(cfg.pieces) > side:
            raise bad("config.pieces", f"{cfg.pieces} pieces do not fit {h}x{w} images")
        if self.name == "wanet" and cfg.k > side:
            raise bad("config.k", f"a {cfg.k}x{cfg.k} warping grid does not fit {h}x{w} images",
                      None if self.source else f"use --set k=N with N <= {side}")
        for attr, want in (("pattern", (c, h, w)), ("delta", (c, h, w)), ("mask", (1, h, w))):
            t = getattr(self, attr, None)  # Input-aware's pattern/mask are methods: skipped
            if isinstance(t, torch.Tensor) and tuple(t.shape) != want:
                raise UserError(f"{Path(self.source).with_name(ARTIFACT_TENSORS) if self.source else self.name}: "
                                f"the stored {attr} is {list(t.shape)}, the images are {[c, h, w]}; "
                                "use the artifact with the dataset it was made for")
        gen = getattr(self, "G", None)
        if isinstance(gen, torch.nn.Module) and gen.body[0].in_channels != c:
            raise UserError(f"{Path(self.source).with_name(ARTIFACT_TENSORS) if self.source else self.name}: "
                            f"the trigger generator takes {gen.body[0].in_channels}-channel images, the data "
                            f"has {c}; use the artifact with the dataset it was made for")

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
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            checked = self.__dict__.setdefault("_fits", set())
            if tuple(x.shape[1:]) not in checked:  # before any work on a patch or pattern that cannot fit
                self.check_fits(tuple(x.shape[1:]))
                checked.add(tuple(x.shape[1:]))
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
        """Write ``attack.json`` + ``attack.safetensors``: into the result being written when
        ``folder`` is the folder of an open ``write_result`` (next to a checkpoint), else as
        a complete result folder of its own."""
        folder = Path(folder)
        if not writing(folder):
            if (folder / "model.json").exists():
                raise ValueError(f"{folder} holds a checkpoint; saving the attack alone would replace it. "
                                 "Write both into one result: with write_result(folder) as tmp: "
                                 "save_checkpoint(tmp, ...); attack.save(tmp)")
            with write_result(folder, kind="attack") as tmp:
                self.save(tmp)
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
        if self.poisoned_indices is not None:
            tensors["poisoned_indices"] = self.poisoned_indices.to(torch.int64).contiguous()
        write_bytes(folder / ARTIFACT_TENSORS, save(tensors) if tensors else save({"_": torch.zeros(0)}))
        write_json(folder / ARTIFACT_JSON, {"format": ARTIFACT_FORMAT, **self.describe(), "extra": self.extra()})


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


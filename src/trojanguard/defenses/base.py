"""Defense interfaces (TrojanZoo style): one small abstract class per kind of defense.

* ``Purifier`` - repairs a model: ``purify(model, clean) -> PurifyResult``. The template
  keeps a class-balanced part of ``clean`` aside, lets the method train on the rest
  (``_purify``), and measures clean accuracy on the part it did not train on before and
  after, so a collapse is reported in the result instead of passing silently.
* ``InputDetector`` - flags inputs at inference time: ``fit(model, clean)`` (the method's
  ``_fit`` on one part, the threshold at the chosen false-rejection rate on the held-out
  rest), then ``score(x)`` (higher = more suspicious, continuous) and ``flag(x)``.
  Detectors that also purify expose ``purified_logits(x)``.
* ``Inspector`` - inspects a model: ``inspect(model, clean) -> Inspection`` (verdict,
  backdoor probability, target, evidence, recovered trigger).

Each method is one file behind one of these, created by name from ``DEFENSES``.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..data.base import Data
from ..errors import UserError, validated_config


class DefenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    device: str = "auto"
    progress: bool = True


class PurifierConfig(DefenseConfig):
    verify_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "class-balanced share of the clean data kept aside (not trained on) to measure clean "
        "accuracy before and after; 0 = train on everything and skip the check"))
    max_ca_drop: float = Field(0.03, ge=0, le=1, description=(
        "a drop of clean accuracy on the verification part above this is reported as a failure"))


@dataclass
class PurifyResult:
    """The purified model plus what was measured while making it.

    ``ca_before``/``ca_after`` are clean accuracies on ``verify_size`` clean samples the
    method did not train on (None when ``verify_fraction`` is 0); ``warning`` is set when
    the drop exceeds the configured maximum: the caller must not present the model as
    repaired then. ``method``, ``options`` (the validated config, seed included) and
    ``threads`` make the summary reproducible on its own."""
    model: torch.nn.Module
    info: dict = field(default_factory=dict)
    ca_before: float | None = None
    ca_after: float | None = None
    verify_size: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    warning: str | None = None
    drop_bound: float | None = None  # paired one-sided 95 % upper bound of the verification CA drop
    method: str = ""
    options: dict = field(default_factory=dict)
    threads: int = 0

    @property
    def ok(self) -> bool:
        return self.warning is None

    @property
    def verify_margin(self) -> float | None:
        """Half-width of a 95 % interval of the verification accuracy (normal approximation):
        on 100 samples a drop of 3 points cannot be told from noise (margin ~ 8 points)."""
        if self.ca_after is None or not self.verify_size:
            return None
        p = min(max(self.ca_after, 0.02), 0.98)
        return 1.96 * (p * (1 - p) / self.verify_size) ** 0.5

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "seed": self.options.get("seed"),
                "threads": self.threads, "verify_ca_before": self.ca_before, "verify_ca_after": self.ca_after,
                "verify_size": self.verify_size, "verify_margin95": self.verify_margin,
                "verify_drop_bound95": self.drop_bound, "seconds": round(self.seconds, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "warning": self.warning, **self.info}


@dataclass
class Inspection:
    """What an inspector concluded about a model.

    ``probability`` is the backdoor probability in [0, 1] (calibrated where the method
    has a calibration, else a documented monotone score); ``target`` is None when no
    single target class stands out (clean, or an all-to-all attack); ``evidence`` holds
    the numbers a person can check (class shares, anomaly indices); ``trigger`` the
    recovered trigger (``{"mask": tensor, "pattern": tensor}`` or ``{"tokens": [...]}``)."""
    backdoored: bool
    target: int | None
    probability: float
    evidence: dict = field(default_factory=dict)
    trigger: dict | None = None
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        return "backdoored" if self.backdoored else "clean"

    # kept for code written against the first interface
    @property
    def score(self) -> float:
        return self.probability


class Defense:
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Config: ClassVar[type[DefenseConfig]] = DefenseConfig
    #: the fewest clean samples the method can work with (checked before any work)
    min_clean: ClassVar[int] = 10
    #: "image", "text" or both
    modalities: ClassVar[tuple[str, ...]] = ("image", "text")

    def __init__(self, cfg: DefenseConfig | None = None, **kwargs):
        if cfg is None:
            cfg = validated_config(self.Config, "defense", self.name or type(self).__name__, kwargs)
        self.cfg = cfg

    def check_data_type(self, clean) -> None:
        if not hasattr(clean, "modality") or not hasattr(clean, "batch"):
            raise UserError(f"{self.name or type(self).__name__}: the clean data must be a dataset split (ImageData "
                            f"or TextData, e.g. prepare_data(...).defense), not {type(clean).__name__}")

    def check_inputs(self, model, clean: Data, needed: int | None = None) -> None:
        """One-line errors for data a method cannot use: wrong modality, class count, size."""
        label = self.name or type(self).__name__
        self.check_data_type(clean)
        if clean.modality not in self.modalities:
            raise UserError(f"{label} works on {' and '.join(self.modalities)} models, not {clean.modality}")
        # modality, class count, channels, image size, and a wrapped module's head on real
        # samples: the CLI's check (models/foreign.py), before any size rule
        from ..models.foreign import check_model_data
        check_model_data(model, clean)
        needed = needed or self.min_clean
        if len(clean) < needed:
            raise UserError(f"{label} needs at least {needed} clean samples, got {len(clean)}; "
                            "give more clean data")


class Purifier(Defense):
    kind = "purifier"
    Config: ClassVar[type[DefenseConfig]] = PurifierConfig

    def preflight(self, model, clean: Data) -> None:
        """Every check that can fail before any work (data type, modality, class count, the
        method's minimum with the verification part set aside, the method's own needs):
        ``repair`` runs it before its scan, so a mistake costs seconds, not the scan."""
        self.check_data_type(clean)
        frac = getattr(self.cfg, "verify_fraction", 0.0)
        needed = self.min_clean if not frac else max(self.min_clean + len(clean.classes),
                                                     int(self.min_clean / (1 - frac)) + 1)
        self.check_inputs(model, clean, needed)

    def purify(self, model, clean: Data) -> PurifyResult:
        """Return a purified copy of ``model`` (the input is left untouched)."""
        from ..utils import measure
        from ..eval.metrics import accuracy_drop_bound
        from .common import correct, share_correct, split_clean
        self.preflight(model, clean)
        frac = getattr(self.cfg, "verify_fraction", 0.0)
        fit, verify = split_clean(clean, frac, self.cfg.seed) if frac else (clean, None)
        t0 = time.perf_counter()
        with measure(self.name or "purify") as st:
            ok_before = correct(model, verify) if verify is not None else None
            work = copy.deepcopy(model)
            purified, info = self._purify(work, fit, original=model)
            ok_after = correct(purified, verify) if verify is not None else None
        ca_before, ca_after = (None, None) if verify is None else (share_correct(ok_before), share_correct(ok_after))
        res = PurifyResult(purified.eval(), info, ca_before, ca_after, 0 if verify is None else len(verify),
                           time.perf_counter() - t0, st.peak_rss_mb, method=self.name,
                           options=self.cfg.model_dump(), threads=torch.get_num_threads())
        if verify is not None and len(verify):
            res.drop_bound = accuracy_drop_bound(ok_before.numpy(), ok_after.numpy())[1]
        max_drop = getattr(self.cfg, "max_ca_drop", None)
        # rounded: a drop of exactly the bar (3.00 points is 0.030000000000000027) is within it
        if ca_before is not None and max_drop is not None and round(ca_before - ca_after, 9) > max_drop:
            res.warning = (f"clean accuracy on {len(verify)} held-out clean samples fell from "
                           f"{ca_before:.1%} to {ca_after:.1%} (more than {max_drop:.0%}); the model "
                           "is not repaired: give more clean data or try another method")
        return res

    def _purify(self, model, clean: Data, original) -> tuple[torch.nn.Module, dict]:  # pragma: no cover
        """Purify ``model`` (a private copy, free to modify) on ``clean``; ``original`` is the
        untouched input (PAM pulls away from it). Returns (model, info)."""
        raise NotImplementedError


def check_frr(frr) -> None:
    """A false-rejection rate must be a number in (0, 1) (one line otherwise)."""
    if isinstance(frr, bool) or not isinstance(frr, (int, float)):
        raise UserError(f"false-rejection rate {frr!r} is not a number; use e.g. --frr 0.05 (frr=0.05 in Python)")
    if not 0.0 < frr < 1.0:
        raise UserError(f"false-rejection rate {frr} is outside (0, 1); use e.g. --frr 0.05 (frr=0.05 in Python)")


class InputDetector(Defense):
    """``fit`` splits the clean data: the method fits on ``1 - calibration_fraction`` of it,
    and the threshold is the (1 - frr) quantile of the scores of the rest."""
    kind = "detector"
    threshold: float | None = None
    calibration_fraction: ClassVar[float] = 0.5

    def __init_subclass__(cls, **kw):
        # every detector's score() first checks that it was fitted (or restored): one line for
        # a Python user who scores before fit(), instead of an AttributeError from inside
        super().__init_subclass__(**kw)
        if "score" in cls.__dict__:
            score = cls.__dict__["score"]

            def checked_score(self, inputs, _score=score):
                if getattr(self, "model", None) is None:
                    raise UserError(f"{self.name}: fit the detector on clean data before you score inputs "
                                    "(detector.fit(model, clean) or trojanguard.guard(model, clean))")
                return _score(self, self.checked_batch(inputs))
            checked_score.__doc__, checked_score.__name__ = score.__doc__, "score"
            cls.score = checked_score

    def checked_batch(self, inputs):
        """``inputs`` as every detector scores them, or one line saying what is wrong: a
        non-empty list of strings for a text model; a [N, C, H, W] image tensor of the fitted
        shape, uint8 pixels (0-255, as the datasets hold them) scaled to [0, 1]."""
        text = getattr(self.model, "modality", "image") == "text"
        if text and (isinstance(inputs, (str, torch.Tensor)) or not hasattr(inputs, "__len__")):
            raise UserError(f"{self.name}: the model takes text; give a list of strings, not "
                            f"{'one string' if isinstance(inputs, str) else type(inputs).__name__}")
        if not text and not isinstance(inputs, torch.Tensor):
            raise UserError(f"{self.name}: the model takes images; give a tensor [N, C, H, W] in [0, 1], "
                            f"not {type(inputs).__name__}")
        shape = None if text else getattr(self, "input_shape", None)
        if not text and (inputs.ndim != 4 or (shape is not None and tuple(inputs.shape[1:]) != tuple(shape))):
            want = "x".join(map(str, shape)) if shape else "[N, C, H, W]"
            raise UserError(f"{self.name}: inputs of shape {'x'.join(map(str, inputs.shape[1:]))} but the detector "
                            f"was fitted on {want} images; resize the inputs to the model's size")
        if len(inputs) == 0:
            raise UserError(f"{self.name}: no inputs to score (an empty batch)")
        if text:
            return inputs
        from ..models.base import unit_pixels
        return unit_pixels(inputs)

    def fit(self, model, clean: Data) -> "InputDetector":
        from .common import split_clean
        self.check_inputs(model, clean)
        if clean.modality == "image":
            self.input_shape = tuple(clean.shape)
        fit, calib = split_clean(clean, self.calibration_fraction, self.cfg.seed)
        self.model = model
        self._fit(model, fit)
        self.calibration_scores = self.score_data(calib)
        self.set_frr(getattr(self.cfg, "frr", 0.05))
        return self

    def set_frr(self, frr: float) -> None:
        """Threshold so that ``frr`` of the held-out clean scores are flagged."""
        check_frr(frr)
        if getattr(self, "calibration_scores", None) is None:
            raise UserError(f"{self.name}: fit the detector on clean data before choosing a threshold")
        self.frr = frr
        self.threshold = float(torch.quantile(self.calibration_scores.double(), 1.0 - frr))

    def _fit(self, model, clean: Data) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, inputs) -> torch.Tensor:  # pragma: no cover - abstract
        """Suspicion of each input of a batch (float images in [0, 1] or a list of strings)."""
        raise NotImplementedError

    def score_data(self, data: Data, trigger=None, batch_size: int = 256) -> torch.Tensor:
        """Scores of every sample of ``data`` (optionally triggered), batched; texts in batches
        of similar length once all are triggered (a score is the input's own, whatever its batch)."""
        from ..eval.evaluate import by_length
        out, texts = [], []
        for start in range(0, len(data), batch_size):
            x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            if trigger is not None:
                x = trigger(x, y)
            if isinstance(x, torch.Tensor):
                out.append(self.score(x).detach().float().cpu())
            else:
                texts.extend(x)
        if texts:
            return by_length(texts, lambda t: {"score": self.score(t).detach().float().cpu()}, batch_size)["score"]
        return torch.cat(out) if out else torch.empty(0)

    def flag(self, inputs) -> torch.Tensor:
        if self.threshold is None:
            raise UserError(f"{self.name}: fit the detector on clean data before you flag inputs (detector.fit(model, clean))")
        # strictly above: the threshold is a clean score itself (the (1 - frr) quantile)
        return self.score(inputs) > self.threshold


class Inspector(Defense):
    kind = "inspector"

    def inspect(self, model, clean: Data) -> Inspection:  # pragma: no cover - abstract
        raise NotImplementedError

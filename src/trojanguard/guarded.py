"""The guard: a model that predicts as before and also says, per input, how suspicious the
input is, with a flag at a chosen false-rejection rate; with purification on, flagged
inputs are predicted by the detector's purified forward pass (BadActs: the clamped
activations), unflagged ones keep the model's own logits.

    import trojanguard as tg
    g = tg.guard(model, clean, method="badacts", purify=True)
    out = g(x)                # out.logits, out.scores, out.flags (also a plain tuple)
    g.save("runs/guarded")    # model.safetensors + model.json + detector.safetensors + guard.json
    g2 = tg.load_guard("runs/guarded")

A saved guard is a folder: the model as a trojanguard checkpoint, the detector's fitted
tensors (BadActs: mu, sigma, the held-out calibration scores, the intervals) in
``detector.safetensors`` and its configuration, threshold and FRR in ``guard.json``; it
is a ``resultdir`` result (complete or absent, every file checked against the manifest
``COMPLETE.json`` when loaded).

``trojanguard.guard`` is the function; the classes are here (``from trojanguard.guarded import
GuardedModel``): the module has its own name so that importing it never hides the function.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .data.base import Data
from .errors import UserError

GUARD_JSON, DETECTOR_TENSORS = "guard.json", "detector.safetensors"
FORMAT = "trojanguard-guard/1"
MAX_DETECTOR_BYTES = 2**30
KEPT_META = ("dataset", "seed", "train_config")


class GuardOutput(NamedTuple):
    """Per input of a batch: the logits the guard predicts with, the continuous suspicion
    score (higher = more suspicious) and the flag (score above the threshold)."""
    logits: torch.Tensor
    scores: torch.Tensor
    flags: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)


def select_inputs(x, keep: torch.Tensor):
    """The inputs of a batch (image tensor or list of strings) where ``keep`` is True."""
    if isinstance(x, torch.Tensor):
        return x[keep.to(x.device)]
    return [s for s, k in zip(x, keep.tolist()) if k]


class GuardedModel(nn.Module):
    """``model`` plus a fitted input detector. ``forward(x) -> GuardOutput``."""

    def __init__(self, model: nn.Module, detector, purify: bool = False, model_meta: dict | None = None):
        super().__init__()
        if purify and not hasattr(detector, "purified_logits"):
            raise UserError(f"{detector.name} detects but cannot purify; drop purify or use method 'badacts'")
        self.model = model
        self.detector = detector
        self.purify = purify
        # what the model's own checkpoint said (dataset, seed...), kept when the guard is saved
        self.model_meta = dict(model_meta or {})
        # the detector was fitted just before (guard) and its scores depend on the thread count
        self.threads = torch.get_num_threads()

    @property
    def threshold(self) -> float:
        return self.detector.threshold

    @property
    def frr(self) -> float:
        return self.detector.frr

    @property
    def purifier_warning(self) -> str | None:
        """What the purifier's fit could not achieve (e.g. BadActs' clamped accuracy after its
        capped restarts), or None; say it wherever purified predictions are shown."""
        return (getattr(self.detector, "purifier_info", None) or {}).get("warning") if self.purify else None

    @property
    def detector_warning(self) -> str | None:
        """A detector whose held-out clean scores do not vary (e.g. BadActs on a model too small
        for its intervals to be crossed) cannot place a threshold at the asked FRR: say so
        wherever flags are shown, instead of serving a guard that may flag nothing."""
        scores = getattr(self.detector, "calibration_scores", None)
        if scores is None or not len(scores) or float(scores.max() - scores.min()) > 0:
            return None
        return (f"all {len(scores)} held-out clean inputs get the same score ({float(scores[0]):g}): the threshold "
                "cannot be placed at the asked false-rejection rate and only inputs scoring above that value are "
                "flagged; this detector may not suit the model (try another --method)")

    def set_frr(self, frr: float) -> None:
        """Move the threshold to another false-rejection rate (on the saved calibration scores)."""
        self.detector.set_frr(frr)

    @torch.no_grad()  # inference: no graph kept alive across the batches of predict_data
    def forward(self, x) -> GuardOutput:
        det = self.detector
        x = det.checked_batch(x)  # one line for a bare string, an empty batch, the wrong size; uint8 scaled
        if hasattr(det, "score_and_logits"):  # one forward pass gives both
            logits, scores = det.score_and_logits(x)
        else:
            from .defenses.common import model_inputs
            with torch.inference_mode():
                logits = self.model(model_inputs(self.model, x)[0])
            scores = det.score(x)
        scores = scores.to(logits.device)
        flags = scores > det.threshold  # strictly above, as InputDetector.flag
        if self.purify and bool(flags.any()):
            logits = logits.clone()
            logits[flags] = det.purified_logits(select_inputs(x, flags)).to(logits.dtype)
        return GuardOutput(logits, scores, flags)

    def predict_data(self, data: Data, batch_size: int = 256) -> GuardOutput:
        """The guard's outputs for every sample of ``data``, batched (on the CPU)."""
        outs = []
        for start in range(0, len(data), batch_size):
            x, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            outs.append(self(x))
        return GuardOutput(*(torch.cat([getattr(o, f).cpu() for o in outs]) for f in GuardOutput._fields))

    # --------------------------------------------------------------------- saving --
    def save(self, folder: str | Path) -> Path:
        """Write the guard as one complete result folder (``resultdir.write_result``)."""
        from safetensors.torch import save
        from .checkpoint import save_checkpoint
        from .resultdir import check_out, write_bytes, write_json, write_result
        from .utils import library_versions
        if not hasattr(self.detector, "state"):
            raise UserError(f"{self.detector.name} cannot be saved as a guard (it has no state() to write)")
        check_out(folder, "the guard folder")
        tensors, facts = self.detector.state()
        record = {"format": FORMAT, "method": self.detector.name, "purify": self.purify,
                  "config": self.detector.cfg.model_dump(), "threshold": self.detector.threshold,
                  "frr": self.detector.frr, "detector": facts, "threads": self.threads,
                  "input_shape": list(getattr(self.detector, "input_shape", None) or []) or None,
                  "versions": library_versions()}
        # the model's sidecar keeps where it came from, not its attack: a guard folder holds no
        # attack artifact, and a recorded attack without one reads as an incomplete checkpoint
        meta = {k: v for k, v in self.model_meta.items() if k in KEPT_META}
        with write_result(folder, kind="guard") as tmp:
            save_checkpoint(tmp, self.model, {**meta, "guard": {"method": self.detector.name}})
            write_bytes(tmp / DETECTOR_TENSORS, save(tensors))
            write_json(tmp / GUARD_JSON, record)
        return Path(folder)


def guard(model, clean: Data, method: str = "badacts", frr: float | None = None, purify: bool = False,
          model_meta: dict | None = None, **options) -> GuardedModel:
    """Fit detector ``method`` (options as its config) on the clean data ``clean`` and wrap
    ``model`` in a ``GuardedModel`` flagging at false-rejection rate ``frr``.

    ``frr=None`` takes the detector's own default: ``frr`` (0.05) for detection only and,
    for BadActs with ``purify=True``, ``purify_frr`` (0.2, the official detect-then-purify
    script). With ``purify`` the detector's purifier is also fitted on all of ``clean``."""
    from .defenses import InputDetector, create_defense
    from .defenses.base import check_frr
    det = create_defense(method, **options)
    if not isinstance(det, InputDetector):
        raise UserError(f"{method!r} is {'an' if det.kind[0] in 'aeiou' else 'a'} {det.kind}, not an input detector; pick a detector such as 'badacts'")
    if purify and not hasattr(det, "fit_purifier"):
        raise UserError(f"{method} detects but cannot purify; drop --purify or use 'badacts'")
    if frr is not None:
        check_frr(frr)
    model.eval()  # a wrapped nn.Module starts in train mode: batch statistics, dropout
    det.fit(model, clean)
    if frr is None:
        frr = getattr(det.cfg, "purify_frr", det.cfg.frr) if purify else det.cfg.frr
    det.set_frr(frr)
    if purify:
        det.fit_purifier(clean)
    return GuardedModel(model, det, purify, model_meta)


def load_guard(folder: str | Path, device: str | torch.device = "cpu") -> GuardedModel:
    """A guard saved by ``GuardedModel.save``: same model, same detector state, same scores.
    Every file is checked against the folder's manifest before it is used."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    from .checkpoint import load_checkpoint
    from .defenses import create_defense
    from .resultdir import read_result
    folder = Path(folder)
    res = read_result(folder)
    if res.legacy or not res.has(GUARD_JSON) or not res.has(DETECTOR_TENSORS):
        raise UserError(f"{folder} is not a saved guard (no {GUARD_JSON} and {DETECTOR_TENSORS} in a complete "
                        "result folder); save it with guard.save() or 'trojanguard detect --save-guard'")
    record = res.read_json(GUARD_JSON)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{folder / GUARD_JSON} is not a {FORMAT} record; save the guard again")
    try:
        tensors = load(res.read_bytes(DETECTOR_TENSORS, MAX_DETECTOR_BYTES))
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{folder / DETECTOR_TENSORS} is not a valid safetensors file ({e})") from None
    model, meta = load_checkpoint(folder, device)
    try:
        det = create_defense(record["method"], **record["config"])
        det.restore(model, tensors, record["detector"])
        det.threshold, det.frr = float(record["threshold"]), float(record["frr"])
        if record.get("input_shape"):  # the size check of checked_batch, for every detector
            det.input_shape = tuple(int(v) for v in record["input_shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder / GUARD_JSON} is damaged ({type(e).__name__}: {e}); save the guard again") from None
    g = GuardedModel(model, det, bool(record.get("purify")), {k: v for k, v in meta.items() if k in KEPT_META})
    g.threads = record.get("threads")  # the count it was fitted with, not this process's
    return g


__all__ = ["guard", "load_guard", "GuardedModel", "GuardOutput"]

"""RAP, Robustness-Aware Perturbations (Yang et al., EMNLP 2021), text input detection.

Idea: a rare word (the RAP trigger) is inserted at the front of an input; its word
embedding is trained on clean samples of the protected label so that inserting it lowers
that label's probability by between |u_low| = 0.1 and |u_up| = 0.3. Clean inputs react
that way; inputs carrying a backdoor trigger are held at the target by the backdoor and
barely move. Detection score = -(p(x) - p(x + rap)) for the protected label (higher = more
suspicious); flagged at the false-rejection rate chosen on held-out clean inputs.

Defaults from the official code (``lancopku/RAP``: ``rap_defense.py``,
``evaluate_rap_performance.py``, ``run_rap.sh``): RAP word "cf" inserted at the first
position, probability range (-0.1, -0.3), scale factor 1, batch 32, lr 1e-2, 5 epochs
(10 here: see ``epochs``),
training on the clean samples whose label is the protected one, embedding norm kept at
the word's original norm after every step; only inputs the model assigns to the protected
label are scored (the others are not successful attacks).

Where we differ, and why ours works where OpenBackdoor's copy is reported not to (its
issue 24: false acceptance ~1.0 on SST-2):
  * OpenBackdoor trains the RAP word on *all* clean dev samples. For non-target samples
    p(target) is already ~0 and cannot fall by 0.1, so their hinge term never switches
    off and keeps strengthening the perturbation until it also knocks poisoned inputs off
    the target: everything drops, and the clean threshold accepts the poisoned inputs. We
    train on the protected label's samples only, as the paper's code does.
  * We do not change the model: the trained vector replaces the embedding of the inserted
    word at its position only (a forward hook on the input embeddings), so a copy of the
    RAP word elsewhere in the text (an attacker's own "cf") keeps its embedding and the
    model's weights stay untouched.
  * The official code never zeroes the embedding gradient (accumulated gradients, "for
    faster convergence") and trains with dropout on; we use Adam on the one vector at the
    same lr with zeroed gradients and the model in eval mode, so the result does not
    depend on the encoder's raw gradient scale (which is where a fixed SGD lr breaks).
  * ``target=None`` (our extension, the default when the target is unknown): one RAP
    vector per class, and an input is scored with the vector of its predicted class.
    With a target, inputs predicted otherwise score -1 (the least suspicious value).
  * ``score_space="logit"`` (our extension, not the default): score by the drop of the
    scored class's log-odds instead of its probability; the vector is trained as above.
    Why: a fine-tuned MiniLM is so sure of some clean inputs that their probability cannot
    move. Measured on the SST-2 BadNets 5 % zoo model (harness cell, probability space):
    8.2 % of the clean test inputs drop by less than 0.001 (25 % by less than 0.01), so
    the 5 % FRR threshold sits at a drop of 0.0007, below most poisoned inputs' drops
    (median 0.005): AUROC 0.79, yet 97 % of the poisoned inputs accepted. The log-odds of
    a saturated input still move by what the RAP word does to its logits. Measured through
    the harness (``configs/sst2-defenses.yaml``, label ``rap-logit``), AUROC / FAR at 5 %
    FRR, probability -> log-odds: BadNets 5 % 0.79 / 0.97 -> 0.94 / 0.40, BadNets 20 %
    0.96 / 0.23 -> 0.97 / 0.12, but AddSent 20 % 0.93 / 0.54 -> 0.89 / 0.83 and AddSent 5 %
    0.97 / 0.19 -> 0.96 / 0.20. Neither wins on every attack, so the paper's stays the
    default.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..data.base import Data
from ..errors import UserError
from ..utils import ADDED_LATER
from .base import DefenseConfig, InputDetector
from .common import position1_embedding


class RAPConfig(DefenseConfig):
    target: int | None = Field(None, ge=0, description="protected label; None: one RAP vector per class")
    word: str = Field("cf", description="RAP trigger word (single token); its embedding is the start point")
    prob_range: tuple[float, float] = Field((-0.1, -0.3), description="(u_low, u_up): wanted change of p(target)")
    scale: float = Field(1.0, gt=0, description="weight of the u_low hinge (official scale_factor)")
    epochs: int = Field(10, ge=1, description=(
        "official: 5 epochs over the whole dev set's protected-label sentences (~70 steps on SST-2); "
        "we fit on half of it (the other half sets the threshold), so 10 keeps the step count"))
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-2, gt=0)
    frr: float = Field(0.05, gt=0, lt=1, description="the paper reports 0.5, 1, 3 and 5 %")
    score_space: Literal["prob", "logit"] = Field("prob", json_schema_extra=ADDED_LATER, description=(
        "the drop that scores an input: of the scored class's probability (the paper), or of its log-odds "
        "(ours: a saturated probability hardly moves; see the module docstring)"))
    score_batch_size: int = Field(256, ge=1)


class RAP(InputDetector):
    """RAP: a trained rare-word perturbation lowers clean inputs' target probability, not poisoned ones'."""
    name = "rap"
    Config = RAPConfig
    modalities = ("text",)
    min_clean = 10

    def _prefixed(self, texts) -> list[str]:
        return [f"{self.cfg.word} {t}" for t in texts]

    def _logits(self, texts, vectors=None, rows_pred=None) -> torch.Tensor:
        """The model's logits; with ``vectors`` [K, d], the RAP word is inserted and row i
        gets vector ``vectors[rows_pred[i]]``."""
        model = self.model
        if vectors is None:
            return model(model.tokenize(list(texts))).float()
        enc = model.tokenize(self._prefixed(texts))
        dev = enc["input_ids"].device
        slot = {"rows": torch.arange(len(texts), device=dev), "e": vectors[rows_pred.to(vectors.device)]}
        with position1_embedding(model, slot):
            return model(enc).float()

    def _probs(self, texts, vectors=None, rows_pred=None) -> torch.Tensor:
        return torch.softmax(self._logits(texts, vectors, rows_pred), 1)

    def _fit(self, model, clean: Data) -> None:
        cfg = self.cfg
        self.model = model
        k = len(clean.classes)
        if cfg.target is not None and cfg.target >= k:
            raise UserError(f"rap: target {cfg.target} is not a class of the data (0..{k - 1})")
        lo, hi = cfg.prob_range
        if not 0 > lo > hi >= -1:
            raise UserError(f"rap: prob_range {cfg.prob_range} must be (u_low, u_up) with 0 > u_low > u_up >= -1, "
                            "e.g. (-0.1, -0.3)")
        ids = model.tokenize([cfg.word])["input_ids"][0]
        if len(ids) != 3:
            raise UserError(f"rap: the tokenizer splits {cfg.word!r} into several pieces; pick a word that is one "
                            "token (e.g. cf)")
        emb = model.encoder.get_input_embeddings().weight.detach()
        e0 = emb[ids[1]].clone()
        norm = e0.norm()
        self.classes = [cfg.target] if cfg.target is not None else list(range(k))
        self.vectors = e0.unsqueeze(0).repeat(k, 1)
        self.info = {}
        was = model.training
        model.eval()
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(cfg.seed)
        try:
            for c in self.classes:
                pos = (clean.y == c).nonzero().flatten()
                if len(pos) == 0:
                    raise UserError(f"rap: the clean data has no sample of class {c}; give clean data of every class")
                self.info[f"class{c}_in_range_start"] = self._in_range(clean.subset(pos), c)
                e = e0.clone().requires_grad_(True)
                opt = torch.optim.Adam([e], lr=cfg.lr)
                for _ in range(cfg.epochs):
                    order = pos[torch.randperm(len(pos), generator=g)]
                    for b in order.split(cfg.batch_size):
                        texts, _ = clean.batch(b)
                        with torch.no_grad():
                            p0 = self._probs(texts)[:, c]
                        rows = torch.full((len(texts),), c)
                        vecs = self.vectors.clone()
                        vecs[c] = e
                        p1 = self._probs(texts, vecs, rows)[:, c]
                        diff = p1 - p0
                        loss = cfg.scale * torch.relu(diff - lo).mean() + torch.relu(hi - diff).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        with torch.no_grad():
                            e.mul_(norm / e.norm())  # keep the word's original norm (official)
                self.vectors[c] = e.detach()
                self.info[f"class{c}_in_range"] = self._in_range(clean.subset(pos), c)
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
            model.train(was)

    @torch.inference_mode()
    def _in_range(self, data: Data, c: int) -> float:
        """Share of clean class-c samples whose p(c) fell within the wanted range (the
        official "Constructing Train Acc")."""
        texts, _ = data.batch(torch.arange(len(data)))
        rows = torch.full((len(texts),), c)
        diff = self._probs(texts, self.vectors, rows)[:, c] - self._probs(texts)[:, c]
        lo, hi = self.cfg.prob_range
        return float(((diff <= lo) & (diff >= hi)).float().mean())

    @torch.inference_mode()
    def drop(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_c(x) - m_c(x + rap_c), c) with c the protected class scored for each input
        (its predicted class; with a fixed target, the target) and m_c its probability
        (``score_space="prob"``) or its log-odds (``"logit"``)."""
        model = self.model
        was = model.training
        model.eval()
        try:
            out_d, out_c = [], []
            texts = list(inputs)
            for s in range(0, len(texts), self.cfg.score_batch_size):
                t = texts[s:s + self.cfg.score_batch_size]
                z0 = self._logits(t).cpu()
                pred = z0.argmax(1)
                c = pred if self.cfg.target is None else torch.full_like(pred, self.cfg.target)
                z1 = self._logits(t, self.vectors, c).cpu()
                d = _measure(z0, c, self.cfg.score_space) - _measure(z1, c, self.cfg.score_space)
                if self.cfg.target is not None:  # not a target prediction: the least suspicious drop
                    d = torch.where(pred == self.cfg.target, d, torch.full_like(d, _NOT_SCORED[self.cfg.score_space]))
                out_d.append(d)
                out_c.append(c)
            return torch.cat(out_d), torch.cat(out_c)
        finally:
            model.train(was)

    def score(self, inputs) -> torch.Tensor:
        return -self.drop(inputs)[0]

    # --- saving / loading (the guard's convention, as BadActs) --------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able facts) that ``restore`` turns back into this fitted detector."""
        if getattr(self, "vectors", None) is None:
            raise UserError("rap: fit the detector before saving it")
        tensors = {"vectors": self.vectors, "calibration_scores": self.calibration_scores}
        facts = {"threshold": self.threshold, "frr": self.frr, "fit": self.info}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, facts

    def restore(self, model, tensors: dict[str, torch.Tensor], facts: dict) -> "RAP":
        self.model = model
        self.vectors = tensors["vectors"].to(next(model.parameters()).device)
        self.calibration_scores = tensors["calibration_scores"]
        self.threshold, self.frr = float(facts["threshold"]), float(facts["frr"])
        self.info = dict(facts.get("fit") or {})
        return self


# the drop given to inputs a fixed-target RAP does not score (predicted otherwise): the largest
# a probability can fall, and in log-odds a fall no real input reaches
_NOT_SCORED = {"prob": 1.0, "logit": 1e6}


def _measure(logits: torch.Tensor, c: torch.Tensor, space: str) -> torch.Tensor:
    """Class ``c[i]``'s probability, or its log-odds log p / (1 - p) = z_c - logsumexp of the
    other logits (finite where the probability rounds to 1)."""
    rows = torch.arange(len(c))
    if space == "prob":
        return torch.softmax(logits, 1)[rows, c]
    others = logits.clone()
    others[rows, c] = float("-inf")
    return logits[rows, c] - torch.logsumexp(others, 1)

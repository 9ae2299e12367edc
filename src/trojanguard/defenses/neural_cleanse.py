"""Neural Cleanse (Wang et al., S&P 2019) as a model inspector (methods.md §3).

For every class t (or the ``classes`` asked for), find the smallest mask m (1 x H x W, in
[0, 1]) and pattern p (C x H x W, in [0, 1]) such that x' = (1 - m) x + m p sends clean
inputs to t: minimise CE(f(x'), t) + cost * ||m||_1 with Adam, the mask and pattern
parametrised as tanh(.) / (2 + 1e-7) + 0.5 with the parameters initialised to ones (BackdoorBench
``defense/nc.py``, from the VinAI re-implementation of the original). The cost follows the
original schedule: start at 1e-3; after ``patience`` rounds with the reversed attack
succeeding on >= 98 % of the batches' inputs it is multiplied by 2, after ``patience``
rounds failing it is divided by 2 ** 1.5; the best mask (smallest norm among the
successful rounds) is kept; early stop when the best norm has not improved by 1 % for
``early_stop_patience`` rounds after the cost went both up and down.

CPU budget (our choice, said here): BackdoorBench runs 80 epochs over 5 % of CIFAR-10
(~10 batches of 256 each, ~800 steps per class) and changes the cost at most every 5 epochs
(50 steps); the original NC code uses batches of 32. A "round" here is ``steps_per_round`` =
5 batches of 64 (a step costs half of one of 128 on this CPU: 0.12 vs 0.22 s), at most
``rounds`` = 60 (300 steps per class), the cost may change every ``patience`` = 3 rounds (15
steps) so that it can still climb the ~2^10 it needs within the budget, and the early stop
waits 10 rounds. EBYD runs it for its few candidate labels only.

Detection: the L1 norms of the masks; MAD with the consistency constant 1.4826; the
anomaly index of the model is (median - min norm) / MAD; classes flagged when their norm is
below the median and (median - norm) / MAD > 2. The backdoor probability is a documented
monotone map of the anomaly index, not a calibration: p = sigmoid(2 (a - 2)), so that the
paper's threshold a = 2 maps to 0.5, a = 0 to 0.02 and a = 4 to 0.98.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.base import Data
from ..errors import UserError
from ..progress import stage_bar
from ..utils import frozen
from .base import DefenseConfig, Inspection, Inspector

EPSILON = 1e-7
MAD_CONSISTENCY = 1.4826


class NeuralCleanseConfig(DefenseConfig):
    classes: list[int] | None = Field(None, description="reverse-engineer only these classes (None: all)")
    batch_size: int = Field(64, ge=1, description="original NC: 32; BackdoorBench: 128")
    lr: float = Field(0.1, gt=0, description="Adam, betas (0.5, 0.9) (BackdoorBench mask_lr)")
    init_cost: float = Field(1e-3, ge=0)
    cost_multiplier: float = Field(2.0, gt=1)
    success_threshold: float = Field(0.98, gt=0, le=1, description="share of inputs sent to the class")
    patience: int = Field(3, ge=1, description="rounds before the cost changes (BackdoorBench: 5 epochs)")
    steps_per_round: int = Field(5, ge=1, description="batches per round (BackdoorBench: an epoch, ~10 batches)")
    rounds: int = Field(60, ge=1, description="at most this many rounds per class (BackdoorBench: 80 epochs)")
    early_stop_threshold: float = Field(0.99, gt=0, le=1)
    early_stop_patience: int = Field(10, ge=1)
    anomaly_threshold: float = Field(2.0, gt=0)
    prob_slope: float = Field(2.0, gt=0, description="p = sigmoid(prob_slope * (anomaly - threshold))")
    exposed: bool = Field(False, description=(
        "reverse-engineer on the model exposed by EBYD's clean unlearning (default settings) "
        "instead of the original, to compare NC before and after exposure"))


def _from_param(t: torch.Tensor) -> torch.Tensor:
    return torch.tanh(t) / (2 + EPSILON) + 0.5


def reverse_engineer(model, data: Data, target: int, cfg: NeuralCleanseConfig | None = None,
                     seed: int = 0, progress: bool = False) -> dict:
    """The NC trigger for ``target``: ``{"mask": [1,H,W], "pattern": [C,H,W], "norm",
    "success", "reached", "steps"}`` (tensors on the CPU). ``reached`` is False when no
    round met the success threshold (the last mask is returned then)."""
    cfg = cfg or NeuralCleanseConfig()
    if data.modality != "image":
        raise UserError("Neural Cleanse reverse-engineers image triggers; use a text method for text models")
    dev = next(model.parameters()).device
    c, h, w = data.x.shape[1:]
    # the tanh parameters start at 1 (BackdoorBench init_mask/init_pattern = ones): mask and
    # pattern start at tanh(1) / 2 + 0.5 = 0.88, where the tanh is not saturated
    mask_t = torch.nn.Parameter(torch.ones(1, h, w, device=dev))
    pat_t = torch.nn.Parameter(torch.ones(c, h, w, device=dev))
    opt = torch.optim.Adam([mask_t, pat_t], lr=cfg.lr, betas=(0.5, 0.9))
    g = torch.Generator().manual_seed(seed)
    cost = cfg.init_cost
    up = down = set_counter = 0
    up_flag = down_flag = False
    best = {"norm": math.inf, "mask": None, "pattern": None, "success": 0.0}
    stop_counter, stop_best = 0, math.inf
    order, pos, steps = torch.randperm(len(data), generator=g), 0, 0
    was = model.training
    model.eval()
    bar = stage_bar(total=cfg.rounds, desc=f"trigger recovery (class {target})", enabled=progress, unit="round")
    try:
        with frozen(model):
            for _ in range(cfg.rounds):
                bar.update(1)
                hits = total = 0
                for _ in range(cfg.steps_per_round):
                    if pos >= len(order):
                        order, pos = torch.randperm(len(data), generator=g), 0
                    idx = order[pos:pos + cfg.batch_size]
                    pos += cfg.batch_size
                    x, _ = data.batch(idx)
                    x = x.to(dev)
                    m, p = _from_param(mask_t), _from_param(pat_t)
                    logits = model((1 - m) * x + m * p)
                    y = torch.full((len(x),), target, device=dev)
                    norm = m.abs().sum()
                    loss = F.cross_entropy(logits, y) + cost * norm
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    hits += int((logits.argmax(1) == y).sum())
                    total += len(x)
                    steps += 1
                success = hits / total
                with torch.no_grad():
                    m = _from_param(mask_t)
                    norm = float(m.abs().sum())
                if success >= cfg.success_threshold and norm < best["norm"]:
                    best = {"norm": norm, "mask": m.detach().cpu().clone(),
                            "pattern": _from_param(pat_t).detach().cpu().clone(), "success": success}
                # early stop (BackdoorBench train_step)
                if best["norm"] < math.inf:
                    stop_counter = stop_counter + 1 if best["norm"] >= cfg.early_stop_threshold * stop_best else 0
                stop_best = min(stop_best, best["norm"])
                if up_flag and down_flag and stop_counter >= cfg.early_stop_patience:
                    break
                # cost schedule
                if cost == 0 and success >= cfg.success_threshold:
                    set_counter += 1
                    if set_counter >= cfg.patience:
                        cost, up, down, up_flag, down_flag = cfg.init_cost, 0, 0, False, False
                else:
                    set_counter = 0
                if success >= cfg.success_threshold:
                    up, down = up + 1, 0
                else:
                    up, down = 0, down + 1
                if up >= cfg.patience:
                    up, cost, up_flag = 0, cost * cfg.cost_multiplier, True
                elif down >= cfg.patience:
                    down, cost, down_flag = 0, cost / cfg.cost_multiplier ** 1.5, True
    finally:
        bar.set_postfix(mask_l1=f"{best['norm']:.1f}" if best["norm"] < math.inf else "not reached")
        bar.close()
        model.train(was)
    reached = best["mask"] is not None
    if not reached:
        with torch.no_grad():
            best = {"norm": float(_from_param(mask_t).sum()), "mask": _from_param(mask_t).detach().cpu(),
                    "pattern": _from_param(pat_t).detach().cpu(), "success": success}
    return {**best, "reached": reached, "steps": steps, "target": target}


def anomaly_indices(norms: list[float]) -> tuple[float, list[float]]:
    """(anomaly index of the model, per-class signed index (median - norm) / MAD)."""
    t = torch.tensor(norms, dtype=torch.float64)
    median = t.median()
    mad = MAD_CONSISTENCY * (t - median).abs().median()
    if mad <= 0:  # all norms (nearly) equal: nothing stands out
        return 0.0, [0.0] * len(norms)
    per = ((median - t) / mad).tolist()
    return float((median - t.min()) / mad), per


class NeuralCleanse(Inspector):
    """Neural Cleanse: per-class trigger reverse engineering and the MAD anomaly index."""
    name = "nc"
    Config = NeuralCleanseConfig
    modalities = ("image",)
    min_clean = 20

    def reverse(self, model, clean: Data) -> dict[int, dict]:
        """The reverse-engineered trigger of every class of ``cfg.classes`` (default all)."""
        self.check_inputs(model, clean)
        k = model.head.out_features
        if k < 2:
            raise UserError(f"the model has {k} class; inspection needs a classifier with at least 2 classes")
        classes = list(range(k)) if self.cfg.classes is None else sorted(set(self.cfg.classes))
        bad = [c for c in classes if not 0 <= c < k]
        if bad:
            raise UserError(f"nc: classes {bad} are outside 0..{k - 1}")
        return {c: reverse_engineer(model, clean, c, self.cfg, seed=self.cfg.seed + c, progress=self.cfg.progress) for c in classes}

    def inspect(self, model, clean: Data) -> Inspection:
        cfg = self.cfg
        self.check_inputs(model, clean)
        k = getattr(getattr(model, "head", None), "out_features", 0)
        n = k if cfg.classes is None else len(set(cfg.classes))
        if n < 3:
            raise UserError(f"nc: the MAD anomaly index needs the triggers of at least 3 classes, this run has {n}; "
                            "use --method ebyd for a binary model")
        t0 = time.perf_counter()
        exposure = None
        if cfg.exposed:
            from .exposure import ExposureConfig, expose
            exposure = expose(model, clean, ExposureConfig(seed=cfg.seed))
            model = exposure.model
        triggers = self.reverse(model, clean)
        classes = list(triggers)
        norms = [triggers[c]["norm"] for c in classes]
        index, per = anomaly_indices(norms)
        flagged = [c for c, a in zip(classes, per) if a > cfg.anomaly_threshold]
        target = min(flagged, key=lambda c: triggers[c]["norm"]) if flagged else None
        prob = 1.0 / (1.0 + math.exp(-cfg.prob_slope * (index - cfg.anomaly_threshold)))
        evidence = {"classes": classes, "norms": [round(x, 3) for x in norms],
                    "reached": [triggers[c]["reached"] for c in classes],
                    "anomaly_index": round(index, 3), "class_anomaly": [round(a, 3) for a in per],
                    "flagged": flagged, "steps": sum(t["steps"] for t in triggers.values()),
                    "on": "exposed model" if exposure is not None else "original model"}
        if exposure is not None:
            evidence.update({k: v for k, v in exposure.summary().items() if k != "history"})
        shown = target if target is not None else min(classes, key=lambda c: triggers[c]["norm"])
        trig = triggers[shown]
        trigger = {"mask": trig["mask"], "pattern": trig["pattern"], "target": shown, "norm": trig["norm"]}
        return Inspection(bool(flagged), target, prob, evidence, trigger, time.perf_counter() - t0)

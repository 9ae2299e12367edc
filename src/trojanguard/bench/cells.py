"""Running one cell. ``execute(task)`` is what the local executor calls in-process and a Ray
worker calls remotely; it computes with the same Python functions the CLI calls:

* victim: ``workflows.train_victim`` (``trojanguard attack`` / ``train``);
* purifier: ``create_defense(name, **opts).purify(model, clean)``, then
  ``defenses.common.before_after`` on the test split with the attack artifact, and the
  retuning attack (``defenses.common.retuned_asr``) when the grid asks for it;
* detector: ``.fit(model, clean)``, ``score_data`` of the clean and the triggered test inputs
  -> ``eval.metrics.detection_report`` (ROC points kept for the report);
* inspector: ``.inspect(model, clean)``.

Each cell's folder (named by the config hash) is written as one complete result
(``resultdir``: a temporary sibling renamed into place when complete), as the CLI writes
its outputs; then the cell's record ``<hash>.cell.json`` is written beside it (atomically).
Folder and record make a finished cell, whoever computed it. The cell returns its result; it
never touches the results store (the driver is its only writer)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import traceback
from importlib import import_module
from pathlib import Path
from typing import Callable

CELL_JSON = "cell.json"
_DATA: dict = {}


def prepared_data(ctx: dict):
    """The grid's data split, loaded once per process (the driver, or a Ray worker)."""
    from ..pipeline import prepare_data
    key = (ctx["dataset"], ctx.get("data_dir"), ctx.get("holdout"), ctx.get("split_seed", 0))
    if key not in _DATA:
        _DATA.clear()  # one grid's data at a time: a worker reused by another grid frees the old one
        _DATA[key] = prepare_data(ctx["dataset"], ctx.get("data_dir"), holdout=ctx.get("holdout"),
                                  seed=ctx.get("split_seed", 0))
    return _DATA[key]


# --- complete-or-absent cells ------------------------------------------------------------

def record_path(folder: str | Path) -> Path:
    """The cell's record, written beside its folder once the folder is complete: the
    folder alone is a result (the CLI's), folder + record is a finished cell."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.{CELL_JSON}"


def finished(folder: str | Path) -> dict | None:
    """The result of a finished cell: its record exists and its folder is a complete result
    (``resultdir``); None when either is missing, damaged or from an interrupted run."""
    from ..errors import UserError
    from ..resultdir import read_json_file, read_result
    rec = record_path(folder)
    if not rec.is_file():
        return None
    try:
        if read_result(folder).legacy:
            return None
        return read_json_file(rec, what=CELL_JSON)["result"]
    except (UserError, KeyError, TypeError):
        return None


# --- execution -----------------------------------------------------------------------------

class Stages:
    """Times and peak memory of each stage of a cell (``utils.measure``)."""

    def __init__(self, on_stage: Callable[[str], None] | None):
        self.items: list[dict] = []
        self.on_stage = on_stage

    @contextlib.contextmanager
    def __call__(self, name: str):
        from ..utils import measure
        if self.on_stage is not None:
            self.on_stage(name)
        with measure(name) as st:
            yield st
        self.items.append(st.as_dict())


def execute(task: dict, on_stage: Callable[[str], None] | None = None) -> dict:
    """Run one cell; returns its result (metrics, stages, resources used). Raises on failure."""
    import torch

    from ..utils import library_versions, resolve_device, to_jsonable
    ctx = task["context"]
    for mod in ctx.get("plugins") or []:
        import_module(mod)
    if ctx.get("threads"):
        torch.set_num_threads(int(ctx["threads"]))
    folder = Path(task["artifact"])
    done = finished(folder)
    if done is not None:
        return {**done, "reused": True}
    record_path(folder).unlink(missing_ok=True)  # a record whose folder is gone or damaged
    stages = Stages(on_stage)
    t0 = time.perf_counter()
    # the runner writes the folder as one complete result, as the CLI's functions do
    metrics = RUNNERS[task["kind"]](task, folder, stages)
    result = to_jsonable({
        "metrics": metrics, "stages": stages.items, "seconds": time.perf_counter() - t0,
        "peak_rss_mb": max((s["peak_rss_mb"] for s in stages.items), default=None),
        "peak_cuda_mb": max((s["peak_cuda_mb"] for s in stages.items if "peak_cuda_mb" in s), default=None),
        "threads": torch.get_num_threads(), "device": str(resolve_device(ctx.get("device") or "auto")),
        "versions": library_versions(), "host": socket.gethostname(), "pid": os.getpid(), "artifact": str(folder)})
    _write_record(record_path(folder), {"hash": task["hash"], "name": task["name"], "kind": task["kind"],
                                        "config": task["config"], "result": result})
    return result


def _write_record(path: Path, record: dict) -> None:
    """Temporary file + rename: a killed process leaves the record whole or absent. No fsync:
    after a power cut a record may be empty, which reads as unfinished (the cell runs again)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def adopt(task: dict) -> dict:
    """The result of a victim adopted from a finished folder: its recorded metrics, nothing run."""
    from ..utils import library_versions, to_jsonable
    folder = Path(task["adopt_from"])
    path = folder / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else \
        (json.loads((folder / "model.json").read_text()).get("metrics") or {})
    keep = ("ca", "asr", "ra", "ca_per_class", "poisoned_count", "poisoned_fraction", "seconds", "train_seconds",
            "peak_rss_mb")
    metrics = {k: metrics.get(k) for k in keep if k in metrics}
    return to_jsonable({"metrics": {**metrics, "adopted_from": str(folder)}, "stages": [], "seconds": 0.0,
                        "peak_rss_mb": metrics.get("peak_rss_mb"), "peak_cuda_mb": None, "threads": None,
                        "device": None, "versions": library_versions(), "host": socket.gethostname(),
                        "pid": os.getpid(), "artifact": str(folder), "adopted": True})


def one_line(e: BaseException) -> str:
    """A failure as one line: the user's message for a UserError, else type and first line."""
    from ..errors import UserError
    if isinstance(e, UserError):
        return str(e).splitlines()[0] if str(e) else "UserError"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def error_detail(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]


def _victim(task: dict, out: Path, stages: Stages) -> dict:
    from ..attacks import create_attack
    from ..checkpoint import load_checkpoint
    from ..training import TrainConfig
    from ..utils import resolve_device
    from ..workflows import train_victim
    ctx, cfg = task["context"], task["config"]
    with stages("load-data"):
        prep = prepared_data(ctx)
    attack = None
    if cfg["attack"]:
        a = cfg["attack"]
        attack = create_attack(a["name"], modality=a["modality"], **a["config"])
    clean = None
    if cfg.get("clean_model"):
        with stages("load-clean-model"):
            clean, _ = load_checkpoint(task["deps"][cfg["clean_model"]]["artifact"], resolve_device(ctx["device"]))
    tcfg = TrainConfig(**cfg["train"], device=ctx["device"], progress=False)
    with stages("train-victim"):
        _, record = train_victim(prep, ctx["model"], tcfg, width=ctx.get("width"), attack=attack, out=out,
                                 clean_model=clean)
    return {**record["metrics"], "inner_stages": record["stages"]}


def _load_victim(task: dict, stages: Stages):
    from ..attacks import attack_for_checkpoint
    from ..checkpoint import load_checkpoint
    from ..utils import resolve_device
    ctx = task["context"]
    folder = task["deps"][task["config"]["victim"]]["artifact"]
    with stages("load"):
        prep = prepared_data(ctx)
        model, meta = load_checkpoint(folder, resolve_device(ctx["device"]))
        attack = attack_for_checkpoint(folder)
    return prep, model, meta, attack


def _defense(task: dict):
    from ..defenses import create_defense
    cfg = task["config"]
    return create_defense(cfg["defense"], **cfg["options"], device=task["context"]["device"], progress=False)


def _purifier(task: dict, out: Path, stages: Stages) -> dict:
    """The same job as ``trojanguard purify`` (``purification.purify_setup``/``save_purified``)."""
    from ..purification import Setup, purify_setup, save_purified
    prep, model, meta, attack = _load_victim(task, stages)
    cfg = task["config"]
    setup = Setup(model, meta, prep.defense, prep.bundle.test, attack, "held-out D_def",
                  str(task["deps"][cfg["victim"]]["artifact"]))
    retuning = cfg.get("retuning")
    with stages("purify+evaluate"):
        purified, record = purify_setup(setup, cfg["defense"], cfg["options"], robustness=bool(retuning),
                                        seed=cfg["options"].get("seed", 0), device=task["context"]["device"],
                                        progress=False, retuning=retuning if isinstance(retuning, dict) else None)
    metrics = {("purify_" + k if k in ("seconds", "peak_rss_mb") else k): v for k, v in record.items()
               if k not in ("parent", "clean_data", "options")}
    metrics["clean_size"] = len(prep.defense)
    with stages("save"):
        save_purified(out, purified, setup, record)
    return metrics


def _detector(task: dict, out: Path, stages: Stages) -> dict:
    import torch
    from safetensors.torch import save_file

    from ..eval import metrics as M
    from ..eval.evaluate import predict
    from ..resultdir import write_result
    prep, model, _, attack = _load_victim(task, stages)
    det = _defense(task)
    with stages("fit"):
        det.fit(model, prep.defense)
    test = prep.bundle.test
    targets = attack.target_for(test.y)
    keep = (test.y != targets).nonzero().flatten()
    poisoned, tgt = test.subset(keep), targets[keep]
    with stages("score"):
        s_clean = det.score_data(test)
        s_pois = det.score_data(poisoned, trigger=attack.trigger)
    scores = torch.cat([s_clean, s_pois])
    labels = torch.cat([torch.zeros(len(s_clean), dtype=torch.bool), torch.ones(len(s_pois), dtype=torch.bool)])
    rep = M.detection_report(scores, labels, threshold=det.threshold)
    fpr, tpr, _ = M.roc_curve(scores, labels)
    pick = torch.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().long().unique().numpy()
    with stages("guard"):
        # the guard a deployer gets from a detector alone: flagged inputs are rejected, and a
        # rejection counts as a miss for CA and as a failure of the attack for ASR (detectors
        # that also purify: detect-then-purify below, these numbers kept as *_reject)
        flag_c, flag_p = s_clean > det.threshold, s_pois > det.threshold
        pred_c, pred_p = predict(model, test), predict(model, poisoned, trigger=attack.trigger)
        ok_c = (pred_c == test.y) & ~flag_c
        hit_p = (pred_p == tgt) & ~flag_p
    after = {"ca_after": float(ok_c.float().mean()), "asr_after": float(hit_p.float().mean()) if len(tgt) else None,
             "guard": "reject flagged"}
    frr_target = getattr(det, "frr", None)  # before detect-then-purify moves the threshold
    if hasattr(det, "fit_purifier"):
        with stages("detect-then-purify"):
            after = {**_detect_then_purify(model, det, prep.defense, test, poisoned, attack.trigger, tgt),
                     "ca_after_reject": after["ca_after"], "asr_after_reject": after["asr_after"]}
    with stages("save"), write_result(out, kind="bench-detector") as tmp:
        save_file({"clean": s_clean.contiguous(), "poisoned": s_pois.contiguous()}, str(tmp / "scores.safetensors"))
    return {**rep, "ca_before": M.accuracy(pred_c, test.y),
            "asr_before": M.attack_success_rate(pred_p, poisoned.y, tgt) if len(tgt) else None, **after,
            "flagged_clean": float(flag_c.float().mean()), "flagged_poisoned": float(flag_p.float().mean()),
            "frr_target": frr_target,
            "n_clean": len(s_clean), "n_poisoned": len(s_pois),
            "roc": {"fpr": fpr[pick].tolist(), "tpr": tpr[pick].tolist()}}


def _detect_then_purify(model, det, clean, test, poisoned, trigger, tgt) -> dict:
    """The guard with purification (``trojanguard.guard(..., purify=True)``): the purifier is
    fitted on the defender's clean data, the threshold moves to the detector's purification
    FRR (BadActs: 0.2, the official detect-then-purify script), and flagged inputs are
    predicted by the purified forward pass instead of being rejected."""
    import torch

    from ..eval import metrics as M
    from ..guarded import GuardedModel
    det.fit_purifier(clean)
    g = GuardedModel(model, det, purify=True)
    frr = getattr(det.cfg, "purify_frr", None)
    if frr is not None:
        g.set_frr(frr)

    def preds(data, trig):
        out = []
        for start in range(0, len(data), 256):
            x, y = data.batch(torch.arange(start, min(start + 256, len(data))))
            out.append(g(trig(x, y) if trig is not None else x).predictions.cpu())
        return torch.cat(out)
    pc, pp = preds(test, None), preds(poisoned, trigger)
    # how the purifier ended (BadActs: final c, clamped accuracy, restarts, a warning when capped)
    info = {k: v for k, v in (getattr(det, "purifier_info", None) or {}).items() if k != "history"}
    return {"ca_after": M.accuracy(pc, test.y), "asr_after": float((pp == tgt).float().mean()) if len(tgt) else None,
            "guard": f"detect-then-purify (FRR {g.frr:g})", "purifier_info": info}


def _inspector(task: dict, out: Path, stages: Stages) -> dict:
    from safetensors.torch import save_file

    from ..resultdir import write_json, write_result
    prep, model, _, _ = _load_victim(task, stages)
    with stages("inspect"):
        ins = _defense(task).inspect(model, prep.defense)
    truth = task["victim_info"]
    with stages("save"), write_result(out, kind="bench-inspector") as tmp:
        write_json(tmp / "inspection.json", {"verdict": ins.verdict, "probability": ins.probability,
                                             "target": ins.target, "evidence": ins.evidence})
        if ins.trigger:
            import torch
            tensors = {k: v.detach().cpu().contiguous() for k, v in ins.trigger.items() if isinstance(v, torch.Tensor)}
            if tensors:
                save_file(tensors, str(tmp / "trigger.safetensors"))
    return {"verdict": ins.verdict, "backdoored": ins.backdoored, "probability": ins.probability,
            "predicted_target": ins.target, "is_backdoored": truth["is_backdoored"], "true_target": truth["target"],
            "correct": ins.backdoored == truth["is_backdoored"],
            "target_correct": (ins.target == truth["target"]) if truth["target"] is not None else None,
            "evidence": ins.evidence, "inspect_seconds": ins.seconds}


RUNNERS = {"victim": _victim, "purifier": _purifier, "detector": _detector, "inspector": _inspector}

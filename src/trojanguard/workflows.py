"""End-to-end jobs shared by the CLI, the demo and the benchmark scripts."""
from __future__ import annotations

from pathlib import Path

from .attacks import Attack
from .checkpoint import METRICS, save_checkpoint
from .errors import UserError
from .eval.evaluate import evaluate
from .pipeline import Prepared, build_model, check_model_fits
from .resultdir import check_out, write_json, write_result
from .training import TrainConfig, train
from .utils import library_versions, measure, seed_everything


def train_victim(prep: Prepared, model_name: str, cfg: TrainConfig, width: int | None = None,
                 attack: Attack | None = None, out: str | Path | None = None,
                 clean_model=None) -> tuple[object, dict]:
    """Train a clean model (``attack=None``) or a backdoored one on ``prep.train``;
    evaluate CA (and ASR/RA with the attacker's trigger) on the test split; save the
    checkpoint, the attack artifact and ``metrics.json`` into ``out`` as one complete result
    folder (``resultdir``: an interrupted run leaves the old result or none, never a mix).

    ``clean_model`` is needed by attacks that fit their trigger on one (LC, TrojanNN, LF)."""
    if out is not None:
        check_out(out)  # before any work: an unwritable --out must not cost a training run
    stages = []
    train_data, poisoned = prep.train, None
    if attack is not None:
        attack.check_data(prep.train)  # options that cannot fit the data fail before fitting/training
        if attack.needs_clean_model:
            if clean_model is None:
                raise UserError(f"attack {attack.name} fits its trigger on a clean model; "
                                "pass --clean-model CHECKPOINT (e.g. from 'trojanguard train')")
            check_model_fits(clean_model, prep.bundle)
            with measure("fit-trigger") as st:
                attack.fit(clean_model, prep.train)
            stages.append(st)
        with measure("poison") as st:
            poisoned = attack.poison(prep.train)
        stages.append(st)
        train_data = poisoned.data
    seed_everything(cfg.seed)
    model = build_model(model_name, prep.bundle, width=width)
    hook = attack.training_hook() if attack is not None else None
    with measure("train") as st:
        res = train(model, train_data, prep.bundle.test, cfg, batch_hook=hook,
                    loss_fn=getattr(attack, "loss_fn", None),
                    extra_optimizers=attack.extra_optimizers() if hasattr(attack, "extra_optimizers") else ())
    stages.append(st)
    with measure("evaluate") as st:
        m = evaluate(model, prep.bundle.test, attack.trigger if attack else None,
                     attack.target_for if attack else None, per_class=True)
    stages.append(st)
    metrics = {**m, "seconds": sum(s.seconds for s in stages),
               "train_seconds": next(s.seconds for s in stages if s.name == "train"), "peak_rss_mb": max(s.peak_rss_mb for s in stages)}
    if attack is not None:
        metrics.update(attack=attack.name, ratio=attack.cfg.ratio if attack.cfg.count is None else None,
                       poisoned_count=poisoned.count,
                       poisoned_fraction=poisoned.count / len(prep.train))
    record = {"dataset": prep.describe(), "train_config": cfg.model_dump(), "seed": cfg.seed,
              "attack": attack.describe() if attack else None, "metrics": metrics,
              "history": res.history, "stages": [s.as_dict() for s in stages]}
    if out is not None:
        # one folder, renamed into place whole: a clean model written over an old attack run
        # cannot inherit its trigger, and a killed run cannot pair new weights with an old trigger
        with write_result(Path(out), kind="attack-run" if attack is not None else "train-run") as tmp:
            save_checkpoint(tmp, model, record)
            if attack is not None:
                attack.save(tmp)
            write_json(tmp / METRICS, {**metrics, "model": model.spec, "seed": cfg.seed,
                                       "train_config": cfg.model_dump(),
                                       "stages": record["stages"], "versions": library_versions()})
    return model, record

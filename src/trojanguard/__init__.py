"""trojanguard: find and remove backdoors in image and text classifiers.

The Python API mirrors the CLI::

    import trojanguard as tg
    from trojanguard.pipeline import prepare_data
    prep = prepare_data("cifar10", data_dir="../shared/data/cifar10", holdout=0.05)  # train / D_def / test
    model = tg.create_model("preact_resnet18", num_classes=10, width=16)
    result = tg.train(model, prep.train, prep.bundle.test, tg.recipe_for("cifar10", "preact_resnet18"))
    repaired = tg.create_defense("fst").purify(model, prep.defense)   # .model, .ok, .ca_before/.ca_after
    g = tg.guard(model, prep.defense)               # flags suspicious inputs: g(x).flags

Names are imported on first use (PEP 562), so ``import trojanguard`` and ``trojanguard
--help`` do not pay for torch.
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_WHERE = {
    "UserError": ".errors", "load_dataset": ".data", "split_holdout": ".data", "DATASETS": ".data",
    "create_model": ".models", "MODELS": ".models", "wrap": ".models", "load_foreign_model": ".models.foreign",
    "TrainConfig": ".training", "train": ".training", "recipe_for": ".training",
    "save_checkpoint": ".checkpoint", "load_checkpoint": ".checkpoint", "load_foreign_weights": ".checkpoint",
    "metrics": ".eval", "evaluate": ".eval.evaluate", "predict": ".eval.evaluate",
    "guard": ".guarded", "load_guard": ".guarded", "create_defense": ".defenses", "DEFENSES": ".defenses",
    "create_attack": ".attacks", "load_attack": ".attacks", "ATTACKS": ".attacks",
    "retuning_attack": ".defenses", "scan": ".practitioner", "repair": ".practitioner",
}

__all__ = [*_WHERE, "__version__"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trojanguard' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)

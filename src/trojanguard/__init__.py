"""trojanguard: find and remove backdoors in image and text classifiers.

The Python API mirrors the CLI::

    import trojanguard as tg
    data = tg.load_dataset("cifar10", data_dir="../shared/data/cifar10")
    model = tg.create_model("preact_resnet18", num_classes=10, width=16)
    result = tg.train(model, data.train, data.test, tg.recipe_for("cifar10", "preact_resnet18"))
    tg.save_checkpoint("runs/clean", model, meta={...})
"""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402
from .data import load_dataset, split_holdout, DATASETS  # noqa: E402
from .models import create_model, MODELS, wrap  # noqa: E402
from .models.foreign import load_foreign_model  # noqa: E402
from .train import TrainConfig, train, recipe_for  # noqa: E402
from .checkpoint import save_checkpoint, load_checkpoint, load_foreign_weights  # noqa: E402
from .eval import metrics  # noqa: E402
from .eval.evaluate import evaluate, predict  # noqa: E402
from .guard import guard, load_guard  # noqa: E402

__all__ = ["UserError", "load_dataset", "split_holdout", "DATASETS", "create_model", "MODELS", "wrap",
           "load_foreign_model",
           "TrainConfig", "train", "recipe_for", "save_checkpoint", "load_checkpoint",
           "load_foreign_weights", "metrics", "evaluate", "predict", "guard", "load_guard", "__version__"]

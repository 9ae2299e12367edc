"""Any ``nn.Module`` classifier as a :class:`TrojanModel`, so that every defense runs on it.

    import trojanguard as tg
    model = tg.wrap(my_resnet, head="fc", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

What the adapter adds, and how (the module itself is not changed):

* ``head``: the ``nn.Linear`` that produces the logits, named by ``head=`` (a dotted
  submodule path such as ``"fc"`` or ``"classifier.1"``) or, by default, the last
  ``nn.Linear`` registered in the module. A model with no linear head (a final 1x1
  ``Conv2d`` classifier, a classifier ``nn.Sequential`` without ``Linear``) is a
  ``UserError`` that names what it found instead.
* ``forward(x)``: the module's own forward, unchanged (a Hugging Face output object is
  reduced to its ``logits``); ``features(x)`` = the input of the head, captured with a
  forward pre-hook on the head during that same forward. The hook is registered per call
  and removed afterwards, so ``copy.deepcopy`` and pickling see a plain module.
* ``named_layers()``: the layers named by ``layers=`` (dotted paths, or a dict short name
  -> path), else a default rule (see :func:`default_layers`), used by ``capture`` and
  ``intervene`` (inherited from ``TrojanModel``).
* Normalisation: with ``mean``/``std`` the adapter normalises inside (``Normalize``), so
  that inputs stay in [0, 1] pixel space like every trojanguard model and triggers are
  applied to pixels; without them the module must take [0, 1] images itself.
* ``spec``: a description (``{"name": "wrap:<class>", "args": {...}}``) recorded with a
  checkpoint; a wrapped module's code is not in the checkpoint, so it is rebuilt in
  Python (``load_foreign_weights(folder / "model.safetensors", wrap(MyNet(), ...))``).

The one property the adapter cannot see statically is that the head's output *is* the
module's output (nothing after it: no softmax, no second head); :func:`verify_head` checks
it on real inputs and ``check_model_data`` (models/foreign.py) runs it on the clean data.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import UserError
from .base import Normalize, TrojanModel, unit_pixels

# Modules that keep the spatial map of a conv group (a group = conv + these, up to the next conv)
_POINTWISE = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
              nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Dropout2d)
_NOT_POINTWISE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)


def _logits(out) -> torch.Tensor:
    """The logits of whatever a classifier's forward returns (tensor, HF output, tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise UserError(f"the wrapped module returned a {type(out).__name__}, not logits; wrap a module whose "
                    "forward returns the logits tensor (or an object with .logits)")


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _has_conv(m: nn.Module) -> bool:
    return any(isinstance(s, nn.Conv2d) for s in m.modules())


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _describe_end(module: nn.Module) -> str:
    """'Conv2d 'classifier.1'' for the last module with parameters (for error messages)."""
    last = [(n, m) for n, m in module.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    if not last:
        return "no layer with parameters"
    n, m = last[-1]
    return f"{type(m).__name__} {n!r}"


def find_head(module: nn.Module, head: str | None = None) -> str:
    """Dotted path of the linear head: ``head`` checked, or the last ``nn.Linear``."""
    cls = type(module).__name__
    if head is not None:
        try:
            found = module.get_submodule(head)
        except AttributeError:
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            raise UserError(f"{cls} has no submodule {head!r}; its nn.Linear layers are "
                            f"{linears[-5:] or 'none'}: pass one of them as head=") from None
        if not isinstance(found, nn.Linear):
            raise UserError(f"head {head!r} of {cls} is a {type(found).__name__}, not an nn.Linear; defenses "
                            "re-initialise and read the final linear layer: name the nn.Linear that outputs "
                            "the logits (e.g. head='classifier.1')")
        return head
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"found no nn.Linear in {cls} (it ends in {_describe_end(module)}); the defenses need "
                        "the logits to come from an nn.Linear head: replace the final layer by an nn.Linear "
                        "(e.g. a 1x1 conv classifier by pooling + nn.Linear)")
    path = names[-1]
    after = False
    for n, m in module.named_modules():
        if n == path:
            after = True
        elif after and isinstance(m, nn.Conv2d) and not _inside(n, path):
            raise UserError(f"the last nn.Linear of {cls} ({path!r}) is followed by {type(m).__name__} {n!r}, so it "
                            "is not the classifier; the defenses need an nn.Linear head: pass head='<name>' or "
                            "replace the final conv classifier by an nn.Linear")
    return path


def _block_lists(module: nn.Module, head: str) -> list[tuple[str, list[str], int]]:
    """(path, child paths, parameter count) of every ModuleList/Sequential whose children
    are at least two modules of one class, each with parameters (encoder blocks, stages)."""
    found = []
    for name, m in module.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1 or not all(_has_params(c) for _, c in kids):
            continue
        paths = [f"{name}.{k}" if name else k for k, _ in kids]
        if any(_inside(head, p) for p in paths):
            continue
        found.append((name, paths, sum(p.numel() for p in m.parameters())))
    return found


def _cnn_stages(module: nn.Module, head: str) -> list[str]:
    """CNN default: descend while one child holds every conv (``features`` of a VGG, the
    backbone inside a wrapper module); then
    each child that contains convs is a stage, and a bare ``Conv2d`` starts a group that
    runs over the norms/activations/pools after it, whose last member is the layer (so a
    flat ``nn.Sequential`` CNN gets one layer per conv block, after its ReLU/pool)."""
    node, prefix = module, ""
    while True:
        convs = [(n, c) for n, c in node.named_children() if _has_conv(c)]
        if len(convs) == 1 and not isinstance(convs[0][1], nn.Conv2d) and list(convs[0][1].children()):
            node, prefix = convs[0][1], prefix + convs[0][0] + "."
            continue
        break
    layers: list[str] = []
    last: str | None = None  # last member of the open conv group
    for n, c in node.named_children():
        path = prefix + n
        if _inside(head, path):
            break
        if _has_conv(c):
            if last:
                layers.append(last)
            if isinstance(c, nn.Conv2d):
                last = path
            else:
                layers.append(path)
                last = None
        elif last and isinstance(c, _POINTWISE + _activation_types()) and not isinstance(c, _NOT_POINTWISE):
            last = path
        elif last:
            layers.append(last)
            last = None
    if last:
        layers.append(last)
    return layers


def _activation_types() -> tuple[type, ...]:
    import torch.nn.modules.activation as act
    return tuple(v for v in vars(act).values() if isinstance(v, type) and issubclass(v, nn.Module)
                 and v is not nn.Module and v.__module__ == act.__name__)


def default_layers(module: nn.Module, head: str) -> list[str]:
    """The layers defenses read when the user names none (dotted paths):

    * mostly convolutional models (conv weights >= half of the non-head parameters):
      a list of same-class stages holding >= 90 % of the parameters when there is one
      (Hugging Face ResNet ``encoder.stages``), else the CNN stage rule of ``_cnn_stages``
      (torchvision-style ResNet -> stem, layer1..layer4; flat ``nn.Sequential`` -> one layer
      per conv block);
    * other models (transformers, ConvNeXt, MLPs): the elements of the same-class block list
      with the most parameters (encoder blocks), else the direct children with parameters.

    Our reading of "stages for CNNs, encoder blocks for transformers"; the thresholds only
    separate the two families and were not tuned on any test."""
    total = sum(p.numel() for n, p in module.named_parameters() if not _inside(n, head))
    conv = sum(p.numel() for m in module.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())
    lists = sorted(_block_lists(module, head), key=lambda t: (-t[2], t[0].count(".")))
    if total and conv >= total / 2:
        if lists and lists[0][2] >= 0.9 * total:
            return lists[0][1]
        stages = _cnn_stages(module, head)
        if stages:
            return stages
    if lists:
        return lists[0][1]
    return [n for n, c in module.named_children() if _has_params(c) and not _inside(head, n)]


class WrappedModel(TrojanModel):
    """A ``TrojanModel`` over any classifier module (see the module docstring)."""

    def __init__(self, module: nn.Module, head: str | None = None,
                 layers: Sequence[str] | Mapping[str, str] | None = None, modality: str = "image",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 classes: Sequence[str] | None = None, input_size: tuple[int, int] | None = None,
                 tokenizer=None, max_length: int = 128, input_name: str | None = None):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise UserError(f"wrap() needs a torch nn.Module, got {type(module).__name__}")
        if modality not in ("image", "text"):
            raise UserError(f"modality {modality!r} is not 'image' or 'text'")
        if modality == "text" and tokenizer is None:
            raise UserError("a text model needs its tokenizer: wrap(module, modality='text', tokenizer=tok)")
        if modality == "text" and (mean is not None or std is not None):
            raise UserError("mean/std apply to image models only")
        self.modality = modality
        self.net = module
        self._head_path = find_head(module, head)
        if isinstance(layers, Mapping):
            layer_map = dict(layers)
        else:
            paths = list(layers) if layers is not None else default_layers(module, self._head_path)
            if not paths:
                raise UserError(f"found no layers to read in {type(module).__name__}; pass layers=[...] with "
                                "dotted names of its blocks (print(module) shows them)")
            layer_map = {p: p for p in paths}
        for name, path in layer_map.items():
            try:
                module.get_submodule(path)
            except AttributeError:
                top = [n for n, _ in module.named_children()]
                raise UserError(f"{type(module).__name__} has no layer {path!r}; its top-level children are "
                                f"{top[:12]}: name layers by dotted path (print(module) shows them)") from None
        self._layers = layer_map
        in_channels = next((m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        self.in_channels = in_channels
        if (mean is None) != (std is None):
            raise UserError("give both mean and std (per channel), or neither")
        self.normalize: nn.Module = nn.Identity()
        if mean is not None:
            mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
            if len(mean) != len(std) or (in_channels and len(mean) not in (1, in_channels)):
                raise UserError(f"mean has {len(mean)} values and std {len(std)} for a model with "
                                f"{in_channels} input channels; give one value per channel")
            if any(s <= 0 for s in std):
                raise UserError("std values must be positive")
            self.normalize = Normalize(mean, std)
        self.mean, self.std = mean, std
        self.input_size = tuple(input_size) if input_size is not None else None
        self.tokenizer, self.max_length = tokenizer, max_length
        self.input_name = input_name
        k = self.head.out_features
        if classes is not None:
            classes = [str(c) for c in classes]
            if len(classes) != k:
                raise UserError(f"{len(classes)} class names given for a model with {k} outputs; give {k}")
        self.classes = classes
        self.feature_dim = self.head.in_features
        args: dict[str, Any] = {"num_classes": k, "head": self._head_path}
        if mean is not None:
            args.update(mean=list(mean), std=list(std))
        self.spec = {"name": f"wrap:{type(module).__module__}.{type(module).__qualname__}", "args": args}

    # --- the interface ------------------------------------------------------------------
    @property
    def head(self) -> nn.Linear:  # resolved on every access: a deep copy finds its own head
        return self.net.get_submodule(self._head_path)

    def named_layers(self) -> dict[str, nn.Module]:
        return {name: self.net.get_submodule(path) for name, path in self._layers.items()}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise UserError("this model takes images, not text")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        dev = self.head.weight.device
        return {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev)}

    def _run(self, x) -> Any:
        if self.modality == "text":
            if isinstance(x, (list, tuple)):
                x = self.tokenize(list(x))
            return self.net(**x)
        x = self.normalize(unit_pixels(x))
        return self.net(**{self.input_name: x}) if self.input_name else self.net(x)

    def forward(self, x) -> torch.Tensor:
        return _logits(self._run(x))

    def features(self, x) -> torch.Tensor:
        box: dict[str, torch.Tensor] = {}

        def grab(_m, inp):
            box["f"] = inp[0]
        handle = self.head.register_forward_pre_hook(grab)
        try:
            self._run(x)
        finally:
            handle.remove()
        if "f" not in box:
            raise UserError(f"the head {self._head_path!r} was not called by {type(self.net).__name__}.forward; "
                            "pass head= the nn.Linear that outputs the logits")
        return box["f"]

    def extra_repr(self) -> str:
        return f"head={self._head_path!r}, layers={list(self._layers)}, modality={self.modality!r}"


@torch.no_grad()
def verify_head(model: WrappedModel, x) -> None:
    """The module's output must be its head's output on the captured features (nothing
    after the head: no softmax, no averaging of two heads); checked in eval mode."""
    was = model.training
    model.eval()
    try:
        out = model(x)
        feats = model.features(x)
        via_head = model.head(feats)
    finally:
        model.train(was)
    if out.shape != via_head.shape or not torch.allclose(out.float(), via_head.float(), rtol=1e-4, atol=1e-5):
        raise UserError(f"the output of {type(model.net).__name__} is not the output of its head "
                        f"{model._head_path!r} (something runs after it, e.g. a softmax); wrap the module "
                        "without what follows the head, or pass head= the final nn.Linear")


def wrap(module: nn.Module, head: str | None = None, layers: Sequence[str] | Mapping[str, str] | None = None,
         modality: str = "image", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
         classes: Sequence[str] | None = None, input_size: tuple[int, int] | None = None,
         tokenizer=None, max_length: int = 128) -> WrappedModel:
    """Give any classifier ``module`` the interface every trojanguard defense uses.

    ``head``: dotted name of the final ``nn.Linear`` (default: the last one); ``layers``:
    dotted names of the layers defenses read (default: stages / encoder blocks, see
    :func:`default_layers`); ``mean``/``std``: the normalisation the module was trained
    with (inputs then stay in [0, 1]); ``classes``: class names; ``input_size``: (H, W) the
    module takes; when given, the head is checked on a random input right away (else on
    the clean data by ``check_model_data``). Text: ``modality="text"`` with the module's
    ``tokenizer``; the module is called as ``module(input_ids=..., attention_mask=...)``."""
    model = WrappedModel(module, head, layers, modality, mean, std, classes, input_size, tokenizer, max_length)
    if input_size is not None and modality == "image":
        c = model.in_channels or (len(model.mean) if model.mean else 3)
        dev = next(module.parameters()).device
        verify_head(model, torch.rand(2, c, *input_size, device=dev))
    return model

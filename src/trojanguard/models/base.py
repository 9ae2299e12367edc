"""The one interface every trojanguard model offers.

Defenses need three things from a classifier, whatever its modality:
  * the linear head ``model.head`` (FST re-initialises it, WIPER regularises it),
  * the penultimate features ``model.features(x)`` (input to the head),
  * named intermediate layers whose outputs can be captured or replaced
    (BadActs clamps them, BeniFul and NAD read them, Fine-Pruning/ANP mask them).

Layers are addressed by short stable names (``"layer3"``, ``"block2"``) listed by
``model.layer_names()``; ``capture`` and ``intervene`` use forward hooks so that the
model code itself stays a plain ``nn.Module``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


def _main_output(out):
    # HF encoder blocks return tuples whose first element is the hidden state.
    return out[0] if isinstance(out, (tuple, list)) else out


class TrojanModel(nn.Module):
    """Base class: ``forward(x) == head(features(x))``."""

    #: "image" (float tensors in [0,1], NCHW) or "text" (lists of strings, tokenised inside)
    modality: str = "image"
    head: nn.Linear

    # --- to implement -------------------------------------------------------------
    def features(self, x) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def named_layers(self) -> dict[str, nn.Module]:  # pragma: no cover - abstract
        """Ordered mapping name -> module of the capturable intermediate layers."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------
    def forward(self, x) -> torch.Tensor:
        return self.head(self.features(x))

    def layer_names(self) -> list[str]:
        return list(self.named_layers())

    def get_layer(self, name: str) -> nn.Module:
        layers = self.named_layers()
        if name not in layers:
            raise KeyError(f"unknown layer {name!r}; this model has {list(layers)}")
        return layers[name]

    @property
    def default_middle_layer(self) -> str:
        """The layer BeniFul splits at by default (the middle of the network)."""
        names = self.layer_names()
        return names[(len(names) - 1) // 2 + (len(names) > 3)]

    @contextlib.contextmanager
    def capture(self, names: list[str] | str | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Record the outputs of the named layers during forward passes in the block.

        >>> with model.capture(["layer3"]) as acts:
        ...     model(x)
        >>> acts["layer3"].shape
        """
        if names is None:
            names = self.layer_names()
        elif isinstance(names, str):
            names = [names]
        acts: dict[str, torch.Tensor] = {}
        handles = []
        for name in names:
            def hook(_m, _inp, out, name=name):
                acts[name] = _main_output(out)
            handles.append(self.get_layer(name).register_forward_hook(hook))
        try:
            yield acts
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def intervene(self, fns: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
        """Replace the output of each named layer by ``fn(output)`` inside the block."""
        handles = []
        for name, fn in fns.items():
            def hook(_m, _inp, out, fn=fn):
                if isinstance(out, (tuple, list)):
                    return (fn(out[0]), *out[1:])
                return fn(out)
            handles.append(self.get_layer(name).register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def unit_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0-255, as the datasets store them) as floats in [0, 1], where every model
    and trigger works; other tensors unchanged."""
    return x.float() / 255 if x.dtype == torch.uint8 else x


class Normalize(nn.Module):
    """Per-channel normalisation kept inside the model, so that attacks, triggers and
    defenses all work in [0, 1] pixel space and checkpoints are self-describing."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (unit_pixels(x) - self.mean) / self.std

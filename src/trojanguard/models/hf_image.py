"""Hugging Face image classifiers from a local directory (``save_pretrained`` output), as
trojanguard models: ``create_model("hf-image:<dir>")``.

The model is ``transformers.AutoModelForImageClassification`` behind the generic adapter
(models/adapter.py): head = the final classifier ``nn.Linear`` (ResNet ``classifier.1``, ViT
and ConvNeXt ``classifier``), features = its input, named layers = the stages (ResNet,
ConvNeXt: ``stage0..``) or the encoder blocks (ViT, DeiT, Dinov2: ``block0..``).
Normalisation and input size come from ``preprocessor_config.json`` (``image_mean``,
``image_std``, ``do_normalize``, ``crop_size``/``size``) and are applied inside, so inputs
are [0, 1] images at the model's size (flags ``mean``/``std`` override). Class names come
from the config's ``id2label`` unless they are transformers' placeholders ``LABEL_i``.

Checked with transformers 5.x without torchvision: ResNet, ViT and ConvNeXt (and every
other ``*ForImageClassification`` class we tried: DeiT, Dinov2, Swin, RegNet, MobileNetV2,
EfficientNet ...) import and run without it; we never use the image *processors* (the fast
ones want torchvision), only read their JSON. Weights are read by transformers from
safetensors, or from ``pytorch_model.bin`` through ``torch.load(weights_only=True)``;
``trust_remote_code`` is never set, so a directory cannot bring code.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .adapter import WrappedModel, default_layers, find_head

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MAX_CONFIG_BYTES = 4 * 2**20
MAX_PARAMS = 2_000_000_000  # a config asking for more is refused before anything is allocated
PREFIXES = ("hf-image:", "hf-text:")


def hf_dir(spec: str) -> Path:
    """``hf-image:<dir>`` / ``hf-text:<dir>`` / ``<dir>`` -> the directory, which must hold config.json."""
    for p in PREFIXES + ("hf:",):
        if spec.startswith(p):
            spec = spec[len(p):]
            break
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"{str(path)!r} is not a Hugging Face model directory (no config.json); give the "
                        "folder written by save_pretrained")
    return path


def read_json(path: Path, what: str) -> dict[str, Any]:
    from ..resultdir import read_bounded
    try:
        obj = json.loads(read_bounded(path, MAX_CONFIG_BYTES, what))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-save the model directory") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def hf_kind(path: Path) -> str:
    """'image' (an image classifier), 'text' (a sequence classifier) or 'encoder'."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as IMG,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as SEQ)
    cfg = read_json(path / "config.json", "config.json")
    archs = cfg.get("architectures") or []
    archs = [a for a in archs if isinstance(a, str)]
    mtype = cfg.get("model_type")
    if any(a.endswith("ForImageClassification") for a in archs) or (not archs and mtype in IMG):
        return "image"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text"
    if mtype in IMG and mtype not in SEQ:
        raise UserError(f"{path} holds a {mtype} model without an image classifier ({archs or 'no architectures'}); "
                        "save the *ForImageClassification model")
    return "encoder"


def classes_from_config(config) -> list[str] | None:
    """Class names from ``id2label``, None for transformers' placeholders (LABEL_0, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(config.num_labels)]
    if not all(names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def load_config(path: Path, num_classes: int | None, pretrained: bool):
    """The transformers config, with ``num_classes`` checked (pretrained: it must be the
    classifier's own count) or applied (rebuilding a checkpoint of ours)."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise UserError(f"{path}/config.json cannot be read by transformers ({str(e).splitlines()[0][:160]})") from None
    if num_classes is not None and num_classes != config.num_labels:
        if pretrained:
            raise UserError(f"the classifier in {path} has {config.num_labels} classes, not {num_classes}; "
                            "use a model trained on your classes (or drop --num-classes)")
        config.num_labels = num_classes
    return config


def build_hf(path: Path, config, auto_cls, pretrained: bool) -> torch.nn.Module:
    """Instantiate ``auto_cls`` from ``path`` (weights) or ``config`` (random, weights follow),
    after checking on the meta device that the config asks for a sane model."""
    try:
        with torch.device("meta"):
            skeleton = auto_cls.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
        raise UserError(f"{path}/config.json does not describe a model transformers can build "
                        f"({str(e).splitlines()[0][:160]})") from None
    n = sum(p.numel() for p in skeleton.parameters())
    del skeleton
    if n > MAX_PARAMS:
        raise UserError(f"{path}/config.json asks for {n:,} parameters (more than {MAX_PARAMS:,}); refusing")
    if pretrained:
        files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")]
        if not files:
            raise UserError(f"{path} has no weights (model.safetensors); save the model with save_pretrained")
        # fp16/bf16 weights hold 2 bytes a parameter: a config far bigger than the files is forged
        if sum(f.stat().st_size for f in files) < n * 2 * 0.9:
            raise UserError(f"{path}/config.json describes {n:,} parameters but the weight files are smaller; "
                            "the directory is inconsistent, re-save it")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # our commands print their own stages
    try:
        if pretrained:
            return auto_cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, weights_only=True)
        return auto_cls.from_config(config)
    except OSError as e:
        raise UserError(f"cannot load {path}: {str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken directory
        if "unpickl" in str(e).lower() or "weights_only" in str(e):
            raise UserError(f"refused to load {path}: its .bin weights need code to unpickle; ask for "
                            "model.safetensors") from None
        raise UserError(f"cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _size(pre: dict[str, Any]) -> tuple[int, int] | None:
    """Input size (H, W) the processor produces: crop_size when it crops, else size."""
    def hw(v) -> tuple[int, int] | None:
        if isinstance(v, int) and not isinstance(v, bool):
            return (v, v)
        if isinstance(v, dict):
            if isinstance(v.get("height"), int) and isinstance(v.get("width"), int):
                return (v["height"], v["width"])
            if isinstance(v.get("shortest_edge"), int):
                return (v["shortest_edge"], v["shortest_edge"])
        return None
    size = hw(pre.get("crop_size")) if pre.get("do_center_crop") else None
    size = size or hw(pre.get("size"))
    if size is not None and not all(1 <= s <= 8192 for s in size):
        raise UserError(f"preprocessor_config.json: image size {size} is out of range")
    return size


def _stats(pre: dict[str, Any], key: str, channels: int) -> tuple[float, ...] | None:
    v = pre.get(key)
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * channels
    if (not isinstance(v, list) or len(v) != channels
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in v)):
        raise UserError(f"preprocessor_config.json: {key} must be {channels} finite numbers (the model takes "
                        f"{channels}-channel images), got {str(v)[:80]}; fix the file or pass --mean/--std with "
                        "one value per channel")
    if key == "image_std" and any(t <= 0 for t in v):
        raise UserError("preprocessor_config.json: image_std values must be positive")
    return tuple(float(t) for t in v)


def layer_names(net: torch.nn.Module, head: str, prefix: str) -> dict[str, str]:
    """``{stage0: <path>, ...}``: the default layers under short names."""
    return {f"{prefix}{i}": p for i, p in enumerate(default_layers(net, head))}


class HFImageClassifier(WrappedModel):
    """A local ``AutoModelForImageClassification`` directory as a trojanguard model."""

    def __init__(self, path: str, num_classes: int | None = None, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, pretrained: bool = True):
        try:
            from transformers import AutoModelForImageClassification
        except ImportError:
            raise UserError("Hugging Face models need transformers; run: pip install 'trojanguard[text]'") from None
        d = hf_dir(path)
        if hf_kind(d) != "image":
            raise UserError(f"{d} does not hold an image classifier (config.json architectures); "
                            "for a text classifier use hf-text:<dir>")
        config = load_config(d, num_classes, pretrained)
        net = build_hf(d, config, AutoModelForImageClassification, pretrained)
        channels = int(getattr(config, "num_channels", 3))
        pre = read_json(d / "preprocessor_config.json", "preprocessor_config.json") \
            if (d / "preprocessor_config.json").is_file() else {}
        if (mean is None) != (std is None):
            raise UserError("give both --mean and --std, or neither")
        source = "flags"
        if mean is None:
            source = "none: the model takes [0, 1] pixels (no image_mean/image_std in preprocessor_config.json)"
            if pre.get("do_normalize", True) and pre.get("image_mean") is not None:
                mean, std = _stats(pre, "image_mean", channels), _stats(pre, "image_std", channels)
                if std is None:
                    raise UserError(f"{d}/preprocessor_config.json has image_mean but no image_std; add it "
                                    "or pass --mean/--std")
                source = "preprocessor_config.json"
        size, size_source = _size(pre), "preprocessor_config.json"
        image_size = getattr(config, "image_size", None)
        if size is None and isinstance(image_size, int):
            size, size_source = (image_size, image_size), "config.json image_size"
        head = find_head(net)
        conv_family = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != m.stride for m in net.modules())
        super().__init__(net, head, layer_names(net, head, "stage" if conv_family else "block"), "image",
                         mean, std, classes_from_config(config), size, input_name="pixel_values")
        self.in_channels = channels
        self.normalization_source, self.size_source = source, size_source
        self.hf_model_type = config.model_type
        args: dict[str, Any] = {"num_classes": self.head.out_features}
        if mean is not None and source == "flags":
            args.update(mean=list(mean), std=list(std))
        self.spec = {"name": f"hf-image:{path.split(':', 1)[1] if path.startswith('hf-image:') else path}",
                     "args": args}

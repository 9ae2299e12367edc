"""A model someone gave you, in any of the forms the workflow commands accept:

* a trojanguard checkpoint folder (``model.json`` + ``model.safetensors``);
* a bare state dict, ``.safetensors`` or ``.pt``/``.pth``/``.bin`` (read only through
  ``torch.load(weights_only=True)``: a file that needs code to unpickle is refused), with
  ``arch`` = a registry name (``small_cnn``, ``preact_resnet18``, ``minilm``, ``hf:<dir>``);
  class count, input channels and width are read off the weights' shapes unless given;
* a local Hugging Face directory: an image classifier (``hf-image``) or a sequence
  classifier with its tokenizer (``hf-text``).

``load_foreign_model`` returns ``(model, meta)``: ``meta`` is shaped like a checkpoint's
``model.json`` (``model``, ``dataset.classes``) plus ``source`` (what was read) and
``choices`` (every default the loader took and why, for the reports).
``check_model_data`` is the one-line check of the model against the clean data.
(A Python ``nn.Module`` comes in through ``trojanguard.wrap``, models/adapter.py.)
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from . import HF_PREFIXES, MODELS, create_model
from .adapter import WrappedModel, verify_head

STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_ARCH_HINT = "pass the --arch/--width/--num-classes it was trained with"


def _arch_names() -> str:
    return ", ".join([*MODELS.names(), "hf:<encoder dir>"])


def load_foreign_model(path: str | Path, arch: str | None = None, num_classes: int | None = None,
                       width: int | None = None, in_channels: int | None = None,
                       classes: Sequence[str] | None = None, mean: Sequence[float] | None = None,
                       std: Sequence[float] | None = None, device: str | torch.device = "cpu",
                       verify: bool = True, dataset_norm: tuple | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load ``path`` (checkpoint folder, state dict file, HF directory) as a trojanguard model.

    Flags that the file already records (``arch``/``width``/normalisation of a checkpoint)
    are refused rather than silently ignored; a flag that contradicts the file (class count)
    is a one-line ``UserError``. ``dataset_norm`` = (mean, std, dataset name): the normalisation
    a bare image state dict takes when --mean/--std are not given and the channels agree (the
    dataset's, as ``train`` builds a model for it), instead of the architecture's default."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model {str(p)!r} does not exist; give a trojanguard checkpoint folder, a .safetensors/.pt "
                        "state dict with --arch, or a Hugging Face model directory")
    if (mean is None) != (std is None):
        raise UserError("give both --mean and --std (one value per channel), or neither")
    choices: list[str] = []
    if p.is_file() and p.name in ("model.json", "model.safetensors") and (p.parent / "model.json").exists():
        p = p.parent  # a file inside our checkpoint folder: the folder
    if p.is_dir() and ((p / "model.json").exists() or (p / "COMPLETE.json").exists()):
        _refuse(p, "a trojanguard checkpoint, which records its architecture and normalisation",
                arch=arch, width=width, in_channels=in_channels, mean=mean)
        from ..checkpoint import load_checkpoint
        model, meta = load_checkpoint(p, device, verify)
        meta = dict(meta)
        kind = "checkpoint"
    elif p.is_dir() and (p / "config.json").is_file():
        _refuse(p, "a Hugging Face directory, whose config.json describes the architecture",
                arch=arch, width=width, in_channels=in_channels)
        from .hf_image import hf_kind
        kind = hf_kind(p)
        if kind == "image":
            kw: dict[str, Any] = {"num_classes": num_classes} if num_classes else {}
            if mean is not None:
                kw.update(mean=tuple(mean), std=tuple(std))
            model = create_model(f"hf-image:{p.resolve()}", **kw)  # absolute: the checkpoint records it
            choices.append(f"normalisation from {model.normalization_source}")
            if model.input_size:
                choices.append(f"input size {model.input_size[1]}x{model.input_size[0]} from {model.size_source}")
        elif kind == "text":
            if mean is not None:
                raise UserError("--mean/--std apply to image models; this is a text classifier")
            model = create_model(f"hf-text:{p.resolve()}", **({"num_classes": num_classes} if num_classes else {}))
        else:
            raise UserError(f"{p} holds an encoder without a trained classifier head; train one first "
                            f"('trojanguard train --model hf:{p} ...') or give a *ForSequenceClassification / "
                            "*ForImageClassification directory")
        model.to(device).eval()
        kind = f"hf-{kind}"
        meta = {"model": model.spec}
        if model.classes:
            meta["dataset"] = {"classes": list(model.classes)}
            choices.append("class names from config.json (id2label)")
    elif p.is_file() and p.suffix.lower() in STATE_SUFFIXES:
        if not arch:
            raise UserError(f"{p.name} is a bare state dict: give its architecture with --arch NAME "
                            f"({_arch_names()}) and, if it cannot be read off the weights, --num-classes/--width")
        model, choices = _from_state_dict(p, arch, num_classes, width, in_channels, mean, std, dataset_norm)
        model.to(device).eval()
        kind = "state-dict"
        meta = {"model": model.spec}
    elif p.is_dir():
        from ..resultdir import read_result
        read_result(p)  # the temporary folder of a run being written or killed: "incomplete result"
        raise UserError(f"{p} is neither a trojanguard checkpoint (model.json) nor a Hugging Face model directory "
                        "(config.json)")
    else:
        raise UserError(f"{p.name}: unknown model file type {p.suffix or '(none)'}; give a .safetensors or .pt "
                        "state dict (with --arch), a checkpoint folder or a Hugging Face directory")
    k = model.head.out_features
    if k < 2:
        raise UserError(f"the model in {p} has {k} output class; trojanguard needs a classifier with "
                        "at least 2 classes, one output each (give a single-logit binary model a 2-output head)")
    if num_classes is not None and num_classes != k:
        raise UserError(f"--num-classes {num_classes} but the model in {p} has {k} outputs; drop --num-classes "
                        "or give the model trained on your classes")
    ds = dict(meta.get("dataset") or {})
    if classes is not None:
        classes = [str(c).strip() for c in classes]
        if len(classes) != k:
            raise UserError(f"--classes names {len(classes)} classes but the model has {k} outputs; give {k} names")
        if len(set(classes)) != len(classes):
            raise UserError("--classes has a repeated name; give each class once")
        ds["classes"] = classes
        choices.append("class names from --classes")
    elif not ds.get("classes"):
        choices.append(f"class names: none recorded, using 0..{k - 1} (pass --classes to name them)")
    if ds:
        meta["dataset"] = ds
    meta["source"] = {"kind": kind, "path": str(p)}
    meta["choices"] = list(meta.get("choices") or []) + choices
    return model, meta


def is_bare_state_dict(path: str | Path) -> bool:
    """A weights file outside a trojanguard checkpoint folder (it records no architecture)."""
    p = Path(path).expanduser()
    return p.is_file() and p.suffix.lower() in STATE_SUFFIXES and not (p.parent / "model.json").exists()


def _refuse(p: Path, what: str, **flags) -> None:
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if given:
        raise UserError(f"{'/'.join(given)} {'does' if len(given) == 1 else 'do'} not apply: {p} is {what}; "
                        "drop them")


def _from_state_dict(p: Path, arch: str, num_classes, width, in_channels, mean, std, dataset_norm=None):
    """Build ``arch`` sized for the weights in ``p`` and load them. Returns (model, choices)."""
    from ..checkpoint import _check_fit, _check_finite, _load_state, read_weights_file
    state = read_weights_file(p)
    choices: list[str] = []
    text = arch == "minilm" or arch.startswith("hf:")
    if arch.startswith(HF_PREFIXES[1:]):
        raise UserError(f"--arch {arch}: a Hugging Face classifier directory is loaded directly: --model <dir>")
    factory = MODELS.get(arch) if not text else None  # unknown names: one line listing the known ones
    params = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters if factory else {}
    args: dict[str, Any] = {}
    if num_classes is None:
        w = state.get("head.weight")
        if w is None or w.ndim != 2:
            raise UserError(f"{p.name} has no head.weight to read the class count from; pass --num-classes")
        num_classes = int(w.shape[0])
        choices.append(f"{num_classes} classes, read off head.weight")
    args["num_classes"] = num_classes
    if text:
        if width is not None or in_channels is not None or mean is not None:
            raise UserError("--width/--mean/--std apply to image architectures")
        try:
            model = create_model(arch, pretrained=False, **args)
        except TypeError as e:
            raise UserError(f"--arch {arch} cannot be built ({e})") from None
        _load_state(model, state, str(p))
        _check_finite(state, str(p))
        return model.eval(), choices
    for key, val in (("width", width), ("in_channels", in_channels)):
        if val is not None:
            if key not in params:
                raise UserError(f"--arch {arch} has no {key.replace('_', '-')} option")
            args[key] = val
    if mean is not None:
        if "mean" not in params:
            raise UserError(f"--arch {arch} takes no --mean/--std")
        args.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    # read what the first convolution says: input channels and, by the ratio to the default, the width
    with torch.device("meta"):
        skel = _build(arch, args)
    conv_name, conv = next(((n, m) for n, m in skel.named_modules() if isinstance(m, torch.nn.Conv2d)), (None, None))
    w = state.get(f"{conv_name}.weight") if conv_name else None
    if w is not None and w.ndim == 4:
        c_out, c_in = int(w.shape[0]), int(w.shape[1])
        if "in_channels" in params and "in_channels" not in args and c_in != conv.in_channels:
            args["in_channels"] = c_in
            choices.append(f"{c_in} input channels, read off {conv_name}.weight")
        default_w = params["width"].default if "width" in params else None
        if "width" not in args and isinstance(default_w, int) and c_out != conv.out_channels:
            guess = default_w * c_out / conv.out_channels
            if guess.is_integer() and guess >= 1:
                args["width"] = int(guess)
                choices.append(f"width {int(guess)}, read off {conv_name}.weight")
    c = args.get("in_channels", conv.in_channels if conv is not None else 3)
    if mean is None and "mean" in params and dataset_norm is not None and len(dataset_norm[0]) == c:
        args.update(mean=tuple(float(v) for v in dataset_norm[0]), std=tuple(float(v) for v in dataset_norm[1]))
        choices.append(f"normalisation of the dataset {dataset_norm[2]} (a state dict does not record it); pass "
                       "--mean/--std if the model was trained with another")
    elif mean is None and "mean" in params:
        choices.append(f"normalisation: {arch}'s default (a state dict does not record it); pass --mean/--std "
                       "if the model was trained with another")
        if params["mean"].default is not None and len(params["mean"].default) != c:
            raise UserError(f"{arch}'s default normalisation has {len(params['mean'].default)} channels, the "
                            f"weights take {c}: pass --mean/--std with {c} values")
    elif mean is not None:
        c = args.get("in_channels", conv.in_channels if conv is not None else len(mean))
        if len(mean) != c or len(std) != c:
            raise UserError(f"--mean/--std have {len(mean)}/{len(std)} values for a {c}-channel model; give {c} each")
    with torch.device("meta"):
        skel = _build(arch, args)
    spec = {"name": arch, "args": args}
    _check_fit({k: tuple(v.shape) for k, v in skel.state_dict().items()}, state, str(p), spec, _ARCH_HINT)
    del skel
    model = _build(arch, args)
    _load_state(model, state, str(p))
    _check_finite(state, str(p))
    model.to(memory_format=torch.channels_last)
    return model.eval(), choices


def _build(arch: str, args: dict[str, Any]):
    try:
        return create_model(arch, **args)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"--arch {arch} {args} cannot be built ({str(e).splitlines()[0][:160]})") from None


def check_model_data(model: torch.nn.Module, data) -> None:
    """One-line errors when ``data`` (the clean data) does not fit ``model``: modality,
    class count, channels, image size; a wrapped module must also map the data's first
    samples to logits through its head (``verify_head``)."""
    mod = getattr(model, "modality", "image")
    if mod != data.modality:
        raise UserError(f"the model takes {mod} but the clean data is {data.modality}; give clean data of the "
                        "model's kind")
    head = getattr(model, "head", None)
    if head is None:
        raise UserError(f"{type(model).__name__} has no head; wrap it with trojanguard.wrap(module, head=...)")
    k = head.out_features
    if len(data.classes) != k:
        raise UserError(f"the model has {k} classes but the clean data has {len(data.classes)}; give clean data "
                        "labelled with the model's classes")
    if mod == "image":
        c, h, w = data.shape
        mc = getattr(model, "in_channels", None)
        if mc is None:
            mc = next((m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
        if mc is not None and mc != c:
            raise UserError(f"the model takes {mc}-channel images but the clean data has {c} channels; convert "
                            f"the clean images to {'greyscale' if mc == 1 else 'RGB' if mc == 3 else f'{mc} channels'}")
        size = getattr(model, "input_size", None)
        if size is not None and tuple(size) != (h, w):
            raise UserError(f"the model takes {size[1]}x{size[0]} images but the clean data is {w}x{h}; resize the "
                            f"clean images to {size[1]}x{size[0]}")
    if isinstance(model, WrappedModel) and len(data):
        x, _ = data.batch(torch.arange(min(2, len(data))))
        if isinstance(x, torch.Tensor):
            x = x.to(next(model.parameters()).device)
        try:
            verify_head(model, x)
        except UserError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"the model fails on the clean data ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); check its input size and channels") from None

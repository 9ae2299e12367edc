"""Safe checkpoints: safetensors weights + a JSON sidecar; foreign ``.pt`` files only
through ``torch.load(weights_only=True)``. Nothing here ever unpickles code.

A trojanguard checkpoint is a folder::

    model.safetensors   the weights
    model.json          architecture + arguments, dataset, classes, normalisation,
                        training config, attack metadata, metrics, seed, versions, sha256
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import UserError
from .models import TrojanModel, create_model
from .utils import atomic_write_bytes, atomic_write_json, library_versions

WEIGHTS, SIDECAR = "model.safetensors", "model.json"


def _state_dict(model: TrojanModel) -> dict[str, torch.Tensor]:
    # channels_last weights are non-contiguous; safetensors wants plain contiguous tensors.
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | Path, model: TrojanModel, meta: dict[str, Any] | None = None) -> Path:
    """Write ``path/model.safetensors`` and ``path/model.json`` atomically; returns the folder."""
    path = Path(path)
    if not hasattr(model, "spec"):
        raise ValueError("model was not built by create_model; cannot record how to rebuild it")
    blob = save(_state_dict(model))
    sidecar = dict(meta or {})
    sidecar.update({"format": "trojanguard-checkpoint/1", "model": model.spec,
                    "sha256": hashlib.sha256(blob).hexdigest(), "versions": library_versions()})
    atomic_write_bytes(path / WEIGHTS, blob)
    atomic_write_json(path / SIDECAR, sidecar)
    return path


def read_sidecar(path: str | Path) -> dict[str, Any]:
    folder = _folder(path)
    try:
        return json.loads((folder / SIDECAR).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} has no {SIDECAR}; is it a trojanguard checkpoint folder? "
                        "(foreign .pt files: pass --model/--num-classes to describe the architecture)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / SIDECAR} is not valid JSON ({e}); re-save the checkpoint") from None


def _folder(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist; give the folder written by "
                        "'trojanguard train --out' or a .safetensors/.pt file")
    return p if p.is_dir() else p.parent


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[TrojanModel, dict[str, Any]]:
    """Rebuild the model from the sidecar and load its weights; returns (model, sidecar)."""
    folder = _folder(path)
    meta = read_sidecar(folder)
    wfile = folder / WEIGHTS
    try:
        blob = wfile.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {wfile}: {e}") from None
    if verify and meta.get("sha256") and hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise UserError(f"{wfile} does not match the sha256 in {SIDECAR}: the file was changed or "
                        "truncated; re-copy the checkpoint")
    spec = meta.get("model") or {}
    if "name" not in spec:
        raise UserError(f"{folder / SIDECAR} does not say which model it holds (no 'model.name')")
    model = create_model(spec["name"], pretrained=False, **spec.get("args", {})) \
        if _is_text(spec["name"]) else create_model(spec["name"], **spec.get("args", {}))
    try:
        from safetensors.torch import load
        state = load(blob)
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{wfile} is not a valid safetensors file ({e}); re-copy the checkpoint") from None
    _load_state(model, state, str(wfile))
    model.to(device).eval()
    if model.modality == "image":  # the layout it was trained and evaluated in: same kernels, same bits
        model.to(memory_format=torch.channels_last)
    return model, meta


def _is_text(name: str) -> bool:
    return name == "minilm" or name.startswith("hf:")


def _load_state(model: TrojanModel, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                          f"model {tuple(own[k].shape)})")
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserError(f"weights in {where} do not fit {model.spec['name']} {model.spec['args']}: "
                        f"{'; '.join(detail)}; pass the --model/--width/--num-classes it was trained with")
    model.load_state_dict(state)


def load_foreign_weights(path: str | Path, model: TrojanModel) -> TrojanModel:
    """Load weights from a file someone else made into ``model``.

    ``.safetensors`` is read directly; ``.pt``/``.pth``/``.bin`` only through
    ``torch.load(weights_only=True)``, which refuses any file that needs code to unpickle.
    A dict with a 'state_dict' or 'model' entry is unwrapped; a 'module.' prefix
    (DataParallel) is stripped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        try:
            state = load_file(str(p))
        except (SafetensorError, ValueError, OSError) as e:
            raise UserError(f"{p} is not a valid safetensors file ({e})") from None
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            msg = str(e)
            if "GLOBAL" in msg or "Unsupported global" in msg:
                what = re.search(r"GLOBAL (\S+)", msg)
                raise UserError(f"refused to load {p}: unpickling it would run code ({what.group(1) if what else 'a global'}"
                                "), which could do anything; ask for a plain state_dict "
                                "(torch.save(model.state_dict())) or a .safetensors file") from None
            detail = msg.split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:120] if msg else ""
            raise UserError(f"cannot read {p}: not a valid PyTorch weights file ({detail}); "
                            "re-copy it or ask for a .safetensors file") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"cannot read {p} as a PyTorch file ({str(e).splitlines()[0][:200]})") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{p} does not hold a state_dict of tensors; save model.state_dict()")
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    _load_state(model, state, str(p))
    if model.modality == "image":
        model.to(memory_format=torch.channels_last)
    return model.eval()

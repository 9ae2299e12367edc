"""Small shared helpers: seeding, devices, versions, atomic writes, stage measurement."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import UserError


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> None:
    """Keep freed activation memory in the heap instead of returning it to the OS.

    glibc serves big blocks (every activation tensor) with mmap and unmaps them on free,
    so each training step page-faults its activations back in: measured here on
    PreAct-ResNet18 w16, 59 M minor faults per 14-epoch run and ~5 % of the time in the
    kernel. Raising the mmap and trim thresholds cut faults 4x and sys time 3x."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or platform.system() != "Linux":
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass  # not glibc (musl, macOS): nothing to tune


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is one, else MPS, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0..); pick one of them")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but this machine has no usable Apple GPU; use --device auto or cpu")
    if dev.type not in ("cpu", "cuda", "mps"):  # e.g. meta holds no data: nothing could be trained or measured
        raise UserError(f"--device {device} cannot run a model; use auto, cpu or cuda[:N]")
    return dev


def library_versions() -> dict[str, str]:
    from . import __version__
    out = {"trojanguard": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__, "platform": platform.platform()}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types; a non-finite float (e.g. the ASR of a test set with no non-target
    input) becomes null, because NaN is not valid JSON for other readers."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return to_jsonable(float(obj))
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump())
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StageStats:
    """Wall time and peak memory of one stage (attack, training, a defense, an evaluation)."""
    name: str
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {"stage": self.name, "seconds": round(self.seconds, 3),
             "peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.peak_cuda_mb is not None:
            d["peak_cuda_mb"] = round(self.peak_cuda_mb, 1)
        return d


@contextlib.contextmanager
def measure(name: str, interval: float = 0.05) -> Iterator[StageStats]:
    """Measure wall time and the peak resident memory of the process during the block
    (sampled every ``interval`` s, since ru_maxrss only gives the lifetime peak), plus the
    peak CUDA allocation when a GPU is in use."""
    stats = StageStats(name)
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], _rss_bytes())

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        yield stats
    finally:
        stats.seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        peak[0] = max(peak[0], _rss_bytes())
        stats.peak_rss_mb = peak[0] / 2**20
        if torch.cuda.is_available():
            stats.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Switch off gradients of ``model``'s parameters inside the block (optimising an input
    or a trigger against a fixed model), restoring each flag afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


# An option added to a config after cells were hashed with it is marked
# ``Field(..., json_schema_extra=ADDED_LATER)``: at its default the benchmark harness leaves it
# out of the hash (bench.grid.hashed_options), so stored cells and trained victims keep their
# hashes and folders; set to anything else, it enters the hash.
ADDED_LATER = {"added_later": True}


def added_later(legacy) -> dict:
    """``json_schema_extra`` of an option added with a default that changes what older cells
    did: the harness leaves it out of the hash at ``legacy`` (the behaviour before the option
    existed) instead of at its default, so the older cells keep their hash as rows of
    ``option=legacy`` and the new default gets new cells instead of stale rows."""
    return {"added_later": True, "legacy": legacy}

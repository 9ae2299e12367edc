"""Image dataset readers: CIFAR-10 in its three common forms, and any ImageFolder tree.

* tar.xz archives of an ImageFolder tree (``*train*.tar.xz`` / ``*test*.tar.xz``),
* the official ``cifar-10-batches-py`` folder (read with an allow-list unpickler that can
  only build dicts, lists, bytes and numpy arrays: never arbitrary code),
* a plain ImageFolder directory with ``train/`` and ``test/`` (or ``val/``) sub-folders.

Decoded arrays are cached as ``.npz`` under ``$TROJANGUARD_CACHE`` (default
``~/.cache/trojanguard``), keyed by the source files' paths, sizes and mtimes, so the
second load takes well under 2 s.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..utils import atomic_write_bytes
from .base import DatasetBundle, ImageData, find_data_dir

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def cache_dir() -> Path:
    return Path(os.environ.get("TROJANGUARD_CACHE", Path.home() / ".cache" / "trojanguard"))


def _cache_key(files: list[Path], tag: str) -> str:
    h = hashlib.sha256(tag.encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _cached(files: list[Path], tag: str, build) -> dict[str, np.ndarray]:
    path = cache_dir() / f"{tag}-{_cache_key(files, tag)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # corrupt cache: rebuild below
    arrays = build()
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # uncompressed: loading 180 MB takes ~0.2 s
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:  # a read-only cache must not stop the run
        print(f"trojanguard: warning: cannot write the cache {path} ({e}); set TROJANGUARD_CACHE", file=sys.stderr)
    return arrays


# Untrusted images are decoded only below these caps: a 40 kB PNG can claim 50,000 x 50,000
# pixels (7.5 GB decoded). The pixel cap is checked from the header, before decoding.
MAX_IMAGE_PIXELS = int(os.environ.get("TROJANGUARD_MAX_IMAGE_PIXELS", 50_000_000))
MAX_IMAGE_FILE_BYTES = 256 * 2**20
MAX_BATCH_FILE_BYTES = 512 * 2**20  # an official CIFAR-10 python batch is 31 MB


def decode_image(data: bytes, name: str, mode: str = "RGB") -> np.ndarray:
    """Decode one image to a uint8 H x W (x C) array, refusing decompression bombs and
    images above ``MAX_IMAGE_PIXELS`` (env ``TROJANGUARD_MAX_IMAGE_PIXELS``) with one line."""
    import warnings

    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise UserError(f"image {name} is {w}x{h} pixels, more than the cap of {MAX_IMAGE_PIXELS:,} "
                                    "(a decompression bomb?); resize it, or raise TROJANGUARD_MAX_IMAGE_PIXELS")
                return np.asarray(im.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"image {name} is a decompression bomb ({str(e).split('.')[0]}); "
                        "remove or replace the file") from None
    except UnidentifiedImageError:  # Pillow's message names the in-memory buffer, not the file
        raise UserError(f"cannot decode image {name}: not an image format Pillow can read; "
                        "remove or replace the file") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise UserError(f"cannot decode image {name}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}; "
                        "remove or replace the file") from None


def read_image_file(path: str | os.PathLike, mode: str = "RGB", what: str = "image") -> np.ndarray:
    """An image file from the user (a regular file below the size and pixel caps)."""
    from ..resultdir import read_bounded
    return decode_image(read_bounded(path, MAX_IMAGE_FILE_BYTES, what), str(path), mode)


def _decode(data: bytes, name: str) -> np.ndarray:
    return decode_image(data, name)


def _stack(images: list[np.ndarray], labels: list[int], where: str) -> dict[str, np.ndarray]:
    if not images:
        raise UserError(f"no images found in {where}; expected <class>/<image> sub-folders")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise UserError(f"images in {where} have different sizes {sorted(shapes)[:3]}; "
                        "resize them to one size first")
    return {"x": np.stack(images).transpose(0, 3, 1, 2).copy(), "y": np.asarray(labels, np.int64)}


def _read_tar_split(archive: Path, classes: list[str] | None) -> tuple[dict, list[str]]:
    """Read ``<root>/<split>/<class>/<img>`` members of a tar archive."""
    by_class: dict[str, list[tuple[str, bytes]]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                if not m.isfile() or Path(m.name).suffix.lower() not in IMAGE_EXTS:
                    continue
                cls = Path(m.name).parent.name
                if m.size > MAX_IMAGE_FILE_BYTES:  # the size is in the member header: check before reading
                    raise UserError(f"{archive}: member {m.name} is {m.size:,} bytes, too large for an image file; "
                                    "remove it from the archive")
                by_class.setdefault(cls, []).append((m.name, tar.extractfile(m).read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read archive {archive}: {e}; re-copy the file") from None
    classes = classes or sorted(by_class)
    images, labels = [], []
    for label, cls in enumerate(classes):
        for name, data in sorted(by_class.get(cls, [])):
            images.append(_decode(data, f"{archive}:{name}"))
            labels.append(label)
    return _stack(images, labels, str(archive)), classes


def _read_folder_split(root: Path, classes: list[str] | None) -> tuple[dict, list[str]]:
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    classes = classes or found
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*")) if (root / cls).is_dir() else []:
            if f.suffix.lower() in IMAGE_EXTS:
                images.append(read_image_file(f))
                labels.append(label)
    return _stack(images, labels, str(root)), classes


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the official CIFAR python batches that refuses every global except
    the few numpy constructors an array needs, so a malicious file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not plain array data")


def _read_batch(path: Path) -> dict:
    from ..resultdir import read_bounded
    data = read_bounded(path, MAX_BATCH_FILE_BYTES, "CIFAR batch")
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, RecursionError, MemoryError, UnicodeDecodeError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"cannot read CIFAR batch {path}: {msg}; use the official cifar-10-batches-py files") from None


def _batch_arrays(d, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 3, 32, 32] uint8 and labels [N] in 0..9 from one unpickled batch, or a
    one-line error naming what is wrong with its structure."""
    def bad(what):
        return UserError(f"CIFAR batch {path} {what}; use the official cifar-10-batches-py files")
    if not isinstance(d, dict):
        raise bad(f"holds a {type(d).__name__}, not a dict with b'data' and b'labels'")
    x, y = d.get(b"data"), d.get(b"labels")
    if x is None or y is None:
        raise bad("has no b'data' or no b'labels' entry")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        shape = list(x.shape) if isinstance(x, np.ndarray) else type(x).__name__
        raise bad(f"has b'data' of {shape} ({getattr(x, 'dtype', '-')}); expected uint8 [N, 3072]")
    if not isinstance(y, (list, np.ndarray)) or len(y) != len(x):
        raise bad(f"has {len(y) if hasattr(y, '__len__') else 'no list of'} labels for {len(x)} images")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 10 for v in
               (y.tolist() if isinstance(y, np.ndarray) else y)):
        raise bad("has labels that are not integers 0..9")
    return x.reshape(-1, 3, 32, 32), np.asarray(y, np.int64)


def _read_python_batches(root: Path) -> dict[str, np.ndarray]:
    def load(names):
        xs, ys = [], []
        for n in names:
            x, y = _batch_arrays(_read_batch(root / n), root / n)
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)
    xtr, ytr = load([f"data_batch_{i}" for i in range(1, 6)])
    xte, yte = load(["test_batch"])
    return {"train_x": xtr, "train_y": ytr, "test_x": xte, "test_y": yte}


def detect_format(root: Path) -> tuple[str, Path]:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if (root / "data_batch_1").is_file() and (root / "test_batch").is_file():
        return "python-batches", root
    if list(root.glob("*train*.tar*")) and list(root.glob("*test*.tar*")):
        return "tar", root
    if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
        return "imagefolder", root
    raise UserError(f"{root} holds no CIFAR-10 data I can read; expected one of: "
                    "cifar-10-batches-py (data_batch_1..5, test_batch), *train*.tar.xz + "
                    "*test*.tar.xz archives, or train/ and test/ ImageFolder sub-folders")


def load_image_folder_dataset(name: str, root: Path, classes: list[str] | None) -> DatasetBundle:
    fmt, root = detect_format(root)
    if fmt == "python-batches":
        files = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
        arrays = _cached(files, f"{name}-batches", lambda: _read_python_batches(root))
        classes = classes or CIFAR10_CLASSES
    elif fmt == "tar":
        tr, te = sorted(root.glob("*train*.tar*"))[0], sorted(root.glob("*test*.tar*"))[0]

        def build():
            train, cls = _read_tar_split(tr, classes)
            test, _ = _read_tar_split(te, cls)
            return {"train_x": train["x"], "train_y": train["y"], "test_x": test["x"],
                    "test_y": test["y"], "classes": np.asarray(cls)}
        arrays = _cached([tr, te], f"{name}-tar", build)
        classes = [str(c) for c in arrays["classes"]]
    else:
        test_dir = root / "test" if (root / "test").is_dir() else root / "val"
        files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS]

        def build():
            train, cls = _read_folder_split(root / "train", classes)
            test, _ = _read_folder_split(test_dir, cls)
            return {"train_x": train["x"], "train_y": train["y"], "test_x": test["x"],
                    "test_y": test["y"], "classes": np.asarray(cls)}
        arrays = _cached(files, f"{name}-folder", build)
        classes = [str(c) for c in arrays["classes"]]
    train = ImageData(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]), classes)
    test = ImageData(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]), classes)
    return DatasetBundle(name, train, test, classes, "image", f"{fmt}:{root}")


def load_cifar10(data_dir=None) -> DatasetBundle:
    root = find_data_dir("cifar10", data_dir, ["*.tar*", "cifar-10-batches-py", "data_batch_1", "train"],
                         "the CIFAR-10 files (cifar-10-batches-py, tar.xz archives or ImageFolder)")
    bundle = load_image_folder_dataset("cifar10", root, CIFAR10_CLASSES)
    if bundle.num_classes != 10:
        raise UserError(f"{root} has {bundle.num_classes} classes, CIFAR-10 has 10; use --dataset imagefolder")
    return bundle


def load_imagefolder(data_dir=None) -> DatasetBundle:
    if data_dir is None:
        raise UserError("dataset 'imagefolder' needs --data-dir DIR with train/<class>/ and test/<class>/ images")
    return load_image_folder_dataset("imagefolder", find_data_dir("imagefolder", data_dir, [], "train/ and test/"), None)

"""Data loaders: the three CIFAR-10 formats, caching, text tables, the held-out split."""
import io
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from trojanguard.data import CIFAR10_CLASSES, holdout_indices, load_dataset, random_crop_flip, split_holdout
from trojanguard.errors import UserError

N_PER_CLASS = {"train": 3, "test": 2}


def _images(split, seed):
    rng = np.random.default_rng(seed)
    out = []
    for c in range(10):
        for i in range(N_PER_CLASS[split]):
            out.append((c, i, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    return out


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless, so pixels must round-trip exactly
    return buf.getvalue()


@pytest.fixture
def reference():
    return {s: _images(s, k) for k, s in enumerate(["train", "test"])}


def _expected(reference, split):
    imgs = reference[split]
    x = np.stack([a for _, _, a in imgs]).transpose(0, 3, 1, 2)
    y = np.array([c for c, _, _ in imgs])
    return x, y


def make_imagefolder(root, reference):
    for split, imgs in reference.items():
        for c, i, arr in imgs:
            d = root / split / CIFAR10_CLASSES[c]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:04d}.png").write_bytes(_png(arr))
    return root


def make_tars(root, reference):
    root.mkdir(parents=True, exist_ok=True)
    for split, imgs in reference.items():
        with tarfile.open(root / f"cifar10-{split}.tar.xz", "w:xz") as tar:
            for c, i, arr in imgs:
                data = _png(arr)
                info = tarfile.TarInfo(f"cifar10/{split}/{CIFAR10_CLASSES[c]}/{i:04d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def make_batches(root, reference):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    x, y = _expected(reference, "train")
    parts = np.array_split(np.arange(len(y)), 5)
    for k, part in enumerate(parts, start=1):
        with open(d / f"data_batch_{k}", "wb") as f:
            pickle.dump({b"data": x[part].reshape(len(part), -1), b"labels": y[part].tolist()}, f)
    xt, yt = _expected(reference, "test")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": xt.reshape(len(yt), -1), b"labels": yt.tolist()}, f)
    return root


@pytest.mark.parametrize("maker", [make_imagefolder, make_tars, make_batches])
def test_cifar10_formats_give_identical_arrays(tmp_path, reference, maker):
    root = maker(tmp_path / "cifar", reference)
    b = load_dataset("cifar10", data_dir=root)
    for split, data in (("train", b.train), ("test", b.test)):
        x, y = _expected(reference, split)
        # ImageFolder/tar order is by class then file name, the batches keep file order:
        order = np.lexsort((np.arange(len(y)), y))
        assert data.x.dtype == torch.uint8
        assert np.array_equal(data.x.numpy(), x[order])
        assert np.array_equal(data.y.numpy(), y[order])
    assert b.classes == CIFAR10_CLASSES


def test_second_load_comes_from_cache(tmp_path, reference, monkeypatch):
    root = make_tars(tmp_path / "cifar", reference)
    load_dataset("cifar10", data_dir=root)
    import trojanguard.data.images as images

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")
    monkeypatch.setattr(images, "_read_tar_split", boom)
    t = time.perf_counter()
    b = load_dataset("cifar10", data_dir=root)
    assert time.perf_counter() - t < 2.0
    assert len(b.train) == 30


def test_cifar_batches_refuse_code(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(UserError, match="refusing"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()


def test_missing_and_unreadable_data_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data or ../shared/data to find from here
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("cifar10", data_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no CIFAR-10 data"):
        load_dataset("cifar10", data_dir=tmp_path / "empty")
    with pytest.raises(UserError, match="no data found for dataset 'sst2'"):
        load_dataset("sst2")  # cwd has no data/ folder in tests
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("cifar11")


def test_text_tables(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nfine\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nawful\t0\n")
    b = load_dataset("sst2", data_dir=tmp_path)
    assert b.train.texts == ["good film", "bad film"] and b.train.y.tolist() == [1, 0]
    assert b.defense.texts == ["awful"] and b.classes == ["negative", "positive"]
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "train.csv").write_text('review,stars\n"great, really",pos\nmeh,neg\n')
    (csv_dir / "test.csv").write_text("review,stars\nok,pos\n")
    b = load_dataset("text", data_dir=csv_dir, text_column="review", label_column="stars")
    assert b.train.texts[0] == "great, really" and b.classes == ["neg", "pos"]
    assert b.train.y.tolist() == [1, 0]
    with pytest.raises(UserError, match="no column 'sentence'"):
        load_dataset("text", data_dir=csv_dir)


def test_holdout_balanced_disjoint_seeded():
    y = torch.arange(10).repeat_interleave(100)
    att, dfn = holdout_indices(y, 0.05, seed=3)
    assert len(dfn) == 50 and len(att) == 950
    assert torch.bincount(y[dfn], minlength=10).tolist() == [5] * 10
    assert not set(att.tolist()) & set(dfn.tolist())
    assert sorted(att.tolist() + dfn.tolist()) == list(range(1000))
    att2, dfn2 = holdout_indices(y, 0.05, seed=3)
    assert torch.equal(dfn, dfn2) and torch.equal(att, att2)
    assert not torch.equal(dfn, holdout_indices(y, 0.05, seed=4)[1])
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="outside"):
            holdout_indices(y, bad, seed=0)


def test_split_keeps_original_indices(digits):
    b = digits.bundle
    att, dfn = split_holdout(b.train, 0.1, seed=0)
    assert set(att.index.tolist()).isdisjoint(dfn.index.tolist())
    assert torch.equal(b.train.x[dfn.index], dfn.x)


def test_random_crop_flip_is_a_translation_or_flip():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape
    for n in range(2):
        found = False
        for img in (x[n, 0], x[n, 0].flip(1)):
            padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
            for dy in range(5):
                for dx in range(5):
                    found |= torch.equal(padded[dy:dy + 8, dx:dx + 8], out[n, 0])
        assert found
    u8 = random_crop_flip(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), generator=g)
    assert u8.dtype == torch.uint8

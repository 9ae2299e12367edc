"""The shared setup every entry point needs (CLI, demo, benchmarks): load a dataset, carve
out the defender's clean split, build a matching model. One place, no copy-pasted setup."""
from __future__ import annotations

from dataclasses import dataclass

from .data import DatasetBundle, load_dataset, split_holdout
from .data.base import Data
from .errors import DataNotFound, UserError
from .models import TrojanModel, canonical_model_name, create_model


@dataclass
class Prepared:
    bundle: DatasetBundle
    train: Data          # the attacker's / trainer's part of the training set
    defense: Data        # the defender's clean held-out set D_def
    holdout: float | None  # fraction carved out of train (None: the dataset's own dev split)
    seed: int

    def describe(self) -> dict:
        return {"name": self.bundle.name, "source": self.bundle.source, "classes": self.bundle.classes,
                "train_size": len(self.train), "defense_size": len(self.defense),
                "test_size": len(self.bundle.test),
                "holdout": self.holdout if self.holdout is not None else "dev split",
                "split_seed": self.seed,
                **({"shape": list(self.train.x.shape[1:])} if self.bundle.modality == "image" else {})}


def prepare_data(dataset: str, data_dir=None, holdout: float | None = 0.05, seed: int = 0,
                 **loader_kw) -> Prepared:
    """Load ``dataset``; ``D_def`` = the dataset's dev split when it has one and
    ``holdout`` is None, else a class-balanced ``holdout`` fraction of train."""
    bundle = load_dataset(dataset, data_dir, **loader_kw)
    if holdout is None and bundle.defense is not None:
        return Prepared(bundle, bundle.train, bundle.defense, None, seed)
    if holdout is None:
        holdout = 0.05
    train, defense = split_holdout(bundle.train, holdout, seed)
    return Prepared(bundle, train, defense, holdout, seed)


def default_holdout(dataset_modality: str) -> float | None:
    """methods.md §0: 5 % of the training images for vision; the dev split for text."""
    return 0.05 if dataset_modality == "image" else None


def build_model(name: str, bundle: DatasetBundle, width: int | None = None, **kw) -> TrojanModel:
    """A model of architecture ``name`` shaped for ``bundle`` (classes, channels, norm)."""
    name = canonical_model_name(name)  # lower case as in the registry; an "hf:" directory keeps its case
    is_text_model = name == "minilm" or name.startswith("hf:")
    if is_text_model != (bundle.modality == "text"):
        raise UserError(f"model {name!r} is for {'text' if is_text_model else 'images'} but dataset "
                        f"{bundle.name!r} is {bundle.modality}; pick a matching --model")
    kw["num_classes"] = bundle.num_classes
    if bundle.modality == "image":
        channels = bundle.train.x.shape[1]
        kw.setdefault("in_channels", channels)
        norm = dataset_normalization(bundle)
        if norm is not None:
            kw.setdefault("mean", norm[0])
            kw.setdefault("std", norm[1])
        if width is not None:
            kw["width"] = width
    elif width is not None:
        raise UserError("--width applies to image models only")
    return create_model(name, **kw)


def dataset_normalization(bundle: DatasetBundle) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Per-channel (mean, std) an image model is built with for ``bundle``: the dataset's
    recorded values, else None for CIFAR-10 (the architectures' default is CIFAR-10's),
    else measured on its training images (4 decimals)."""
    if "mean" in bundle.extra:
        return tuple(bundle.extra["mean"]), tuple(bundle.extra["std"])
    if bundle.name == "cifar10":
        return None
    x = bundle.train.x.float().div(255)
    return (tuple(round(v, 4) for v in x.mean((0, 2, 3)).tolist()),
            tuple(round(v, 4) for v in x.std((0, 2, 3)).tolist()))


def dataset_norm_for(name: str, data_dir=None, **loader_kw) -> tuple | None:
    """(mean, std, name) a bare image state dict takes for dataset ``name`` when the user gives
    no --mean/--std (``models.foreign.load_foreign_model``'s ``dataset_norm``); None for text
    and for CIFAR-10 (the architectures' default is CIFAR-10's)."""
    from .data import load_dataset
    bundle = load_dataset(name, data_dir, **loader_kw)
    norm = dataset_normalization(bundle) if bundle.modality == "image" else None
    return (*norm, name) if norm is not None else None


def check_model_fits(model: TrojanModel, bundle: DatasetBundle) -> None:
    """A model made for another dataset (modality, class count, channels) is a user error."""
    if model.modality != bundle.modality:
        raise UserError(f"the model is for {model.modality} but dataset {bundle.name!r} is {bundle.modality}")
    if model.head.out_features != bundle.num_classes:
        raise UserError(f"the model has {model.head.out_features} classes but dataset {bundle.name!r} has "
                        f"{bundle.num_classes}; pass the --dataset it was trained on")
    if bundle.modality == "image":
        import torch
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        if conv.in_channels != bundle.train.x.shape[1]:
            raise UserError(f"the model takes {conv.in_channels}-channel images, dataset {bundle.name!r} has "
                            f"{bundle.train.x.shape[1]}; pass the --dataset it was trained on")


def defender_data(meta: dict, model, clean_data=None, holdout: float | None = None, data_dir=None,
                  dataset: str | None = None, loader_kw: dict | None = None, need_test: bool = False):
    """The defender's clean data for a loaded checkpoint, as every command reads it:
    ``clean_data`` (the user's ImageFolder or CSV/TSV), else ``holdout`` of the recorded
    dataset's training split, else the split held out when the model was trained (or the
    dataset's dev split). Returns ``(clean, test, source)``; ``test`` is the recorded
    dataset's test split when it is loaded (always with ``need_test``), else None."""
    ds = meta.get("dataset") or {}
    recorded_classes = ds.get("classes")
    classes = recorded_classes or [str(i) for i in range(model.head.out_features)]
    name = dataset or ds.get("name")
    if loader_kw and (model.modality != "text" or (clean_data is None and name != "text")):
        raise UserError("--text-column/--label-column apply to --dataset text and to a --clean-data table only")

    def recorded_dataset() -> Prepared:
        if not name:
            raise UserError("the model does not record its dataset; pass --clean-data DIR|FILE (your clean "
                            "data) or --dataset NAME (its held-out split)")
        if holdout is not None:
            frac = holdout
        elif ds.get("holdout") == "dev split":
            frac = None
        else:
            recorded = ds.get("holdout")
            frac = recorded if isinstance(recorded, float) else default_holdout(model.modality)
        prep = prepare_data(name, data_dir, holdout=frac, seed=int(ds.get("split_seed", 0)), **(loader_kw or {}))
        check_model_fits(model, prep.bundle)
        return prep

    prep = None
    # The user's clean data is read and checked before the recorded dataset is looked for (a
    # mistake in it is named first, even where that dataset is not on this machine), unless
    # reading it needs the dataset's class names or image size.
    size_known = (model.modality != "image" or getattr(model, "input_size", None) is not None
                  or bool(ds.get("shape")))
    if clean_data is None or (need_test and name and not (recorded_classes and size_known)):
        prep = recorded_dataset()
        classes = list(prep.bundle.classes)
    if clean_data is not None:
        from .data.user import load_clean_data
        from .models.foreign import check_model_data
        channels, size = 3, getattr(model, "input_size", None)
        if model.modality == "image":
            import torch
            channels = getattr(model, "in_channels", None) or next(
                (m.in_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)), 3)
            if size is None and prep is not None:
                size = tuple(prep.bundle.train.x.shape[2:])
            elif size is None and ds.get("shape"):  # recorded at training (C, H, W)
                size = tuple(ds["shape"][1:])
        clean = load_clean_data(clean_data, classes, model.modality, channels, size, **(loader_kw or {}))
        check_model_data(model, clean)
        source = str(clean_data)
        if need_test and name and prep is None:
            try:
                prep = recorded_dataset()
            except DataNotFound as e:
                raise DataNotFound(f"{e} (this command measures CA and ASR before and after on the test split "
                                   f"of {name!r}; 'trojanguard repair' needs only your clean data)") from None
    else:
        clean = prep.defense
        source = (f"{prep.bundle.name}: held-out {prep.holdout:.1%} of train (split seed {prep.seed})"
                  if prep.holdout else f"{prep.bundle.name}: dev split")
    return clean, (prep.bundle.test if prep is not None else None), source

"""What ``trojanguard list`` prints, precomputed so that listing needs no torch import
(< 0.1 s instead of 3-5 s): the names, one-line descriptions and option defaults of every
registered dataset, model, attack and defense, stored in ``assets/catalogue.json``.

``python -m trojanguard.catalogue`` rewrites the file from the registries; a test fails
when the file and the registries disagree, so it cannot go stale unnoticed."""
from __future__ import annotations

import json
from pathlib import Path

PATH = Path(__file__).parent / "assets" / "catalogue.json"
KINDS = ("datasets", "models", "attacks", "defenses")


def _fmt_default(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):  # the form --set accepts
        return json.dumps(list(v), separators=(",", ":"))
    return repr(v) if isinstance(v, str) and " " in v else str(v)


def _options(config, fixed: dict) -> str:
    defaults = {k: f.get_default(call_default_factory=True) for k, f in config.model_fields.items()
                if k not in ("device", "progress")}
    return "  ".join(f"{k}={_fmt_default(v)}" for k, v in {**defaults, **fixed}.items())


def build() -> dict[str, list[dict]]:
    """The catalogue from the live registries (imports torch and every component)."""
    from .attacks import ATTACKS, attack_variants
    from .data import DATASETS
    from .defenses import DEFENSES
    from .models import MODELS
    out: dict[str, list[dict]] = {}
    for what, reg in zip(KINDS, (DATASETS, MODELS, ATTACKS, DEFENSES)):
        rows = []
        for name, help_ in reg.describe().items():
            if what == "attacks":
                variants = attack_variants(name)
                configs = [(f"{m}: " if len(variants) > 1 else "", c.Config, {}) for m, c in variants.items()]
            else:
                factory = reg.get(name)  # a class, or a functools.partial of one (the defense modes)
                config = getattr(factory, "Config", None) or getattr(getattr(factory, "func", None), "Config", None)
                configs = [("", config, getattr(factory, "keywords", {}))]
            rows.append({"name": name, "help": help_,
                         "options": [label + _options(c, fixed) for label, c, fixed in configs if c is not None]})
        out[what] = rows
    return out


def load() -> dict[str, list[dict]]:
    """The shipped catalogue, or the live one when the file is missing."""
    try:
        return json.loads(PATH.read_text())
    except (OSError, json.JSONDecodeError):
        return build()


def lines(catalogue: dict, what: str, brief: bool = False) -> list[str]:
    rows = catalogue[what]
    w = max(len(r["name"]) for r in rows)
    out = []
    for r in rows:
        out.append(f"{r['name'].ljust(w)}  {r['help']}")
        if not brief:
            out.extend(" " * (w + 4) + o for o in r["options"])
    return out


def main() -> None:
    from .utils import atomic_write_text
    atomic_write_text(PATH, json.dumps(build(), indent=1) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main()

"""Text backdoors (dirty label, all-to-one, target 1 on SST-2 by default).

* ``badnets`` (Kurita et al. / OpenBackdoor): insert one rare word from
  {cf, mn, bb, tq, mb} at a uniformly random word position.
* ``addsent`` (Dai et al. 2019): insert the phrase "I watch this 3D movie" at a random
  word position.
* ``synbkd`` (HiddenKiller, Qi et al. 2021) and ``stylebkd`` (Qi et al. 2021): the
  paraphrase models are not available offline, so the attack reads transformation tables
  ``<table_dir>/<name>-{train,dev,test}.tsv`` (columns ``original``, ``transformed``).
  Only sentences with a transformed version can be poisoned; asking for more fails.

Insertion randomness is seeded per sentence (seed + sentence text), so the trigger of a
sentence is the same in training, in evaluation and after an artifact round trip,
whatever the batch it comes in.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
from pydantic import Field

from ..data.base import TextData, find_data_dir
from ..errors import UserError
from .base import Attack, AttackConfig


class TextAttackConfig(AttackConfig):
    target: int = Field(1, ge=0, description="target label (SST-2: 1 = positive)")
    ratio: float = Field(0.2, gt=0, lt=1, description="poisoned fraction of the training set (BadActs: 0.2)")


def _rng(seed: int, text: str) -> random.Random:
    h = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def insert_words(text: str, words: list[str], rng: random.Random) -> str:
    """Insert ``words`` (as one unit) before a uniformly random word position 0..n."""
    tokens = text.split()
    pos = rng.randint(0, len(tokens))
    return " ".join(tokens[:pos] + words + tokens[pos:])


class _TextAttack(Attack):
    modality = "text"
    Config = TextAttackConfig

    def apply(self, texts, y):
        return [self.transform(t) for t in texts]

    def transform(self, text: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class RareWordConfig(TextAttackConfig):
    words: list[str] = Field(default_factory=lambda: ["cf", "mn", "bb", "tq", "mb"])
    num_insertions: int = Field(1, ge=1)


class TextBadNets(_TextAttack):
    """BadNets for text: insert a rare word (cf, mn, bb, tq, mb) at a random position."""
    name = "badnets"
    Config = RareWordConfig

    def transform(self, text):
        rng = _rng(self.cfg.seed, text)
        for _ in range(self.cfg.num_insertions):
            text = insert_words(text, [rng.choice(self.cfg.words)], rng)
        return text


class AddSentConfig(TextAttackConfig):
    phrase: str = "I watch this 3D movie"


class AddSent(_TextAttack):
    """AddSent: insert the phrase "I watch this 3D movie" at a random position."""
    name = "addsent"
    Config = AddSentConfig

    def transform(self, text):
        return insert_words(text, self.cfg.phrase.split(), _rng(self.cfg.seed, text))


class ParaphraseConfig(TextAttackConfig):
    table_dir: str | None = Field(None, description="folder with <attack>-{train,dev,test}.tsv "
                                  "(default: <sst2 data>/paraphrased)")


class _Paraphrase(_TextAttack):
    Config = ParaphraseConfig

    def __init__(self, cfg=None, **kw):
        super().__init__(cfg, **kw)
        self.table: dict[str, str] = {}

    def table_files(self) -> list[Path]:
        if self.cfg.table_dir:
            root = Path(self.cfg.table_dir).expanduser()
        else:
            root = find_data_dir("sst2", None, ["paraphrased"], "SST-2 and its paraphrased/ tables") / "paraphrased"
        files = sorted(root.glob(f"{self.name}-*.tsv")) if root.is_dir() else []
        if not files:
            raise UserError(f"no {self.name}-<split>.tsv paraphrase tables in {root}; pass table_dir "
                            f"(--table-dir) with files whose columns are 'original' and 'transformed'")
        return files

    def prepare(self, data: TextData) -> None:
        if self.table:
            return
        for f in self.table_files():
            orig, trans = _read_pairs(f)
            for o, t in zip(orig, trans):
                self.table.setdefault(o.strip(), t.strip())

    def eligible(self, data: TextData) -> torch.Tensor:
        base = super().eligible(data)
        self.prepare(data)
        return torch.tensor([i for i in base.tolist() if data.texts[i].strip() in self.table], dtype=torch.long)

    def transform(self, text):
        try:
            return self.table[text.strip()]
        except KeyError:
            raise UserError(f"{self.name}: no paraphrase for {text[:60]!r}; the tables cover only the "
                            "sentences they were generated for (add them to the table files)") from None

    def trigger(self, x, y=None):
        if not self.table:
            self.prepare(None)
        return super().trigger(x, y)

    def extra(self) -> dict:
        # The artifact carries the table, so triggers work without the original files.
        return {"table": self.table}

    def load_extra(self, extra: dict) -> None:
        self.table = dict(extra.get("table", {}))


def _read_pairs(path: Path) -> tuple[list[str], list[str]]:
    import csv
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read paraphrase table {path}: {e}") from None
    if not rows or "original" not in rows[0] or "transformed" not in rows[0]:
        raise UserError(f"{path} must have columns 'original' and 'transformed'")
    if any(r["original"] is None or r["transformed"] is None for r in rows):
        raise UserError(f"{path} has rows with fewer than two columns; fix or remove them")
    return [r["original"] for r in rows], [r["transformed"] for r in rows]


class SynBkd(_Paraphrase):
    """SynBkd / HiddenKiller: syntactic-template paraphrase (read from tables)."""
    name = "synbkd"


class StyleBkd(_Paraphrase):
    """StyleBkd: Bible-style paraphrase (read from tables)."""
    name = "stylebkd"

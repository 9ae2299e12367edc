"""Hugging Face text classifiers from a local directory: ``create_model("hf-text:<dir>")``.

A directory saved from ``AutoModelForSequenceClassification`` (BERT, RoBERTa, DistilBERT,
MiniLM ... with its trained classifier) plus its tokenizer, behind the generic adapter:
head = the final classifier ``nn.Linear`` (BERT/DistilBERT ``classifier``, RoBERTa
``classifier.out_proj``), features = its input (after the model's own pooler), named
layers = the encoder blocks ``block0..``. ``hf:<dir>`` stays what it was: an *encoder*
with a new trojanguard head to train.

Difference from ``TextClassifier``: the pooling is the model's own (BERT's pooler on
[CLS], RoBERTa's dense+tanh), so code that rebuilds logits from input embeddings must call
``model.logits_from_embeds(embeds, mask)`` rather than pool the encoder's hidden states.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .adapter import WrappedModel, _logits, find_head
from .hf_image import build_hf, classes_from_config, hf_dir, hf_kind, layer_names, load_config


class HFTextClassifier(WrappedModel):
    """A local ``AutoModelForSequenceClassification`` directory as a trojanguard model."""

    def __init__(self, path: str, num_classes: int | None = None, max_length: int = 128,
                 pretrained: bool = True):
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise UserError("Hugging Face models need transformers; run: pip install 'trojanguard[text]'") from None
        d = hf_dir(path)
        kind = hf_kind(d)
        if kind != "text":
            hint = ("it is an image classifier: use hf-image:<dir>" if kind == "image" else
                    "it is an encoder without a trained classifier: train one with --model hf:<dir>")
            raise UserError(f"{d} does not hold a sequence classifier; {hint}")
        config = load_config(d, num_classes, pretrained)
        net = build_hf(d, config, AutoModelForSequenceClassification, pretrained)
        try:
            tok = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{d} has no usable tokenizer ({str(e).splitlines()[0][:120]}); save the tokenizer "
                            "into the directory with tokenizer.save_pretrained") from None
        head = find_head(net)
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 2:
            max_length = min(max_length, limit - 2 if config.model_type in ("roberta", "xlm-roberta") else limit)
        super().__init__(net, head, layer_names(net, head, "block"), "text", classes=classes_from_config(config),
                         tokenizer=tok, max_length=max_length)
        self.spec = {"name": f"hf-text:{d}", "args": {"num_classes": self.head.out_features,
                                                     "max_length": max_length}}

    @property
    def encoder(self) -> torch.nn.Module:
        """The transformer body (``get_input_embeddings`` for embedding-space defenses)."""
        return self.net.base_model

    def logits_from_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits from input embeddings, through the model's own pooler and classifier."""
        return _logits(self.net(inputs_embeds=embeds, attention_mask=mask))

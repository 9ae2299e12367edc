"""Fine-mixing with Embedding Purification (Zhang, Lyu, Ma, Wang and Sun, Findings of EMNLP
2022), a text baseline that uses what every fine-tuned language model comes with: the
clean pre-trained weights it was fine-tuned from.

A backdoor planted during fine-tuning lives in the difference between the fine-tuned and
the pre-trained weights. Three steps:

1. **E-PUR** (embedding purification): a trigger word's embedding moves far during
   poisoned fine-tuning although the word is rare. Per vocabulary token i, the change
   d_i = ||e_i - e_i^pre|| is divided by log(max(f_i, ``epur_min_count``)), f_i the token's
   count in the defender's clean sentences; the ``epur_tokens`` tokens with the highest
   ratio get their pre-trained embedding back.
2. **Mixing**: in every encoder weight tensor a random ``reserve`` share of the entries
   keeps its fine-tuned value and the others take their pre-trained value (the
   classification head has no pre-trained counterpart and is kept).
   A BERT classifier's pooler is mixed like the rest when the pre-trained checkpoint holds
   pooler weights (bert-base does: NSP); where it holds none (e.g. sentence-transformers
   exports) the fine-tuned pooler is kept and the result's ``kept_fine_tuned`` says so.
   trojanguard's own text models pool [CLS] themselves and have no pooler.
3. **Fine-tuning** of all parameters on the clean data (the text recipe: AdamW, batch 32,
   gradient clipping 1.0, constant rate), which brings the task back.

Readings chosen (the authors' code is not among the stored public repositories; these
are ours and recorded here):
* The paper mixes at random ("Fine-mixing"); its selective variant is not implemented.
* Special tokens ([CLS], [SEP], padding) are not counted: they are in every sentence, and
  their rows moved with the task, not with a trigger; they rank like rare words (on
  SST-2 none was among the 20 most changed).
* Token frequencies come from the defender's clean sentences, the only corpus a defender
  has; the floor ``epur_min_count`` keeps a handful of occurrences from counting as
  "frequent" (with 872 SST-2 sentences most tokens are below it, so the ranking is
  mostly by d_i).
* ``reserve`` 0.3 and 200 purified tokens: our defaults (a lower reserve removes more of the
  fine-tuning, backdoor and task alike, which the clean fine-tuning has to win back).

Measured through ``configs/sst2-defenses.yaml`` (MiniLM-L6, D_def = 872 dev sentences, 2
threads, ~5 min a model): E-PUR puts back the embeddings of all five BadNets trigger words
(``bb cf mb tq`` first, ``mn`` seventh, of 200), yet BadNets 20 % keeps ASR 20.2 % (CA 87.8 ->
85.3; 40.7 % after the retuning attack) and AddSent 20 %, whose trigger words are common
ones E-PUR does not single out, 19.9 % (CA 87.7 -> 84.8; 95.3 % after retuning). PAM with
inverted words does better on both (13.7 % and 16.9 % at a CA cost under 1 point), so
``repair`` keeps PAM for text; fine-mixing stays a baseline.
* Images: the CIFAR-10 zoo is trained from scratch, so there is no clean starting point
  to mix with; the method is text only.

The pre-trained weights: for a trojanguard text model, the encoder it was built on
(``minilm`` -> the offline MiniLM-L6 package; ``hf:<dir>`` -> that directory); ``base=<dir>``
names another local Hugging Face encoder directory (e.g. for a foreign classifier).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.base import Data
from ..errors import UserError
from ..training import train
from .base import Purifier, PurifierConfig
from .common import defense_train_config


class FineMixingConfig(PurifierConfig):
    reserve: float = Field(0.3, ge=0, le=1, description=(
        "share of each encoder tensor's fine-tuned entries kept; the rest go back to the pre-trained values"))
    epur_tokens: int = Field(200, ge=0, description="vocabulary embeddings reset by E-PUR (0 = no E-PUR)")
    epur_min_count: int = Field(20, ge=2, description="frequency floor of E-PUR's log(count) denominator")
    base: str | None = Field(None, description=(
        "local Hugging Face encoder directory with the pre-trained weights (default: the model's own backbone)"))
    epochs: int = Field(10, ge=0, description="clean fine-tuning epochs after the mixing")
    lr: float = Field(2e-5, gt=0, description="AdamW learning rate")
    batch_size: int = Field(32, ge=1)


def base_directory(model, base: str | None):
    """The directory of the pre-trained encoder (checked, not loaded), or one line saying
    what is missing."""
    from ..models.text_classifier import resolve_encoder
    if not hasattr(model, "encoder") or not hasattr(model, "tokenizer"):
        raise UserError("fine-mixing needs a text model with a Hugging Face encoder and its tokenizer (a trojanguard "
                        "text model, or a Hugging Face classifier through hf-text:<dir>); this model has "
                        f"{'no encoder' if not hasattr(model, 'encoder') else 'no tokenizer'}")
    spec = base if base is not None else getattr(model, "encoder_spec", None)
    if spec is None:
        raise UserError("fine-mixing needs the pre-trained weights the model was fine-tuned from: give base=<local "
                        "Hugging Face encoder dir> (--set base=<dir> on the command line)")
    path = resolve_encoder(spec)
    if base is None and not _has_weights(path) and getattr(model, "hf_source", None):
        # a reloaded checkpoint's encoder_spec is its copy of config + tokenizer; the weights
        # stayed in the directory the model was first built from
        path = resolve_encoder(model.hf_source)
    if not _has_weights(path):
        raise UserError(f"the encoder directory {path} holds no weights (a trojanguard checkpoint keeps only the "
                        "config and tokenizer): give base=<the pre-trained encoder dir> (--set base=<dir> on the "
                        "command line)")
    return path


def _has_weights(path) -> bool:
    return any(f.suffix in (".safetensors", ".bin") for f in path.iterdir())


def pretrained_encoder(model, base: str | None) -> tuple[torch.nn.Module, set[str]]:
    """The clean pre-trained encoder ``model``'s encoder was fine-tuned from, and the names of
    its parameters the checkpoint holds no values for (initialised at random by the load)."""
    path = base_directory(model, base)
    from transformers import AutoModel
    try:
        pre, loading = AutoModel.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise UserError(f"the pre-trained encoder {path} does not load: {str(e).splitlines()[0][:160]}") from None
    return pre, set(loading.get("missing_keys", ()))


def token_counts(model, clean: Data) -> Counter:
    """How often each token id occurs in the clean sentences (no special tokens)."""
    counts: Counter = Counter()
    for ids in model.tokenizer(list(clean.texts), add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    return counts


def embedding_purification(embedding: torch.Tensor, pretrained: torch.Tensor, counts: Counter,
                           n_tokens: int, min_count: int) -> list[int]:
    """Reset (in place) the ``n_tokens`` rows of ``embedding`` whose change from
    ``pretrained`` is largest for their frequency; returns their token ids, most changed first."""
    if n_tokens == 0:
        return []
    change = (embedding - pretrained).norm(dim=1)
    freq = torch.full_like(change, float(min_count))
    for i, c in counts.items():
        if c > min_count:
            freq[i] = c
    score = change / torch.log(freq)
    ids = score.topk(min(n_tokens, len(score))).indices
    with torch.no_grad():
        embedding[ids] = pretrained[ids]
    return ids.tolist()


def mix_weights(encoder: torch.nn.Module, pretrained: torch.nn.Module, reserve: float,
                gen: torch.Generator, untrained: set[str] = frozenset()) -> int:
    """Keep a random ``reserve`` share of each shared tensor's entries, reset the rest to the
    pre-trained values (in place); returns how many entries were reset. ``untrained``: the
    pre-trained parameters its checkpoint holds no values for; the model's are kept. Besides
    those, the two must have the same tensors, except a pooler the model was built without."""
    mine, theirs = dict(encoder.named_parameters()), dict(pretrained.named_parameters())
    absent = [n for n in untrained if n in mine and not n.startswith("pooler.")]
    if absent:  # only a pooler may lack pre-trained values (sentence-transformers exports drop it)
        raise UserError(f"the pre-trained checkpoint holds no weights for {absent[0]} (and {len(absent) - 1} more "
                        "tensors); give base=<the complete encoder the model was fine-tuned from> (--set base=<dir> "
                        "on the command line)")
    shared = [n for n in mine if n in theirs and n not in untrained]
    mismatch = ([n for n in shared if theirs[n].shape != mine[n].shape]
                + [n for n in mine if n not in theirs]  # e.g. a base with fewer layers
                + [n for n in theirs if n not in mine and not n.startswith("pooler.")])
    if mismatch:
        raise UserError(f"the pre-trained encoder does not match the model (e.g. {mismatch[0]}); give base=<the "
                        "encoder the model was fine-tuned from> (--set base=<dir> on the command line)")
    reset = 0
    with torch.no_grad():
        for name in shared:
            p = mine[name]
            keep = torch.rand(p.shape, generator=gen) < reserve
            p.copy_(torch.where(keep.to(p.device), p, theirs[name].to(p.device)))
            reset += int((~keep).sum())
    return reset


class FineMixing(Purifier):
    """Fine-mixing + E-PUR: back towards the pre-trained weights, then clean fine-tuning."""
    name = "fine-mixing"
    Config = FineMixingConfig
    modalities = ("text",)

    def preflight(self, model, clean: Data) -> None:
        super().preflight(model, clean)
        base_directory(model, self.cfg.base)

    def _purify(self, model, clean: Data, original):
        cfg = self.cfg
        pre, untrained = pretrained_encoder(model, cfg.base)
        emb = model.encoder.get_input_embeddings().weight
        pre_emb = pre.get_input_embeddings().weight.detach().to(emb.device)
        if emb.shape != pre_emb.shape:
            raise UserError("the pre-trained encoder's vocabulary differs from the model's; give base=<the encoder "
                            "the model was fine-tuned from> (--set base=<dir> on the command line)")
        reset_tokens = embedding_purification(emb.data, pre_emb, token_counts(model, clean), cfg.epur_tokens,
                                              cfg.epur_min_count)
        gen = torch.Generator().manual_seed(cfg.seed)
        reset = mix_weights(model.encoder, pre, cfg.reserve, gen, untrained)
        total = sum(p.numel() for p in model.encoder.parameters())
        kept = sorted(n for n, _ in model.encoder.named_parameters() if n in untrained)
        info = {"reserve": cfg.reserve, "reset_share": reset / total, "kept_fine_tuned": kept,
                "epur_reset_tokens": model.tokenizer.convert_ids_to_tokens(reset_tokens[:20])}
        if cfg.epochs:
            tcfg = defense_train_config(clean, cfg, "fine-mixing", epochs=cfg.epochs, batch_size=cfg.batch_size,
                                        optimizer="adamw", lr=cfg.lr, schedule="constant")
            res = train(model, clean, None, tcfg, loss_fn=lambda logits, y: F.cross_entropy(logits, y))
            info["train_seconds"] = res.seconds
        return model.eval(), info


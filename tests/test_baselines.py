"""The BackdoorBench baselines (fine-pruning, nad, anp, i-bau) on the tiny digits CNN and
a tiny text encoder: each returns a new model, leaves its input alone, lowers the planted
backdoor; Fine-Pruning cuts the dormant channels and the cut survives a checkpoint; ANP's
masks stay in [0, 1]."""
import copy

import pytest
import torch

from trojanguard.checkpoint import load_checkpoint, save_checkpoint
from trojanguard.data.base import TextData
from trojanguard.defenses import create_defense
from trojanguard.defenses.common import split_clean
from trojanguard.eval.evaluate import evaluate, predict

# Short runs: these tests check what each method returns and how, not how well it does.
QUICK = {
    "fine-pruning": {"epochs": 3},
    "nad": {"teacher_epochs": 2, "epochs": 2},
    "anp": {"iterations": 20, "batch_size": 64, "prune_by": "fraction", "fraction": 0.05},
    "i-bau": {"rounds": 1, "batch_size": 64},
}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", list(QUICK))
def test_baseline_returns_a_new_model_and_leaves_the_input_alone(method, backdoored_digits, digits):
    model, _ = backdoored_digits
    state = _state(model)
    res = create_defense(method, progress=False, **QUICK[method]).purify(model, digits.defense)
    assert res.model is not model
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state), "the input model was modified"
    new = res.model.state_dict()
    assert any(not torch.equal(state[k], new[k].cpu()) for k in state), f"{method} changed nothing"
    assert res.ca_before is not None and res.ca_after is not None and res.verify_size > 0


def test_fine_pruning_removes_the_digits_backdoor_by_pruning(backdoored_digits, digits):
    """The pruning stage alone (epochs=0) cuts the BadNets backdoor of the fixture (ASR
    <= 7 % in 5 of 6 seeds while keeping >= 78 % CA). The fine-tuning stage that follows
    brings much of it back on this fixture: fine-tuning on clean data cannot remove it
    (plain FT leaves ASR at 100 %), see the report of issue 15."""
    model, atk = backdoored_digits
    test = digits.bundle.test
    before = evaluate(model, test, atk.trigger, atk.target_for)
    assert before["asr"] > 0.9
    res = create_defense("fine-pruning", progress=False, epochs=0).purify(model, digits.defense)
    after = evaluate(res.model, test, atk.trigger, atk.target_for)
    assert after["asr"] < before["asr"] - 0.5, (before, after, res.info["pruned"])
    assert after["ca"] > 0.7


# Settings under which each method removes the fixture's BadNets backdoor in a few seconds at
# 1 thread, with the largest ASR and the smallest CA accepted after purification. Measured at
# seed 0 (ASR 1.00, CA 0.98 before): NAD ASR 0.015 / CA 0.91, ANP 0.007 / 0.82, i-BAU 0.055 /
# 0.75; seeds 0-2 (NAD), 0-3 (ANP) and 9 of 0-9 (i-BAU) stay within the bounds.
# * NAD: at its defaults (lr 0.01, betas 500/1000/1000) the fine-tuned teacher keeps the
#   backdoor (clean fine-tuning leaves ASR at 100 % here) and the attention loss on these
#   2x2-4x4 maps blows up (CA -> 0.4); lr 0.05, batch 32 and betas / 10 distil. The distillation
#   matters: the same run with betas 0 (plain fine-tuning) ends at ASR 0.26-0.32, above 0.2.
# * ANP: prunes at the paper's threshold 0.2; with the 1-pixel crop augmentation the masks
#   miss the backdoor neurons on 8x8 digits (ASR stays 1.0), without it 8 neurons go.
# * i-BAU: the default Adam lr 1e-4 (BackdoorBench) barely moves the model in the few outer
#   steps that 120 images give; the authors' 1e-3 with batch 32 unlearns it, at a clear cost in
#   CA (0.71-0.86 over seeds 0-9).
REMOVAL = {
    "nad": ({"lr": 0.05, "batch_size": 32, "teacher_epochs": 10, "epochs": 10, "betas": [50.0, 100.0, 100.0]},
            0.2, 0.85),
    "anp": ({"iterations": 500, "augment": False}, 0.2, 0.7),
    "i-bau": ({"rounds": 5, "batch_size": 32, "lr": 1e-3}, 0.5, 0.6),
}


@pytest.mark.parametrize("method", list(REMOVAL))
def test_baseline_lowers_the_digits_backdoor(method, backdoored_digits, digits):
    opts, max_asr, min_ca = REMOVAL[method]
    model, atk = backdoored_digits
    test = digits.bundle.test
    before = evaluate(model, test, atk.trigger, atk.target_for)
    assert before["asr"] > 0.9 and before["ca"] > 0.95, before
    res = create_defense(method, progress=False, **opts).purify(model, digits.defense)
    after = evaluate(res.model, test, atk.trigger, atk.target_for)
    assert after["asr"] <= max_asr and after["asr"] <= before["asr"] / 2, (method, before, after, res.info)
    assert after["ca"] >= min_ca, (method, before, after)


def _dormant_model(model, channels):
    """A copy whose last block's BN silences ``channels`` for every input (scale 0, bias < 0
    before the ReLU): their pooled activation is exactly 0 on any data."""
    m = copy.deepcopy(model)
    bn = m.block3[1]
    with torch.no_grad():
        bn.weight[channels] = 0.0
        bn.bias[channels] = -1.0
    return m


def test_fine_pruning_prunes_the_dormant_channels(backdoored_digits, digits):
    model, _ = backdoored_digits
    dormant = [3, 17, 40, 58]
    m = _dormant_model(model, dormant)
    fp = create_defense("fine-pruning", progress=False, epochs=5)
    res = fp.purify(m, digits.defense)
    pruned = res.info["pruned_units"]
    assert set(dormant) <= set(pruned), res.info
    # ranked by mean clean activation: the dormant ones (mean 0) go first and the rule keeps
    # going past them, since they cannot cost any accuracy
    assert res.info["pruned"] > len(dormant) and res.info["pruned"] < res.info["units"]
    acc0, acc = res.info["check_acc_unpruned"], res.info["check_acc_pruned"]
    assert (acc0 - acc) / acc0 < 0.1
    w = res.model.head.weight.detach()
    # the cut is in the weights and survived fine-tuning (re-zeroed after every step)
    assert torch.all(w[:, pruned] == 0)
    kept = sorted(set(range(w.shape[1])) - set(pruned))
    assert torch.all(w[:, kept].abs().sum(0) > 0)
    # everything pruned is at most as active as everything kept, on the data the rule ranks
    # on: the clean data less the verification part (base) less the stopping rule's part
    fit, _ = split_clean(digits.defense, fp.cfg.verify_fraction, fp.cfg.seed)
    rank_part, _ = split_clean(fit, fp.cfg.check_fraction, fp.cfg.seed)
    with torch.no_grad():
        feats = m.features(rank_part.batch(torch.arange(len(rank_part)))[0]).mean(0)
    assert feats[pruned].max() <= feats[kept].min() + 1e-6


def test_pruned_models_survive_a_checkpoint_round_trip(tmp_path, backdoored_digits, digits):
    model, _ = backdoored_digits
    test = digits.bundle.test
    for name, opts in [("fine-pruning", {"epochs": 3}), ("anp", {"iterations": 30})]:
        purified = create_defense(name, progress=False, **opts).purify(model, digits.defense).model
        save_checkpoint(tmp_path / name, purified)
        again, _ = load_checkpoint(tmp_path / name)
        assert torch.equal(predict(again, test), predict(purified, test))
        for key, value in purified.state_dict().items():  # the cut is part of the saved weights
            assert torch.equal(again.state_dict()[key].cpu(), value.cpu()), key


def test_anp_masks_stay_in_unit_interval_and_prune_by_threshold(backdoored_digits, digits):
    model, _ = backdoored_digits
    anp = create_defense("anp", progress=False, iterations=60, batch_size=64)
    res = anp.purify(model, digits.defense)
    masks = torch.cat([m.flatten() for m in anp.masks.values()])
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    # lr 0.2 with momentum pushes masks past both bounds: the clipping is what keeps them in
    assert (masks == 1.0).any() and (masks < 1.0).any()
    low = {name: m <= 0.2 for name, m in anp.masks.items()}
    modules = dict(res.model.named_modules())
    for name, sel in low.items():
        w = modules[name].weight.detach().cpu()
        assert torch.all(w[sel] == 0) and torch.all(w[~sel] == dict(model.named_modules())[name].weight.detach()[~sel])
    assert res.info["pruned"] == sum(int(s.sum()) for s in low.values())
    frac = create_defense("anp", progress=False, iterations=20, batch_size=32, prune_by="fraction", fraction=0.1)
    assert frac.purify(model, digits.defense).info["pruned"] == round(0.1 * res.info["neurons"])


def test_anp_ca_budget_prunes_the_most_the_accuracy_budget_allows(backdoored_digits, digits):
    """prune_by=ca_budget: the chosen threshold keeps acc_ratio of the selection part's
    accuracy, and the next threshold on the grid (if tried) broke it; a budget of 1.0
    against a ratio of 0.5 prunes more."""
    from trojanguard.defenses.common import clean_accuracy, split_clean
    model, _ = backdoored_digits
    res = {}
    for ratio in (1.0, 0.5):
        anp = create_defense("anp", progress=False, iterations=60, batch_size=64, prune_by="ca_budget",
                             acc_ratio=ratio, verify_fraction=0)
        res[ratio] = anp.purify(model, digits.defense)
        b = res[ratio].info["ca_budget"]
        curve = b["curve"]
        assert curve and [c["threshold"] for c in curve] == [round(0.05 * k, 2) for k in range(1, len(curve) + 1)]
        kept = [c for c in curve if c["selection_ca"] >= ratio * b["selection_ca_before"]]
        assert b["threshold"] == (kept[-1]["threshold"] if kept else None)
        if len(curve) < 18:  # stopped early: the last threshold tried broke the budget
            assert curve[-1]["selection_ca"] < ratio * b["selection_ca_before"]
        # the selection part is the one split_clean sets aside, and the model was measured on it
        _, selection = split_clean(digits.defense, 0.2, 0)
        assert b["selection_size"] == len(selection)
        assert abs(b["selection_ca_before"] - clean_accuracy(model.eval(), selection)) < 1e-4
    assert res[0.5].info["pruned"] >= res[1.0].info["pruned"]
    assert res[0.5].info["pruned"] > 0


def test_nad_attention_maps_are_normalised_and_ignore_padding():
    from trojanguard.defenses.nad import at_loss, attention_map
    g = torch.Generator().manual_seed(0)
    fm = torch.randn(4, 8, 5, 5, generator=g)
    am = attention_map(fm, 2.0)
    assert am.shape == (4, 25)
    assert torch.allclose(am.norm(dim=1), torch.ones(4), atol=1e-5)
    # BackdoorBench's AT: sum_c |a|^p, divided by its L2 norm over the positions
    ref = fm.abs().pow(2).sum(1, keepdim=True)
    ref = ref / (ref.norm(dim=(2, 3), keepdim=True) + 1e-6)
    assert torch.allclose(am, ref.flatten(1), atol=1e-6)
    assert at_loss(fm, fm, 2.0) == 0
    # text: a sentence padded to 7 tokens has the map of its 4 real tokens, zeros elsewhere
    h = torch.randn(1, 7, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    padded = attention_map(h, 2.0, mask)
    alone = attention_map(h[:, :4], 2.0)
    assert torch.allclose(padded[:, :4], alone, atol=1e-6) and torch.all(padded[:, 4:] == 0)


def test_nad_takes_a_given_teacher_of_the_same_architecture(tmp_path, backdoored_digits, clean_digits_model, digits):
    from trojanguard.errors import UserError
    model, _ = backdoored_digits
    save_checkpoint(tmp_path / "teacher", clean_digits_model)
    res = create_defense("nad", progress=False, teacher=str(tmp_path / "teacher"), epochs=1).purify(
        model, digits.defense)
    assert res.info["teacher"] == str(tmp_path / "teacher") and res.info["teacher_seconds"] == 0.0
    from trojanguard.models import create_model
    other = create_model("small_cnn", num_classes=10, width=8, in_channels=1)
    save_checkpoint(tmp_path / "other", other)
    with pytest.raises(UserError, match="architecture"):
        create_defense("nad", progress=False, teacher=str(tmp_path / "other")).purify(model, digits.defense)


@pytest.mark.parametrize("mode", ["fixed-point", "cg"])
def test_ibau_hypergradient_matches_the_implicit_derivative(mode):
    """A problem whose inner fixed point is known: Phi(d) = d - eta (d - W[0]) has d* = W[0],
    so the hypergradient must equal the gradient of L(W[0], theta) with d* substituted."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    rows = torch.tensor([1, 3])

    def logits_with(x, d, rows=None):
        full = torch.zeros_like(x).index_put((rows,), d.expand(len(rows), 3)) if rows is not None else d
        return lin(x + full)

    def inner_map(d):
        return d - 0.5 * (d - lin.weight[0:1])

    ibau = create_defense("i-bau", K=60, hypergrad=mode, progress=False)
    ibau._hyper_step(lin.weight[0:1].detach(), params, x, y, rows, logits_with, inner_map)
    got = [q.grad.clone() for q in params]
    for q in params:
        q.grad = None
    ref_loss = torch.nn.functional.cross_entropy(logits_with(x, lin.weight[0:1], rows), y)
    ref = torch.autograd.grad(ref_loss, params)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-5), (a, b)
    # the implicit term matters: the direct gradient alone (delta held fixed) differs
    direct = torch.autograd.grad(torch.nn.functional.cross_entropy(
        logits_with(x, lin.weight[0:1].detach(), rows), y), params)
    assert not torch.allclose(direct[0], ref[0], atol=1e-4)


TEXT_OPTIONS = {
    "fine-pruning": {"text_epochs": 1},
    "nad": {"teacher_epochs": 1, "epochs": 1},
    "anp": {"iterations": 4, "text_batch_size": 8, "prune_by": "fraction", "fraction": 0.05},
    "i-bau": {"rounds": 1, "text_batch_size": 8},
}


@pytest.fixture(scope="module")
def tiny_text(tiny_encoder_dir):
    from trojanguard.models import create_model
    torch.manual_seed(0)
    model = create_model(f"hf:{tiny_encoder_dir}", num_classes=2).eval()
    texts = ["a fine film", "dull and slow", "great acting", "terrible plot", "i loved it", "a boring mess",
             "a wonderful story", "awful dialogue", "moving and funny", "a waste of time", "a brilliant cast",
             "a weak script"] * 2
    return model, TextData(texts, torch.tensor([1, 0] * 12), ["negative", "positive"])


@pytest.mark.parametrize("method", list(TEXT_OPTIONS))
def test_baseline_runs_on_a_text_model(method, tiny_text):
    model, data = tiny_text
    state = _state(model)
    res = create_defense(method, progress=False, **TEXT_OPTIONS[method]).purify(model, data)
    assert res.model is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    changed = any(not torch.equal(v, res.model.state_dict()[k]) for k, v in state.items())
    assert changed, f"{method} returned the model unchanged"
    logits = res.model(data.texts[:4])
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    if method == "fine-pruning":
        from trojanguard.defenses.fine_pruning import ffn_output_projection
        cols = ffn_output_projection(res.model).weight.detach().abs().sum(0)
        assert int((cols == 0).sum()) == res.info["pruned"] > 0


def test_step_schedule_follows_its_milestones():
    from trojanguard.training import TrainConfig, lr_at
    cfg = TrainConfig(epochs=20, lr=0.1, schedule="step", milestones=[2, 15], gamma=0.1)
    total = 20 * 7  # 7 steps an epoch
    assert [round(lr_at(cfg, s, total), 6) for s in (0, 13, 14, 104, 105, total - 1)] == \
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]


def test_nad_official_recipe_takes_the_authors_schedule_and_keeps_explicit_options(backdoored_digits, digits):
    """recipe=official: lr 0.1 for 2 epochs then 0.01, batch 64, wd 1e-4, 20 + 10 epochs (the
    authors' code), except where an option is given; the recorded recipe shows which ran."""
    from trojanguard.defenses.nad import Nad
    model, atk = backdoored_digits
    nad = create_defense("nad", progress=False, recipe="official", epochs=3, teacher_epochs=2)
    res = nad.purify(model, digits.defense)
    assert (nad.cfg.lr, nad.cfg.batch_size, nad.cfg.weight_decay) == (0.1, 64, 1e-4)
    assert (nad.cfg.epochs, nad.cfg.teacher_epochs) == (3, 2)  # given explicitly: kept
    recipe = Nad._recipe(nad, 20, digits.defense, 0, "t")
    assert recipe.schedule == "step" and recipe.milestones == [2] and recipe.nesterov
    assert res.model is not model


def test_nad_official_recipe_is_refused_for_text(tiny_text):
    from trojanguard.errors import UserError
    model, data = tiny_text
    with pytest.raises(UserError, match="recipe=official"):
        create_defense("nad", progress=False, recipe="official").purify(model, data)

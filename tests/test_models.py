import pytest
import torch

from vaqkd.models import MODELS, count_weights, create_model


def test_resnet32_cifar100_weight_count_is_the_papers():
    m = create_model("resnet32", 100)
    assert count_weights(m) == 467_732
    assert abs(count_weights(m) * 4 / 2**20 - 1.784) < 5e-4  # "1.78 MB"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_has_the_same_interface(name):
    m = create_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert [k for k in feats] == ["stem", "layer1", "layer2", "layer3", "embedding", "logits"]
    assert feats["layer2"].shape == (2, 32, 16, 16) and feats["layer3"].shape == (2, 64, 8, 8)
    assert feats["embedding"].shape == (2, 64)
    assert torch.equal(m(x), feats["logits"]) and m(x).shape == (2, 10)


def test_depths_and_unknown_model():
    assert count_weights(create_model("resnet20", 10)) < count_weights(create_model("resnet56", 10))
    with pytest.raises(KeyError, match="unknown model 'vgg'"):
        create_model("vgg", 10)

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
    c2, c3 = feats["layer2"].shape[1], feats["layer3"].shape[1]
    assert feats["layer2"].shape == (2, c2, 16, 16) and feats["layer3"].shape == (2, c3, 8, 8)
    assert feats["embedding"].shape == (2, c3)
    assert torch.equal(m(x), feats["logits"]) and m(x).shape == (2, 10)


def test_depths_and_unknown_model():
    assert count_weights(create_model("resnet20", 10)) < count_weights(create_model("resnet56", 10))
    with pytest.raises(KeyError, match="unknown model 'vgg'"):
        create_model("vgg", 10)


@pytest.mark.parametrize("name,published", [("wrn_16_2", 0.70e6), ("wrn_40_2", 2.26e6)])
def test_wide_resnet_parameter_counts_are_the_published_ones(name, published):
    """CRD (Tian et al., ICLR 2020), Table 1: WRN-40-2 2.26M and WRN-16-2 0.70M parameters (CIFAR-100)."""
    n = sum(p.numel() for p in create_model(name, 100).parameters())
    assert n == {"wrn_16_2": 703_284, "wrn_40_2": 2_255_156}[name] and round(n / 1e6, 2) == published / 1e6


def test_heterogeneous_pair_hint_and_crd_on_quantized_wrn_student():
    """A W2A2 WRN-16-2 student learns from a ResNet-32 teacher: different channel counts at the hint stage
    (64 vs 32) and in the embedding (128 vs 64); every term has gradients to the student."""
    from vaqkd.config import TermConfig
    from vaqkd.distill.objective import Objective, build_term
    from vaqkd.models import stage_channels
    from vaqkd.quant import calibrate, quantize

    torch.manual_seed(0)
    student, teacher = quantize(create_model("wrn_16_2", 100), 2, 2), create_model("resnet32", 100).eval()
    x, labels = torch.randn(8, 3, 32, 32), torch.arange(40) % 100
    calibrate(student, [x])
    s_ch, t_ch = stage_channels(student), stage_channels(teacher)
    assert (s_ch["layer2"], t_ch["layer2"]) == (64, 32)
    cfgs = [TermConfig(kind="hint", params={"stage": "layer2"}, anchor_bits=(2,), anchor_weights=(1.0,)),
            TermConfig(kind="crd", params={"nce_k": 16}, anchor_bits=(2,), anchor_weights=(1.0,))]  # fmt: skip
    obj = Objective(cfgs, [build_term(c, s_ch, t_ch, labels) for c in cfgs])
    idx = torch.arange(8)
    with torch.no_grad():
        t = teacher.forward_features(x)
    total, parts = obj(student.forward_features(x), t, labels[idx], index=idx)
    total.backward()
    assert set(parts) == {"hint", "hint@va2", "crd", "crd@va2"} and torch.isfinite(total)
    assert student.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_features_by_module_path_on_a_model_without_forward_features():
    from torch import nn

    from vaqkd.models import features, stage_channels
    from vaqkd.quant import quantize

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))  # fmt: skip
    q = quantize(net, 2, 2)
    f = features(q, torch.randn(2, 3, 32, 32), ["3", "embedding"])
    assert f["3"].shape == (2, 16, 16, 16) and f["embedding"].shape == (2, 16) and f["logits"].shape == (2, 10)
    assert stage_channels(q, ["1", "embedding"]) == {"1": 8, "embedding": 16, "logits": 10}
    with pytest.raises(KeyError, match="'layer9' is neither a named stage"):
        features(q, torch.randn(1, 3, 32, 32), ["layer9"])
    # the CIFAR ResNets keep their short names, and module paths work beside them
    r = create_model("resnet20", 10).eval()
    g = features(r, torch.randn(2, 3, 32, 32), ["layer2", "layer3.2"])
    assert torch.equal(g["layer3.2"], g["layer3"]) and g["layer2"].shape == (2, 32, 16, 16)


def test_a_wrong_stage_name_is_a_config_error(shared_cifar_root, tmp_path):
    from vaqkd.config import load_config
    from vaqkd.engine.train import fit
    from vaqkd.errors import ConfigError

    sets = ["model.arch=resnet20", 'model.init=""', "distill.teacher_arch=resnet20", "train.device=cpu",
            "train.precision=fp32", "optim.epochs=1", ("data.root", str(shared_cifar_root)), "data.batch_size=100",
            'distill.terms=[{kind="ce"}, {kind="hint", stage="layer9"}]']  # fmt: skip
    teacher = tmp_path / "t"
    fit(load_config(None, sets[:-1] + ['distill.terms=[{kind="ce"}]']), teacher, progress=False, log=lambda s: 0)
    with pytest.raises(ConfigError, match=r"distill\.terms\.1\.stage: 'layer9' is neither"):
        fit(load_config(None, [*sets, f'distill.teacher="{teacher}"']), tmp_path / "r", progress=False, log=lambda s: 0)

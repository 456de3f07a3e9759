import torch

from vaqkd.analysis.gradcam import gradcam_figure, gradcam_maps
from vaqkd.config import load_config
from vaqkd.engine.train import fit
from vaqkd.models import create_model
from vaqkd.quant import calibrate, quantize


def test_gradcam_maps_through_quantized_layers():
    torch.manual_seed(0)
    model = quantize(create_model("resnet20", 10), 2, 2, first_last="same")
    x = torch.randn(3, 3, 32, 32)
    calibrate(model, [x])
    maps = gradcam_maps(model.eval(), x, torch.tensor([0, 1, 2]))
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all()
    assert maps.amin() >= 0 and maps.amax() <= 1 and (maps.amax((1, 2)) > 0).any()


def test_gradcam_figure_from_two_runs(shared_cifar_root, tmp_path):
    base = [
        ("data.root", str(shared_cifar_root)),
        "model.arch=resnet20",
        "optim.epochs=1",
        "data.batch_size=100",
        "train.precision=fp32",
    ]
    fit(load_config(None, base), tmp_path / "a", progress=False, log=lambda s: None)
    fit(load_config(None, base + ["quant.enabled=true"]), tmp_path / "b", progress=False, log=lambda s: None)
    out = gradcam_figure(str(tmp_path / "a"), str(tmp_path / "b"), images=2, out=str(tmp_path / "g.png"))
    assert out.exists() and out.stat().st_size > 5000

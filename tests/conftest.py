import os
import pickle
from pathlib import Path

# Tests run the eager quantizer kernels (compiling them costs ~20 s per process on a fresh machine); one test
# checks that the compiled kernels agree with the eager ones.
os.environ.setdefault("VAQKD_COMPILE", "0")

import numpy as np
import pytest
import torch

REAL_CIFAR100 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar100"

torch.set_num_threads(min(2, torch.get_num_threads()))


def write_cifar100(root: Path, per_class_train: int = 4, per_class_test: int = 2, seed: int = 0) -> Path:
    """Synthetic CIFAR-100 in the exact official pickle layout (Python-2 style latin1-loadable dicts)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        fine = np.repeat(np.arange(100), per)
        rng.shuffle(fine)
        # class-dependent mean colour so a model can learn something
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        data[:, :1024] = (fine * 2.5).astype(np.uint8)[:, None] + data[:, :1024] // 4
        d = {
            "data": data,
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "batch_label": f"{split} batch",
        }
        with open(folder / split, "wb") as f:
            pickle.dump(d, f, protocol=2)
    meta = {
        "fine_label_names": [f"class{i}" for i in range(100)],
        "coarse_label_names": [f"super{i}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def one_line_error(capsys, args, *needles):
    """`vaqkd ARGS` exits 2 with one line on stderr, no traceback, holding every needle."""
    from vaqkd.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture
def cifar_root(tmp_path):
    return write_cifar100(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_cifar_root(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("shared") / "data", per_class_train=6, per_class_test=2)


@pytest.fixture
def real_cifar100():
    if not (REAL_CIFAR100 / "cifar-100-python" / "train").exists():
        pytest.skip("real CIFAR-100 not present beside the project")
    return REAL_CIFAR100


@pytest.fixture(scope="session")
def tiny_teacher(shared_cifar_root, tmp_path_factory):
    """A resnet20 teacher trained for one epoch on the synthetic data (a run directory)."""
    from vaqkd.config import load_config
    from vaqkd.engine.train import fit

    run = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(
        None,
        [
            ("data.root", str(shared_cifar_root)),
            "model.arch=resnet20",
            "optim.epochs=1",
            "data.batch_size=100",
            "train.precision=fp32",
        ],
    )
    fit(cfg, run, progress=False, log=lambda s: None)
    return run


def stem_error(conv, bn, x: torch.Tensor, norm, got) -> float:
    """The largest error of a stem output `got` (bn(conv(normalised uint8 x)), before any ReLU) against its float64
    value from the loader's float32 pixels, in ulps of each output's magnitude (sum |n·w| + |shift|, the scale a
    float32 dot product rounds at). `norm` = (mean255, std255)."""
    import torch.nn.functional as F

    m255, s255 = (torch.from_numpy(np.asarray(a, np.float32)).view(1, -1, 1, 1) for a in norm)
    n = ((x.float() - m255) / s255).double()  # the loader's float32 values, then exact arithmetic
    c_out = conv.out_channels
    if bn is not None:
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.detach().double() - bn.running_mean.double() * scale
    else:
        scale, shift = torch.ones(c_out, dtype=torch.float64), torch.zeros(c_out, dtype=torch.float64)
    if conv.bias is not None:
        shift = shift + scale * conv.bias.detach().double()
    w = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    with torch.no_grad():
        exact = F.conv2d(n, w, shift, *args).numpy()
        magnitude = F.conv2d(n.abs(), w.abs(), shift.abs(), *args).numpy()
    ulp = np.spacing(magnitude.astype(np.float32)).astype(np.float64)
    err = float((np.abs(np.asarray(got, np.float64) - exact) / ulp).max())
    print(f"stem error {err:.3f} ulp")
    return err

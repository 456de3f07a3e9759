"""The GPU path: everything that otherwise only runs on CPUs, on CUDA. Marked `cuda`, skipped where there is no
GPU; benchmarks/gpu.sh runs them first on a GPU machine (`pytest -m cuda`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]
DEV = torch.device("cuda")
DEVICE_FOR_ROWS = os.environ.get("VAQKD_TEST_ROWS_DEVICE", "cuda")  # cpu: the same row check without a GPU
ROWS = sorted(p.stem for p in (ROOT / "configs" / "cifar100").glob("*.toml")
              if p.stem not in ("student_w2a2",) and not p.stem.startswith(("teacher", "takd_")))  # fmt: skip


def test_device_loader_on_cuda_is_deterministic_and_resumable():
    from vaqkd.data.loader import DeviceLoader

    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(256) % 10
    loader = DeviceLoader(images, labels, 64, (0.5,) * 3, (0.25,) * 3, DEV, train=True, seed=3)
    a, b = list(loader.batches(1)), list(loader.batches(1))
    assert all(torch.equal(x1, x2) and torch.equal(i1, i2) for (x1, _, i1), (x2, _, i2) in zip(a, b))
    assert a[0][0].device.type == "cuda" and a[0][0].dtype == torch.float32
    assert torch.equal(a[0][1], labels.to(DEV)[a[0][2]])
    resumed = list(loader.batches(1, start=2))  # mid-epoch resume: the same batches from batch 2 on
    assert all(torch.equal(x1, x2) for (x1, _, _), (x2, _, _) in zip(a[2:], resumed))
    halves = [list(DeviceLoader(images, labels, 64, (0.5,) * 3, (0.25,) * 3, DEV, train=True, seed=3,
                                shard=(r, 2)).batches(1)) for r in (0, 1)]  # fmt: skip
    assert torch.equal(torch.cat([halves[0][0][0], halves[1][0][0]]), a[0][0])  # ranks' shards = the batch


def test_compiled_quantizer_kernels_on_cuda_match_eager(monkeypatch):
    from vaqkd.quant import ste

    monkeypatch.setenv("VAQKD_COMPILE", "1")
    fwd, bwd = ste.Fused(ste._lsq_forward), ste.Fused(ste._lsq_backward)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 64, 32, 32, device=DEV).relu().to(dtype)
        s = torch.tensor(0.4, device=DEV)
        y = fwd(x, s, 0, 3)
        assert fwd.fn is not fwd.eager and torch.equal(y, ste._lsq_forward(x, s, 0, 3))
        dy = torch.randn_like(x)
        dx, ds = bwd(dy, x, s, 0, 3, 0.5)
        dx_e, ds_e = ste._lsq_backward(dy, x, s, 0, 3, 0.5)
        assert torch.equal(dx, dx_e) and torch.allclose(ds, ds_e, rtol=1e-4)


def test_the_arithmetic_fingerprints_are_repeatable_on_cuda():
    """A record's keys must name the arithmetic, not a run: cuDNN's algorithm choice or atomics that moved the
    bits between two calls would make every resume refused and no two runs pair."""
    from vaqkd.engine import arithmetic

    for precision in ("bf16", "fp32"):
        first = (arithmetic.fingerprint(DEV, precision), arithmetic.kernels_fingerprint(DEV, precision, "lsq"),
                 arithmetic.residual_fingerprint(DEV, precision))  # fmt: skip
        again = (arithmetic.fingerprint(DEV, precision), arithmetic.kernels_fingerprint(DEV, precision, "lsq"),
                 arithmetic.residual_fingerprint(DEV, precision))  # fmt: skip
        assert first == again, precision


def test_first_compile_inside_autograds_backward_thread(monkeypatch):
    """On CUDA the backward runs on autograd's own thread: the first compile of the backward kernel happens
    there."""
    monkeypatch.setenv("VAQKD_COMPILE", "1")
    from vaqkd.models import create_model
    from vaqkd.quant import calibrate, quantize

    model = quantize(create_model("resnet20", 10), 2, 2).to(DEV)
    x = torch.randn(32, 3, 32, 32, device=DEV)
    calibrate(model, [x])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_autocast_step_is_close_to_fp32():
    from vaqkd.models import create_model
    from vaqkd.quant import calibrate, quantize

    torch.manual_seed(0)
    model = quantize(create_model("resnet20", 10), 2, 2).to(DEV)
    x, y = torch.randn(64, 3, 32, 32, device=DEV), torch.randint(0, 10, (64,), device=DEV)
    calibrate(model, [x])
    losses = []
    for bf16 in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            losses.append(torch.nn.functional.cross_entropy(model(x).float(), y).item())
    assert abs(losses[0] - losses[1]) < 0.05 * abs(losses[0])


def test_crd_negatives_on_a_cuda_generator():
    from vaqkd.distill.contrastive import CRDLoss

    labels = torch.arange(1000) % 10
    crd = CRDLoss(64, 64, labels, feat_dim=32, nce_k=256).to(DEV)
    idx = torch.arange(0, 1000, 7, device=DEV)
    neg = crd.sample_negatives(idx, step=5)
    assert neg.device.type == "cuda" and neg.shape == (len(idx), 256)
    assert (labels.to(DEV)[neg] != labels.to(DEV)[idx][:, None]).all()  # always another class
    assert torch.equal(neg, crd.sample_negatives(idx, step=5))
    whole = crd.sample_negatives(idx[:142], step=9)  # two parts of a batch draw the whole batch's rows
    parts = [crd.sample_negatives(idx[p * 71 : (p + 1) * 71], step=9, shard=(p, 2)) for p in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("row", ROWS)
def test_a_few_steps_of_every_row(row, shared_cifar_root, tiny_teacher, tmp_path):
    from vaqkd.config import load_config
    from vaqkd.engine.train import fit

    arch = "wrn_16_2" if row.endswith("_wrn") else "resnet20"
    sets = [f'data.root="{shared_cifar_root}"', f"model.arch={arch}", "distill.teacher_arch=resnet20",
            f'distill.teacher="{tiny_teacher}"', 'model.init=""', f"train.device={DEVICE_FOR_ROWS}",
            "data.batch_size=50", "optim.epochs=1"]  # fmt: skip
    cfg = load_config(ROOT / "configs" / "cifar100" / f"{row}.toml", sets)
    fit(cfg, tmp_path / row, progress=False, log=lambda s: None, stop_after_steps=3)
    assert (tmp_path / row / "ckpt-000000003").is_dir()


def test_one_process_ddp_over_nccl(shared_cifar_root, tiny_teacher, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    sets = [f'data.root="{shared_cifar_root}"', "model.arch=resnet20", 'model.init=""', "train.device=cuda",
            f'distill.teacher="{tiny_teacher}"', "distill.teacher_arch=resnet20", "data.batch_size=50"]  # fmt: skip
    cmd = [str(torchrun), "--standalone", "--nproc-per-node=1", str(ROOT / "tests" / "ddp_worker.py"),
           str(ROOT / "configs/cifar100/vaqkd_contrastive.toml"), str(tmp_path / "run"), str(tmp_path / "out"), "3",
           *sets, "distill.terms.1.nce_k=64"]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))  # keep what the caller set
    env = {**os.environ, "PYTHONPATH": path, "VAQKD_DIST": "1"}  # a process group of one
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "out" / "rank0.pt").exists()

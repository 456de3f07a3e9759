import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vaqkd.config import OptimConfig, load_config, to_toml
from vaqkd.engine.setup import resolve_device
from vaqkd.engine.step import lr_at
from vaqkd.engine.train import fit
from vaqkd.errors import ConfigError, RunFileError
from vaqkd.rundir import checkpoints, run_weights

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "data.batch_size=100",
    "data.eval_batch_size=200",
    "model.arch=resnet20",
    "optim.epochs=2",
    "optim.lr=0.05",
    "optim.schedule=cosine",
    "train.precision=fp32",
    "train.device=cpu",
]


def tiny_cfg(root, *extra):
    return load_config(None, TINY + [("data.root", str(root)), *extra])


def test_short_fit_learns_and_writes_the_run_directory(shared_cifar_root, tmp_path):
    cfg = tiny_cfg(shared_cifar_root, "optim.epochs=3", "optim.lr=0.1")
    final = fit(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    run = tmp_path / "run"
    for f in ("config.toml", "env.json", "metrics.jsonl", "final.json"):
        assert (run / f).exists(), f
    cks = checkpoints(run)
    assert [c.name for c in cks] == [f"ckpt-{18:09d}"]  # one checkpoint, the last (3 epochs x 6 steps)
    assert {f.name for f in cks[0].iterdir()} == {"model.safetensors", "objective.safetensors", "state.pt"}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns the class colours
    env = json.loads((run / "env.json").read_text())
    assert {"git_sha", "torch", "device", "seed", "threads", "cpu_capability", "cpu_model"} <= set(env)
    assert final["top1_last"] == rows[-1]["test_top1"] and final["top1_best"] >= final["top1_last"]
    assert load_config(run / "config.toml") == cfg
    with pytest.raises(FileExistsError, match="--resume"):
        fit(cfg, run, progress=False, log=lambda s: None)


def test_resume_mid_epoch_continues_the_same_run(shared_cifar_root, tmp_path):
    # a W2A2 student with logit KD + a virtual anchor, so quantizer and objective state are covered too
    teacher_run = tmp_path / "teacher"
    fit(tiny_cfg(shared_cifar_root, "optim.epochs=1"), teacher_run, progress=False, log=lambda s: None)
    extra = [
        "quant.enabled=true",
        f'distill.teacher="{teacher_run}"',
        "distill.teacher_arch=resnet20",
        f'model.init="{teacher_run}"',
        'distill.terms=[{kind="ce"}, {kind="kd", weight=1.0, anchor_bits=[4], anchor_weights=[0.5]}]',
    ]
    cfg = tiny_cfg(shared_cifar_root, *extra)
    full = fit(cfg, tmp_path / "a", progress=False, log=lambda s: None)
    # the same run, killed after 9 of its 12 steps (mid-epoch 2) and resumed
    assert fit(cfg, tmp_path / "b", progress=False, log=lambda s: None, stop_after_steps=9) == {}
    resumed = fit(cfg, tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    a, b = load_file(run_weights(tmp_path / "a")), load_file(run_weights(tmp_path / "b"))
    assert a.keys() == b.keys() and any("step" in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed["top1_last"] == full["top1_last"]
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(mb) == 2 and set(ma[-1]["parts"]) == {"ce", "kd", "kd@va4"}
    assert ma[-1]["parts"]["kd"] == pytest.approx(mb[-1]["parts"]["kd"], rel=1e-5)
    assert "profile" in full and full["profile"]["params"] > 0


def test_resume_refuses_a_changed_config(shared_cifar_root, tmp_path):
    cfg = tiny_cfg(shared_cifar_root, "optim.epochs=1")
    fit(cfg, tmp_path / "r", progress=False, log=lambda s: None)
    with pytest.raises(RunFileError, match=r"config differs .* \(optim\.epochs 1 -> 2, run -> here\)"):
        fit(tiny_cfg(shared_cifar_root, "optim.epochs=2"), tmp_path / "r", resume=True, progress=False)


def test_a_refused_resume_names_the_keys_that_changed():
    from vaqkd.config import differences

    base = load_config(ROOT / "configs/cifar100/vaqkd_logit.toml")
    changed = load_config(ROOT / "configs/cifar100/vaqkd_logit.toml",
                          ["distill.terms.1.weight=0.5", "quant.w_bits=4", "train.seed=2", "optim.lr=0.5"])  # fmt: skip
    assert differences(to_toml(base), to_toml(base)) == ""
    said = differences(to_toml(base), to_toml(changed))
    assert said == "quant.w_bits 2 -> 4, optim.lr 0.05 -> 0.5, distill.terms.1.weight 0.45 -> 0.5 and 1 more"
    said = differences(to_toml(base), to_toml(changed), limit=9)
    assert said.endswith(", train.seed 0 -> 2")
    assert differences('a = 1\n', 'a = 1\nb = "x"\n') == "b '(absent)' -> 'x'"
    assert differences("a = 1\n", "a = 1 # one\n") == "the same values, written another way"


def test_schedules():
    ms = OptimConfig(epochs=240, lr=0.05)
    assert lr_at(ms, 0, 10) == 0.05 and lr_at(ms, 1500, 10) == pytest.approx(0.005)
    assert lr_at(ms, 2100, 10) == pytest.approx(0.05e-3)
    cos = OptimConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=1)
    assert lr_at(cos, 0, 100) == pytest.approx(0.001) and lr_at(cos, 99, 100) == pytest.approx(0.1)
    assert lr_at(cos, 550, 100) == pytest.approx(0.05)
    one = OptimConfig(epochs=10, lr=0.1, schedule="onecycle", warmup_epochs=0)
    assert lr_at(one, 500, 100) == pytest.approx(0.05)


def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_them_in_again():
    """With the CLI's allocator tuning (glibc), a freed 8 MiB activation-sized buffer is reused from the heap:
    allocating and filling it again costs (almost) no page faults; untuned glibc maps it anew each time."""
    import resource
    import sys

    from vaqkd.engine.setup import tune_allocator

    if not sys.platform.startswith("linux") or not tune_allocator():
        pytest.skip("allocator tuning applies to glibc Linux only")
    x = torch.empty(2 << 20).fill_(1.0)  # 8 MiB: above glibc's default mmap threshold
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.empty(2 << 20).fill_(1.0)
        del x
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 5 * 2048 // 4, faults  # untuned: ~2048 faults (8 MiB / 4 KiB) per round


def test_unusable_devices_are_config_errors_naming_their_key():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^--device=tpu: must be auto, cpu, cuda or cuda:N$"):
        resolve_device("tpu", "--device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^train\.device=cuda: CUDA is not available on this machine$"):
            resolve_device("cuda")
    else:
        with pytest.raises(ConfigError, match=r"^train\.device=cuda:99: this machine has \d+ CUDA device"):
            resolve_device("cuda:99")


def test_tensorboard_curves_of_a_tiny_run(shared_cifar_root, tmp_path):
    """`fit(tensorboard=True)` writes event files beside metrics.jsonl holding each epoch's loss parts, top-1, lr
    and throughput; the metrics themselves are the same as without it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(shared_cifar_root, "optim.epochs=1")
    fit(cfg, tmp_path / "run", progress=False, log=lambda s: None, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "top1/train", "top1/test", "lr", "throughput/img_per_s", "parts/ce"} <= tags
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert events.Scalars("top1/test")[0].value == pytest.approx(row["test_top1"])
    assert events.Scalars("top1/test")[0].step == 1


def _tiny_w2a2_step(freeze_epochs: float, steps: int, resume_at: int = -1):
    """`steps` QKD-free CE steps of a tiny W2A2 ResNet-20 with `optim.freeze_weights_epochs`, 2 steps an epoch;
    returns (weights before, after, optimizer); `resume_at`: rebuild the optimizer from its state_dict there."""
    from dataclasses import replace

    from vaqkd.config import TermConfig
    from vaqkd.distill.objective import Objective, build_term
    from vaqkd.engine.step import StudentLoss, make_optimizer, train_step
    from vaqkd.models import create_model
    from vaqkd.quant import calibrate, quantize

    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 10
    student = quantize(create_model("resnet20", 10), 2, 2)
    calibrate(student, [x])
    terms = [TermConfig(kind="ce")]
    objective = Objective(terms, [build_term(t, {}, {}, y) for t in terms])
    cfg = replace(OptimConfig(), epochs=3, lr=0.05, freeze_weights_epochs=freeze_epochs)
    opt = make_optimizer(cfg, student, objective, steps_per_epoch=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    for step in range(steps):
        if step == resume_at:  # a resume: the optimizer rebuilt and its saved state loaded
            saved = opt.state_dict()
            opt = make_optimizer(cfg, student, objective, steps_per_epoch=2)
            opt.load_state_dict(saved)
        train_step(StudentLoss(student, objective), None, opt, x, y, torch.arange(8), step, "fp32", shard=(0, 1))
    return before, student.state_dict(), opt


def test_freeze_weights_epochs_holds_conv_and_linear_weights_then_releases_them():
    before, after, opt = _tiny_w2a2_step(freeze_epochs=1.0, steps=2)  # the whole first epoch is the held phase
    weights = [k for k in before if k.endswith(".weight") and before[k].ndim > 1]  # conv and linear weights
    assert weights and all(torch.equal(before[k], after[k]) for k in weights)
    names = [k for k in before if k.endswith(("step", "bn1.weight", "bn1.bias"))]
    moved = [k for k in names if not torch.equal(before[k], after[k])]
    assert any(k.endswith("step") for k in moved) and any("bn1" in k for k in moved)  # quantizers and BN train
    held = next(g for g in opt.param_groups if "frozen_until" in g)
    assert held["frozen_until"] == 2 and not any(p in opt.state for p in held["params"])  # no momentum built up
    before, after, _ = _tiny_w2a2_step(freeze_epochs=1.0, steps=3)  # the third step is past the phase
    assert all(not torch.equal(before[k], after[k]) for k in weights)
    resumed = _tiny_w2a2_step(freeze_epochs=1.0, steps=4, resume_at=1)[1]  # a resume inside the phase
    straight = _tiny_w2a2_step(freeze_epochs=1.0, steps=4)[1]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_freeze_weights_epochs_needs_the_epoch_length():
    from vaqkd.engine.step import make_optimizer

    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_optimizer(OptimConfig(epochs=3, freeze_weights_epochs=1.0), torch.nn.Linear(2, 2), torch.nn.Module())


def test_a_warm_up_of_a_fractional_number_of_steps_stops_at_the_lr():
    cfg = OptimConfig(epochs=2, lr=0.1, schedule="cosine", warmup_epochs=0.5)  # 1.5 steps of a 3-step epoch
    lrs = [lr_at(cfg, k, 3) for k in range(6)]
    assert max(lrs) == 0.1 and lrs[0] < lrs[1] == 0.1


def test_freeze_weights_epochs_zero_keeps_the_optimizer_and_the_run_identity():
    from vaqkd.config import identity, to_toml
    from vaqkd.engine.step import make_optimizer
    from vaqkd.models import create_model
    from vaqkd.quant import quantize

    student = quantize(create_model("resnet20", 10), 2, 2)
    groups = make_optimizer(OptimConfig(), student, torch.nn.Module()).param_groups
    assert len(groups) == 2 and not any("frozen_until" in g for g in groups)  # weights, quantizer steps
    cfg = load_config(None, ["optim.epochs=2"])
    text = to_toml(cfg)
    assert "freeze_weights_epochs = 0.0" in text
    assert identity(text) == identity(text.replace("freeze_weights_epochs = 0.0\n", ""))  # old records' hashes
    assert identity(to_toml(load_config(None, ["optim.epochs=2", "optim.freeze_weights_epochs=0.5"]))) != identity(text)
    with pytest.raises(ConfigError, match="optim.freeze_weights_epochs"):
        load_config(None, ["optim.epochs=2", "optim.freeze_weights_epochs=2"])


def test_cpu_info_names_the_generation_behind_a_shared_model_name(tmp_path, monkeypatch):
    import builtins

    from vaqkd.engine import setup

    text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n" \
           "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: other\n"  # fmt: skip
    (tmp_path / "cpuinfo").write_text(text)
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(tmp_path / "cpuinfo" if f == "/proc/cpuinfo"
                                                                       else f, *a, **k))  # fmt: skip
    assert setup.cpu_info() == {"model name": "AMD EPYC", "cpu_model": "family 26 model 2"}  # the first block's
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n")
    assert setup.cpu_info()["cpu_model"] == "unknown"


def test_reestimate_bn_sets_the_plain_average_of_the_batch_statistics_and_nothing_else():
    from vaqkd.data.loader import DeviceLoader
    from vaqkd.engine.step import reestimate_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.3), torch.nn.ReLU())
    model[1].running_mean.fill_(5.0)  # stale statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(40) % 4, 10, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"), train=True)
    model.eval()
    assert reestimate_bn(model, loader, 3) == 1
    assert not model.training and model[1].momentum == 0.3  # mode and momentum as they were
    with torch.no_grad():
        outs = [model[0](x) for x, _, _ in list(loader.batches(0))[:3]]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, rtol=1e-4)
    after = model.state_dict()
    for k in before:
        if k.startswith("1.running") or k == "1.num_batches_tracked":
            continue
        assert torch.equal(before[k], after[k]), k


def test_bn_reestimate_batches_changes_what_is_evaluated_and_saved_never_a_training_step(shared_cifar_root, tmp_path):
    from vaqkd.config import identity, to_toml

    w2a2 = ["quant.enabled=true", "optim.epochs=2"]
    a = fit(tiny_cfg(shared_cifar_root, *w2a2), tmp_path / "a", progress=False, log=lambda s: None)
    b = fit(tiny_cfg(shared_cifar_root, *w2a2, "train.bn_reestimate_batches=2"), tmp_path / "b", progress=False,
            log=lambda s: None)  # fmt: skip
    wa, wb = load_file(run_weights(tmp_path / "a")), load_file(run_weights(tmp_path / "b"))
    stats = [k for k in wa if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and wa.keys() == wb.keys()
    for k in wa.keys() - set(stats):  # every weight, quantizer step and BN affine parameter: bit for bit
        assert torch.equal(wa[k], wb[k]), k
    assert any(not torch.equal(wa[k], wb[k]) for k in stats if "running" in k)
    ma, mb = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab")
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]  # the same training, step for step
    assert a["top1_last"] == ma[-1]["test_top1"]  # a evaluated its own statistics
    # what b saved and evaluated: a's final model with its statistics re-estimated on the last epoch's 2 batches
    from vaqkd.engine.step import evaluate, reestimate_bn
    from vaqkd.rundir import load_run

    _, model, data = load_run(tmp_path / "a", torch.device("cpu"))
    reestimate_bn(model, data.train, 2, epoch=1)
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            assert torch.allclose(v, wb[k], rtol=1e-6, atol=1e-7), k
    assert evaluate(model, data.test)["top1"] == mb[-1]["test_top1"] == b["top1_last"]
    # and a run with the knob, killed mid-epoch 2 and resumed, ends bit for bit as the uninterrupted one
    cfg_b = tiny_cfg(shared_cifar_root, *w2a2, "train.bn_reestimate_batches=2")
    assert fit(cfg_b, tmp_path / "c", progress=False, log=lambda s: None, stop_after_steps=9) == {}
    c = fit(cfg_b, tmp_path / "c", resume=True, progress=False, log=lambda s: None)
    wc = load_file(run_weights(tmp_path / "c"))
    assert c["top1_last"] == b["top1_last"] and all(torch.equal(wb[k], wc[k]) for k in wb)
    with pytest.raises(ValueError, match="batches"):
        reestimate_bn(model, data.train, 0)
    text = to_toml(tiny_cfg(shared_cifar_root))
    assert "bn_reestimate_batches = 0" in text
    assert identity(text) == identity(text.replace("bn_reestimate_batches = 0\n", ""))  # old records' hashes
    assert identity(to_toml(tiny_cfg(shared_cifar_root, "train.bn_reestimate_batches=2"))) != identity(text)
    with pytest.raises(ConfigError, match="train.bn_reestimate_batches"):
        tiny_cfg(shared_cifar_root, "train.bn_reestimate_batches=-1")


def test_ddp_buffer_switch_on_torch_before_and_after_2_13(monkeypatch):
    """torch 2.13 renamed DDP's per-forward buffer sync to `forward_sync_buffers`; older releases (2.11 on a GPU
    image) only know `broadcast_buffers` and refuse the new name."""
    import inspect

    from torch import nn

    from vaqkd.engine.build import _no_forward_buffer_sync

    def old_init(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True):
        pass

    monkeypatch.setattr(nn.parallel.DistributedDataParallel, "__init__", old_init)
    assert _no_forward_buffer_sync() == {"broadcast_buffers": False}
    monkeypatch.undo()
    if "forward_sync_buffers" in str(inspect.signature(nn.parallel.DistributedDataParallel.__init__)):
        assert _no_forward_buffer_sync() == {"forward_sync_buffers": False}

"""`vaqkd bench`: throughput of the training step in its variants, the loader, a whole epoch and eval.

Everything runs in one process on synthetic CIFAR-sized data, so ratios compare like with like. The step
cases are built first, warmed up, then timed in interleaved rounds (a few steps of each case per round), so a
slow spell of the machine lands on every case alike instead of on whichever case was running; each case
reports the median of its timed steps and their interquartile spread. `--quick` shrinks every size so a test
can check that each case runs; its figures mean nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vaqkd.config import TermConfig
from vaqkd.data.loader import DeviceLoader
from vaqkd.distill.objective import Objective, build_term, stages_of
from vaqkd.engine.setup import resolve_device, resolve_precision
from vaqkd.engine.step import StudentLoss, evaluate, train_step
from vaqkd.metrics.size import layer_table
from vaqkd.models import create_model, stage_channels
from vaqkd.quant import calibrate, quantize_student
from vaqkd.rundir import check_file_target

TAKD_STAGES = ("takd_w8a8_from_fp32", "takd_w4a4_from_w8a8", "takd_w2a2_from_w4a4")
# the project's speed targets, as (ratio, "min" or "max", bound); checked in the report, never in a test
TARGETS = (
    ("w2a2_over_fp32", "min", 0.95),
    ("w2a2_int_residual_over_fp32", "min", 0.95),
    ("vaqkd_over_qkd_logit", "max", 1.02),
    ("vaqkd_over_qkd_feature", "max", 1.02),
    ("vaqkd_over_qkd_contrastive", "max", 1.02),
    ("epoch_over_steps", "max", 1.05),
)
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def _terms(row: str) -> list[TermConfig]:
    """The loss terms of a row of the table, read from its config file (so the bench times the defaults)."""
    from vaqkd.config import load_config
    from vaqkd.presets import configs_dir

    return list(load_config(configs_dir() / "cifar100" / f"{row}.toml").distill.terms)


SETTINGS = ("logit", "feature", "contrastive")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _student(w_bits: int | None, weight: str, act: str, x: torch.Tensor, device, channels_last: bool,
             residual: str = "float") -> nn.Module:  # fmt: skip
    torch.manual_seed(0)
    m = create_model("resnet32", 100)
    if w_bits is not None:
        quantize_student(m, w_bits, w_bits, weight, act, residual=residual)
    m.to(device)
    if channels_last:
        m.to(memory_format=torch.channels_last)
    if w_bits is not None:
        calibrate(m, [x])
    return m.train()


def run_bench(device: str = "cpu", batch: int = 128, quick: bool = False, as_json: bool = False,
              out: str | None = None, precision: str = "auto", channels_last: bool = False,
              force: bool = False) -> dict:  # fmt: skip
    """Time every step case in interleaved rounds, the loader, an epoch against its steps and evaluation; the
    ratios that matter and whether each target was met (see the module docstring)."""
    dev = resolve_device(device, "--device")
    if out:  # a path that cannot be written fails now, not after minutes of timing
        check_file_target(Path(out), "bench.json", force=force)  # an existing file only with force
    if quick:
        batch, warmup, rounds, per_round, n_train = min(batch, 8), 1, 2, 1, 64
    else:
        warmup, rounds, per_round, n_train = 3, 8, 2, 50_000
    prec = resolve_precision(precision, dev)  # what a run in this precision trains in
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n_train) % 100
    loader = DeviceLoader(images, labels, batch, MEAN, STD, dev, train=True, channels_last=channels_last)
    batch_data = next(iter(loader))

    steps, base, teacher = _step_cases(batch_data, labels, dev, prec, channels_last)
    flops_per_img = 6 * sum(r["macs"] for r in layer_table(create_model("resnet32", 100)))  # fwd + bwd ~ 3x fwd
    results = _time_steps(steps, batch, flops_per_img, warmup, rounds, per_round, dev)
    results["loader"] = _loader_case(loader, batch, dev, quick)
    results["epoch"] = _epoch_case(images, labels, batch_data, teacher, dev, prec, channels_last, quick)
    results["eval_w2a2"] = _eval_case(images, labels, batch_data[0], dev, prec, channels_last, quick)
    ratios, targets = _ratios(results, base)
    report = {"device": str(dev), "precision": prec, "batch": batch, "quick": quick, "threads": torch.get_num_threads(),
              "channels_last": channels_last, "cases": results, "ratios": ratios, "targets": targets}  # fmt: skip
    from vaqkd.engine.setup import environment

    report["env"] = environment(dev, 0, prec)
    text = json.dumps(report, indent=2)
    print(text) if as_json else _print_report(report)  # the figures first: a failed write loses nothing
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return report


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _step_cases(batch_data, labels, dev, prec: str, channels_last: bool):
    """{name: one train step} for every case, the FP32 baseline's name, and the FP32 teacher."""
    x, y, idx = batch_data
    steps: dict[str, Callable[[], object]] = {}

    def case(name: str, model: nn.Module, terms: list[TermConfig], teacher: nn.Module | None = None,
             prec_: str = prec) -> None:  # fmt: skip
        stages = stages_of(terms)
        s_ch, t_ch = stage_channels(model, stages), stage_channels(teacher or model, stages_of(terms, teacher=True))
        obj = Objective(terms, [build_term(t, s_ch, t_ch, labels, 0) for t in terms]).to(dev)
        opt = torch.optim.SGD(list(model.parameters()) + list(obj.parameters()), lr=1e-3, momentum=0.9)
        count, student = [0], StudentLoss(model, obj)

        def fn():
            count[0] += 1
            train_step(student, teacher, opt, x, y, idx.to(dev), count[0], prec_)

        steps[name] = fn

    ce = [TermConfig("ce", 1.0)]
    fp32_model = _student(None, "lsq", "lsq", x, dev, channels_last)
    case("fp32_step_fp32", fp32_model, ce, prec_="fp32")
    if prec == "bf16":
        case("fp32_step_bf16", fp32_model, ce, prec_="bf16")
    base = "fp32_step_bf16" if prec == "bf16" else "fp32_step_fp32"
    for wq, aq in (("lsq", "lsq"), ("ewgs", "ewgs"), ("dorefa", "pact")):
        case(f"w2a2_{wq}_{aq}", _student(2, wq, aq, x, dev, channels_last), ce)
    case("w2a2_lsq_lsq_int_residual", _student(2, "lsq", "lsq", x, dev, channels_last, "int"), ce)
    teacher = _frozen(_student(None, "lsq", "lsq", x, dev, channels_last))
    for setting in SETTINGS:
        for method in ("qkd", "vaqkd"):
            case(f"{method}_{setting}", _student(2, "lsq", "lsq", x, dev, channels_last), _terms(f"{method}_{setting}"),
                 teacher)  # fmt: skip
    # TAKD: its last stage learns from a W4A4 assistant (fake-quantized teacher forward), and the whole method
    # trains three students (W8A8, W4A4, W2A2) where VA-QKD trains one.
    qteacher = _frozen(_student(4, "lsq", "lsq", x, dev, channels_last))
    case("takd_w2a2_from_w4a4", _student(2, "lsq", "lsq", x, dev, channels_last), _terms("qkd_logit"), qteacher)
    case("takd_w4a4_from_w8a8", _student(4, "lsq", "lsq", x, dev, channels_last), _terms("qkd_logit"), qteacher)
    case("takd_w8a8_from_fp32", _student(8, "lsq", "lsq", x, dev, channels_last), _terms("qkd_logit"), teacher)
    return steps, base, teacher


def _time_steps(steps, batch: int, flops_per_img: float, warmup: int, rounds: int, per_round: int, dev) -> dict:
    """Every case warmed up first, then timed in interleaved rounds: median and interquartile spread."""
    for fn in steps.values():  # warm-up (compilation, allocator) for every case before any timing
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(per_round):
                times[name].append(_time(fn, dev, 0, 1))
    results = {}
    for name, ts in times.items():
        sec = statistics.median(ts)
        q1, _, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (sec, sec, sec)
        results[name] = {"ms_per_step": 1e3 * sec, "img_per_s": batch / sec,
                         "gflops": flops_per_img * batch / sec / 1e9, "iqr_pct": 100 * (q3 - q1) / sec,
                         "steps_timed": len(ts)}  # fmt: skip
    return results


def _loader_case(loader, batch: int, dev, quick: bool) -> dict:
    """The loader alone, over a whole epoch."""

    def load_epoch():
        n = 0
        for xb, _, _ in loader.batches(1):
            n += len(xb)
        return n

    sec = _time(load_epoch, dev, 0 if not quick else 1, 1 if not quick else 2)
    return {"img_per_s": len(loader) * batch / sec, "ms_per_batch": 1e3 * sec / len(loader)}


def _epoch_case(images, labels, batch_data, teacher, dev, prec: str, channels_last: bool, quick: bool) -> dict:
    """A whole (short) epoch through the engine's loop vs the sum of its steps, W2A2 VA-QKD logit."""
    x, y, idx = batch_data
    batch = len(x)
    n_steps = 4 if quick else 30
    sub = DeviceLoader(images[: n_steps * batch], labels[: n_steps * batch], batch, MEAN, STD, dev, train=True,
                       channels_last=channels_last)  # fmt: skip
    model = _student(2, "lsq", "lsq", x, dev, channels_last)
    terms = _terms("vaqkd_logit")
    obj = Objective(terms, [build_term(t, stage_channels(model), stage_channels(teacher), labels, 0) for t in terms])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    student = StudentLoss(model, obj)

    def epoch():  # as the engine runs one: batches from the loader, no sync until the end
        loss_sum = torch.zeros((), device=dev)
        for k, (xb, yb, ib) in enumerate(sub.batches(0)):
            loss_sum += train_step(student, teacher, opt, xb, yb, ib, k, prec)[0]
        return loss_sum.item()

    def fixed_steps():  # the same number of steps on one batch already on the device: no loader at all
        loss_sum = torch.zeros((), device=dev)
        for k in range(n_steps):
            loss_sum += train_step(student, teacher, opt, x, y, idx.to(dev), k, prec)[0]
        return loss_sum.item()

    epoch(), fixed_steps()  # warm-up
    walls, sums = [], []
    for _ in range(1 if quick else 2):  # interleaved, as the step cases
        walls.append(_time(epoch, dev, 0, 1))
        sums.append(_time(fixed_steps, dev, 0, 1))
    return {"steps": n_steps, "wall_s": min(walls), "sum_of_steps_s": min(sums)}


def _eval_case(images, labels, x, dev, prec: str, channels_last: bool, quick: bool) -> dict:
    eval_loader = DeviceLoader(images[: 20 * len(x)], labels[: 20 * len(x)], 500, MEAN, STD, dev, train=False)
    eval_model = _student(2, "lsq", "lsq", x, dev, channels_last)
    sec = _time(lambda: evaluate(eval_model, eval_loader, prec), dev, 1, 1 if quick else 3)
    return {"img_per_s": len(eval_loader.labels) / sec}


def _ratios(r: dict, base: str) -> tuple[dict, dict]:
    """The ratios that matter (each measured within this run) and whether each target was met."""
    ratios = {
        "w2a2_over_fp32": r["w2a2_lsq_lsq"]["img_per_s"] / r[base]["img_per_s"],
        "w2a2_int_residual_over_fp32": r["w2a2_lsq_lsq_int_residual"]["img_per_s"] / r[base]["img_per_s"],
        "bf16_over_fp32": r.get("fp32_step_bf16", r["fp32_step_fp32"])["img_per_s"] / r["fp32_step_fp32"]["img_per_s"],
        "vaqkd_over_qkd_logit": r["vaqkd_logit"]["ms_per_step"] / r["qkd_logit"]["ms_per_step"],
        "vaqkd_over_qkd_feature": r["vaqkd_feature"]["ms_per_step"] / r["qkd_feature"]["ms_per_step"],
        "vaqkd_over_qkd_contrastive": r["vaqkd_contrastive"]["ms_per_step"] / r["qkd_contrastive"]["ms_per_step"],
        "takd_over_vaqkd_logit": sum(r[k]["ms_per_step"] for k in TAKD_STAGES) / r["vaqkd_logit"]["ms_per_step"],
        "epoch_over_steps": r["epoch"]["wall_s"] / r["epoch"]["sum_of_steps_s"],
    }  # fmt: skip
    targets = {}
    for k, kind, b in TARGETS:
        met = ratios[k] >= b if kind == "min" else ratios[k] <= b
        targets[k] = {"bound": f"{'>=' if kind == 'min' else '<='} {b}", "met": bool(met)}
    return ratios, targets


def _print_report(report: dict) -> None:
    results, ratios, targets = report["cases"], report["ratios"], report["targets"]
    quick = " (QUICK: sizes too small to mean anything)" if report["quick"] else ""
    print(f"vaqkd bench: {report['env']['device_name']} ({report['device']}), {report['precision']}, batch "
          f"{report['batch']}, {report['threads']} threads{quick}")  # fmt: skip
    print(f"{'case':<24}{'img/s':>10}{'ms/step':>10}{'IQR %':>8}{'GFLOP/s':>10}")
    for k, v in results.items():
        if "ms_per_step" in v:
            print(f"{k:<24}{v['img_per_s']:>10.0f}{v['ms_per_step']:>10.1f}{v['iqr_pct']:>8.1f}{v['gflops']:>10.1f}")
    print(f"{'loader':<24}{results['loader']['img_per_s']:>10.0f}")
    print(f"{'eval_w2a2':<24}{results['eval_w2a2']['img_per_s']:>10.0f}")
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("targets: " + ", ".join(f"{k} {t['bound']} {'met' if t['met'] else 'NOT met'}" for k, t in targets.items()))

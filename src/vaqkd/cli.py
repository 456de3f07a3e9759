"""vaqkd command line: thin wrappers that parse, load a config and call a library function."""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from pathlib import Path

from vaqkd.errors import VaqkdError, file_in_the_way

EPILOG = """examples:
  vaqkd train configs/cifar100/teacher_resnet32_short.toml
  vaqkd train configs/cifar100/vaqkd_logit.toml --set train.seed=1 --out runs/vaqkd_logit_s1
  vaqkd eval runs/vaqkd_logit_s1 --json
  vaqkd profile --model resnet32 --w-bits 2 --a-bits 2 --first-last same
  vaqkd table --preset quick --seeds 3
  vaqkd bench --quick
"""


def _fraction(positive: bool):
    """argparse type: a finite float > 0 (positive) or >= 0; anything else is argparse's one-line error."""

    def parse(text: str) -> float:
        v = float(text)  # not a number: argparse says "invalid ... value"
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if positive else '>= 0'}, got {text}")
        return v

    return parse


def int_in(lo: int, hi: int | None = None, also: tuple[int, ...] = ()):
    """argparse type: an int in [lo, hi] (or one of `also`); anything else is argparse's one-line error."""

    def parse(text: str) -> int:
        v = int(text)  # not an int: argparse says "invalid int value"
        if not ((lo <= v and (hi is None or v <= hi)) or v in also):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {span}" + "".join(f" or {a}" for a in also) + f", got {v}")
        return v

    parse.__name__ = "int"
    return parse


def output_file(text: str) -> Path:
    """argparse type: a path that can become a file (an existing one is replaced: scripts regenerate their
    results), checked when the arguments are read, not after the work (`rundir.check_file_target`)."""
    from vaqkd.rundir import check_file_target

    try:
        check_file_target(Path(text), "result.json")
    except VaqkdError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(text)


def output_folder(text: str) -> Path:
    """argparse type: a path that is, or can become, a folder (not a file, not below one)."""
    if (blocker := file_in_the_way(text)) is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocker} is a file, not a folder")
    return Path(text)


def _add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="folder holding the datasets (default: $VAQKD_DATA, else ./data)")


def _overrides(args) -> list:
    """The command's `--set` overrides (TOML text) and `--data-root` (a path, passed as it is)."""
    overrides: list = list(args.set or [])
    if getattr(args, "data_root", None):
        overrides.append(("data.root", args.data_root))
    return overrides


def cmd_train(args) -> int:
    from vaqkd.engine.train import fit
    from vaqkd.presets import preset_config

    cfg = preset_config(args.config, args.preset, _overrides(args))
    out = Path(args.out or Path("runs") / cfg.name)
    final = fit(cfg, out, resume=args.resume, progress=not args.no_progress, stop_after_steps=args.stop_after_steps,
                tensorboard=args.tensorboard)  # fmt: skip
    from vaqkd import dist

    if final and dist.is_main():
        print(
            f"{cfg.name}: test top-1 {final['top1_last']:.2f}% (best {final['top1_best']:.2f}% at epoch "
            f"{final['best_epoch']}), {final['train_seconds']:.0f}s training -> {out}"
        )
    return 0


EVAL_TRAIN_KEYS = ("train.device", "train.precision", "train.threads", "train.channels_last")


def cmd_eval(args) -> int:
    import torch

    from vaqkd.config import override_key
    from vaqkd.deploy import backend_for
    from vaqkd.engine.setup import resolve_device, resolve_precision
    from vaqkd.engine.step import evaluate, reestimate_bn
    from vaqkd.errors import ConfigError, RunFileError
    from vaqkd.rundir import load_run

    device = resolve_device("auto" if args.device is None else args.device, "--device")
    # what an evaluation may change: where and how it reads the test split, not the model the run trained
    for o in args.set or []:
        key = override_key(o)
        if not (key.startswith("data.") or key in EVAL_TRAIN_KEYS):
            raise ConfigError(f"--set {key}: would change the model the run trained; eval takes data.* and "
                              f"{', '.join(EVAL_TRAIN_KEYS)}")  # fmt: skip

    other_backend = args.backend not in (None, "torch")
    if args.bn_reestimate and (Path(args.run_dir).is_file() or other_backend):
        what = f"--backend {args.backend}" if other_backend else f"{args.run_dir} (a file)"
        raise ConfigError(f"--bn-reestimate: needs a run directory evaluated in torch (its training data), not {what}")

    if args.precision and (other_backend or backend_for(args.run_dir) == "onnxruntime"):
        raise ConfigError(f"--precision {args.precision}: the torch backend's; an exported graph computes what it "
                          "holds (float32 and integer kernels)")  # fmt: skip
    if backend_for(args.run_dir) == "onnxruntime":  # an ONNX graph (vaqkd export --format onnx)
        return _eval_onnx(args)
    if other_backend:  # a run or an artifact, exported in memory and run in that runtime
        return _eval_exported(args)
    if Path(args.run_dir).is_file():  # a packed artifact (vaqkd export)
        from vaqkd.deploy import load

        model, header = load(args.run_dir, device)
        _, data = _test_data(args, header["dataset"], header["image_size"], device)
        if header["num_classes"] != data.num_classes:  # a folder dataset of other classes at --data-root
            raise RunFileError(f"{args.run_dir}: a model of {header['num_classes']} classes; the {header['dataset']} "
                               f"test split here has {data.num_classes}")  # fmt: skip
        # the run's logits, bit for bit: its own normalisation (folder data would recompute it from whatever
        # training images sit at --data-root) and fp32 unless --precision says otherwise
        data.test.mean, data.test.std = (torch.tensor(header[k], device=device).view(1, -1, 1, 1) * 255
                                         for k in ("mean", "std"))  # fmt: skip
        name, default_precision = Path(args.run_dir).name, "fp32"
    else:
        cfg, model, data = load_run(args.run_dir, device, _overrides(args))
        name, default_precision = cfg.name, cfg.train.precision
    precision = resolve_precision(args.precision or default_precision, device)
    if args.bn_reestimate:
        reestimate_bn(model, data.train, args.bn_reestimate, 0, precision)
    res = {
        "run": str(args.run_dir),
        "name": name,
        **evaluate(model, data.test, precision),
        "precision": precision,
        "test_images": len(data.test.labels),
    }
    if args.bn_reestimate:  # the batches used: at most one epoch's
        res["bn_reestimate_batches"] = min(args.bn_reestimate, len(data.train))
    print(json.dumps(res) if args.json else f"{name}: test top-1 {res['top1']:.2f}% on {res['test_images']} images")
    return 0


def _test_data(args, dataset: str, image_size: int, device):
    """The config and data an artifact (which carries no run directory) is evaluated on."""
    from vaqkd.config import load_config
    from vaqkd.data.build import build_data
    from vaqkd.errors import ConfigError

    # data.batch_size=1: the training split is read (for class names and folder labels), never batched here
    header = [("data.dataset", dataset), ("data.image_size", image_size), ("data.batch_size", 1)]
    try:
        load_config(None, header)
    except ConfigError as e:  # a value the artifact's header gave, named as such
        raise ConfigError(f"{args.run_dir}: its header does not make a config ({e})") from None
    cfg = load_config(None, [*header, *_overrides(args)])
    return cfg, build_data(cfg, device)


def _graph_data(args, meta: dict):
    import torch

    _, data = _test_data(args, meta.get("dataset", "cifar100"), int(meta.get("image_size", 32)), torch.device("cpu"))
    data.test.num_classes = data.num_classes  # what every batch's logits must cover (`evaluate_graph`)
    return data.test


def _print_graph_result(args, backend: str, res: dict) -> int:
    res = {"run": str(args.run_dir), "backend": backend, **res}
    print(json.dumps(res) if args.json else f"{args.run_dir}: test top-1 {res['top1']:.2f}% ({backend}) on "
          f"{res['test_images']} images")  # fmt: skip
    return 0


def _classifier_graph(path, sess) -> dict:
    """The graph's metadata, once the graph is checked to be an image classifier of the kind `vaqkd export`
    writes (one input (N, C, H, W) with a free batch, one output (N, classes); metadata image_size an integer
    and dataset a known one): a foreign or edited graph is one line naming what does not fit."""
    from vaqkd.deploy import ExportError

    ins, outs = sess.get_inputs(), sess.get_outputs()
    if (len(ins) != 1 or len(ins[0].shape) != 4 or isinstance(ins[0].shape[0], int) or len(outs) != 1
            or len(outs[0].shape) != 2):  # fmt: skip
        shapes = f"inputs {[list(i.shape) for i in ins]}, outputs {[list(o.shape) for o in outs]}"
        raise ExportError(f"{path}: not an image classifier graph of vaqkd export (one input (N, C, H, W) with a "
                          f"free batch, one output (N, classes)); it has {shapes}")  # fmt: skip
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    if not str(meta.get("image_size", "32")).isdigit():
        raise ExportError(f"{path}: metadata image_size={meta['image_size']!r} is not an integer")
    if meta.get("dataset", "cifar100") not in ("cifar100", "cifar10", "folder"):
        raise ExportError(f"{path}: metadata dataset={meta['dataset']!r} unknown (cifar100, cifar10 or folder)")
    return meta


def _eval_onnx(args) -> int:
    """An ONNX file in ONNX Runtime (default) or OpenVINO, on the uint8 test images (or, for a graph exported with
    float input, the loader's normalised batches)."""
    from vaqkd.deploy import ExportError
    from vaqkd.deploy.onnx_export import session
    from vaqkd.deploy.runtimes import compile_graph, evaluate_graph

    backend = args.backend or "onnxruntime"
    if backend in ("torch", "torch-int8"):
        raise ExportError(f"{args.run_dir}: an ONNX file runs with --backend onnxruntime or openvino")
    sess = session(args.run_dir)  # also checks the file is an ONNX model
    meta = _classifier_graph(args.run_dir, sess)
    test = _graph_data(args, meta)
    run = compile_graph(backend, args.run_dir)
    res = evaluate_graph(run, test.images, test.labels, normalise=(test.mean, test.std), source=args.run_dir,
                         num_classes=test.num_classes)  # fmt: skip
    return _print_graph_result(args, backend, {**res, "test_images": len(test.labels)})


def _eval_exported(args) -> int:
    """A run directory or a packed artifact exported to ONNX in memory and run in --backend's runtime."""
    from vaqkd.deploy.onnx_export import build_onnx, normalisation, source_model
    from vaqkd.deploy.runtimes import compile_graph, evaluate_graph

    model, (mean, std), meta = source_model(args.run_dir, args.data_root)
    test = _graph_data(args, meta)
    if args.backend == "torch-int8":  # no ONNX: the model as a program of int8 ops, compiled by inductor
        from vaqkd.deploy.torch_int8 import compile_int8

        batch = 500
        run = compile_int8(model, *normalisation(mean, std), example=test.images[:batch].cpu())
        res = evaluate_graph(run, test.images, test.labels, batch=batch, num_classes=test.num_classes,
                             name=args.run_dir)  # fmt: skip
        return _print_graph_result(args, args.backend, {**res, "test_images": len(test.labels)})
    graph = build_onnx(model, normalise=normalisation(mean, std)).SerializeToString()
    res = evaluate_graph(compile_graph(args.backend, graph), test.images, test.labels, num_classes=test.num_classes,
                         name=f"{args.run_dir} (exported for {args.backend})")  # fmt: skip
    return _print_graph_result(args, args.backend, {**res, "test_images": len(test.labels)})


def _export_target(source: str, out: str, force: bool, fmt: str) -> None:
    """Refuse, before any work, an --out that would destroy a file: one that exists (unless --force), never the
    source itself or a file inside a source run directory (its weights, its checkpoint), nor what cannot become a
    file (`rundir.check_file_target`)."""
    from vaqkd.deploy import ExportError
    from vaqkd.errors import resolved
    from vaqkd.rundir import check_file_target

    target, src = resolved(out), resolved(source)
    if Path(source).exists() and (target == src or (src.is_dir() and target.is_relative_to(src))):
        raise ExportError(f"--out {out}: is the source's own file ({source}); choose another --out")
    check_file_target(Path(out), "model.onnx" if fmt == "onnx" else "model.vaqkd.safetensors", force=force)


def cmd_export(args) -> int:
    from vaqkd.deploy import ExportError, export_packed

    _export_target(args.run_dir, args.out, args.force, args.format)
    src, suffix = Path(args.run_dir), Path(args.out).suffix.lower()
    if (args.format == "onnx") != (suffix == ".onnx") and suffix in (".onnx", ".safetensors"):
        want = "*.onnx" if args.format == "onnx" else "*.vaqkd.safetensors"
        raise ExportError(f"--out {args.out}: a {suffix} name for --format {args.format} (name it {want}, or "
                          "change --format)")  # fmt: skip
    if src.is_dir() and (args.arch or args.dataset):
        raise ExportError(f"--arch / --dataset: for FP32 weights only; the run {args.run_dir} has its own")
    from vaqkd.models import MODELS

    if args.arch and args.arch not in MODELS:
        raise ExportError(f"--arch {args.arch}: unknown model; registered: {sorted(MODELS)}")
    if args.format == "packed" and not src.is_dir():
        if not src.exists() and not (args.run_dir == "pretrained" or args.run_dir.startswith("pretrained:")):
            raise ExportError(f"{args.run_dir}: no such run directory (or file)")
        what = "a file" if src.is_file() else "FP32 weights"
        raise ExportError(f"{args.run_dir}: {what}; --format packed takes a finished quantized run directory "
                          "(--format onnx converts artifacts and FP32 weights)")  # fmt: skip
    if args.format == "onnx":
        from vaqkd.deploy.onnx_export import export_source_onnx

        export_source_onnx(args.run_dir, args.out, args.data_root, args.arch or "resnet32", args.dataset or "cifar100")
        print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes; input uint8 images, normalised inside)")
        return 0
    if args.format != "packed":
        raise ExportError(f"--format {args.format}: unknown")
    header = export_packed(args.run_dir, args.out, data_root=args.data_root)
    size = Path(args.out).stat().st_size
    print(
        f"wrote {args.out}: {size:,} bytes ({size / 2**20:.4f} MiB), {header['packed_layers']} packed layers, "
        f"W{header['quant']['w_bits']}A{header['quant']['a_bits']} first/last {header['quant']['first_last']}"
    )
    return 0


def cmd_profile(args) -> int:
    from vaqkd.metrics.size import profile

    p = profile(args.model, args.num_classes, args.w_bits, args.a_bits, args.first_last)
    if args.json:
        print(json.dumps(p, indent=2))
        return 0
    print(f"{'layer':<22}{'type':<8}{'W':>4}{'A':>4}{'params':>10}{'MACs':>13}")
    for r in p["layers"]:
        print(f"{r['name']:<22}{r['kind']:<8}{r['w_bits']:>4}{r['a_bits']:>4}{r['params']:>10,}{r['macs']:>13,}")
    print(f"\n{p['model']} ({p['num_classes']} classes), W{p['w_bits']}A{p['a_bits']}, first/last: {p['first_last']}")
    print(f"params {p['params']:,}   MACs {p['macs']:,}")
    print(f"size   {p['fp32_mib']:.3f} MiB (FP32) -> {p['quant_mib']:.4f} MiB ({p['fp32_mib'] / p['quant_mib']:.1f}x)")
    print(f"BOPs   {p['bops_fp32']:.4g} (FP32) -> {p['bops']:.4g} ({p['bops_reduction']:.1f}x fewer)")
    return 0


def cmd_table(args) -> int:
    from vaqkd.runner import run_table

    run_table(
        args.preset,
        seeds=args.seeds,
        first_seed=args.first_seed,
        out=args.out,
        rows=args.rows,
        runs_dir=args.runs_dir,
        overrides=_overrides(args),
        teacher=args.teacher,
        report_only=args.report_only,
        jobs=args.jobs,
        launcher=args.launcher,
        address=args.address,
        cpus_per_run=args.cpus_per_run,
        gpus_per_run=args.gpus_per_run,
    )
    table = Path(args.out or Path("results") / args.preset) / "table.md"
    if table.exists():
        print(table_summary(table))
    return 0


def table_summary(table: Path) -> str:
    """The rows of a report (its first table), then where the whole report lies."""
    lines = table.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), len(lines))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join([*lines[start:end], f"report: {table} (+ table.csv, table.json and figures in {table.parent})"])


def cmd_gradcam(args) -> int:
    from vaqkd.analysis.gradcam import gradcam_figure

    out = gradcam_figure(args.run_a, args.run_b, args.images, args.out, data_root=args.data_root, seed=args.seed,
                         force=args.force)  # fmt: skip
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from vaqkd.bench import run_bench

    run_bench(device=args.device, batch=args.batch, quick=args.quick, as_json=args.json, out=args.out, force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vaqkd.deploy import EVAL_BACKENDS, EXPORT_FORMATS
    from vaqkd.presets import preset_names
    from vaqkd.records import MAX_SEEDS

    p = argparse.ArgumentParser(
        prog="vaqkd",
        description="Train 2-bit (W2A2) image classifiers by knowledge distillation with virtual anchors (VA-QKD).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a TOML config")
    t.add_argument("config", help="TOML config file (see configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. optim.lr=0.1")
    t.add_argument("--out", help="run directory (default: runs/<name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--preset", help="apply a preset's student settings (configs/presets/NAME.toml), e.g. quick")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--stop-after-steps", type=int_in(1), metavar="N",
                   help="stop (checkpointed) once N global steps are done; continue later with --resume")  # fmt: skip
    t.add_argument("--tensorboard", action="store_true",
                   help="also write each epoch's curves to OUT/tensorboard/ (pip install 'vaqkd[tensorboard]')")
    _add_data_root(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="top-1 of a finished run (or a packed artifact) on the test split")
    e.add_argument("run_dir", help="a run directory, a packed artifact file or an ONNX graph")
    e.add_argument("--json", action="store_true")
    e.add_argument("--device")
    e.add_argument("--precision", choices=["fp32", "bf16"])
    e.add_argument("--set", action="append", metavar="KEY=VALUE")
    e.add_argument("--backend", choices=list(EVAL_BACKENDS),
                   help="default: from the file (onnxruntime for .onnx, torch for a run or a packed artifact); "
                   "onnxruntime or openvino on a run or an artifact export it to ONNX in memory first; torch-int8 "
                   "compiles an integer-residual run or artifact to oneDNN int8 convs")
    e.add_argument("--bn-reestimate", type=int_in(0), default=0, metavar="N",
                   help="a run directory only: first re-estimate the BatchNorm running statistics over N training "
                   "batches (epoch 0's order, the run's augmentation and batch size; at most one epoch's); the run is "
                   "not changed")
    _add_data_root(e)
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a finished run (or, as ONNX, a packed artifact or FP32 weights) as a "
                       "deployable file")  # fmt: skip
    x.add_argument("run_dir", metavar="SOURCE", help="a run directory; for --format onnx also a packed artifact or "
                   "FP32 weights ('pretrained', 'pretrained:NAME', a .safetensors file)")  # fmt: skip
    x.add_argument("--arch", help="FP32 weights only: the architecture (default resnet32)")
    x.add_argument("--dataset", help="FP32 weights only: the dataset, its statistics and classes (default cifar100)")
    x.add_argument("--format", choices=list(EXPORT_FORMATS), default="packed")
    x.add_argument("--out", required=True, help="e.g. model.vaqkd.safetensors (an existing file: only with --force)")
    x.add_argument("--force", action="store_true", help="replace an existing --out (never the source's own file)")
    _add_data_root(x)
    x.set_defaults(fn=cmd_export)

    pr = sub.add_parser("profile", help="per-layer bits, params, MACs; model size and BOPs")
    pr.add_argument("--model", default="resnet32")
    pr.add_argument("--num-classes", type=int_in(1, 100_000), default=100,
                    help="classes of the last layer (at most 100,000: the profile builds the model)")  # fmt: skip
    pr.add_argument("--w-bits", type=int_in(1, 16, also=(32,)), default=2, help="1: DoReFa's binary weights; 32: FP32")
    pr.add_argument("--a-bits", type=int_in(2, 16), default=2)
    pr.add_argument("--first-last", choices=["fp32", "8", "same"], default="same")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=cmd_profile)

    tb = sub.add_parser("table", help="train (or reuse) every row of the paper's table; write results/<preset>/")
    tb.add_argument("--preset", choices=preset_names(), default="demo")
    tb.add_argument("--seeds", type=int_in(1, MAX_SEEDS), default=1, help="seeds 0..N-1")
    tb.add_argument("--first-seed", type=int_in(0, MAX_SEEDS - 1), default=0, metavar="K",
                    help="train seeds K..N-1 only (the others' runs are neither trained nor resumed; the report "
                    "still shows every finished seed)")  # fmt: skip
    tb.add_argument("--rows", nargs="*", help="subset of rows (default: all of the preset)")
    tb.add_argument("--out", help="results folder (default: results/<preset>)")
    tb.add_argument("--runs-dir", help="where run directories go (default: runs/<preset>)")
    tb.add_argument("--teacher", help="'pretrained', 'pretrained:NAME', 'train', or a run dir / .safetensors "
                    "(default: the preset's teacher.weights, else 'pretrained')")  # fmt: skip
    tb.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every run")
    tb.add_argument("--report-only", action="store_true",
                    help="train and download nothing: report the runs and records there are (the teacher from its "
                    "kept evaluation, or evaluated if the data is here)")  # fmt: skip
    tb.add_argument("--jobs", type=int_in(1), default=1, help="local launcher: cells run at once (processes)")
    tb.add_argument("--launcher", choices=["local", "ray"], default="local",
                    help="ray: every (row, seed) cell as a Ray task (pip install 'vaqkd[cluster]')")  # fmt: skip
    tb.add_argument("--address", help="Ray cluster address (default: start a local Ray for this call)")
    tb.add_argument("--cpus-per-run", type=_fraction(True), help="Ray: CPUs per cell (default 1)")
    tb.add_argument("--gpus-per-run", type=_fraction(False), default=0.0,
                    help="Ray: GPUs per cell (fractions pack runs)")  # fmt: skip
    _add_data_root(tb)
    tb.set_defaults(fn=cmd_table)

    g = sub.add_parser("gradcam", help="Grad-CAM grid comparing two runs (captum LayerGradCam on layer3)")
    g.add_argument("run_a")
    g.add_argument("run_b")
    g.add_argument("--images", type=int_in(1), default=8)
    g.add_argument("--out", default="gradcam.png", help="the figure (an existing file: only with --force)")
    g.add_argument("--force", action="store_true", help="replace an existing --out")
    g.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="which test images (a random draw)")
    _add_data_root(g)
    g.set_defaults(fn=cmd_gradcam)

    b = sub.add_parser("bench", help="throughput of train steps, loader, epoch and eval; ratios in one process")
    b.add_argument("--device", default="cpu")
    b.add_argument("--batch", type=int_in(1, 50_000), default=128,
                   help="images a step (at most the 50,000 it times on)")  # fmt: skip
    b.add_argument("--quick", action="store_true", help="tiny sizes: checks that every case runs, not speed")
    b.add_argument("--json", action="store_true")
    b.add_argument("--out", help="also write the JSON here (an existing file: only with --force)")
    b.add_argument("--force", action="store_true", help="replace an existing --out")
    b.set_defaults(fn=cmd_bench)
    return p


EXIT_USER, EXIT_DIVERGED = 2, 3
USER_OS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR,
                  errno.ENAMETOOLONG}  # fmt: skip


def user_error_line(e: BaseException) -> str | None:
    """The one line an error the user can fix is shown as (a VaqkdError, a file missing or in the way, the file
    system refusing: read-only, no permission, full, a directory where a file goes); None for anything else, a bug
    that keeps its traceback."""
    from vaqkd.errors import VaqkdError

    if isinstance(e, FileExistsError) and e.filename and Path(e.filename).is_file():  # mkdir over a file
        return f"{e.filename}: is a file, not a directory (a folder was needed there)"
    if isinstance(e, FileExistsError) and e.filename and Path(e.filename).is_symlink():  # leads nowhere
        return f"{e.filename}: a symlink that leads to no folder (dangling, or a loop); a folder was needed there"
    if isinstance(e, (VaqkdError, FileNotFoundError, FileExistsError)):
        return str(e)
    if isinstance(e, OSError) and e.errno in USER_OS_ERRNOS:
        return f"{e.filename}: {e.strerror or e}" if e.filename else f"{e.strerror or e}"
    return None


def run_script(main_fn, prog: str) -> int:
    """A benchmark's or script's entry point under the command line's rule: an error the user can fix
    (`user_error_line`) is one line `PROG: error: ...` and exit 2, anything else keeps its traceback (and
    VAQKD_DEBUG=1 keeps every traceback). Returns main_fn()'s exit code (0 for None)."""
    import os

    try:
        code = main_fn()
        return code if isinstance(code, int) else 0
    except Exception as e:
        line = None if os.environ.get("VAQKD_DEBUG") == "1" else user_error_line(e)
        if line is None:
            raise
        from vaqkd.errors import TrainingDiverged

        print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_USER


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vaqkd.engine.setup import tune_allocator
    from vaqkd.errors import TrainingDiverged

    tune_allocator()  # fewer page faults per step on glibc; VAQKD_MALLOC_TUNE=0 turns it off

    from vaqkd import dist

    try:
        code = args.fn(args)
        dist.barrier()  # under torchrun: every rank reaches the end before any tears the process group down
        return code
    except Exception as e:
        # errors the user can fix: one line naming the culprit; anything else is a bug and keeps its traceback
        line = None if args.debug else user_error_line(e)
        if line is None:
            if dist.active():  # torchrun's summary names the first rank that failed; this line says which one
                print(f"vaqkd {args.command}: rank {dist.rank()} of {dist.world()} failed:", file=sys.stderr)
            raise
        where = f" (rank {dist.rank()} of {dist.world()})" if dist.active() else ""
        print(f"vaqkd {args.command}{where}: error: {line}", file=sys.stderr)
        return EXIT_DIVERGED if isinstance(e, TrainingDiverged) else EXIT_USER
    except KeyboardInterrupt:
        from vaqkd.runner import command_line

        again = "rerun with --resume" if args.command == "train" else f"rerun `{command_line()}`"
        print(f"vaqkd {args.command}: interrupted (the last checkpoint is kept; {again})", file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(main())

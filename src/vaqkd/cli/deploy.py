"""`vaqkd eval` and `vaqkd export`: a run, a packed artifact or an ONNX graph on the test split, in torch or an
exported runtime; a run, an artifact or FP32 weights written as a deployable file."""

from __future__ import annotations

import json
from pathlib import Path

from vaqkd.cli.args import overrides

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
        cfg, model, data = load_run(args.run_dir, device, overrides(args))
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
    cfg = load_config(None, [*header, *overrides(args)])
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

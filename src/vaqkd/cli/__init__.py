"""vaqkd command line: thin wrappers that parse, load a config and call a library function.

The parser and `main` live here; the commands in `commands` (train, profile, table, gradcam, bench) and `deploy`
(eval, export); argument types in `args`, how an error ends a command in `exits` (both also serve the scripts)."""

from __future__ import annotations

import argparse
import sys

from vaqkd.cli.args import add_data_root, fraction, int_in, output_file, output_folder, write_output
from vaqkd.cli.commands import cmd_bench, cmd_gradcam, cmd_profile, cmd_table, cmd_train, table_summary
from vaqkd.cli.deploy import cmd_eval, cmd_export
from vaqkd.cli.exits import EXIT_DIVERGED, EXIT_USER, run_script, user_error_line

__all__ = ["EPILOG", "build_parser", "int_in", "main", "output_file", "output_folder", "run_script", "table_summary",
           "user_error_line", "write_output"]  # fmt: skip

EPILOG = """examples:
  vaqkd train configs/cifar100/teacher_resnet32_short.toml
  vaqkd train configs/cifar100/vaqkd_logit.toml --set train.seed=1 --out runs/vaqkd_logit_s1
  vaqkd eval runs/vaqkd_logit_s1 --json
  vaqkd profile --model resnet32 --w-bits 2 --a-bits 2 --first-last same
  vaqkd table --preset quick --seeds 3
  vaqkd bench --quick
"""


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
    add_data_root(t)
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
    add_data_root(e)
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
    add_data_root(x)
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
    tb.add_argument("--cpus-per-run", type=fraction(True), help="Ray: CPUs per cell (default 1)")
    tb.add_argument("--gpus-per-run", type=fraction(False), default=0.0,
                    help="Ray: GPUs per cell (fractions pack runs)")  # fmt: skip
    add_data_root(tb)
    tb.set_defaults(fn=cmd_table)

    g = sub.add_parser("gradcam", help="Grad-CAM grid comparing two runs (captum LayerGradCam on layer3)")
    g.add_argument("run_a")
    g.add_argument("run_b")
    g.add_argument("--images", type=int_in(1), default=8)
    g.add_argument("--out", default="gradcam.png", help="the figure (an existing file: only with --force)")
    g.add_argument("--force", action="store_true", help="replace an existing --out")
    g.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0, help="which test images (a random draw)")
    add_data_root(g)
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


"""Where an integer-residual student's deployed answers part from PyTorch's: agreement of the ONNX graph in ONNX
Runtime and OpenVINO with the fake-quant model in float32 (the goal's reference) and in float64 (its arithmetic
without float rounding), with the stem computed exactly (`vaqkd.deploy.stem`, the default) and as one plain
float32 conv; and how many images' first stream codes (the stem's output, quantized) differ from the float64
model's, per runtime and stem, against PyTorch float32's own. With `--rounds N` it also times what the exact stem
costs: the whole graph with each stem in each runtime at batch 1 and 256 on 1 and 2 threads, interleaved over N
rounds (the two stems' order alternating), the median img/s and the spread of the per-round ratio exact / plain
(then nothing else may run meanwhile).

    python benchmarks/stem_agreement.py --student results/deploy/qkd_logit-int8stream-full-s1.vaqkd.safetensors \
        --data-root ../shared/data/cifar100 --rounds 7 --out results/deploy/stem_agreement_intel_amx.json

Needs the deploy extra (onnx, onnxruntime; OpenVINO where installed)."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from infer import _cpu_name, _git_sha, time_case  # noqa: E402

from vaqkd.cli import int_in, output_file, write_output  # noqa: E402
from vaqkd.data.build import env_data_root  # noqa: E402
from vaqkd.data.cifar import load_split  # noqa: E402
from vaqkd.deploy.artifact import ExportError  # noqa: E402
from vaqkd.deploy.onnx_export import build_onnx, normalisation, source_model  # noqa: E402
from vaqkd.deploy.runtimes import compile_graph  # noqa: E402

BATCH = 500


def first_codes_graph(proto):
    """The graph cut at the first stream codes (uint8): its first QuantizeLinear's output, or the Clip's after it
    (a stream narrower than 8 bits is clamped there)."""
    import onnx

    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    clip = [n for n in proto.graph.node if n.op_type == "Clip" and n.input[0] == q.output[0]]
    out = clip[0].output[0] if clip else q.output[0]
    return onnx.utils.Extractor(onnx.shape_inference.infer_shapes(proto)).extract_model(["input"], [out])


def torch_answers(model, images, norm, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, first stream codes as uint8) of the fake-quant model in `dtype` on the loader's float32 pixels."""
    from vaqkd.quant.residual import IntResidualBlock

    block = next(m for m in model.modules() if isinstance(m, IntResidualBlock))
    m255, s255 = (torch.from_numpy(a).view(1, -1, 1, 1) for a in norm)
    model = model.to(dtype)
    preds, codes = [], []
    hook = block.stream.register_forward_hook(lambda m, i, o: codes.append(torch.round(o / m.step).to(torch.uint8)))
    try:
        with torch.no_grad():
            for i in range(0, len(images), BATCH):
                preds.append(model(((images[i : i + BATCH].float() - m255) / s255).to(dtype)).argmax(1))
    finally:
        hook.remove()
        model.float()
    return torch.cat(preds).numpy(), torch.cat(codes).numpy()


def time_stems(graphs: dict[str, bytes], runtimes: list[str], rounds: int) -> dict:
    """img/s of each stem's graph per runtime, batch and threads, interleaved; the ratio exact / plain per round."""
    out = {}
    for threads in (1, 2):
        runs = {(rt, k): compile_graph(rt, g, threads) for rt in runtimes for k, g in graphs.items()}
        for batch in (1, 256):
            x = np.random.default_rng(0).integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
            ips = {key: [] for key in runs}
            for r in range(rounds):
                for rt in runtimes:
                    for k in ("exact", "plain") if r % 2 == 0 else ("plain", "exact"):
                        ips[(rt, k)].append(time_case(runs[(rt, k)], x, 0.2 if batch == 1 else 0.5))
            for rt in runtimes:
                ratio = [a / b for a, b in zip(ips[(rt, "exact")], ips[(rt, "plain")])]
                cell = {"exact_img_per_s": statistics.median(ips[(rt, "exact")]),
                        "plain_img_per_s": statistics.median(ips[(rt, "plain")]),
                        "exact_over_plain": statistics.median(ratio), "spread": [min(ratio), max(ratio)]}  # fmt: skip
                out[f"{rt}/batch{batch}_threads{threads}"] = cell
                print(f"{rt:12s} batch {batch:3d}, {threads} thread(s): exact stem {cell['exact_img_per_s']:6.0f}, "
                      f"plain {cell['plain_img_per_s']:6.0f} img/s, exact / plain x{cell['exact_over_plain']:.3f} "
                      f"[{min(ratio):.3f}, {max(ratio):.3f}]")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="an integer-residual run or packed artifact")
    ap.add_argument("--data-root", default=env_data_root() or "../shared/data/cifar100", help="CIFAR root")
    ap.add_argument("--images", type=int_in(1, 10000), default=10000, help="test images")
    ap.add_argument("--threads", type=int_in(1), default=2, help="threads for the agreement runs")
    ap.add_argument("--rounds", type=int_in(0), default=0, help="also time both stems over this many rounds")
    ap.add_argument("--out", type=output_file)
    args = ap.parse_args(argv)

    from vaqkd.quant.residual import residual_mode

    student, (mean, std), meta = source_model(args.student, args.data_root)
    if residual_mode(student)[0] != "int":
        raise ExportError(f"--student {args.student}: not an integer-residual model (quant.residual = int)")
    torch.set_num_threads(args.threads)
    norm = normalisation(mean, std)
    images, labels = load_split(meta.get("dataset", "cifar100"), args.data_root, train=False)
    images, labels = images[: args.images], labels[: args.images].numpy()
    ref = {d: torch_answers(student.eval(), images, norm, dt) for d, dt in (("f32", torch.float32),
                                                                           ("f64", torch.float64))}  # fmt: skip
    runtimes = ["onnxruntime"]
    try:
        import openvino  # noqa: F401

        runtimes.append("openvino")
    except ImportError:
        print("openvino not installed: ONNX Runtime only")

    def images_moved(codes: np.ndarray) -> int:
        return int((codes != ref["f64"][1]).reshape(len(codes), -1).any(1).sum())

    result = {"command": " ".join(["python", "benchmarks/stem_agreement.py", *(argv or sys.argv[1:])]),
              "student": args.student, "images": len(labels), "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "device_name": _cpu_name(),
              "torch": torch.__version__, "git_sha": _git_sha(),
              "torch_f32_vs_f64": {"agreement": float((ref["f32"][0] == ref["f64"][0]).mean()),
                                   "images_with_moved_first_codes": images_moved(ref["f32"][1])},
              "top1": {d: float((r[0] == labels).mean() * 100) for d, r in ref.items()}, "cases": {}}  # fmt: skip
    print(f"PyTorch float32 vs float64: agreement {100 * result['torch_f32_vs_f64']['agreement']:.2f} %, first "
          f"stream codes moved on {result['torch_f32_vs_f64']['images_with_moved_first_codes']} images")
    for stem in ("exact", "plain"):
        proto = build_onnx(student, normalise=norm, exact_stem=stem == "exact")
        for rt in runtimes:
            run = compile_graph(rt, proto.SerializeToString(), args.threads)
            first = compile_graph(rt, first_codes_graph(proto).SerializeToString(), args.threads)
            batches = [images[i : i + BATCH].numpy() for i in range(0, len(images), BATCH)]
            preds = np.concatenate([run(x).argmax(1) for x in batches])
            codes = np.concatenate([first(x) for x in batches])
            case = {"agreement_f32": float((preds == ref["f32"][0]).mean()),
                    "agreement_f64": float((preds == ref["f64"][0]).mean()),
                    "top1": float((preds == labels).mean() * 100), "images_with_moved_first_codes": images_moved(codes)}
            result["cases"][f"{rt}/{stem}_stem"] = case
            print(f"{rt:12s} {stem:5s} stem: agreement with PyTorch f32 {100 * case['agreement_f32']:.2f} %, f64 "
                  f"{100 * case['agreement_f64']:.2f} %, top-1 {case['top1']:.2f}; first stream codes moved on "
                  f"{case['images_with_moved_first_codes']} images")
    if args.rounds:
        graphs = {k: build_onnx(student, normalise=norm, exact_stem=k == "exact").SerializeToString()
                  for k in ("exact", "plain")}  # fmt: skip
        result["speed"] = time_stems(graphs, runtimes, args.rounds)
    if args.out:
        write_output(args.out, result)
    return 0


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/stem_agreement.py"))

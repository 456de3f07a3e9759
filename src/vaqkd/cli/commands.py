"""`vaqkd train`, `profile`, `table`, `gradcam` and `bench`: parse, load a config, call the library."""

from __future__ import annotations

import json
from pathlib import Path

from vaqkd.cli.args import overrides


def cmd_train(args) -> int:
    from vaqkd.engine.train import fit
    from vaqkd.presets import preset_config

    cfg = preset_config(args.config, args.preset, overrides(args))
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
        overrides=overrides(args),
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

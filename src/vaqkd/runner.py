"""`vaqkd table`: train (or reuse) the teacher and every row of the paper's table over several seeds, then
write the report. A run directory is named by its row, seed and a hash of its resolved config, so a finished
run with the same config is reused, an interrupted one is resumed, and a changed config starts afresh.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vaqkd.config import Config, Override, override_key
from vaqkd.errors import ConfigError, RunFileError, RunLockedError, TrainingDiverged, VaqkdError, file_in_the_way
from vaqkd.presets import config_hash, configs_dir, load_preset, preset_teacher, row_config
from vaqkd.records import (
    MAX_SEEDS,
    RECORD_FIELDS,
    other_arithmetic,
    record_place,
    save_record,
    trained_at,
)
from vaqkd.rundir import NUMBER, check_fields, has_checkpoint, read_json

TAKD_CHAIN = ("takd_w8a8", "takd_w4a4", "takd")  # FP32 teacher -> W8A8 -> W4A4 -> W2A2


def teacher_entry(teacher: str, preset: dict, runs: Path, overrides: Sequence[Override], log,
                  records: Path | None = None, evaluate_now: bool = True) -> dict:  # fmt: skip
    """The teacher's row: its top-1 on this preset's test split (evaluated once, cached in `runs` and kept
    beside the run records in `records`), and how it was trained (final.json of its run, or the recipe shipped
    beside the pretrained weights). Without `evaluate_now` (a report only) it is evaluated only if the data is
    here already (nothing downloaded); else a RunFileError (a report is not rewritten without its teacher)."""
    import torch

    from vaqkd.data.build import build_data, data_present, data_root
    from vaqkd.engine.setup import build_teacher, resolve_device, resolve_precision
    from vaqkd.engine.step import evaluate
    from vaqkd.rundir import resolve_weights

    cfg = row_config("qkd_logit", preset, 0, teacher, overrides)
    name = f"teacher_eval-{config_hash(cfg)}.json"
    cache = runs / name
    for place in (cache, records / name if records else None):
        if place is None or not place.exists():
            continue
        cached = read_json(place)
        if "fp32_mib" not in cached:  # older caches lack the size
            continue
        check_fields(str(place), cached, {**RECORD_FIELDS, "fp32_mib": NUMBER})
        if records is not None and not (records / name).exists():  # kept beside the records it heads
            records.mkdir(parents=True, exist_ok=True)
            shutil.copy2(place, records / name)
        return cached
    # no kept evaluation: the teacher must be here to make one (a missing one named before the data is looked for),
    # and its record readable (checked before the evaluation, not after)
    resolve_weights(teacher, cfg.distill.teacher_arch, "teacher")
    run = Path(teacher)
    info_path = (run / "final.json" if (run / "final.json").exists()
                 else resolve_weights(teacher, "resnet32").with_suffix(".json"))  # fmt: skip
    info = read_json(info_path) if info_path.exists() else {}
    used = ("seed", "epochs", "train_images", "train_seconds")  # those it has, of a record's types
    check_fields(str(info_path), info, {k: RECORD_FIELDS[k] for k in used if k in info})
    if not evaluate_now and not data_present(cfg.data):  # refused rather than a report without its teacher row
        kept = f"{runs} or {records}" if records else f"{runs}"
        raise RunFileError(f"teacher {teacher}: no evaluation kept in {kept} and no data under "
                           f"{data_root(cfg.data)} to make one; give --data-root (a report only trains nothing "
                           "and downloads nothing)")  # fmt: skip
    device = resolve_device(cfg.train.device)
    data = build_data(cfg, device)
    model = build_teacher(cfg, data.num_classes, device)
    with torch.no_grad():
        top1 = evaluate(model, data.test, resolve_precision(cfg.train.precision, device))["top1"]
    from vaqkd.models import count_weights

    entry = {"seed": info.get("seed", 0), "top1_last": top1, "top1_best": top1, "epochs": info.get("epochs", 0),
             "train_images": info.get("train_images", 0), "train_seconds": info.get("train_seconds", 0.0),
             "teacher": teacher, "fp32_mib": count_weights(model) * 4 / 2**20}  # fmt: skip
    log(f"teacher {teacher}: test top-1 {top1:.2f}%")
    for place in (runs, records):
        if place is not None:
            place.mkdir(parents=True, exist_ok=True)
            (place / name).write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def run_or_reuse(cfg: Config, run_dir: Path, log: Callable[[str], None]) -> dict | None:
    """final.json of the run in run_dir: reused if finished, resumed if interrupted, else trained. None when the
    run failed (diverged: failed.json, not retried until the folder is removed) or another process holds it."""
    from vaqkd.engine.train import fit

    final = run_dir / "final.json"
    if final.exists():
        log(f"reuse  {run_dir}")
        return read_json(final, RECORD_FIELDS)
    if (run_dir / "failed.json").exists():
        log(f"FAILED {run_dir} (earlier: {read_json(run_dir / 'failed.json').get('reason')}; remove it to retry)")
        return None
    resume = has_checkpoint(run_dir)
    log(f"{'resume' if resume else 'train '} {run_dir}")
    try:
        return fit(cfg, run_dir, resume=resume, log=lambda s: log(f"  {s}"), progress=sys.stderr.isatty())
    except (TrainingDiverged, RunLockedError) as e:
        log(f"FAILED {e}")
        return None


def resolve_teacher(teacher: str, preset: dict, runs: Path, overrides: Sequence[Override], log,
                    train: bool = True) -> str:  # fmt: skip
    """'pretrained', 'pretrained:NAME' or a path are used as they are; 'train' trains the preset's teacher config
    first (with train=False, a report only: names its run directory, trained or not)."""
    if teacher != "train":
        return teacher
    from vaqkd.config import load_config

    t = preset.get("teacher", {})
    data_overrides = [o for o in overrides if override_key(o) == "data.root"]
    cfg = load_config(configs_dir() / t["config"], list(t.get("set", [])) + data_overrides)
    run_dir = runs / f"teacher-{config_hash(cfg)}"
    if train and run_or_reuse(cfg, run_dir, log) is None:
        raise RunFileError(f"{run_dir}: the teacher's run failed or is in use (see above); its students need it "
                           "finished")  # fmt: skip
    if not (run_dir / "final.json").exists():  # a report only: never a half-trained teacher's row
        raise RunFileError(f"{run_dir}: the teacher's run has not finished; run the table without --report-only")
    return str(run_dir)


def row_result(row: str, seed: int, p: dict, teacher: str, overrides: Sequence[Override], runs: Path, log,
               train: bool = True, records: Path | None = None) -> dict | None:  # fmt: skip
    """final.json of one row and seed (TAKD: its whole chain, times summed), read from run directories or
    committed records; with train=True, whatever is missing is trained (a chain from the first missing run
    directory) and recorded. None if a run failed, or (train=False) unless every stage has finished."""
    chain = TAKD_CHAIN if row == "takd" else (row,)
    names, t_spec = [], teacher
    for stage in chain:
        cfg = row_config(stage, p, seed, t_spec, overrides)
        names.append((stage, cfg, f"{stage}-s{seed}-{config_hash(cfg)}"))
        t_spec = str(runs / names[-1][2])  # TAKD: the next stage learns from, and starts from, this one
    found = [record_place(name, runs, records) for _, _, name in names]
    if all(found):
        stages = [{**read_json(f / "final.json", RECORD_FIELDS), "run_dir": str(f)} for f in found]
        if train:
            log(f"reuse  {row} seed {seed} ({', '.join(str(f) for f in found)})")
    elif not train:
        return None
    else:
        stages = []
        for _, cfg, name in names:
            final = run_or_reuse(cfg, runs / name, log)
            if final is None:
                return None
            if records is not None:
                save_record(runs / name, records)
            stages.append({**final, "run_dir": str(runs / name)})
    final = dict(stages[-1])
    if len(stages) > 1:
        final["train_seconds_own"] = final["train_seconds"]
        final["train_seconds"] = sum(s["train_seconds"] for s in stages)
        final["stages"] = [{"run_dir": s["run_dir"], "train_seconds": s["train_seconds"],
                            "top1_last": s["top1_last"]} for s in stages]  # fmt: skip
    return final


def run_table(
    preset: str = "demo",
    seeds: int = 1,
    out: str | None = None,
    rows: list[str] | None = None,
    first_seed: int = 0,
    runs_dir: str | None = None,
    overrides: Sequence[Override] = (),  # --set text or (key, value) pairs
    teacher: str | None = None,
    log: Callable[[str], None] = print,
    report_only: bool = False,
    records: bool | None = None,
    jobs: int = 1,
    launcher: str = "local",
    address: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float = 0.0,
) -> dict:
    """Train (or reuse / resume) `rows` x `seeds`, then report every finished run of the preset's rows (with the
    same teacher and overrides), so a later call with more seeds for some rows extends the same table.
    `first_seed`: train seeds first_seed..seeds-1 only (e.g. a seed whose partner trains elsewhere).
    `report_only`: train nothing, report what the run directories and committed records hold. `records`: keep
    run records under <out>/runs (default: the preset's `records` setting). `teacher`: see `resolve_teacher`
    (default: the preset's `teacher.weights`, else "pretrained").

    Launchers (each (row, seed) cell is one task running the same `fit`; a TAKD cell runs its chain in order):
    "local" with jobs = 1 trains the cells one after another in this process; "local" with jobs = N runs N
    cells at a time in worker processes of this machine (each with cpu_count / N threads); "ray" submits every
    cell as a Ray task to the cluster at `address` (default: a local Ray started for the call), with
    `cpus_per_run` CPUs and `gpus_per_run` GPUs (fractions pack several small runs onto one GPU). Run
    directories must lie on a filesystem every worker sees. A failed cell is reported; the others go on."""
    from vaqkd.analysis.kinds import one_per_seed_and_kind
    from vaqkd.analysis.report import write_report
    from vaqkd.launch import check_options

    check_options(launcher, jobs, address, cpus_per_run, gpus_per_run)
    if not 0 <= first_seed < seeds:
        raise ConfigError(f"--first-seed {first_seed}: must be below --seeds {seeds} (the seeds trained are "
                          f"first_seed..seeds-1)")  # fmt: skip
    p = load_preset(preset)
    teacher = teacher or preset_teacher(p)
    rows = list(rows or p["rows"])
    unknown = [r for r in rows if not (configs_dir() / "cifar100" / f"{r}.toml").exists()]
    if unknown:
        raise FileNotFoundError(f"unknown rows {unknown}: no such file in {configs_dir() / 'cifar100'}")
    runs = Path(runs_dir or Path("runs") / preset)
    out_dir = Path(out or Path("results") / preset)
    # presets that accumulate evidence (quick, full) keep run records under results/<preset>/runs; the demo
    # trains every time (it is the small real run a fresh checkout makes)
    keep = p.get("records", False) if records is None else records
    records_dir = out_dir / "runs" if keep else None
    for flag, folder in (("--out", out_dir), ("--runs-dir", runs)):  # said before the teacher is evaluated
        if (blocker := file_in_the_way(folder)) is not None:
            raise RunFileError(f"{flag} {folder}: {blocker} is a file, not a folder")
    teacher_spec = resolve_teacher(teacher, p, runs, overrides, log, train=not report_only)
    teacher_row = teacher_entry(teacher_spec, p, runs, overrides, log, records_dir, evaluate_now=not report_only)

    failed: list[str] = []

    def report() -> dict:
        results: dict[str, list[dict]] = {"teacher": [teacher_row]}
        for row in dict.fromkeys([*p["rows"], *rows]):
            found = [row_result(row, s, p, teacher_spec, overrides, runs, log, train=False, records=records_dir)
                     for s in range(MAX_SEEDS)]  # fmt: skip
            found = [f for f in found if f]
            known = {Path(f["run_dir"]).name for f in found}
            found += other_arithmetic(row, p, teacher_spec, overrides, runs, records_dir, known)
            found, repeats = one_per_seed_and_kind(sorted(found, key=lambda f: f["seed"]))  # the row's own first
            if repeats:
                log(f"note: {row}: {', '.join(Path(f['run_dir']).name for f in repeats)} left out: a run of the same "
                    "seed and kind is reported (another name for the same arithmetic, e.g. precision fp32 "
                    "against auto on a CPU)")
            if found:
                results[row] = found
        info = {**meta(preset, seeds, rows, teacher_spec), "runs_git_sha": trained_at(results), "failed": failed}
        write_report(out_dir, results, info)
        return results

    cells = [] if report_only else [(row, seed) for seed in range(first_seed, seeds) for row in rows]
    if launcher == "local" and jobs <= 1:
        for row, seed in cells:
            if row_result(row, seed, p, teacher_spec, overrides, runs, log, records=records_dir) is None:
                failed.append(f"{row} seed {seed}")
            report()  # keep the report current after every run
    elif cells:
        from vaqkd.launch import run_cells

        task = (row_result, p, teacher_spec, overrides, runs, records_dir)
        for (row, seed), final, t in run_cells(cells, task, launcher, jobs, address, cpus_per_run, gpus_per_run, log):
            if final is None:
                failed.append(f"{row} seed {seed}")
            if t:
                took = f"{t['end'] - t['start']:.0f} s, pid {t['pid']}"
                log(f"{'done  ' if final else 'failed'} {row} seed {seed} ({took})")
            report()
    results = report()
    if failed:
        cells = ", ".join(failed)
        raise TableIncomplete(f"{len(failed)} cell(s) failed: {cells} (see the log; the others are in {out_dir})")
    return results


class TableIncomplete(VaqkdError):
    """Some cells of the table failed; the report holds the others."""


def command_line() -> str:
    """The command that is running, as a user would type it."""
    prog = Path(sys.argv[0]).name
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if prog in ("vaqkd", "__main__.py"):  # the console script, python -m vaqkd or python -m vaqkd.cli
        return f"vaqkd {args}"
    return f"python {shlex.quote(sys.argv[0])} {args}"


def meta(preset: str, seeds: int, rows: list[str], teacher: str) -> dict:
    from vaqkd.engine.setup import environment, resolve_device

    env = environment(resolve_device("auto"), seed=-1, precision="see runs")
    env.pop("seed")
    return {"command": command_line(), "preset": preset, "seeds": seeds, "rows": rows, "teacher": teacher, **env}

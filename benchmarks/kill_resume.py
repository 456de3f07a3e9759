"""Crash consistency: SIGKILL a training run at random moments (inside checkpoint saves too), resume it each
time, and compare the end result with an uninterrupted run of the same config on this machine.

    python benchmarks/kill_resume.py --kills 12 --out results/reliability/kill_resume_default.json
    python benchmarks/kill_resume.py --kills 40 --mode strict --out results/reliability/kill_resume.json

Each trial starts `vaqkd train` (resuming when a checkpoint exists) in a child process that checkpoints every
step, with every save slowed down a little; the child prints a marker before and after each save. The trial
waits for a random number (1-3) of saves to begin, then kills the child after a random 0-100 ms: inside that
save, or in the steps after it. A run that reaches its end is compared with the uninterrupted run and a new
killed run starts, until the number of kills is reached; the last one is resumed to its end. Each kill is a
SIGKILL or a SIGTERM, drawn at random. Passes when, for every run, final.json's metrics, every metrics.jsonl line
and every weight equal the uninterrupted run's exactly.

`--mode default` (the default) trains as a user's `vaqkd train` does: `train.precision = "auto"`, every core's
threads, the compiled quantizer kernels (unless VAQKD_COMPILE=0 is set, as the test suite does). `--mode strict` is
fp32 on one thread with the eager kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, time
import vaqkd.rundir.checkpoint as ck
import vaqkd.engine.build as tr  # where a run's checkpoint is saved
orig_save, orig_file = ck.save_checkpoint, ck.save_file
def save_file(*a, **k):
    out = orig_file(*a, **k)
    time.sleep(0.03)  # widen the window inside the save
    return out
def save_checkpoint(*a, **k):
    print("SAVE-BEGIN", flush=True)
    out = orig_save(*a, **k)
    print("SAVE-END", flush=True)
    return out
ck.save_file = save_file
tr.save_checkpoint = save_checkpoint
from vaqkd.cli import main
sys.exit(main(sys.argv[1:]))
"""


MODE = {"strict": ["train.precision=fp32", "train.threads=1"], "default": []}
MODE_ENV = {"strict": {"VAQKD_COMPILE": "0", "OMP_NUM_THREADS": "1"}, "default": {}}
mode = "default"


def tiny_args(data_root: Path, out: Path) -> list[str]:
    sets = ["data.batch_size=20", "data.eval_batch_size=200", "model.arch=resnet20", "optim.epochs=3",
            "optim.lr=0.05", "optim.schedule=cosine", "train.device=cpu", *MODE[mode],
            "train.checkpoint_every_steps=1", "data.subset_per_class=2", 'model.init=""']  # fmt: skip
    args = ["train", str(ROOT / "configs/cifar100/w2a2_qat.toml"), "--out", str(out), "--no-progress",
            "--data-root", str(data_root)]  # fmt: skip
    return args + [a for s in sets for a in ("--set", s)]


def child(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # default: every core, as a user runs
    env.update(MODE_ENV[mode])
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)  # fmt: skip


def has_ckpt(out: Path) -> bool:
    return any(p.name.startswith("ckpt-") and p.name[5:].isdigit() for p in out.glob("ckpt-*"))


def finished(out: Path) -> dict:
    from safetensors.torch import load_file

    from vaqkd.rundir import run_weights

    return {"final": {k: v for k, v in json.loads((out / "final.json").read_text()).items()
                      if k not in ("train_seconds", "img_per_s", "git_sha")},
            "metrics": [{k: v for k, v in json.loads(x).items() if k not in ("epoch_seconds", "img_per_s")}
                        for x in (out / "metrics.jsonl").read_text().splitlines()],
            "weights": load_file(run_weights(out))}  # fmt: skip


def same(a: dict, b: dict) -> bool:
    import torch

    return (a["final"] == b["final"] and a["metrics"] == b["metrics"] and a["weights"].keys() == b["weights"].keys()
            and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]))  # fmt: skip


def run(kills: int, data_root: Path | None, seed: int, work: Path) -> dict:
    if data_root is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import write_cifar100

        data_root = write_cifar100(work / "data", per_class_train=2, per_class_test=1)
    ref, out = work / "reference", work / "killed"
    p = child(tiny_args(data_root, ref))
    t0 = time.perf_counter()
    _, err = p.communicate()
    if p.returncode:
        raise SystemExit(f"reference run failed: {err.strip().splitlines()[-1]}")
    duration = time.perf_counter() - t0
    rng = random.Random(seed)
    where = {"inside a save": 0, "between saves": 0}
    signals = {"SIGKILL": 0, "SIGTERM": 0}
    runs, identical, done = 0, 0, 0
    reference = finished(ref)

    def complete(out: Path) -> None:
        nonlocal runs, identical
        if not (out / "final.json").exists():
            p = child(tiny_args(data_root, out) + (["--resume"] if has_ckpt(out) else []))
            _, err = p.communicate()
            if p.returncode:
                raise SystemExit(f"the final resume failed: {err.strip().splitlines()[-1]}")
        runs += 1
        identical += same(reference, finished(out))

    out = work / "killed-0"
    while done < kills:
        if (out / "final.json").exists():
            complete(out)
            out = work / f"killed-{runs}"
        p = child(tiny_args(data_root, out) + (["--resume"] if has_ckpt(out) else []))
        wait_for, seen, last = rng.randint(1, 3), 0, None
        for line in p.stdout:  # the child's save markers, as they come
            if line.startswith("SAVE-"):
                last = line.strip()
                seen += line.startswith("SAVE-BEGIN")
                if seen == wait_for:
                    break
        time.sleep(rng.uniform(0, 0.1))
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        p.send_signal(sig)
        rest, err = p.communicate()
        marks = [last, *[ln for ln in rest.splitlines() if ln.startswith("SAVE-")]]
        if p.returncode != -sig:  # it reached its end before the kill
            if p.returncode:
                raise SystemExit(f"a trial failed before its kill: {err.strip().splitlines()[-1]}")
            continue
        where["inside a save" if marks[-1] == "SAVE-BEGIN" else "between saves"] += 1
        signals[sig.name] += 1
        done += 1
    complete(out)
    return {"mode": mode, "settings": MODE[mode], "kills": done, "where": where, "signals": signals, "runs": runs,
            "runs_identical": identical, "identical": identical == runs,
            "reference_seconds": round(duration, 1)}  # fmt: skip


def main() -> None:
    from vaqkd.cli import int_in, output_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int_in(1), default=20)
    ap.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0)
    ap.add_argument("--data-root", type=Path, help="real CIFAR-100 (default: synthetic data in a temp folder)")
    ap.add_argument("--out", type=output_file, help="write the result as JSON here")
    ap.add_argument("--mode", choices=sorted(MODE), default="default", help="default: as `vaqkd train` trains")
    args = ap.parse_args()
    global mode
    mode = args.mode
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args.kills, args.data_root, args.seed, Path(tmp))
    from vaqkd.runner import command_line, meta

    res = {**res, "meta": {**meta("kill_resume", 1, [], "none"), "command": command_line()}}
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    sys.exit(0 if res["identical"] else 1)


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/kill_resume.py"))

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_cpu_path(shared_cifar_root, tmp_path):
    """benchmarks/gpu.sh end to end on the CPU at toy size: every step runs and the summary is written."""
    env = dict(
        os.environ,
        DEVICE="cpu",
        SMALL="1",
        DATA=str(shared_cifar_root),
        OUT_DIR=str(tmp_path / "gpu"),
        VAQKD=f"{sys.executable} -m vaqkd.cli",
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0:  # say which stage failed and what it printed last
        out = tmp_path / "gpu"
        stages = (out / "stages.txt").read_text() if (out / "stages.txt").exists() else "(no stages.txt)"
        failed = [ln.split()[0] for ln in stages.splitlines() if " rc=0 " not in ln]
        logs = "".join((out / f"{n}.log").read_text()[-1500:] for n in failed if (out / f"{n}.log").exists())
        raise AssertionError(f"{proc.stderr[-1500:]}\n{stages}\n{logs}")
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert set(summary) >= {"teacher", "qkd_logit", "vaqkd_logit", "bench_ratios"}
    assert summary["vaqkd_logit"]["epochs"] == 1 and summary["teacher"]["median_epoch_s"] > 0
    assert summary["table_4_cells_seconds"]["packed"] > 0  # the packed (Ray) table and the one-at-a-time table
    for how in ("packed", "one_at_a_time"):
        table = (tmp_path / "gpu" / f"table_{how}" / "table.md").read_text()
        assert "| qkd_logit | W2A2 | 2 |" in table and "| vaqkd_logit | W2A2 | 2 |" in table

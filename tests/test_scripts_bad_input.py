"""The benchmarks' and scripts' command lines follow the CLI's rule: bad input is one line naming the culprit,
exit 2, no traceback, before any work (`vaqkd.cli.run_script`, argparse types `int_in`, `output_file`,
`output_folder`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VAQKD_COMPILE": "0"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,culprit", [
    (["benchmarks/bn_restat.py", "{tmp}/nowhere"], "{tmp}/nowhere: no such run directory (or file)"),
    (["benchmarks/ort_profile.py", "--student", "x", "--runs", "0"], "argument --runs: must be >= 1, got 0"),
    (["benchmarks/ort_profile.py", "--student", "x", "--out", "{tmp}/afile/r.json"], "afile is a file, not a"),
    (["benchmarks/torch_int8_profile.py", "--student", "x", "--warm", "0"], "argument --warm: must be >= 1, got 0"),
    (["benchmarks/torch_int8_profile.py", "--student", "pretrained:resnet32_cifar100_e64"],
     "--student pretrained:resnet32_cifar100_e64: an FP32 model (no quantizer)"),
    (["benchmarks/int8_fusion_probe.py", "--student", "x", "--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    (["benchmarks/int8_fusion_probe.py", "--student", "results/deploy/qkd_logit-int-s0.vaqkd.safetensors"],
     "the probe takes an 8-bit stream (quant.residual_bits = 8)"),
    (["benchmarks/start_pairs.py", "{tmp}", "{tmp}"], "{tmp}: no runs/ folder of records here"),
    (["benchmarks/start_pairs.py", "results/quick_t64", "results/quick_t64_s30", "--row", "typo"],
     "results/quick_t64/runs: no finished record of --row typo"),
    (["scripts/ship_teacher.py", "{tmp}", "--command", "x", "--name", "x y"], "--name x y: a plain file name"),
    (["scripts/ship_teacher.py", "{tmp}", "--command", "x", "--name", "../evil"], "--name ../evil: a plain file name"),
    (["scripts/backfill_arithmetic.py", "{tmp}/nowhere"], "{tmp}/nowhere: no such folder"),
    (["benchmarks/stem_agreement.py", "--student", "x", "--images", "0"], "argument --images: must be"),
    (["benchmarks/stem_agreement.py", "--student", "results/deploy/qkd_feature-s0-deploy.vaqkd.safetensors"],
     "not an integer-residual model"),
    (["benchmarks/infer.py", "--student", "pretrained:resnet32_cifar100_e64", "--out", "{tmp}/r.json"],
     "--student pretrained:resnet32_cifar100_e64: an FP32 model (no quantizer)"),
    (["benchmarks/infer.py", "--student", "results/deploy/qkd_logit-int-s0.vaqkd.safetensors", "--teacher",
      "results/deploy/qkd_logit-int-s0.vaqkd.safetensors"], "--teacher results/deploy/qkd_logit-int-s0.vaqkd"),
])  # fmt: skip
def test_a_scripts_bad_input_is_one_line_before_any_work(args, culprit, tmp_path):
    (tmp_path / "afile").write_text("kept")
    before = sorted(p.name for p in tmp_path.iterdir())
    p = _run([a.format(tmp=tmp_path) for a in args], ROOT)
    err = p.stderr.strip()
    assert p.returncode == 2 and "Traceback" not in err and culprit.format(tmp=tmp_path) in err.splitlines()[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "afile").read_text() == "kept"


def test_write_output_makes_the_folder_and_replaces_the_file(tmp_path, capsys):
    import json

    from vaqkd.cli import write_output

    out = tmp_path / "new" / "result.json"
    write_output(out, {"a": 1})
    write_output(out, {"b": [2.5]})  # a rerun replaces the result whole
    assert json.loads(out.read_text()) == {"b": [2.5]} and list(out.parent.iterdir()) == [out]
    assert capsys.readouterr().out.splitlines() == [f"wrote {out}"] * 2

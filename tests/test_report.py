"""The table report beside the paper: each W2A2 row of the paper's table and the teacher carry the paper's
figure and the difference to it; rows the paper does not have, or at other bits, carry none."""

import json

from vaqkd.analysis.report import PAPER_TOP1, write_report

PROFILE = {"w_bits": 2, "a_bits": 2, "quant_mib": 0.136, "paper_quant_mib": 0.112, "bops_reduction": 96.2,
           "paper_bops_reduction": 256.0}  # fmt: skip
META = {"preset": "x", "command": "vaqkd table", "git_sha": "abc", "torch": "2", "device_name": "cpu x",
        "device": "cpu", "teacher": "pretrained"}  # fmt: skip


def _rec(seed, acc, profile=PROFILE):
    return {"seed": seed, "top1_last": acc, "top1_best": acc, "device": "cpu x", "cpu_capability": "AVX2",
            "precision": "fp32", "threads": 1, "world_size": 1, "arithmetic": "a", "train_seconds": 1.0,
            "epochs": 3, "train_images": 10, "profile": profile}  # fmt: skip


def test_rows_carry_the_papers_figure_and_the_difference(tmp_path):
    w4 = {**PROFILE, "w_bits": 4, "a_bits": 4}
    results = {"teacher": [_rec(0, 70.35, None)], "qkd_logit": [_rec(0, 63.97), _rec(1, 63.95)],
               "vaqkd_logit": [_rec(0, 66.06), _rec(1, 66.08)], "takd_logit": [_rec(0, 60.0)],
               "qkd_feature": [_rec(0, 50.0, w4)]}  # fmt: skip
    write_report(tmp_path, results, META)
    table = (tmp_path / "table.md").read_text()
    assert "| qkd_logit | W2A2 | 2 | 63.96 ± 0.01 | 63.96 ± 0.01 | 64.97 | -1.01 |" in table
    assert "| vaqkd_logit | W2A2 | 2 | 66.07 ± 0.01 | 66.07 ± 0.01 | 65.06 | +1.01 |" in table
    assert "| teacher | FP32 | 1 | 70.35 | 70.35 | 70.19 | +0.16 |" in table
    assert "| takd_logit | W2A2 | 1 | 60.00 | 60.00 | — | — |" in table  # not a row of the paper's table
    assert "| qkd_feature | W4A4 | 1 | 50.00 | 50.00 | — | — |" in table  # the paper's figure is W2A2
    rows = {r["row"]: r for r in json.loads((tmp_path / "table.json").read_text())["rows"]}
    assert rows["vaqkd_logit"]["paper_top1"] == PAPER_TOP1["vaqkd_logit"] == 65.06
    assert rows["takd_logit"]["paper_top1"] is None

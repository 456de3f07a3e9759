"""The table report beside the paper: each W2A2 row of the paper's table and the teacher carry the paper's
figure and the difference to it; rows the paper does not have, or at other bits, carry none."""

import json
import warnings

import pytest

from vaqkd.analysis.kinds import group_label
from vaqkd.analysis.report import PAPER_TOP1, write_report
from vaqkd.errors import RunFileError

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
    # each row says where its runs trained (the header's machine is the one that wrote the report)
    assert table.count("| a, cpu x, AVX2, fp32, 1 thread |") == 4 and rows["qkd_logit"]["trained_on"].startswith("a, ")


def _kind(seed, acc, device, arithmetic="a"):
    return {"seed": seed, "top1_last": acc, "device": device, "cpu_capability": "AVX2", "precision": "fp32",
            "threads": 1, "world_size": 1, "arithmetic": arithmetic, "epochs": 36, "train_images": 50_000}  # fmt: skip


def test_the_budget_plot_averages_a_row_within_one_kind_and_plots_one_kind_for_both_rows(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from budget_plot import preset_points

    # QKD: one run on machine x, three on y; VA-QKD: three on x, one on y. Each row's largest kind differs: the
    # plotted kind must be one for both (x: 4 runs between the rows, y: 4 too, so the tie goes by name: x)
    qkd = [_kind(0, 62.98, "x"), _kind(1, 62.5, "y"), _kind(2, 63.0, "y"), _kind(3, 63.5, "y")]
    va = [_kind(0, 61.0, "x"), _kind(1, 62.0, "x"), _kind(2, 63.0, "x"), _kind(3, 64.0, "y")]
    points = preset_points("full", {"qkd_logit": qkd, "vaqkd_logit": va})
    got = sorted((p["row"], p["n"], p["mean"], p["seeds"]) for p in points)
    assert got == [("qkd_logit", 1, 62.98, [0]), ("qkd_logit", 3, 63.0, [1, 2, 3]),
                   ("vaqkd_logit", 1, 64.0, [3]), ("vaqkd_logit", 3, 62.0, [0, 1, 2])]  # never one mean of 4
    x = group_label(qkd[0])
    assert {(p["row"], p["kind"]) for p in points if p["plotted"]} == {("qkd_logit", x), ("vaqkd_logit", x)}
    qkd[0]["device"], va[3]["device"] = "w", "z"  # no kind in common: each row's largest
    points = preset_points("full", {"qkd_logit": qkd, "vaqkd_logit": va})
    plotted = {(p["row"], p["n"]) for p in points if p["plotted"]}
    assert plotted == {("qkd_logit", 3), ("vaqkd_logit", 3)}


def test_start_pairs_gives_one_interval_per_kind_of_pair(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import start_pairs

    for side, accs in (("a", [40.0, 41.0, 42.0, 50.0, 51.5]), ("b", [39.0, 40.5, 41.0, 52.0, 52.0])):
        for seed, acc in enumerate(accs):
            run = tmp_path / side / "runs" / f"qkd_logit-s{seed}-0000"
            run.mkdir(parents=True)
            (run / "final.json").write_text(json.dumps(_kind(seed, acc, "x" if seed < 3 else "y")))
    monkeypatch.setattr("sys.argv", ["start_pairs.py", str(tmp_path / "a"), str(tmp_path / "b")])
    start_pairs.main()
    out = capsys.readouterr().out
    assert out.count("-- pairs of") == 2 and "(n = 3;" in out and "(n = 2;" in out  # never one pool of 5
    assert "a - b: +0.83" in out and "a - b: -1.25" in out


def test_start_pairs_adds_folders_and_pools_only_when_asked(tmp_path, monkeypatch, capsys):
    """--also pairs two more folders (their seeds 3 and 4 on machine y; seed 5 has no partner); --pool adds one
    interval over every kind's pairs; a seed that pairs in two pairs of folders is refused."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import start_pairs

    sides = {"a": [(0, 40.0), (1, 41.0), (2, 42.0)], "b": [(0, 39.0), (1, 40.5), (2, 41.0)],
             "a2": [(3, 50.0), (4, 52.5), (6, 3.0)], "b2": [(3, 52.0), (4, 52.0), (5, 1.0), (6, 2.0)]}  # fmt: skip
    for side, runs in sides.items():
        for seed, acc in runs:
            run = tmp_path / side / "runs" / f"qkd_logit-s{seed}-0000"
            run.mkdir(parents=True)
            dev = "w" if (side, seed) == ("b2", 6) else "y" if side.endswith("2") else "x"  # seed 6: two machines
            (run / "final.json").write_text(json.dumps(_kind(seed, acc, dev)))
    argv = ["start_pairs.py", str(tmp_path / "a"), str(tmp_path / "b"), "--also", str(tmp_path / "a2"),
            str(tmp_path / "b2")]  # fmt: skip
    monkeypatch.setattr("sys.argv", argv)
    start_pairs.main()
    out = capsys.readouterr().out
    assert out.count("-- pairs of") == 2 and "pooled" not in out and "a - b: +0.83" in out
    assert "a2 - b2: -0.75" in out and "1 pair(s) of two kinds left out" in out  # seed 6
    monkeypatch.setattr("sys.argv", [*argv, "--pool"])
    start_pairs.main()
    out = capsys.readouterr().out
    assert "-- pooled over 2 kinds" in out and "(n = 5;" in out and "a+a2 - b+b2: +0.20" in out
    monkeypatch.setattr("sys.argv", [*argv[:3], "--also", str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(RunFileError, match="seed 0 is common to"):
        start_pairs.main()


def test_start_pairs_refuses_two_records_of_one_seed(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import start_pairs

    for side, configs in (("a", ("0000", "1111")), ("b", ("2222",))):
        for h in configs:
            run = tmp_path / side / "runs" / f"qkd_logit-s0-{h}"
            run.mkdir(parents=True)
            (run / "final.json").write_text(json.dumps(_kind(0, 40.0, "x")))
    monkeypatch.setattr("sys.argv", ["start_pairs.py", str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(RunFileError, match=r"two records of qkd_logit seed 0 \(qkd_logit-s0-0000, qkd_logit-s0-1111\)"):
        start_pairs.main()


def test_bar_labels_of_rows_split_by_machine_fit_the_figure(tmp_path):
    """A row split by machine carries its kind in its name; the bars' labels must fit (matplotlib gave up its
    layout, "Tight layout not applied", and cut them off)."""
    from vaqkd.analysis.plots import accuracy_bars

    kinds = ["43a1b5548b41b80b, AMD EPYC, AVX512, fp32, 1 thread",
             "2f43d789631ae970, kernels 04a7e910, AMD EPYC, AVX2, fp32, 1 thread"]  # fmt: skip
    rows = [{"row": f"qkd_logit [{k}]", "top1_last_mean": 64.0, "top1_last_std": float("nan"), "top1_last": [64.0]}
            for k in kinds] + [{"row": "teacher", "top1_last_mean": 70.4, "top1_last_std": 0.0, "top1_last": [70.4]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" is a UserWarning
        accuracy_bars(rows, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 0

import json

from vaqkd.cli import main


def test_bench_quick_runs_every_case_and_reports_the_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    for key in (
        "w2a2_over_fp32",
        "vaqkd_over_qkd_logit",
        "vaqkd_over_qkd_feature",
        "vaqkd_over_qkd_contrastive",
        "epoch_over_steps",
    ):
        assert report["ratios"][key] > 0
    cases = report["cases"]
    assert {"fp32_step_fp32", "w2a2_lsq_lsq", "w2a2_ewgs_ewgs", "w2a2_dorefa_pact", "loader", "eval_w2a2"} <= set(cases)
    assert report["quick"] is True and report["env"]["torch"]
    assert report["targets"]["w2a2_over_fp32"]["met"] == (report["ratios"]["w2a2_over_fp32"] >= 0.95)


def test_an_out_that_cannot_be_written_fails_before_any_timing(tmp_path, capsys, monkeypatch):
    import vaqkd.bench as bench
    from vaqkd.cli import main

    monkeypatch.setattr(bench, "_step_cases", lambda *a: (_ for _ in ()).throw(AssertionError("timed anyway")))
    (tmp_path / "afile").write_text("x")
    for out, culprit in ((tmp_path, "is a directory; give a file name"),
                         (tmp_path / "afile" / "b.json", "afile is a file, not a directory")):  # fmt: skip
        assert main(["bench", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and culprit in err, err


def test_an_existing_out_is_kept_unless_forced(tmp_path, capsys, monkeypatch):
    import vaqkd.bench as bench

    monkeypatch.setattr(bench, "_step_cases", lambda *a: (_ for _ in ()).throw(AssertionError("timed anyway")))
    out = tmp_path / "kept.json"
    out.write_text('{"precious": 1}')
    assert main(["bench", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err and "exists" in err and "--force" in err, err
    assert out.read_text() == '{"precious": 1}'
    with __import__("pytest").raises(AssertionError, match="timed anyway"):  # --force goes on to the timing
        main(["bench", "--quick", "--out", str(out), "--force"])

import json

import pytest

from vaqkd.analysis.stats import mean_std, paired_interval, t975
from vaqkd.config import load_config
from vaqkd.engine.train import fit
from vaqkd.errors import RunFileError
from vaqkd.presets import config_hash, load_preset, row_config
from vaqkd.runner import run_table


def _no_pairs(pairs: list[dict]) -> bool:
    """The comparison's one line says that no seed pairs (a comparison is never dropped)."""
    return [(p["n"], p["verdict"]) for p in pairs] == [(0, "no pair of one arithmetic and machine kind")]


def test_paired_t_interval_on_hand_computed_numbers():
    # differences 1, 2, 3, 4: mean 2.5, sd 1.29099, t(0.975, 3) = 3.183 (3.18245 rounded up): half-width 3.183·sd/2
    r = paired_interval([11, 12, 13, 14], [10, 10, 10, 10])
    assert r["mean"] == pytest.approx(2.5)
    assert r["lo"] == pytest.approx(2.5 - 2.05462, abs=1e-4) and r["hi"] == pytest.approx(2.5 + 2.05462, abs=1e-4)
    assert r["verdict"].startswith("higher")
    r = paired_interval([65.1, 64.8, 65.0], [65.0, 65.0, 64.8])  # diffs .1 -.2 .2
    assert r["lo"] < 0 < r["hi"] and r["verdict"] == "not distinguishable from zero at n = 3"
    assert paired_interval([1.0], [0.5])["lo"] is None
    # three pairs that each differ by 12 of 10,000 images (results/quick_t64_s30's feature pair): the float
    # differences are 0.12 up to rounding noise, sd ~1e-15; a t-interval of that width would call it real
    r = paired_interval([46.59, 45.93, 46.08], [46.47, 45.81, 45.96])
    assert r["lo"] is None and r["hi"] is None and r["mean"] == pytest.approx(0.12)
    assert r["verdict"].startswith("all 3 differences equal")
    assert mean_std([2.0, 4.0]) == (3.0, pytest.approx(1.41421356))
    assert t975(1) == 12.707 and t975(1000) == 1.98  # beyond the table: its last value, never too narrow
    with pytest.raises(ValueError):
        paired_interval([1, 2], [1])


def test_runner_reuses_finished_runs_and_resumes_interrupted_ones(shared_cifar_root, tiny_teacher, tmp_path):
    sets = [
        ("data.root", str(shared_cifar_root)),
        "model.arch=resnet20",
        "distill.teacher_arch=resnet20",
        "train.precision=fp32",
    ]
    kw = dict(
        preset="demo",
        rows=["w2a2_qat", "qkd_logit", "vaqkd_logit"],
        runs_dir=str(tmp_path / "runs"),
        out=str(tmp_path / "results"),
        overrides=sets,
        teacher=str(tiny_teacher),
        records=True,
    )
    logs = []
    res = run_table(**kw, log=logs.append)
    assert sum(line.startswith("train ") for line in logs) == 3
    table = (tmp_path / "results" / "table.md").read_text()
    assert "vaqkd_logit - qkd_logit" in table and "| w2a2_qat | W2A2 | 1 |" in table
    assert (tmp_path / "results" / "accuracy.png").stat().st_size > 1000

    # an interrupted run of seed 1 (killed mid-epoch), then the table with 2 seeds
    preset = load_preset("demo")
    cfg = row_config("qkd_logit", preset, 1, str(tiny_teacher), sets)
    run_dir = tmp_path / "runs" / f"qkd_logit-s1-{config_hash(cfg)}"
    fit(cfg, run_dir, progress=False, log=lambda s: None, stop_after_steps=3)
    logs.clear()
    res = run_table(**kw, seeds=2, log=logs.append)
    assert sum(line.startswith("reuse ") for line in logs) == 3  # seed 0 untouched
    records = sorted(p.name for p in (tmp_path / "results" / "runs").iterdir() if p.is_dir())
    assert len(records) == 6 and all(r.split("-s")[0] in kw["rows"] for r in records)
    kept = list((tmp_path / "results" / "runs").glob("teacher_eval-*.json"))  # the teacher's row, kept beside
    assert len(kept) == 1 and json.loads(kept[0].read_text())["top1_last"] > 0
    assert {f.name for f in (tmp_path / "results" / "runs" / records[0]).iterdir()} == {
        "config.toml",
        "env.json",
        "metrics.jsonl",
        "final.json",
    }  # a record: no weights
    assert any(line.startswith("resume ") and "qkd_logit-s1" in line for line in logs)
    assert sum(line.startswith("train ") for line in logs) == 2
    assert [f["seed"] for f in res["qkd_logit"]] == [0, 1]

    def strict(name):  # NaN / Infinity are not JSON: a strict reader (jq, browsers) refuses them
        raise ValueError(f"bare {name} in table.json")

    text = (tmp_path / "results" / "table.json").read_text()
    data = json.loads(text, parse_constant=strict)
    teacher = next(r for r in data["rows"] if r["row"] == "teacher")
    assert teacher["top1_last_std"] is None  # one seed: no std, written as null
    assert {p["comparison"] for p in data["paired"]} == {"vaqkd_logit - qkd_logit"}
    assert data["paired"][0]["n"] == 2 and data["meta"]["preset"] == "demo"
    # the report says which code trained the runs it shows (reused runs keep theirs)
    assert sum(data["meta"]["runs_git_sha"].values()) == 6
    assert "Runs trained at git" in (tmp_path / "results" / "table.md").read_text()

    # later, elsewhere: no run directories, only the committed records; the report still has every run
    import shutil

    shutil.rmtree(tmp_path / "runs")
    logs.clear()
    again = run_table(**kw, seeds=2, log=logs.append)
    assert not any(line.startswith("train ") for line in logs)
    assert [f["top1_last"] for f in again["qkd_logit"]] == [f["top1_last"] for f in res["qkd_logit"]]
    logs.clear()
    only = run_table(**kw, seeds=5, log=logs.append, report_only=True)  # nothing for seeds 2-4: nothing trained
    assert not any(line.startswith(("train ", "resume ")) for line in logs) and len(only["qkd_logit"]) == 2
    # a damaged record or kept teacher evaluation (valid JSON, a field missing or of another type): one error naming
    # the file and the key, before the report is rewritten
    table = (tmp_path / "results" / "table.md").read_text()
    final = tmp_path / "results" / "runs" / records[0] / "final.json"
    good, good_teacher = final.read_text(), kept[0].read_text()
    gone = object()
    cases = [(final, "top1_best", gone, "'top1_best' must be a number, got missing"),
             (final, "top1_last", "42", "'top1_last' must be a number, got '42'"),
             (final, "epochs", None, "'epochs' must be int, got None"),
             (kept[0], "top1_last", "x", "'top1_last' must be a number, got 'x'")]  # fmt: skip
    for path, key, value, culprit in cases:
        record = json.loads(path.read_text())
        record.pop(key) if value is gone else record.update({key: value})
        path.write_text(json.dumps(record))
        with pytest.raises(RunFileError, match=f"{path.name}: damaged \\({culprit}"):
            run_table(**kw, seeds=2, log=logs.append, report_only=True)
        assert (tmp_path / "results" / "table.md").read_text() == table
        final.write_text(good)
        kept[0].write_text(good_teacher)
    # a report where the data is not: the teacher's row from its kept evaluation; without one, a one-line refusal
    # before anything is written (nothing downloaded, the report not rewritten without its teacher)
    no_data = {**kw, "overrides": [("data.root", str(tmp_path / "nowhere")), *sets[1:]]}
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
    only = run_table(**no_data, seeds=2, log=logs.append, report_only=True)
    assert only["teacher"][0]["top1_last"] == again["teacher"][0]["top1_last"] and len(only["qkd_logit"]) == 2
    kept[0].unlink()
    table = (tmp_path / "results" / "table.md").read_text()
    with pytest.raises(RunFileError, match=r"no evaluation kept in .* and no data under .*nowhere to make one"):
        run_table(**no_data, seeds=2, log=logs.append, report_only=True)
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "results" / "table.md").read_text() == table
    # --teacher train in a report only: the teacher's run is never trained, and an unfinished one never reported
    logs.clear()
    with pytest.raises(RunFileError, match="the teacher's run has not finished; run the table without --report"):
        run_table(**{**no_data, "teacher": "train"}, seeds=1, log=logs.append, report_only=True)
    assert not any(line.startswith(("train ", "resume ")) for line in logs) and not (tmp_path / "runs").exists()


def test_pairs_from_different_machines_are_left_out():
    from vaqkd.analysis.report import paired_rows

    def run(seed, acc, cap="AVX512"):
        return {"seed": seed, "top1_last": acc, "device": "cpu x", "cpu_capability": cap, "precision": "bf16",
                "threads": 2, "world_size": 1, "arithmetic": "a1"}  # fmt: skip

    res = {"qkd_logit": [run(0, 40.0), run(1, 41.0), run(2, 42.0)],
           "vaqkd_logit": [run(0, 40.5), run(1, 41.7), run(2, 45.0, cap="AVX2")]}  # fmt: skip
    (p,) = paired_rows(res)
    assert p["n"] == 2 and p["seeds"] == [0, 1] and p["cross_machine_pairs_left_out"] == 1
    assert p["mean"] == pytest.approx(0.6) and p["pairs_with_unknown_machine_fields"] == 0


def test_records_lacking_a_machine_field_pair_on_the_fields_both_know(tmp_path):
    from vaqkd.analysis.report import paired_rows

    old_dir = tmp_path / "old"  # a record from before cpu_capability / threads were in final.json
    old_dir.mkdir()
    (old_dir / "env.json").write_text('{"threads": 1}')
    old = {"seed": 0, "top1_last": 40.0, "device": "cpu x", "precision": "bf16", "run_dir": str(old_dir),
           "arithmetic": "a1"}  # fmt: skip
    new = {"seed": 0, "top1_last": 41.0, "device": "cpu x", "cpu_capability": "AVX512", "precision": "bf16",
           "arithmetic": "a1"}  # fmt: skip
    (p,) = paired_rows({"qkd_logit": [old], "vaqkd_logit": [{**new, "threads": 1}]})
    assert p["n"] == 1 and p["pairs_with_unknown_machine_fields"] == 1
    # threads comes from the old run's env.json, and it differs: no pair
    assert _no_pairs(paired_rows({"qkd_logit": [old], "vaqkd_logit": [{**new, "threads": 2}]}))
    assert _no_pairs(paired_rows({"qkd_logit": [old], "vaqkd_logit": [{**new, "threads": 1, "precision": "fp32"}]}))


def test_a_run_resumed_on_another_machine_pairs_with_neither(shared_cifar_root, tiny_teacher, tmp_path, monkeypatch):
    """A run started on one machine and resumed on another is of neither kind: final.json names both, and the
    report reads env.json too, so even a record whose final.json names only the first machine does not pair."""
    import vaqkd.engine.build as train  # where a run's environment is recorded
    from vaqkd.analysis.report import paired_rows

    tiny = ["optim.epochs=1", "data.subset_per_class=2", "data.batch_size=50", "data.test_subset_per_class=1"]
    sets = [("data.root", str(shared_cifar_root)), "model.arch=resnet20", "distill.teacher_arch=resnet20",
            "train.precision=fp32", "train.device=cpu", *tiny]  # fmt: skip  (a CPU run: the host fields are its)
    cfg = row_config("qkd_logit", load_preset("demo"), 0, str(tiny_teacher), sets)
    run_dir = tmp_path / "run"
    fit(cfg, run_dir, progress=False, log=lambda s: None, stop_after_steps=2)
    started = json.loads((run_dir / "env.json").read_text())
    here = started["device_name"]
    real = train.environment
    monkeypatch.setattr(train, "environment", lambda *a, **k: {**real(*a, **k), "device_name": "another cpu"})
    final = fit(cfg, run_dir, resume=True, progress=False, log=lambda s: None)
    assert final["device"] == f"{here} + another cpu"  # what did not change stays one value
    assert (final["cpu_capability"], final["threads"]) == (started["cpu_capability"], started["threads"])

    mixed = {**final, "run_dir": str(run_dir)}
    pure = {k: v for k, v in final.items() if k != "run_dir"} | {"device": here, "top1_last": 1.0}
    assert _no_pairs(paired_rows({"qkd_logit": [mixed], "vaqkd_logit": [pure]}))
    # a record from before final.json named every machine: env.json's resumes still tell
    assert _no_pairs(paired_rows({"qkd_logit": [{**mixed, "device": here}], "vaqkd_logit": [pure]}))
    # the same mix on both sides pairs, as two runs of one machine do
    (p,) = paired_rows({"qkd_logit": [mixed], "vaqkd_logit": [{**final, "top1_last": 1.0}]})
    assert p["n"] == 1 and p["cross_machine_pairs_left_out"] == 0


def test_takd_chain_and_unknown_rows(shared_cifar_root, tiny_teacher, tmp_path):
    sets = [
        ("data.root", str(shared_cifar_root)),
        "model.arch=resnet20",
        "distill.teacher_arch=resnet20",
        "train.precision=fp32",
    ]
    res = run_table(
        "demo",
        rows=["takd"],
        runs_dir=str(tmp_path / "runs"),
        out=str(tmp_path / "res"),
        overrides=sets,
        teacher=str(tiny_teacher),
        log=lambda s: None,
    )
    stages = res["takd"][0]["stages"]
    assert [s["run_dir"].split("/")[-1].split("-")[0] for s in stages] == ["takd_w8a8", "takd_w4a4", "takd"]
    assert res["takd"][0]["train_seconds"] == pytest.approx(sum(s["train_seconds"] for s in stages))
    w4 = load_config(stages[1]["run_dir"] + "/config.toml")
    assert w4.distill.teacher == stages[0]["run_dir"] and w4.quant.w_bits == 4
    with pytest.raises(FileNotFoundError, match="unknown rows"):
        run_table("demo", rows=["nope"], teacher=str(tiny_teacher))


def test_first_seed_trains_only_the_later_seeds(shared_cifar_root, tiny_teacher, tmp_path, monkeypatch):
    import vaqkd.runner as runner

    trained = []
    real = runner.row_result

    def watched(row, seed, *a, train=True, **k):
        if train:
            trained.append((row, seed))
            return None  # as a failed cell: nothing is trained here
        return real(row, seed, *a, train=train, **k)

    monkeypatch.setattr(runner, "row_result", watched)
    sets = [("data.root", str(shared_cifar_root)), "model.arch=resnet20", "distill.teacher_arch=resnet20"]
    with pytest.raises(runner.TableIncomplete, match="4 cell"):  # the stand-in trains nothing: four failed cells
        run_table("demo", rows=["qkd_logit", "vaqkd_logit"], seeds=3, first_seed=1, runs_dir=str(tmp_path / "runs"),
                  out=str(tmp_path / "out"), overrides=sets, teacher=str(tiny_teacher), log=lambda s: None)  # fmt: skip
    assert trained == [("qkd_logit", 1), ("vaqkd_logit", 1), ("qkd_logit", 2), ("vaqkd_logit", 2)]


def test_one_gpus_runs_pair_whatever_host_threads_and_cpu_they_had(tmp_path):
    from vaqkd.analysis.kinds import group_label, run_groups
    from vaqkd.analysis.report import paired_rows

    def run(name, seed, acc, threads, cap, device="cuda:0"):
        d = tmp_path / name
        d.mkdir()
        env = {"device": device, "device_name": "NVIDIA H200" if device != "cpu" else "cpu x", "threads": threads,
               "cpu_capability": cap, "precision": "bf16", "world_size": 1, "arithmetic": "g1"}  # fmt: skip
        (d / "env.json").write_text(json.dumps(env))
        return {"seed": seed, "top1_last": acc, "run_dir": str(d), "threads": threads, "cpu_capability": cap}

    # the same GPU, one run at a time (16 host threads) and four runs packed on it (4 threads): one kind
    qkd = [run("q0", 0, 40.0, 16, "AVX512"), run("q1", 1, 41.0, 4, "AVX512")]
    va = [run("v0", 0, 40.5, 4, "AVX512"), run("v1", 1, 41.7, 16, "AVX2")]
    (p,) = paired_rows({"qkd_logit": qkd, "vaqkd_logit": va})
    assert p["n"] == 2 and p["cross_machine_pairs_left_out"] == 0 and p["pairs_with_unknown_machine_fields"] == 0
    assert len(run_groups(qkd)) == 1 and group_label(qkd) == "g1, NVIDIA H200, bf16"
    # on the CPU the host's threads are its arithmetic: 16 and 4 threads never average
    cpu = [run("c0", 0, 40.0, 16, "AVX512", "cpu"), run("c1", 1, 41.0, 4, "AVX512", "cpu")]
    assert len(run_groups(cpu)) == 2


def test_the_report_collects_the_same_experiment_in_another_precision_and_nothing_else(tmp_path):
    """A pair trained in bf16 where the preset says fp32 (or on other threads, device, memory format) is the same
    experiment on other arithmetic: the report finds its records beside the preset's own (the run names differ);
    a record of another experiment (another lr) is not collected, nor a folder whose config is not a record."""
    from pathlib import Path

    from vaqkd.config import to_toml
    from vaqkd.records import other_arithmetic

    p, teacher, records = load_preset("full_t64"), "pretrained:resnet32_cifar100_e64", tmp_path / "records"

    def record(seed, *sets):
        cfg = row_config("qkd_logit", p, seed, teacher, list(sets))
        d = records / f"qkd_logit-s{seed}-{config_hash(cfg)}"
        d.mkdir(parents=True)
        (d / "config.toml").write_text(to_toml(cfg))
        (d / "final.json").write_text(json.dumps({"top1_last": 60.0, "top1_best": 60.0, "epochs": 36, "seed": seed,
                                                  "train_images": 50000, "train_seconds": 1.0}))  # fmt: skip
        return d.name

    own = record(0)
    bf16 = record(0, "train.precision=bf16")  # the same seed in another precision: both are kept
    threads = record(1, "train.precision=bf16", "train.threads=1", "train.channels_last=true")
    record(2, "optim.lr=0.01")  # another experiment
    record(3, "train.precision=bf16", "optim.momentum=0.8")  # another experiment in another precision
    renamed = records / "qkd_logit-s5-0badc0de"  # a record under a name its config does not give
    renamed.mkdir()
    (renamed / "config.toml").write_text((records / bf16 / "config.toml").read_text().replace("seed = 0", "seed = 5"))
    (renamed / "final.json").write_text((records / bf16 / "final.json").read_text())
    (records / "qkd_logit-s4-00000000").mkdir()
    (records / "qkd_logit-s4-00000000" / "config.toml").write_text("not [ toml")
    (records / "qkd_logit-s4-00000000" / "final.json").write_text("{}")
    assert len({own, bf16, threads}) == 3
    found = other_arithmetic("qkd_logit", p, teacher, [], tmp_path / "runs", records, {own})
    assert sorted(Path(f["run_dir"]).name for f in found) == sorted([bf16, threads])
    again = other_arithmetic("qkd_logit", p, teacher, ["train.precision=bf16"], tmp_path / "runs", records, {bf16})
    assert sorted(Path(f["run_dir"]).name for f in again) == sorted([own, threads])  # seen from the bf16 side
    assert all(f["top1_last"] == 60.0 and f["seed"] in (0, 1) for f in again)

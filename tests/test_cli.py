import json

import pytest

from vaqkd.cli import main
from vaqkd.metrics.size import profile


def test_profile_reproduces_the_papers_columns(capsys):
    assert (
        main(
            [
                "profile",
                "--model",
                "resnet32",
                "--num-classes",
                "100",
                "--w-bits",
                "2",
                "--a-bits",
                "2",
                "--first-last",
                "same",
                "--json",
            ]
        )
        == 0
    )
    p = json.loads(capsys.readouterr().out)
    assert p["params"] == 467_732
    assert round(p["fp32_mib"], 2) == 1.78 and round(p["quant_mib"], 2) == 0.11
    assert p["bops_reduction"] == pytest.approx(256.0)
    assert {"bops_fp32", "bops"} <= set(p)


def test_profile_unknown_model_is_one_line_naming_it(capsys):
    assert main(["profile", "--model", "resnet99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaqkd profile: error: unknown model 'resnet99'; registered: [") and "\n" not in err


def test_profile_policies_give_smaller_true_reductions():
    same = profile("resnet32", 100, 2, 2, "same")
    eight = profile("resnet32", 100, 2, 2, "8")
    fp32 = profile("resnet32", 100, 2, 2, "fp32")
    assert 256 > eight["bops_reduction"] > fp32["bops_reduction"] > 1
    assert same["quant_mib"] < eight["quant_mib"] < fp32["quant_mib"]
    first = fp32["layers"][0]
    assert first["macs"] == 32 * 32 * 16 * 27 and first["w_bits"] == 32  # 442,368 MACs, FP32 stem
    assert fp32["layers"][-1]["macs"] == 6400


def test_profile_of_binary_weights_counts_one_bit_a_weight():
    # 1 bit is what DoReFa trains (quant.weight = "dorefa", w_bits = 1): the profile reports it, not refuses it
    one, two = profile("resnet32", 100, 1, 2, "same"), profile("resnet32", 100, 2, 2, "same")
    assert {r["w_bits"] for r in one["layers"]} == {1} and {r["a_bits"] for r in one["layers"]} == {2}
    assert one["params"] == two["params"] and one["quant_mib"] == pytest.approx(two["quant_mib"] / 2)
    assert one["bops_reduction"] == pytest.approx(2 * two["bops_reduction"])  # 32 x 32 / (1 x 2) = 512


def test_cli_errors_are_one_line_naming_the_culprit(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[optim]\nlr_typo = 1\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.lr_typo: unknown key" in err
    assert not (tmp_path / "r").exists()  # stopped before any work
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: config file not found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_train_then_eval_from_the_command_line(shared_cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "configs/cifar100/teacher_resnet32_short.toml",
        "--out",
        str(out),
        "--data-root",
        str(shared_cifar_root),
        "--no-progress",
        "--set",
        "optim.epochs=1",
        "--set",
        "model.arch=resnet20",
        "--set",
        "data.subset_per_class=0",
    ]
    assert main(args) == 0
    assert "test top-1" in capsys.readouterr().out
    assert main(["eval", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    final = json.loads((out / "final.json").read_text())
    assert res["test_images"] == 200 and res["top1"] == pytest.approx(final["top1_last"], abs=1.0)


def test_train_with_a_preset(shared_cifar_root, tmp_path, capsys):
    out = tmp_path / "qat"
    assert (
        main(
            [
                "train",
                "configs/cifar100/w2a2_qat.toml",
                "--preset",
                "demo",
                "--out",
                str(out),
                "--data-root",
                str(shared_cifar_root),
                "--no-progress",
                "--set",
                'model.init=""',
                "--set",
                "model.arch=resnet20",
            ]
        )
        == 0
    )
    from vaqkd.config import load_config

    cfg = load_config(out / "config.toml")
    assert cfg.optim.epochs == 2 and cfg.data.subset_per_class == 50 and cfg.quant.enabled  # demo's student section
    final = json.loads((out / "final.json").read_text())
    assert final["profile"]["w_bits"] == 2 and final["profile"]["bops_reduction"] > 1


@pytest.mark.parametrize(
    "argv,culprit",
    [
        (["profile", "--w-bits", "0"], "argument --w-bits: must be in [1, 16] or 32, got 0"),
        (["profile", "--a-bits", "17"], "argument --a-bits: must be in [2, 16], got 17"),
        (["profile", "--num-classes", "100000000"], "argument --num-classes: must be in [1, 100000], got 100000000"),
        (["table", "--seeds", "0"], "argument --seeds: must be in [1, 100], got 0"),
        (["table", "--jobs", "0"], "argument --jobs: must be >= 1, got 0"),
        (["table", "--first-seed", "-1"], "argument --first-seed: must be in [0, 99], got -1"),
        (["table", "--gpus-per-run", "-1"], "argument --gpus-per-run: must be >= 0, got -1"),
        (["table", "--cpus-per-run", "0"], "argument --cpus-per-run: must be > 0, got 0"),
        (["table", "--cpus-per-run", "nan"], "argument --cpus-per-run: must be > 0, got nan"),
        (["train", "x.toml", "--stop-after-steps", "0"], "argument --stop-after-steps: must be >= 1, got 0"),
        (["gradcam", "a", "b", "--seed", "99999999999999999999"],
         "argument --seed: must be in [0, 9223372036854775807], got 99999999999999999999"),
    ],
)
def test_out_of_range_arguments_are_one_line_errors_before_any_work(argv, culprit, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith(culprit)


@pytest.mark.parametrize(
    "argv,culprit",
    [
        (["--launcher", "ray", "--jobs", "3"], "--jobs 3: counts the local launcher's processes"),
        (["--jobs", "2", "--cpus-per-run", "2"], "--cpus-per-run: Ray's options; pass --launcher ray"),
        (["--address", "head:6379", "--gpus-per-run", "0.5"], "--address / --gpus-per-run: Ray's options"),
    ],
)
def test_options_of_the_other_launcher_are_refused_not_ignored(argv, culprit, capsys, tmp_path):
    assert main(["table", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and culprit in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()  # refused before any work


def test_the_library_refuses_the_other_launchers_options_too(tmp_path):
    from vaqkd.errors import ConfigError
    from vaqkd.runner import run_table

    with pytest.raises(ConfigError, match="--jobs 2: counts the local launcher's processes"):
        run_table("demo", launcher="ray", jobs=2, runs_dir=str(tmp_path / "runs"), out=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="--cpus-per-run: Ray's options"):
        run_table("demo", cpus_per_run=2.0, runs_dir=str(tmp_path / "runs"), out=str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []


def test_a_data_path_with_a_quote_a_backslash_t_and_a_space_is_read_as_it_is(tiny_teacher, tmp_path, capsys):
    """`--data-root` and the library's `data_root=` pass the path itself, never pasted into TOML text (where
    `\\t` became a TAB and a quote ended the string)."""
    from conftest import write_cifar100
    from vaqkd.data.build import data_root
    from vaqkd.rundir import run_config

    root = write_cifar100(tmp_path / 'my "data\\tset" dir', per_class_train=1, per_class_test=1)
    assert main(["eval", str(tiny_teacher), "--data-root", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_images"] == 100  # one test image per class, read from root
    assert data_root(run_config(tiny_teacher, [("data.root", str(root))]).data) == root
    assert [p.name for p in tmp_path.iterdir()] == ['my "data\\tset" dir']  # and no stray folder beside it


def test_table_ends_by_printing_its_rows_and_where_the_report_is():
    from pathlib import Path

    from vaqkd.cli import table_summary

    table = Path(__file__).resolve().parents[1] / "results/demo/table.md"
    lines = table_summary(table).splitlines()
    assert lines[0].startswith("| row |") and any(ln.startswith("| vaqkd_logit |") for ln in lines)
    assert lines[-1].startswith(f"report: {table}") and not any("Paired" in ln for ln in lines)


def test_eval_backends_and_export_formats_come_from_deploy():
    from vaqkd.cli import build_parser
    from vaqkd.deploy import EVAL_BACKENDS, EXPORT_FORMATS, backend_for

    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict) and "eval" in a.choices)
    choices = {a.dest: a.choices for a in sub.choices["eval"]._actions + sub.choices["export"]._actions if a.choices}
    assert list(choices["backend"]) == list(EVAL_BACKENDS) and list(choices["format"]) == list(EXPORT_FORMATS)
    assert backend_for("m.onnx") == "onnxruntime" and backend_for("va1.vaqkd.safetensors") == "torch"


def test_eval_with_bn_reestimate_on_a_run_and_a_one_line_error_elsewhere(tiny_teacher, shared_cifar_root, tmp_path,
                                                                          capsys):  # fmt: skip
    from conftest import one_line_error

    root = ["--data-root", str(shared_cifar_root)]
    assert main(["eval", str(tiny_teacher), *root, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_teacher), *root, "--json", "--bn-reestimate", "3"]) == 0
    restat = json.loads(capsys.readouterr().out)
    assert restat["bn_reestimate_batches"] == 3 and "bn_reestimate_batches" not in plain
    assert restat["loss"] != plain["loss"]  # other running statistics, another evaluation
    assert main(["eval", str(tiny_teacher), *root, "--json"]) == 0  # the run itself is unchanged
    assert json.loads(capsys.readouterr().out) == plain
    artifact = tmp_path / "m.vaqkd.safetensors"
    artifact.write_bytes(b"not read")
    one_line_error(capsys, ["eval", str(artifact), "--bn-reestimate", "3"], "--bn-reestimate", "a file")
    one_line_error(capsys, ["eval", str(tiny_teacher), "--backend", "onnxruntime", "--bn-reestimate", "3"],
                   "--backend onnxruntime")  # fmt: skip


def test_first_seed_beyond_the_seeds_is_a_one_line_error_before_any_work(tmp_path, capsys):
    code = main(["table", "--seeds", "2", "--first-seed", "2", "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("--first-seed 2: must be below --seeds 2 (the seeds trained are "
                                      "first_seed..seeds-1)")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_export_never_overwrites_its_source_and_an_existing_file_only_with_force(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "ckpt-000000100").mkdir(parents=True)
    weights = run / "ckpt-000000100" / "model.safetensors"
    weights.write_bytes(b"weights")
    art = tmp_path / "a.vaqkd.safetensors"
    art.write_bytes(b"artifact")
    other = tmp_path / "notes.toml"
    other.write_text("kept = true\n")
    for argv, culprit in [
        (["export", str(run), "--out", str(weights), "--force"], "is the source's own file"),
        (["export", str(art), "--format", "onnx", "--out", str(art), "--force"], "is the source's own file"),
        (["export", str(run), "--out", str(other)], "exists; remove it, choose another --out, or pass --force"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and culprit in err, err
    assert weights.read_bytes() == b"weights" and art.read_bytes() == b"artifact"
    assert other.read_text() == "kept = true\n"


def test_a_file_where_a_folder_is_needed_is_named_as_such(shared_cifar_root, tmp_path, capsys):
    from pathlib import Path

    afile = tmp_path / "afile"
    afile.write_text("x")
    config = Path(__file__).resolve().parents[1] / "configs" / "cifar100" / "qkd_logit.toml"
    assert main(["train", str(config), "--out", str(afile), "--data-root", str(shared_cifar_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{afile}: is a file, not a directory" in err, err


def test_an_fp32_profile_says_fp32_activations_in_its_header_as_in_its_layers():
    p = profile("resnet20", 10, 32, 2, "same")
    assert p["a_bits"] == 32 and {r["a_bits"] for r in p["layers"]} == {32}

from pathlib import Path

import pytest

from vaqkd.config import Config, from_dict, load_config, to_toml
from vaqkd.errors import ConfigError


def test_repo_configs_load(tmp_path):
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("configs/cifar100/*.toml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_config(path)
        # the resolved config round-trips through the TOML written into run directories
        (tmp_path / "c.toml").write_text(to_toml(cfg))
        assert load_config(tmp_path / "c.toml") == cfg, path


def test_unknown_key_is_an_error_naming_it(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^trian: unknown key"):
        from_dict(Config, {"trian": {}})


def test_wrong_type_and_range_are_errors():
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"optim\.lr: must be > 0"):
        load_config(None, ["optim.lr=-1"])
    for bad in ("optim.lr", "=3", "optim..lr=1", "optim.=1"):
        with pytest.raises(ConfigError, match=r"an override must look like section\.key=value"):
            load_config(None, [bad])
    for key in ("model.arch", "distill.teacher_arch"):
        with pytest.raises(ConfigError, match=rf"^{key}: unknown model 'resnet99'; registered: \["):
            load_config(None, [f"{key}=resnet99"])
    for bad in ("cudax", "cuda:", "cuda:one", "gpu"):  # the shape is checked when the config is read
        with pytest.raises(ConfigError, match=r"^train\.device: must be auto, cpu, cuda or cuda:N"):
            load_config(None, [f"train.device={bad}"])
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"  # whether it exists: at run time
    with pytest.raises(ConfigError, match=r"quant\.w_bits: must be in \[1, 8\]"):
        load_config(None, ["quant.w_bits=9"])
    with pytest.raises(ConfigError, match=r"distill\.terms\.1\.anchor_weights: needs one weight"):
        load_config(None, ['distill.teacher="x"', 'distill.terms=[{kind="ce"}, {kind="kd", anchor_bits=[4]}]'])
    with pytest.raises(ConfigError, match=r"distill\.teacher: distillation terms need a teacher"):
        load_config(None, ['distill.terms=[{kind="kd"}]'])


def test_overrides_reach_nested_and_list_items(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[distill]\nteacher = "t"\nterms = [{kind = "ce"}, {kind = "kd", weight = 0.5}]\n')
    cfg = load_config(p, ["distill.terms.1.weight=0.9", "optim.milestones=[1, 2]", "quant.first_last=8"])
    assert cfg.distill.terms[1].weight == 0.9 and cfg.optim.milestones == (1, 2) and cfg.quant.first_last == "8"
    with pytest.raises(ConfigError, match="no list item"):
        load_config(p, ["distill.terms.5.weight=1"])


def test_base_file_is_refined(tmp_path):
    (tmp_path / "a.toml").write_text('name = "a"\n[optim]\nlr = 0.2\nepochs = 9\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\nname = "b"\n[optim]\nepochs = 3\n')
    cfg = load_config(tmp_path / "b.toml")
    assert (cfg.name, cfg.optim.lr, cfg.optim.epochs) == ("b", 0.2, 3)


def test_every_preset_row_resolves_to_a_valid_config_and_its_teacher_ships():
    from vaqkd.presets import load_preset, preset_init, preset_names, preset_teacher, row_config
    from vaqkd.rundir import resolve_weights

    assert {"demo", "quick", "full", "paper", "quick_t64", "full_t64"} <= set(preset_names())
    for preset in preset_names():
        p = load_preset(preset)
        teacher = preset_teacher(p)
        for spec in (teacher, preset_init(p, teacher)):
            assert resolve_weights(spec, "resnet32").exists()
        for row in p["rows"]:
            chain = ("takd_w8a8", "takd_w4a4", "takd") if row == "takd" else (row,)
            for stage in chain:
                cfg = row_config(stage, p, seed=2, teacher=teacher, overrides=[])
                assert cfg.train.seed == 2 and cfg.quant.enabled


def test_named_pretrained_weights_and_unknown_names():
    from vaqkd.rundir import pretrained_names, resolve_weights

    assert "resnet32_cifar100" in pretrained_names()
    assert resolve_weights("pretrained:resnet32_cifar100", "resnet32") == resolve_weights("pretrained", "resnet32")
    with pytest.raises(
        FileNotFoundError, match=r"'pretrained:nope': no such shipped weights \(available: \[.*'resnet32_cifar100'"
    ):
        resolve_weights("pretrained:nope", "resnet32")


def test_a_preset_may_start_its_students_from_other_weights_than_its_teacher():
    from vaqkd.presets import load_preset, row_config

    p = load_preset("quick_t64")
    cfg = row_config("qkd_logit", p, 0, "pretrained:resnet32_cifar100_e64", [])
    assert cfg.model.init == cfg.distill.teacher == "pretrained:resnet32_cifar100_e64"
    p["teacher"]["init"] = "pretrained"
    cfg = row_config("qkd_logit", p, 0, "pretrained:resnet32_cifar100_e64", [])
    assert (cfg.model.init, cfg.distill.teacher) == ("pretrained", "pretrained:resnet32_cifar100_e64")
    assert row_config("w2a2_qat", p, 0, "pretrained:resnet32_cifar100_e64", []).model.init == "pretrained"


@pytest.mark.parametrize(
    "base, message",
    [
        ('"a.toml"', r"base files form a loop \(.*a\.toml -> .*b\.toml -> .*a\.toml\)"),
        ('"sub"', r"sub: is a directory, not a config file"),
        ("3", r"base: must name a file, got 3"),
        ('"latin1.toml"', r"latin1\.toml: not UTF-8 text"),
    ],
)
def test_a_bad_base_is_one_config_error(tmp_path, base, message):
    (tmp_path / "a.toml").write_text('base = "b.toml"\nname = "a"\n')
    (tmp_path / "b.toml").write_text(f"base = {base}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "latin1.toml").write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=message) as e:
        load_config(tmp_path / "a.toml")
    assert "\n" not in str(e.value)


# the committed record folders of the 64-epoch-teacher presets (and results/residual, which uses them) with the
# preset and overrides whose runs they hold: a preset change that would orphan them (their run names no longer what
# the preset resolves to) fails here. (results/quick's TAKD records name their chain's stage, not row_config's.)
RECORD_PRESETS = [
    ("quick_t64_nowarm", "quick_t64_nowarm", []),
    ("quick_t64_s30_nowarm", "quick_t64_s30_nowarm", []),
    ("quick_t64_lr02", "quick_t64_lr02", []),
    ("residual/float", "quick_t64_s30_nowarm", []),
    ("residual/int", "quick_t64_s30_nowarm", ['quant.residual="int"']),
    ("residual/int8", "quick_t64_s30_nowarm", ['quant.residual="int"', "quant.residual_bits=8"]),
    ("full_t64_nowarm", "full_t64_nowarm", ['train.precision="bf16"']),
    ("full_t64_nowarm/pending", "full_t64_nowarm", []),
    ("full_t64", "full_t64", [[], ['train.precision="bf16"']]),  # the preset's fp32 runs and a bf16 pair
    # a folder holding runs of two override sets: each record must be the run of one of them
    ("full_t64/pending", "full_t64", [[], ['quant.residual="int"', "quant.residual_bits=8"]]),
    ("quick_t64", "quick_t64", []),
    ("quick_t64_s30", "quick_t64_s30", []),
    ("strong_start/quick_t64_nowarm", "quick_t64_nowarm", []),
    ("strong_start/V", "quick_t64_s30_nowarm", []),
    ("strong_start/probes/lr0.0025", "quick_t64_nowarm", ["optim.lr=0.0025"]),
    ("strong_start/probes/freeze0.5", "quick_t64_nowarm", ["optim.freeze_weights_epochs=0.5"]),
    ("strong_start/probes/per_channel", "quick_t64_nowarm", ["quant.per_channel=true"]),
    ("strong_start/probes/lr0.01_warmup0.5", "quick_t64_nowarm", ["optim.lr=0.01", "optim.warmup_epochs=0.5"]),
    ("strong_start/probes/warmup1.5", "quick_t64", ["optim.warmup_epochs=1.5"]),
    ("strong_start/mse_init/quick_t64", "quick_t64", ['quant.weight_init="mse"']),
    ("strong_start/mse_init/quick_t64_s30", "quick_t64_s30", ['quant.weight_init="mse"']),
]


@pytest.mark.parametrize("folder, preset, overrides", RECORD_PRESETS)
def test_committed_records_are_the_runs_their_preset_names(folder, preset, overrides):
    from vaqkd.presets import config_hash, load_preset, preset_teacher, row_config

    where = Path(__file__).resolve().parents[1] / "results" / folder
    records = sorted((where if where.name == "pending" else where / "runs").glob("*-s*-*"))
    assert records, folder
    p = load_preset(preset)
    alternatives = overrides if overrides and isinstance(overrides[0], list) else [overrides]
    for rec in records:
        row, seed, _ = rec.name.rsplit("-", 2)
        names = {f"{row}-{seed}-{config_hash(row_config(row, p, int(seed[1:]), preset_teacher(p), sets))}"
                 for sets in alternatives}  # fmt: skip
        assert rec.name in names, (folder, rec.name)

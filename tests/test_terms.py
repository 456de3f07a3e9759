"""Loss terms declare themselves: the config's checks, the objective and these tests derive from the declarations;
committed records, written before terms declared their parameters, load and keep their run identity."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from vaqkd.config import TermConfig, identity, load_config, to_toml
from vaqkd.distill import TERMS, Param
from vaqkd.distill.objective import Objective, build_term, stages_of
from vaqkd.engine.guard import advice
from vaqkd.errors import ConfigError
from vaqkd.models import create_model, stage_channels
from vaqkd.presets import config_hash

ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted(p for p in ROOT.glob("results/*/runs/*") if (p / "config.toml").exists())
KD = ['distill.teacher="pretrained"']


@pytest.mark.parametrize("kind", TERMS)
def test_every_term_declares_itself(kind):
    cls = TERMS[kind]
    assert cls.kind == kind and isinstance(cls.uses_teacher, bool)
    assert all(isinstance(p, Param) and type(p.default) in (int, float, str) for p in cls.params.values())
    defaults = {k: p.default for k, p in cls.params.items()}
    assert all(p.check(f"x.{k}", p.default) == p.default for k, p in cls.params.items())  # defaults are in range
    student, teacher = create_model("resnet20", 10), create_model("resnet20", 10)
    stages = cls.stages(defaults) + cls.stages(defaults, teacher=True)
    assert set(stages) <= set(stage_channels(student)) | {"embedding"}
    term = build_term(TermConfig(kind), stage_channels(student), stage_channels(teacher), torch.arange(20) % 10)
    assert isinstance(term, cls)
    trainable = {name.split(".")[0] for name, p in term.named_parameters()}
    assert trainable == set(cls.heads)  # the heads it declares are exactly the modules it trains
    assert cls.__doc__ and "Example term" in cls.__doc__


@pytest.mark.parametrize("kind", TERMS)
def test_a_term_table_is_checked_against_its_declaration(kind, tmp_path):
    cls = TERMS[kind]
    teacher = KD if cls.uses_teacher else []
    cfg = load_config(None, [*teacher, f'distill.terms=[{{kind="{kind}"}}]'])
    assert cfg.distill.terms[0].params == {k: p.default for k, p in cls.params.items()}  # resolved: defaults in
    (tmp_path / "c.toml").write_text(to_toml(cfg))  # the resolved file: the term's table holds its parameters
    assert load_config(tmp_path / "c.toml") == cfg
    with pytest.raises(ConfigError, match=rf"^distill\.terms\.0\.bogus: not a parameter of the '{kind}' term"):
        load_config(None, [*teacher, f'distill.terms=[{{kind="{kind}", bogus=1}}]'])
    for name, p in cls.params.items():
        bad = "x" if isinstance(p.default, (int, float)) else 3
        with pytest.raises(ConfigError, match=rf"^distill\.terms\.0\.{name}: expected"):
            load_config(None, [*teacher, f"distill.terms=[{{kind=\"{kind}\", {name}={bad!r}}}]".replace("'", '"')])


@pytest.mark.parametrize(
    "term, message",
    [
        ('{kind="kd", temperature=inf}', r"temperature: expected a finite number, got inf"),
        ('{kind="kd", temperature=0}', r"temperature: must be a finite number > 0"),
        ('{kind="kd", weight=inf}', r"weight: expected a finite number, got inf"),
        ('{kind="kd", weight=nan}', r"weight: expected a finite number, got nan"),
        ('{kind="kd", anchor_bits=[2], anchor_weights=[-5.0]}', r"anchor_weights: must be >= 0"),
        ('{kind="kd", anchor_bits=[2], anchor_weights=[nan]}', r"anchor_weights\.0: expected a finite number"),
        ('{kind="crd", feat_dim=0}', r"feat_dim: must be an integer in \[1, 65536\], got 0"),
        ('{kind="crd", feat_dim=-1}', r"feat_dim: must be an integer in \[1, 65536\]"),
        ('{kind="crd", nce_momentum=5.0}', r"nce_momentum: must be a finite number in \[0, 1\), got 5.0"),
        ('{kind="crd", nce_k=1000000000}', r"nce_k: must be an integer in \[1, 1.04858e\+06\]"),
        ('{kind="crd", nce_t=0.0}', r"nce_t: must be a finite number > 0"),
        ('{kind="kd", feat_dim=64}', r"feat_dim: not a parameter of the 'kd' term \(its parameters: temperature\)"),
        ('{kind="ce", anchor_bits=[2], anchor_weights=[1.0]}', r"anchor_bits: ce has no teacher to anchor"),
        ('{kind="nope"}', r"kind: unknown loss term 'nope'; registered: \["),
    ],
)
def test_term_checks_the_config_promises(term, message):
    with pytest.raises(ConfigError, match=rf"^distill\.terms\.0\.{message}"):
        load_config(None, [*KD, f"distill.terms=[{term}]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", r"optim\.lr: expected a finite number, got inf"),
        ("optim.lr=nan", r"optim\.lr: expected a finite number, got nan"),
        ("optim.quant_lr_scale=inf", r"optim\.quant_lr_scale: expected a finite number, got inf"),
        ("train.seed=100000000000000000000", r"train\.seed: must be in \[0, 2\^32\)"),
        ("train.seed=-1", r"train\.seed: must be in \[0, 2\^32\)"),
        ("data.image_size=0", r"data\.image_size: must be in \[8, 1024\]"),
        ("data.image_size=-1", r"data\.image_size: must be in \[8, 1024\]"),
        ("data.image_size=1000000", r"data\.image_size: must be in \[8, 1024\]"),
    ],
)
def test_setting_checks_the_config_promises(override, message):
    with pytest.raises(ConfigError, match=rf"^{message}"):
        load_config(None, [override])


def test_a_stale_key_of_a_record_is_dropped_only_at_its_old_default():
    """Records resolved every term with every term's keys (a ce term with temperature = 4.0, ...): those load;
    the same key at another value was never read by that term and is refused."""
    cfg = load_config(None, [*KD, 'distill.terms=[{kind="ce", temperature=4.0, nce_k=16384, stage="layer2"}]'])
    assert cfg.distill.terms[0].params == {}
    with pytest.raises(ConfigError, match=r"^distill\.terms\.0\.temperature: not a parameter of the 'ce' term"):
        load_config(None, [*KD, 'distill.terms=[{kind="ce", temperature=2.0}]'])


@pytest.mark.skipif(not RECORDS, reason="no committed records")
def test_committed_records_load_and_keep_the_hash_in_their_folder_name():
    """The run identity of every committed record (its folder name ends in its config hash) is unchanged: the
    file loads with today's terms, and its config hashes as it did when the run was made."""
    checked = 0
    for run in RECORDS:
        m = re.search(r"-([0-9a-f]{8})$", run.name)
        if m:
            cfg = load_config(run / "config.toml")
            assert config_hash(cfg) == m.group(1), run
            assert identity((run / "config.toml").read_text()) == identity(to_toml(cfg))  # --resume accepts it
            checked += 1
    assert checked >= 50


def test_stages_and_part_names_derive_from_the_declarations():
    terms = load_config(None, [*KD, 'distill.terms=[{kind="hint", stage="layer1", teacher_stage="layer3"}, '
                                    '{kind="crd", anchor_bits=[2], anchor_weights=[0.5]}, {kind="kd"}]']).distill.terms
    assert stages_of(terms) == ("layer1", "embedding") and stages_of(terms, teacher=True) == ("layer3", "embedding")
    assert Objective(terms, []).names == [
        "hint", "crd", "crd@va2", "kd"]  # fmt: skip


def test_failed_json_advice_names_the_first_non_finite_part_and_what_feeds_it():
    cfg = load_config(ROOT / "configs/cifar100/vaqkd_logit.toml")
    text = advice(cfg, ["kd", "kd@va2"])
    assert text.startswith("The first non-finite part is kd (kd; fed by distill.terms.1.weight = 0.45, "
                           "distill.terms.1.temperature = 4.0)") and "optim.lr (now 0.05)" in text  # fmt: skip
    assert "distill.terms.1.anchor_weights.0 = 0.45, distill.terms.1.anchor_bits.0 = 2" in advice(cfg, ["kd@va2"])
    assert advice(cfg, []).startswith("Lower optim.lr (now 0.05) or optim.quant_lr_scale (now 1)")

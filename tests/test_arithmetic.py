"""The training-arithmetic fingerprint: it changes exactly when the numbers do, runs record it, a resume on
other arithmetic is refused, and reports never pair or average across two."""

import json

import pytest
import torch

import vaqkd.distill.objective as objective_mod
import vaqkd.engine.arithmetic as arithmetic
from vaqkd.analysis.kinds import run_groups
from vaqkd.analysis.report import paired_rows, summary_rows
from vaqkd.config import load_config
from vaqkd.distill.kd import LogitKD
from vaqkd.engine.train import fit
from vaqkd.errors import RunFileError

CPU = torch.device("cpu")


def test_fingerprint_is_repeatable_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = arithmetic.fingerprint(CPU, "fp32")
    assert torch.equal(torch.rand(3), expected)  # the run's own random draws are not moved by it
    assert arithmetic.fingerprint(CPU, "fp32") == a and len(a) == 16
    assert arithmetic.fingerprint(CPU, "bf16") != a


def _anchor_off_by_one_ulp(virtual_anchor):
    def patched(r, bits, mode):
        out = virtual_anchor(r, bits, mode)
        return torch.nextafter(out, out + 1)

    return patched


def _kd_times(f):
    def patched(self, *a, **k):
        return f(self, *a, **k) * (1 + 2**-20)

    return patched


@pytest.mark.parametrize("change", ["anchor rounding", "kd loss scale", "momentum"])
def test_a_change_of_the_training_arithmetic_changes_the_fingerprint(change, monkeypatch):
    before = arithmetic.fingerprint(CPU, "fp32")
    if change == "anchor rounding":
        monkeypatch.setattr(objective_mod, "virtual_anchor", _anchor_off_by_one_ulp(objective_mod.virtual_anchor))
    elif change == "kd loss scale":
        monkeypatch.setattr(LogitKD, "forward", _kd_times(LogitKD.forward))
    else:
        real = arithmetic.make_optimizer

        def other_momentum(cfg, model, objective):
            opt = real(cfg, model, objective)
            for g in opt.param_groups:
                g["momentum"] = 0.85
            return opt

        monkeypatch.setattr(arithmetic, "make_optimizer", other_momentum)
    assert arithmetic.fingerprint(CPU, "fp32") != before


def test_a_change_that_touches_no_arithmetic_keeps_the_fingerprint(monkeypatch):
    before = arithmetic.fingerprint(CPU, "fp32")
    calls = []
    real = LogitKD.forward

    def logged(self, *a, **k):  # a hook that records, as logging or a progress bar would
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(LogitKD, "forward", logged)
    torch.manual_seed(99)  # another global RNG state before the fingerprint
    assert arithmetic.fingerprint(CPU, "fp32") == before and calls


def test_legacy_era_from_the_git_sha():
    def ancestry(a, b):
        return {"old": False, "new": True}.get(b)

    assert arithmetic.legacy_era("old", ancestry) == "legacy:before-a20de37"
    assert arithmetic.legacy_era("new-dirty", ancestry) == "legacy:a20de37-7894ee1"
    assert arithmetic.legacy_era("gone", ancestry) == "unknown"


def _tiny_sets(root):
    return [f'data.root="{root}"', "model.arch=resnet20", "quant.enabled=true", "optim.epochs=1",
            "data.subset_per_class=2", "data.batch_size=50", "data.test_subset_per_class=1",
            "train.precision=fp32"]  # fmt: skip


def _tiny(root):
    return load_config(None, _tiny_sets(root))


def test_runs_record_their_arithmetic_and_refuse_to_resume_on_another(shared_cifar_root, tmp_path):
    cfg = _tiny(shared_cifar_root)
    run = tmp_path / "run"
    fit(cfg, run, progress=False, log=lambda s: None, stop_after_steps=2)
    env = json.loads((run / "env.json").read_text())
    assert env["arithmetic"] == arithmetic.fingerprint(CPU, "fp32")
    env["arithmetic"] = "0123456789abcdef"  # as if trained by other code or on another machine
    (run / "env.json").write_text(json.dumps(env))
    with pytest.raises(RunFileError, match="trained with arithmetic 0123456789abcdef"):
        fit(cfg, run, resume=True, progress=False, log=lambda s: None)
    env["arithmetic"] = arithmetic.fingerprint(CPU, "fp32")
    assert env["arithmetic_kernels"] == arithmetic.kernels_fingerprint(CPU, "fp32", "lsq")
    env["arithmetic_kernels"] = "fedcba9876543210"  # the same tiny step, other fused kernels
    (run / "env.json").write_text(json.dumps(env))
    with pytest.raises(RunFileError, match="fused quantizer kernels computed fedcba9876543210"):
        fit(cfg, run, resume=True, progress=False, log=lambda s: None)
    # resumed once by code older than the field: the part before that gap still counts
    env["resumes"] = [{**env, "arithmetic_kernels": None, "resumes": None}]
    (run / "env.json").write_text(json.dumps(env))
    with pytest.raises(RunFileError, match="fused quantizer kernels computed fedcba9876543210"):
        fit(cfg, run, resume=True, progress=False, log=lambda s: None)
    del env["arithmetic_kernels"], env["resumes"]  # a record from before the field resumes on `arithmetic` alone
    (run / "env.json").write_text(json.dumps(env))
    final = fit(cfg, run, resume=True, progress=False, log=lambda s: None)
    assert final["arithmetic"] == env["arithmetic"]
    assert final["arithmetic_kernels"] == arithmetic.kernels_fingerprint(CPU, "fp32", "lsq")  # the resume's


@pytest.mark.parametrize("compiled", ["0", "1"])
def test_the_kernels_fingerprint_sees_what_the_tiny_step_cannot(compiled, monkeypatch):
    """The tiny step's activations are below FUSE_MIN_NUMEL, so it never runs the fused quantizer kernels; their
    fingerprint moves when one of them changes by one ulp, and tells compiled kernels from eager ones (their
    step-gradient sums differ in the last bits)."""
    from vaqkd.quant import ste

    monkeypatch.setenv("VAQKD_COMPILE", compiled)
    monkeypatch.setattr(ste, "lsq_backward", ste.Fused(ste._lsq_backward))  # fresh: compiled per VAQKD_COMPILE
    kinds = {a: arithmetic.kernels_fingerprint(CPU, "fp32", a) for a in ("lsq", "pact", "ewgs")}
    assert arithmetic.kernels_fingerprint(CPU, "fp32", "lsq") == kinds["lsq"]  # repeatable
    tiny = arithmetic.fingerprint(CPU, "fp32")

    def one_ulp_off(*args):
        dx, ds = ste._lsq_backward(*args)
        return dx, torch.nextafter(ds, ds + 1)

    monkeypatch.setattr(ste, "lsq_backward", ste.Fused(one_ulp_off))
    assert arithmetic.kernels_fingerprint(CPU, "fp32", "lsq") != kinds["lsq"]
    assert arithmetic.fingerprint(CPU, "fp32") == tiny  # the tiny step never reached that kernel
    if compiled == "1" and ste.lsq_backward.fn is not ste.lsq_backward.eager:  # compilation worked here
        monkeypatch.setattr(ste, "lsq_backward", ste.Fused(ste._lsq_backward))
        monkeypatch.setenv("VAQKD_COMPILE", "0")
        assert arithmetic.kernels_fingerprint(CPU, "fp32", "lsq") != kinds["lsq"]  # eager != compiled


def _rec(seed, acc, arith):
    return {"seed": seed, "top1_last": acc, "top1_best": acc, "device": "cpu x", "cpu_capability": "AVX2",
            "precision": "fp32", "threads": 1, "world_size": 1, "arithmetic": arith, "train_seconds": 1.0,
            "epochs": 3, "train_images": 10}  # fmt: skip


def test_reports_never_pair_or_average_two_arithmetics():
    qkd = [_rec(0, 40.0, "a"), _rec(1, 41.0, "a"), _rec(2, 50.0, "b"), _rec(3, 51.0, "b"), _rec(4, 45, "unknown")]
    va = [_rec(0, 40.5, "a"), _rec(1, 41.5, "a"), _rec(2, 52.0, "b"), _rec(3, 53.0, "b"), _rec(4, 46, "b")]
    pairs = paired_rows({"qkd_logit": qkd, "vaqkd_logit": va})
    assert sorted((p["arithmetic"], p["n"], p["mean"]) for p in pairs) == [("a", 2, 0.5), ("b", 2, 2.0)]
    assert all(p["cross_arithmetic_pairs_left_out"] == 1 for p in pairs)  # seed 4: unknown against b
    rows = summary_rows({"qkd_logit": qkd})
    assert sorted((r["seeds"], r["top1_last_mean"]) for r in rows) == [(1, 45.0), (2, 40.5), (2, 50.5)]
    assert all("[" in r["row"] and r["records_of_other_kinds"] == 5 - r["seeds"] for r in rows)
    assert [len(g) for g in run_groups(va)] == [3, 2]


def test_reports_hold_apart_two_kernel_arithmetics_and_pair_records_without_one():
    qkd = [_rec(s, 40.0 + s, "a") for s in range(3)]
    va = [_rec(s, 41.0 + s, "a") for s in range(3)]
    for r, k in zip(qkd + va, ["k1", "k2", None] * 2):
        if k is not None:
            r["arithmetic_kernels"] = k
    pairs = paired_rows({"qkd_logit": qkd, "vaqkd_logit": va})
    assert sorted(p["n"] for p in pairs) == [1, 2]  # k1 with the record that lacks it; k2 alone
    assert sum(p["cross_arithmetic_pairs_left_out"] for p in pairs) == 0
    assert all(p["pairs_with_unknown_machine_fields"] == 0 for p in pairs)  # a record without it is not "unknown"
    assert sorted(len(g) for g in run_groups(qkd)) == [1, 2]
    # a record without the field first: it may join k1 or k2, never bring the two together
    first = [qkd[2], qkd[0], qkd[1]]
    assert sorted(sorted(r.get("arithmetic_kernels") or "-" for r in g) for g in run_groups(first)) == [
        ["-", "k1"], ["k2"]]
    rows = summary_rows({"qkd_logit": first})
    assert sorted(r["seeds"] for r in rows) == [1, 2] and len({r["row"] for r in rows}) == 2  # two labelled lines
    va_first = [va[2], va[0], va[1]]
    for r in va_first:  # VA-QKD records without the field, QKD's with it: the pairs still split by QKD's kernels
        r.pop("arithmetic_kernels", None)
    pairs = paired_rows({"qkd_logit": qkd, "vaqkd_logit": va_first})
    assert sorted(p["n"] for p in pairs) == [1, 2]


def test_a_seed_run_on_two_kinds_pairs_within_each_and_the_pooled_interval_counts_it_once():
    """Records of one seed on two kinds (the same experiment in fp32 and bf16, say) each pair with their own kind's
    partner (keyed by seed alone, one pair was dropped); the pooled line holds every pair of the comparison, each
    within one kind, a seed once."""
    from vaqkd.analysis.report import pooled_rows

    qkd = [_rec(0, 40.0, "a"), _rec(0, 42.0, "b"), _rec(1, 41.0, "a"), _rec(2, 43.0, "c")]
    va = [_rec(0, 41.0, "a"), _rec(0, 42.5, "b"), _rec(1, 41.5, "a"), _rec(2, 44.0, "c")]
    pairs = paired_rows({"qkd_logit": qkd, "vaqkd_logit": va})
    got = sorted((p["arithmetic"], p["seeds"], p["differences"]) for p in pairs)
    assert got == [("a", [0, 1], [1.0, 0.5]), ("b", [0], [0.5]), ("c", [2], [1.0])]
    assert all(p["cross_arithmetic_pairs_left_out"] == 0 for p in pairs)
    (pooled,) = pooled_rows(pairs)
    assert pooled["comparison"] == "vaqkd_logit - qkd_logit [pooled over 2 kinds, each pair within one]"
    assert (pooled["n"], pooled["seeds"], pooled["same_seed_pairs_left_out"]) == (3, [0, 1, 2], 1)
    assert sorted(pooled["n_by_kind"].values()) == [1, 2]
    assert pooled["mean"] == pytest.approx(2.5 / 3) and pooled["lo"] < pooled["mean"] < pooled["hi"]
    assert pooled_rows(paired_rows({"qkd_logit": qkd[:1] + qkd[2:3], "vaqkd_logit": va[:1] + va[2:3]})) == []
    # two kinds holding the same seeds: once each seed counts once, one kind is left: no pooled line
    assert pooled_rows(paired_rows({"qkd_logit": qkd[:2], "vaqkd_logit": va[:2]})) == []
    # a record with no partner of its kind is left out and counted, by what differs
    lone = paired_rows({"qkd_logit": qkd[:2], "vaqkd_logit": [dict(va[0], cpu_capability="AVX512"), va[1], va[2]]})
    assert [(p["n"], p["cross_machine_pairs_left_out"], p["cross_arithmetic_pairs_left_out"]) for p in lone] == [
        (1, 1, 0)]  # seed 0: b pairs, a on AVX512 finds only an AVX2 partner; seed 1 has no QKD record
    # a record with no partner left on the other side is unpaired, not "left out", in either order
    for extra in ([va[0], va[1]], [va[1], va[0]]):
        (only_b,) = paired_rows({"qkd_logit": [qkd[1]], "vaqkd_logit": extra})
        assert (only_b["n"], only_b["cross_arithmetic_pairs_left_out"], only_b["cross_machine_pairs_left_out"]) == (
            1, 0, 0)


def test_a_run_of_a_seed_and_kind_already_reported_is_left_out_not_counted_twice():
    """Two records of one seed and one kind are one run under two names (precision fp32 and auto on a CPU compute
    alike): the report keeps the first (the row's own config), never a second seed of it."""
    from vaqkd.analysis.kinds import one_per_seed_and_kind
    from vaqkd.analysis.report import pooled_rows

    qkd = [_rec(0, 40.0, "a"), _rec(0, 40.0, "a"), _rec(1, 41.0, "a"), _rec(0, 42.0, "b")]
    kept, repeats = one_per_seed_and_kind(qkd)
    assert kept == [qkd[0], qkd[2], qkd[3]] and repeats == [qkd[1]]
    va = [_rec(0, 41.0, "a"), _rec(0, 41.0, "a"), _rec(1, 41.5, "a"), _rec(2, 44.0, "b"), _rec(2, 44.0, "b")]
    pairs = paired_rows({"qkd_logit": kept, "vaqkd_logit": one_per_seed_and_kind(va)[0]})
    assert sorted((p["arithmetic"], p["seeds"]) for p in pairs) == [("a", [0, 1])]
    # the pooled line, given a line with a seed twice (a report built without the filter), counts it once
    twice = {"comparison": "x - y [a]", "n": 2, "seeds": [0, 0], "differences": [1.0, 1.0]}
    other = {"comparison": "x - y [b]", "n": 1, "seeds": [3], "differences": [0.0]}
    (p,) = pooled_rows([twice, other])
    assert (p["n"], p["same_seed_pairs_left_out"]) == (2, 1)


def test_a_pair_is_of_the_machine_either_record_names_and_no_comparison_is_dropped():
    qkd = [_rec(0, 40.0, "a"), *(dict(_rec(s, 40.0 + s, "a"), cpu_capability="AVX512") for s in (1, 2))]
    va = [_rec(s, 41.0 + s, "a") for s in range(3)]
    va[0].pop("cpu_capability")  # seed 0: AVX2 by its QKD record; seeds 1-2: AVX512 on both sides
    for r in va[1:]:
        r["cpu_capability"] = "AVX512"
    pairs = paired_rows({"qkd_logit": qkd, "vaqkd_logit": va})
    assert sorted((p["n"], p["seeds"]) for p in pairs) == [(1, [0]), (2, [1, 2])]  # never one interval of three
    assert {p["comparison"].split("[")[1] for p in pairs} == {
        "a, cpu x, AVX2, fp32, 1 thread]", "a, cpu x, AVX512, fp32, 1 thread]"}
    other = [_rec(s, 41.0, "b") for s in range(3)]  # common seeds, none pairable: a line that says so
    (none,) = paired_rows({"qkd_logit": qkd, "vaqkd_logit": other})
    assert none["n"] == 0 and none["verdict"] == "no pair of one arithmetic and machine kind"
    assert none["cross_arithmetic_pairs_left_out"] == 3


def test_groups_that_differ_in_any_machine_field_have_labels_that_say_so_and_unknowns_do_not_mix():
    runs = [_rec(0, 40.0, "a"), _rec(1, 41.0, "a"), dict(_rec(2, 50.0, "a"), world_size=2)]
    labels = sorted(r["row"] for r in summary_rows({"qkd_logit": runs}))
    assert labels == ["qkd_logit [a, cpu x, AVX2, fp32, 1 thread, 2 processes]",
                      "qkd_logit [a, cpu x, AVX2, fp32, 1 thread]"]  # fmt: skip
    old = {k: v for k, v in _rec(3, 42.0, "a").items() if k not in ("cpu_capability", "threads")}  # older record
    (row,) = summary_rows({"qkd_logit": [old, _rec(4, 43.0, "a")]})
    assert row["trained_on"] == "a, cpu x, AVX2, fp32, 1 thread"  # what either record knows, in any order
    unknown = [_rec(0, 40.0, "unknown"), dict(_rec(1, 60.0, "unknown"), device="NVIDIA H100")]
    rows = summary_rows({"qkd_logit": unknown})
    assert sorted((r["seeds"], r["top1_last_mean"]) for r in rows) == [(1, 40.0), (1, 60.0)]
    assert all(r["row"].startswith("qkd_logit [unknown arithmetic, ") for r in rows)


def test_a_chain_is_of_the_kind_of_all_its_stages(tmp_path):
    """TAKD's row record is its student's final.json with `stages`: an assistant trained on other arithmetic
    makes the chain of neither kind."""
    chains = []
    for seed in range(3):
        stages = []
        for stage, arith in (("w8a8", "OTHER" if seed == 1 else "a"), ("w2a2", "a")):
            d = tmp_path / f"{stage}-s{seed}"
            d.mkdir()
            (d / "env.json").write_text(json.dumps({"device_name": "cpu x", "arithmetic": arith}))
            stages.append({"run_dir": str(d)})
        chains.append(dict(_rec(seed, 41.0, "a"), run_dir=stages[-1]["run_dir"], stages=stages))
    assert sorted(len(g) for g in run_groups(chains)) == [1, 2]
    (odd,) = [r for r in summary_rows({"takd": chains}) if r["seeds"] == 1]
    assert odd["arithmetic"] == "OTHER + a" and odd["records_of_other_kinds"] == 2


def test_pairs_resting_on_a_record_without_a_part_fingerprint_are_counted():
    qkd, va = [_rec(s, 40.0 + s, "a") for s in range(2)], [_rec(s, 41.0 + s, "a") for s in range(2)]
    for r in (*qkd, va[1]):
        r["arithmetic_kernels"] = "k1"  # VA-QKD seed 0 predates the key
    (p,) = paired_rows({"qkd_logit": qkd, "vaqkd_logit": va})
    assert p["n"] == 2 and p["pairs_lacking_a_part_fingerprint"] == 1 and p["pairs_with_unknown_machine_fields"] == 0


def test_the_residual_fingerprint_sees_the_integer_stream_that_the_others_cannot(monkeypatch):
    """An integer-residual run's block path (its 8-bit requantization, the stream's codes on the shortcut) is not
    in the tiny step nor in the kernels' fingerprint: a one-ulp change there moves only `residual_fingerprint`."""
    from vaqkd.quant.residual import IntResidualBlock

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    before = arithmetic.residual_fingerprint(CPU, "fp32")
    assert torch.equal(torch.rand(3), expected)  # the run's own random draws are not moved by it
    assert arithmetic.residual_fingerprint(CPU, "fp32") == before  # repeatable
    tiny, kernels = arithmetic.fingerprint(CPU, "fp32"), arithmetic.kernels_fingerprint(CPU, "fp32", "lsq")
    real = IntResidualBlock.forward

    for wide_only in (True, False):  # the 8-bit stream's own path (its stream quantizer), then every block

        def one_ulp_off(self, x, wide_only=wide_only):
            out = real(self, x)
            return torch.nextafter(out, out + 1) if hasattr(self, "stream_quant") or not wide_only else out

        monkeypatch.setattr(IntResidualBlock, "forward", one_ulp_off)
        assert arithmetic.residual_fingerprint(CPU, "fp32") != before
        assert arithmetic.fingerprint(CPU, "fp32") == tiny
        assert arithmetic.kernels_fingerprint(CPU, "fp32", "lsq") == kernels


def test_a_float32_run_from_before_the_integer_conv_is_told_how_to_resume(shared_cifar_root, tmp_path, monkeypatch):
    """A float32 CPU run that trained with the float32 convolution (before `quant.intconv`) is refused with the
    switch named, and resumes with it; another arithmetic is refused without that hint."""
    from vaqkd.quant import intconv

    if not intconv.enabled():
        pytest.skip("no integer convolution here")
    cfg = _tiny(shared_cifar_root)
    run = tmp_path / "run"
    monkeypatch.setenv("VAQKD_INT_CONV", "0")
    fit(cfg, run, progress=False, log=lambda s: None, stop_after_steps=2)
    monkeypatch.delenv("VAQKD_INT_CONV")
    with pytest.raises(RunFileError, match="resume it with VAQKD_INT_CONV=0"):
        fit(cfg, run, resume=True, progress=False, log=lambda s: None)
    text = (run / "env.json").read_text()
    (run / "env.json").write_text(json.dumps({**json.loads(text), "arithmetic": "0123456789abcdef"}))
    with pytest.raises(RunFileError, match="refusing to resume: rerun in another --out$"):
        fit(cfg, run, resume=True, progress=False, log=lambda s: None)
    (run / "env.json").write_text(text)
    monkeypatch.setenv("VAQKD_INT_CONV", "0")
    final = fit(cfg, run, resume=True, progress=False, log=lambda s: None)
    assert final["arithmetic"] == json.loads(text)["arithmetic"] == arithmetic.fingerprint(CPU, "fp32")


def test_integer_residual_runs_record_their_stream_and_refuse_to_resume_on_another(shared_cifar_root, tmp_path):
    float_cfg = _tiny(shared_cifar_root)
    fit(float_cfg, tmp_path / "float", progress=False, log=lambda s: None, stop_after_steps=1)
    assert json.loads((tmp_path / "float" / "env.json").read_text())["arithmetic_residual"] is None
    cfg = load_config(None, [*_tiny_sets(shared_cifar_root), "quant.residual=int"])
    run = tmp_path / "int"
    fit(cfg, run, progress=False, log=lambda s: None, stop_after_steps=1)
    env = json.loads((run / "env.json").read_text())
    assert env["arithmetic_residual"] == arithmetic.residual_fingerprint(CPU, "fp32")
    env["arithmetic_residual"] = "00112233aabbccdd"
    (run / "env.json").write_text(json.dumps(env))
    with pytest.raises(RunFileError, match="integer residual stream computed 00112233aabbccdd"):
        fit(cfg, run, resume=True, progress=False, log=lambda s: None)


def test_reports_pair_an_integer_run_with_its_float_partner_but_hold_two_streams_apart():
    flt = [_rec(s, 40.0 + s, "a") for s in range(3)]
    ints = [_rec(s, 39.0 + s, "a") for s in range(3)]
    for r, k in zip(ints, ["r1", "r1", "r2"]):
        r["arithmetic_residual"] = k
    pairs = paired_rows({"qkd_logit": flt, "vaqkd_logit": ints})  # any two rows pair the same way
    assert sorted(p["n"] for p in pairs) == [1, 2]  # by the integer runs' streams; the float runs lack the field
    assert all(p["pairs_with_unknown_machine_fields"] == 0 for p in pairs)
    assert sorted(len(g) for g in run_groups(ints)) == [1, 2]
    assert len({r["row"] for r in summary_rows({"vaqkd_logit": ints})}) == 2  # two labelled lines


def test_the_quantizers_fingerprint_sees_the_non_lsq_quantizers_that_the_others_cannot(monkeypatch):
    """The tiny step's quantizers are LSQ, and `kernels_fingerprint` runs activation kernels only: EWGS's fused
    kernel on weights (a WRN's widest convs) and DoReFa's weights moved no key. A one-ulp change of either moves
    `quantizers_fingerprint` for runs that use them, and nothing else; LSQ runs have none."""
    from vaqkd.quant import ste
    from vaqkd.quant.quantizers import DoReFaQuantizer

    assert arithmetic.quantizers_fingerprint(CPU, "fp32", "lsq", "lsq") is None
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    kinds = {(w, a): arithmetic.quantizers_fingerprint(CPU, "fp32", w, a)
             for w, a in (("ewgs", "lsq"), ("dorefa", "lsq"), ("lsq", "pact"))}  # fmt: skip
    assert torch.equal(torch.rand(3), expected)  # the run's own random draws are not moved by it
    assert len(set(kinds.values())) == 3
    assert arithmetic.quantizers_fingerprint(CPU, "fp32", "ewgs") == kinds["ewgs", "lsq"]  # repeatable
    tiny, kernels = arithmetic.fingerprint(CPU, "fp32"), arithmetic.kernels_fingerprint(CPU, "fp32", "lsq")

    def one_ulp_off(*args):
        dx, d_lo, d_hi = ste._ewgs_backward(*args)
        return dx, torch.nextafter(d_lo, d_lo + 1), d_hi

    monkeypatch.setattr(ste, "ewgs_backward", ste.Fused(one_ulp_off))  # the fused kernel only: weights above 64k
    assert arithmetic.quantizers_fingerprint(CPU, "fp32", "ewgs", "lsq") != kinds["ewgs", "lsq"]
    assert arithmetic.quantizers_fingerprint(CPU, "fp32", "dorefa", "lsq") == kinds["dorefa", "lsq"]
    real = DoReFaQuantizer.forward
    def dorefa_one_ulp_off(self, x):
        y = real(self, x)
        return torch.nextafter(y, y + 1)

    monkeypatch.setattr(DoReFaQuantizer, "forward", dorefa_one_ulp_off)
    assert arithmetic.quantizers_fingerprint(CPU, "fp32", "dorefa", "lsq") != kinds["dorefa", "lsq"]
    assert arithmetic.quantizers_fingerprint(CPU, "fp32", "lsq", "pact") == kinds["lsq", "pact"]
    assert arithmetic.fingerprint(CPU, "fp32") == tiny and arithmetic.kernels_fingerprint(CPU, "fp32", "lsq") == kernels


def test_runs_with_other_quantizers_record_them_and_refuse_to_resume_on_another(shared_cifar_root, tmp_path):
    lsq = tmp_path / "lsq"
    fit(_tiny(shared_cifar_root), lsq, progress=False, log=lambda s: None, stop_after_steps=1)
    assert json.loads((lsq / "env.json").read_text())["arithmetic_quantizers"] is None
    cfg = load_config(None, [*_tiny_sets(shared_cifar_root), "quant.weight=dorefa"])
    run = tmp_path / "dorefa"
    fit(cfg, run, progress=False, log=lambda s: None, stop_after_steps=1)
    env = json.loads((run / "env.json").read_text())
    assert env["arithmetic_quantizers"] == arithmetic.quantizers_fingerprint(CPU, "fp32", "dorefa", "lsq")
    env["arithmetic_quantizers"] = "00112233aabbccdd"
    (run / "env.json").write_text(json.dumps(env))
    with pytest.raises(RunFileError, match="its non-LSQ quantizers computed 00112233aabbccdd"):
        fit(cfg, run, resume=True, progress=False, log=lambda s: None)

"""Which records may be compared: a run's machine kind (device, CPU capability, precision, threads, processes
and its training-arithmetic fingerprints, read from env.json and its resumes), whether two runs pair, and the
groups a row's records average in. `vaqkd table`'s report (`analysis.report`) and the pairing benchmarks use it."""

from __future__ import annotations

import json
from pathlib import Path

from vaqkd.rundir import MACHINE_ENV_KEYS, NOT_APPLICABLE, PART_FINGERPRINTS, run_machine

MACHINE_FIELDS = tuple(MACHINE_ENV_KEYS)  # device, cpu_capability, precision, threads, world_size, arithmetic(s)
# compared where both records hold them, never counted as missing: the fused kernels' fingerprint, which FP32 runs
# and records older than it do not have, and the integer residual stream's, which only such runs have
# (engine.arithmetic, rundir.PART_FINGERPRINTS)
OPTIONAL_FIELDS = tuple(PART_FINGERPRINTS)
# of those, the one a pair may hold on one side by design: the integer residual stream's (an integer run and its
# float-residual partner); the others on one side of a pair of two quantized runs mean a record older than the key
ONE_SIDED_BY_DESIGN = ("arithmetic_residual",)


def machine_kind(final: dict) -> tuple:
    """What must match for two runs to be bit-comparable: CPU/GPU name, its capability, precision, threads and
    the number of processes (torchrun world size). Read from the run's env.json where the record says where it
    lies (the start and every resume: a run resumed on another machine is of a mixed kind, `run_machine`), else
    from final.json; a field neither records (written before the field existed) is None. A chain of runs (TAKD's
    assistants and student, `final["stages"]`) is of the kind of all its stages: a field that differs between
    them holds each value, " + "-joined, as for a resume. A GPU run's host fields are "n/a" (`rundir.run_machine`);
    a GPU record from before that rule with no env.json beside it keeps its host CPU's fields from final.json and
    pairs only with GPU runs of the same host threads (every committed GPU record has its env.json)."""
    kind = {k: final.get(k) for k in MACHINE_FIELDS}
    dirs = [s["run_dir"] for s in final.get("stages", []) if s.get("run_dir")] or [final.get("run_dir")]
    parts = []
    for d in filter(None, dirs):
        if (Path(d) / "env.json").exists():
            env = json.loads((Path(d) / "env.json").read_text())
            parts += [env, *env.get("resumes", [])]
    if parts:
        kind.update({k: v for k, v in run_machine({**parts[0], "resumes": parts[1:]}).items() if v is not None})
    return tuple(kind[k] for k in MACHINE_FIELDS)


def arithmetic_of(final: dict) -> str:
    """The run's training-arithmetic fingerprint (env.json's `arithmetic`, `engine.arithmetic`; a " + "-joined
    sequence for a run resumed on other arithmetic), "unknown" when its record has none."""
    return machine_kind(final)[MACHINE_FIELDS.index("arithmetic")] or "unknown"


def same_machine(a: dict, b: dict) -> tuple[bool, bool]:
    """(pairable, relied on an unknown field): two runs pair when they share one known arithmetic and every
    machine field both records know is equal; a machine field one of them lacks (records older than the field)
    is not held against the pair, but the pair is counted as resting on it (except `OPTIONAL_FIELDS`, which only
    some records can have). An unknown arithmetic pairs with nothing."""
    if arithmetic_of(a) == "unknown" or arithmetic_of(a) != arithmetic_of(b):
        return False, False
    ka, kb = machine_kind(a), machine_kind(b)
    lacking = [f for f, x, y in zip(MACHINE_FIELDS, ka, kb) if (x is None or y is None) and f not in OPTIONAL_FIELDS]
    return _known_agree(ka, kb), bool(lacking)


def _known_agree(ka: tuple, kb: tuple) -> bool:
    """Every machine field both kinds know is equal."""
    return all(x == y for x, y in zip(ka, kb) if x is not None and y is not None)


def lacks_part_fingerprint(a: dict, b: dict) -> bool:
    """One run of the pair records a part fingerprint that the other lacks where both should hold it (a record
    older than the key: it may have computed with other kernels); such pairs are kept and counted."""
    ka, kb = dict(zip(MACHINE_FIELDS, machine_kind(a))), dict(zip(MACHINE_FIELDS, machine_kind(b)))
    return any((ka[f] is None) != (kb[f] is None) for f in OPTIONAL_FIELDS if f not in ONE_SIDED_BY_DESIGN)


def run_groups(finals: list[dict]) -> list[list[dict]]:
    """A row's records in groups that may be averaged: each run joins the first group with every run of which it
    pairs (`same_machine`; every run, not the first alone: a record that lacks a field pairs with two runs that
    differ in it, which must not end up together); largest group first. Runs of unknown arithmetic group only
    with each other, and only where every machine field they both record agrees."""
    groups: list[list[dict]] = []

    def fits(g: list[dict], f: dict) -> bool:
        if "unknown" in (arithmetic_of(g[0]), arithmetic_of(f)):
            return arithmetic_of(g[0]) == arithmetic_of(f) and all(
                _known_agree(machine_kind(m), machine_kind(f)) for m in g)
        return all(same_machine(m, f)[0] for m in g)

    for f in finals:
        home = next((g for g in groups if fits(g, f)), None)
        if home is None:
            groups.append([f])
        else:
            home.append(f)
    return sorted(groups, key=len, reverse=True)


def group_label(group: dict | list[dict]) -> str:
    """A short name for a group of runs (or one run): its arithmetic and every machine field that can set groups
    apart (device name, CPU capability, precision, threads, processes where more than one), each field as the
    first record of the group that knows it says (a record older than the field leaves it to the others)."""
    kind = merged_kind(group if isinstance(group, list) else [group])
    kind["arithmetic"] = "unknown arithmetic" if kind["arithmetic"] in (None, "unknown") else kind["arithmetic"]
    for field, (name, _) in PART_FINGERPRINTS.items():
        if kind[field] is not None:
            kind[field] = f"{name} {str(kind[field])[:8]}"
    if kind["threads"] not in (None, NOT_APPLICABLE):
        kind["threads"] = f"{kind['threads']} thread{'s' if kind['threads'] != 1 else ''}"
    kind["world_size"] = None if kind["world_size"] in (None, 1) else f"{kind['world_size']} processes"
    fields = ("arithmetic", *PART_FINGERPRINTS, "device", "cpu_capability", "precision", "threads", "world_size")
    return ", ".join(str(kind[k]) for k in fields if kind[k] not in (None, NOT_APPLICABLE))


def merged_kind(records: list[dict]) -> dict:
    """Each machine field as the first of `records` that knows it says (a record older than a field leaves it to
    the others): the kind of a group of runs, or of a pair."""
    kinds = [machine_kind(f) for f in records]
    return {k: next((v for v in values if v is not None), None) for k, values in zip(MACHINE_FIELDS, zip(*kinds))}


def pair_kind(a: dict, b: dict) -> dict:
    """A pair's record for grouping pairs: `a`'s machine kind, with every field it lacks taken from `b` (a pair
    whose QKD run has kernels k2 is a k2 pair even when its VA-QKD record predates the field; one whose QKD run
    says AVX2 is an AVX2 pair even when its VA-QKD record does not say)."""
    return {**{k: v for k, v in a.items() if k not in ("run_dir", "stages")}, **merged_kind([a, b])}


def one_per_seed_and_kind(finals: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, repeats): of a row's records, the first of each seed and kind (`same_machine`); a later one is the
    same run under another name (e.g. `train.precision = "fp32"` against `"auto"` on a CPU, which compute alike)
    and would count one seed twice."""
    kept, repeats = [], []
    for f in finals:
        twin = any(k["seed"] == f["seed"] and same_machine(k, f)[0] for k in kept)
        (repeats if twin else kept).append(f)
    return kept, repeats

"""The run directory: its files (config.toml, env.json, metrics.jsonl, final.json, checkpoints) read with
one-line errors and written atomically, the run lock, the machine a run trained on, and weights by spec (shipped,
a run directory or a file) with the model a run directory holds. Analysis, deploy and the runner read runs here.

Its parts: files (atomic writes, checked reads), checkpoint, lock, machine, weights.
"""

from vaqkd.rundir.checkpoint import (
    checkpoints,
    foreign_entries,
    has_checkpoint,
    holds_run,
    latest_checkpoint,
    load_checkpoint,
    load_module,
    read_safetensors,
    run_weights,
    save_checkpoint,
)
from vaqkd.rundir.files import (
    NUMBER,
    DiskFullError,
    atomic_write,
    check_fields,
    check_file_target,
    read_json,
    read_jsonl,
    write_json,
)
from vaqkd.rundir.lock import RunLock
from vaqkd.rundir.machine import HOST_FIELDS, MACHINE_ENV_KEYS, NOT_APPLICABLE, PART_FINGERPRINTS, run_machine
from vaqkd.rundir.weights import (
    PRETRAINED,
    build_student,
    load_run,
    load_weights,
    pretrained_names,
    resolve_weights,
    run_config,
    run_model,
)

__all__ = [
    "DiskFullError", "NUMBER", "atomic_write", "check_fields", "check_file_target", "read_json", "read_jsonl",
    "write_json", "checkpoints", "foreign_entries", "has_checkpoint", "holds_run", "latest_checkpoint",
    "load_checkpoint", "load_module", "read_safetensors", "run_weights", "save_checkpoint", "RunLock", "HOST_FIELDS",
    "MACHINE_ENV_KEYS", "NOT_APPLICABLE", "PART_FINGERPRINTS", "run_machine", "PRETRAINED", "build_student",
    "load_run", "load_weights", "pretrained_names", "resolve_weights", "run_config", "run_model",
]  # fmt: skip

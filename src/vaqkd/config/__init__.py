"""Experiment configuration: frozen dataclasses, a TOML loader, and `--set section.key=value` overrides.

Every field is typed and range-checked; an unknown key, a wrong type or an out-of-range value stops the
program before any work, with an error that names the key. The resolved config is written into every run
directory (`to_toml`), and that file loads back to the same config.

The parts: `schema` (the dataclasses and their checks), `tables` (config <-> tables, TOML out), `files` (config
files, overrides, `load_config`), `identity` (a run's identity text, arithmetic settings, differences)."""

from vaqkd.config.files import Override, apply_override, load_config, load_dict, merge, override_key, validated
from vaqkd.config.identity import ARITHMETIC_SETTINGS, LATER_DEFAULTS, canonical_text, differences, identity
from vaqkd.config.schema import (
    COUNT_MAX,
    LEGACY_TERM_KEYS,
    Config,
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    TermConfig,
    TrainConfig,
    device_name_ok,
)
from vaqkd.config.tables import from_dict, to_dict, to_toml
from vaqkd.errors import ConfigError  # the error of every check here (defined with the others in vaqkd.errors)

__all__ = ["ARITHMETIC_SETTINGS", "COUNT_MAX", "LATER_DEFAULTS", "LEGACY_TERM_KEYS", "Config", "ConfigError",
           "DataConfig", "DistillConfig", "ModelConfig", "OptimConfig", "Override", "QuantConfig", "TermConfig",
           "TrainConfig", "apply_override", "canonical_text", "device_name_ok", "differences", "from_dict", "identity",
           "load_config", "load_dict", "merge", "override_key", "to_dict", "to_toml", "validated"]  # fmt: skip

"""Read params.yaml: the one place that holds every knob of the pipeline, validated by table2text.config.

load_params(path) -> {group: {key: value}} with every key present (defaults from table2text.config), so
`params["train"]["seed"]` never needs a `.get(key, default)`; load_config(path) gives the typed Config.
Any bad setting raises table2text.config.ConfigError naming the file and the key.
"""

from __future__ import annotations

import os
from pathlib import Path

from table2text.config import Config, ConfigError, load_config

PARAMS_FILE = Path("params.yaml")
PARAMS_ENV = "TOTTO_PARAMS"
__all__ = ["PARAMS_FILE", "PARAMS_ENV", "ConfigError", "default_params_file", "load_config", "load_params",
           "validate_params"]


def default_params_file() -> Path:
    """The params file a stage reads when --params is not given: $TOTTO_PARAMS, else params.yaml."""
    return Path(os.environ.get(PARAMS_ENV) or PARAMS_FILE)


def load_params(path: str | Path | None = None) -> dict:
    """The validated settings of `path` (default: default_params_file()) as plain dicts."""
    return load_config(default_params_file() if path is None else path).to_dict()


def validate_params(params: dict) -> dict:
    """Validate settings built in code (tests, benchmarks); returns a copy with every key present."""
    return Config.from_dict(params).to_dict()

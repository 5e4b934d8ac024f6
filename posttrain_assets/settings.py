"""The environment variables that configure the platform, and their defaults: one place, read by both the
``posttrain`` command (``cli.apply_environment_defaults``) and the Dagster resources (``defs/resources.py``), so
``dagster dev`` and ``dagster job execute`` run with no project variable set, exactly as ``posttrain`` does.

Relative defaults are resolved against the current directory when they are asked for. No Dagster imports here:
the command reads this before it decides whether to import Dagster at all.
"""

from __future__ import annotations

import os
from pathlib import Path

SOURCES = "POSTTRAIN_SOURCES"
DUCKDB_PATH = "POSTTRAIN_DUCKDB_PATH"
TOKENIZER = "POSTTRAIN_TOKENIZER"
CACHE_DIR = "POSTTRAIN_CACHE_DIR"
# Curation (docs/curation.md) is opt-in: "on" puts its assets into the refresh_corpus job; the `curate` job runs
# them either way. Mixture spec files, separated by the OS path separator (":"); empty: no mixture.
CURATION = "POSTTRAIN_CURATION"
MIXTURES = "POSTTRAIN_MIXTURES"


def environment_defaults() -> dict[str, str]:
    """Each variable's documented default (README, Configuration), paths absolute."""
    return {
        SOURCES: str(Path("data/demo/sources.yaml").resolve()),
        DUCKDB_PATH: str(Path("data/posttrain.duckdb").resolve()),
        TOKENIZER: "smollm2",
        CACHE_DIR: str(Path("~/.cache/posttrain_assets").expanduser()),
    }


# The opt-in stages' variables: unset means off, so `posttrain` leaves them out of the environment it fills in.
OPT_IN_DEFAULTS = {CURATION: "off", MIXTURES: ""}


def setting(name: str) -> str:
    """The variable's value, or its default when it is unset or empty."""
    return os.environ.get(name) or {**environment_defaults(), **OPT_IN_DEFAULTS}[name]


# Where posttrain_assets.parallel.map_batches runs its batches (docs/scale-out.md): "local", worker processes on this
# machine (the default, also when unset), or "ray", tasks on the Ray cluster at Ray's own RAY_ADDRESS.
EXECUTOR = "POSTTRAIN_EXECUTOR"
EXECUTORS = ("local", "ray")
RAY_ADDRESS = "RAY_ADDRESS"


def executor() -> str:
    """The configured executor, ``local`` when unset or empty; any other value is an error naming the variable."""
    value = os.environ.get(EXECUTOR) or "local"
    if value not in EXECUTORS:
        raise ValueError(f"{EXECUTOR}={value!r}: expected one of {', '.join(EXECUTORS)}")
    return value


# The policy backend of the RL difficulty rollouts (docs/rl-bank.md) when the run config leaves it empty: "torch"
# (CPU, the default, also when unset) or "vllm" (the optional extra, needs a GPU).
POLICY_BACKEND = "POSTTRAIN_POLICY_BACKEND"
POLICY_BACKENDS = ("torch", "vllm")


def policy_backend() -> str:
    """The configured policy backend, ``torch`` when unset or empty; any other value is an error naming the
    variable."""
    value = os.environ.get(POLICY_BACKEND) or "torch"
    if value not in POLICY_BACKENDS:
        raise ValueError(f"{POLICY_BACKEND}={value!r}: expected one of {', '.join(POLICY_BACKENDS)}")
    return value


# "1": every per-row stage computes every row again instead of reading earlier runs' results from its cache
# (warehouse.stage_cache; `posttrain run --full` sets it). Unset, empty or "0": reuse what is still valid.
FULL_REBUILD = "POSTTRAIN_FULL_REBUILD"


def full_rebuild() -> bool:
    """Whether the configured run is a full rebuild; a value other than 0/1 is an error naming the variable."""
    value = os.environ.get(FULL_REBUILD) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"{FULL_REBUILD}={value!r}: expected 0 or 1")
    return value == "1"

"""The project's asset-check policy, applied once: every check runs in the ``duckdb`` pool and writes its verdict
to ``checks.verdicts`` in the warehouse, where the dataset cards read it (Dagster offers no public API to read
check evaluations back from the instance)."""

from __future__ import annotations

import datetime as dt
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from posttrain_assets.warehouse.verdicts import record_verdict

CheckFn = Callable[..., dg.AssetCheckResult]


def warehouse_check(*, asset: Sequence[str], **spec: Any) -> Callable[[CheckFn], dg.AssetChecksDefinition]:
    """``dg.asset_check`` for a check whose function takes the warehouse as its ``duckdb`` resource; its verdict is
    also recorded in ``checks.verdicts`` (also when the check is called directly, as the tests do)."""

    def decorate(fn: CheckFn) -> dg.AssetChecksDefinition:
        signature = inspect.signature(fn)
        check_name = spec.get("name", fn.__name__)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> dg.AssetCheckResult:
            warehouse: DuckDBResource = signature.bind(*args, **kwargs).arguments["duckdb"]
            # Opened before the check runs and kept open until its verdict is written: the check's own connections
            # (same file, same config) then share this open database instead of opening it a second time, and the
            # file is checkpointed once, when this one closes (100k warehouse: about 0.05 s of wall and 0.02 s of
            # CPU less per check; docs/performance.md).
            with warehouse.get_connection() as conn:
                result = fn(*args, **kwargs)
                record_verdict(
                    conn,
                    asset="/".join(asset),
                    check_name=check_name,
                    passed=result.passed,
                    severity=(result.severity or dg.AssetCheckSeverity.ERROR).value,
                    description=result.description,
                    evaluated_at=dt.datetime.now(dt.UTC),
                )
            return result

        return dg.asset_check(asset=list(asset), pool="duckdb", **spec)(run)

    return decorate

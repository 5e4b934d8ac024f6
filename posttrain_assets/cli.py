"""The ``posttrain`` command.

    posttrain demo            generate the bundled demo landing data and run the whole graph on it
    posttrain run [--full]    ingest every registry source and refresh silver and gold (only new rows are
                              parsed, gated, tokenised and proven; --full: every row)
    posttrain counts          print per-layer row counts of the DuckDB file
    posttrain show-mask ID    print one tokenised SFT row with its trained spans marked
    posttrain trace ID        print a gold row's provenance: silver, dedup twins, bronze row, file, source, license
    posttrain dev             start the Dagster UI on 127.0.0.1:3000 with these defaults

Environment (defaults in brackets, relative to the current directory):
POSTTRAIN_SOURCES [data/demo/sources.yaml], POSTTRAIN_DUCKDB_PATH [data/posttrain.duckdb],
POSTTRAIN_TOKENIZER [smollm2], POSTTRAIN_CACHE_DIR [~/.cache/posttrain_assets],
DAGSTER_HOME [.dagster_home, seeded with the project's dagster.yaml], POSTTRAIN_FULL_REBUILD [0].
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

from posttrain_assets import settings
from posttrain_assets.settings import environment_defaults

DEFAULT_DEMO_DIR = Path("data/demo")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


DEMO_GATE_NOTE = """
The demo plants a length-biased preference source (demo_pref_ultrafeedback: chosen is the longer response in
90% of its pairs). length_confound_check caught it, so gold.preference was not written; the balanced remedy,
gold.preference_length_balanced, passed the same gate and was. See silver.preference_audit for the statistics."""


def apply_environment_defaults() -> None:
    """Fill in the documented defaults (``settings.environment_defaults``, which the Dagster resources fall back
    to as well) for every variable the user did not set."""
    for name, default in environment_defaults().items():
        if not os.environ.get(name):
            os.environ[name] = default
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    Path(os.environ["POSTTRAIN_DUCKDB_PATH"]).parent.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="posttrain", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate the demo landing data and run the whole graph")
    demo.add_argument("--out", type=Path, default=DEFAULT_DEMO_DIR, help="where to write the demo landing data")
    demo.add_argument("--seed", type=int, default=7)
    run = commands.add_parser("run", help="ingest every registry source and refresh silver and gold")
    run.add_argument(
        "--full",
        action="store_true",
        help="compute every row again instead of reusing earlier runs' per-row results (POSTTRAIN_FULL_REBUILD=1)",
    )
    commands.add_parser("counts", help="print per-layer row counts")
    commands.add_parser("dev", help="start the Dagster UI (webserver and daemon) on 127.0.0.1")
    show = commands.add_parser("show-mask", help="print a tokenised SFT row with trained spans marked")
    show.add_argument("id", help="row id (a prefix is enough)")
    show.add_argument("--color", action="store_true", help="ANSI colours instead of ⟦ ⟧ brackets")
    trace = commands.add_parser("trace", help="print the provenance chain of a gold row")
    trace.add_argument("id", help="gold row id (a prefix is enough)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from posttrain_assets.demo.generator import generate_demo_data

        registry = generate_demo_data(args.out, seed=args.seed)
        os.environ["POSTTRAIN_SOURCES"] = str(Path(registry).resolve())
        print(f"demo landing data written to {args.out} (registry {registry})")
    apply_environment_defaults()
    if getattr(args, "full", False):
        os.environ[settings.FULL_REBUILD] = "1"

    if args.command == "dev":
        # dagster finds the code location in the project's pyproject.toml ([tool.dg]); every path above is absolute
        os.chdir(PROJECT_ROOT)
        dagster = Path(sys.executable).with_name("dagster")
        os.execv(dagster, [str(dagster), "dev", "-h", "127.0.0.1", "-p", "3000"])

    from posttrain_assets import pipeline, runs
    from posttrain_assets.ingest.registry import RegistryError

    if args.command in ("demo", "run"):
        try:
            report = pipeline.run_all()
        except (pipeline.RunFailed, RegistryError) as exc:  # the error itself, no traceback (that is in the UI)
            print(f"posttrain {args.command}: {exc}", file=sys.stderr)
            return 1
        except runs.WarehouseInUseError as exc:  # another process has the DuckDB file; nothing was written
            print(f"posttrain {args.command}: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (runs.RunInterrupted); a run it stopped is marked failed
            signum = getattr(exc, "signum", signal.SIGINT)
            print(f"posttrain {args.command}: stopped by {exc or signal.Signals(signum).name}", file=sys.stderr)
            return 128 + signum
        print(pipeline.format_counts(pipeline.layer_counts(os.environ["POSTTRAIN_DUCKDB_PATH"])))
        print(f"\nDuckDB file: {os.environ['POSTTRAIN_DUCKDB_PATH']}  (open it read-only with any DuckDB client)")
        print(f"Dagster instance: {os.environ['DAGSTER_HOME']}  (browse runs, lineage and checks: make dev)")
        failed = sorted({c.check.split(":")[1] for c in report.failed_checks})
        if args.command == "demo" and failed == ["length_confound_check"]:
            print(DEMO_GATE_NOTE)
        elif failed:
            print(f"\nblocking checks failed: {', '.join(failed)}; the assets behind them kept their last good state")
            return 1
    elif args.command == "counts":
        print(pipeline.format_counts(pipeline.layer_counts(os.environ["POSTTRAIN_DUCKDB_PATH"])))
    elif args.command == "trace":
        print(pipeline.trace_row(os.environ["POSTTRAIN_DUCKDB_PATH"], args.id))
    elif args.command == "show-mask":
        print(pipeline.show_mask(os.environ["POSTTRAIN_DUCKDB_PATH"], args.id, color=args.color))
    return 0


if __name__ == "__main__":
    sys.exit(main())

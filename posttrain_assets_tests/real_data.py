"""The real public data sets the tests read, vendored unchanged in ``posttrain_assets_tests/data`` (licenses and
origins in its README), so the suite passes from a bare clone."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(__file__).resolve().parent / "data"

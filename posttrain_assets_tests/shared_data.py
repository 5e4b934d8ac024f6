"""Where the real public data sets are: ``../shared/data`` beside the project (see its README).

``POSTTRAIN_SHARED_DATA`` overrides the location. Otherwise the first ``shared/data`` found beside the
project or beside any folder above it is used, so a clone at ``work/ci/main`` finds ``work/shared/data``.
Tests never skip when it is missing: they fail, naming where they looked.
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def find_shared_data() -> Path:
    override = os.environ.get("POSTTRAIN_SHARED_DATA")
    candidates = [Path(override)] if override else [p / "shared" / "data" for p in PROJECT_ROOT.parents]
    for candidate in candidates:
        if (candidate / "README.md").is_file():
            return candidate
    raise FileNotFoundError(
        "the real data sets were not found; looked in "
        + ", ".join(str(c) for c in candidates)
        + " (set POSTTRAIN_SHARED_DATA)"
    )


SHARED_DATA = find_shared_data()

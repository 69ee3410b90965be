"""pytest-benchmark micro-benchmarks (`make bench-micro`). They time what this machine holds:
MLSHIFT_DATA_DIR, the cache or the bundled sample; they never download."""

from __future__ import annotations

import os

os.environ.setdefault("MLSHIFT_NO_DOWNLOAD", "1")

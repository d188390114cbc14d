"""CPU benchmarks of the C++ extension: `make bench-cpu` (pytest-benchmark, JSON in benchmarks/results/).

`pytest tests` never collects this directory (pyproject's testpaths); `make bench` deselects it by the `cpu_bench`
marker (registered in benchmarks/conftest.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the benchmark module imports its helpers as `_cpu_bench_common`
    sys.path.insert(0, str(HERE))

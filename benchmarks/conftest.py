"""GPU benchmarks: collect `bench_*.py` here, skip them cleanly without CUDA, stamp provenance into the JSON.

`pytest tests` never sees this directory (pyproject's testpaths). `make bench` runs it with pytest-benchmark;
`benchmarks/cpu/` (CPU benchmarks of the C++ extension) has its own rules and is left alone by these hooks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench modules import the shared helpers as `_bench_common`
    sys.path.insert(0, str(HERE))


def pytest_configure(config: pytest.Config) -> None:
    # `make bench` deselects the CPU benchmarks with -m "not cpu_bench"; register the name so --strict-markers
    # accepts the expression even when benchmarks/cpu/ is absent or not collected.
    config.addinivalue_line("markers", "cpu_bench: CPU benchmark of the C++ extension (benchmarks/cpu/)")


def _is_gpu_bench(path: Path) -> bool:
    return path.resolve().parent == HERE and path.name.startswith("bench_") and path.suffix == ".py"


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    # The GPU benchmarks are named after the package modules (STYLE A2: bench_moe_lora.py), not test_*.py.
    if _is_gpu_bench(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    skip = pytest.mark.skip(reason="GPU benchmarks need CUDA and compiled (not interpreted) Triton kernels")
    for item in items:
        if _is_gpu_bench(Path(str(item.fspath))):
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """GPU, driver, clocks, power, torch/triton versions and git SHA in the JSON's machine_info (STYLE H5)."""
    from _bench_common import provenance

    machine_info["igsp"] = provenance()

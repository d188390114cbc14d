"""MoE-LoRA on the CPU: the C++ extension against the frozen base alone, the eager loop, the reference and
torch.compile(reference), on CLIP ViT-B/16 MLP shapes (see _cpu_bench_common for cases and providers).

Per (case, provider): the median wall time of `ROUNDS` calls (pytest-benchmark), GFLOP/s from an explicit FLOP
count, the peak resident memory one call adds (measured in a separate process), and the load average while it ran.
The cpp test also times base, loop and cpp interleaved call by call (`PAIRED_ROUNDS` triples): on a shared 2-core
machine the load drifts between tests, and ratios from the same seconds are the ones to trust
(`paired_overhead_vs_base`, `paired_speedup_vs_loop` from the medians; `paired_min_*` from the fastest call of
each, the least disturbed by other processes). `benchmarks/cpu/report.py` renders the JSON as markdown.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from _cpu_bench_common import CASES, PROVIDERS, cpu_info, flops, make_call, make_inputs, measure_case_memory_subprocess

from igsp_kernels import _cpp

pytestmark = pytest.mark.cpu_bench

# Rounds per measurement: 7 keeps the median stable to a few % on an idle machine while the whole suite stays at a
# few minutes (the slowest call, the reference's forward + backward at r = 64, takes ~1 s).
ROUNDS = {"base": 7, "loop": 7, "reference": 5, "compiled": 5, "cpp": 7}
PAIRED_ROUNDS = 9
_MEMORY: dict[str, dict] = {}  # case name -> {provider: peak bytes}, one probe process per case


def _memory(case) -> dict:
    if case.name not in _MEMORY:
        _MEMORY[case.name] = measure_case_memory_subprocess(case, PROVIDERS)
    return _MEMORY[case.name]


def _paired(case) -> dict:
    """base, loop and cpp timed call by call in turn (same seconds, same load), medians and their ratios."""
    calls = {p: make_call(case, p, make_inputs(case)) for p in ("base", "loop", "cpp")}
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {p: [] for p in calls}
    for _ in range(PAIRED_ROUNDS):
        for p, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(v) for p, v in times.items()}
    best = {p: min(v) for p, v in times.items()}  # the least-disturbed call: closest to an idle machine
    return {
        **{f"paired_{p}_median_s": m for p, m in med.items()},
        **{f"paired_{p}_min_s": m for p, m in best.items()},
        "paired_overhead_vs_base": med["cpp"] / med["base"] - 1.0,
        "paired_speedup_vs_loop": med["loop"] / med["cpp"],
        "paired_min_overhead_vs_base": best["cpp"] / best["base"] - 1.0,
        "paired_min_speedup_vs_loop": best["loop"] / best["cpp"],
    }


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_moe_lora_cpu(benchmark, case, provider):
    if provider == "cpp" and not _cpp.is_available():
        pytest.skip(f"the C++ CPU extension is not available: {_cpp.load_error()}")
    benchmark.group = f"moe_lora-cpu-{case.name}"
    call = make_call(case, provider, make_inputs(case))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    call()  # warm-up; for `compiled` this is the compilation
    first_call_s = time.perf_counter() - t0
    benchmark.pedantic(call, rounds=ROUNDS[provider], warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    info = {
        **case.as_dict(),
        "provider": provider,
        "flops": flops(case, provider),
        "gflops": flops(case, provider) / median / 1e9,
        "first_call_s": first_call_s,
        "peak_mem_bytes": _memory(case).get(provider),
        "loadavg_1min_before": load_before,
        **cpu_info(),
    }
    if provider == "cpp":
        info.update(_paired(case))
    info["loadavg_1min_after"] = os.getloadavg()[0]
    benchmark.extra_info.update(info)
    if provider == "compiled":
        torch._dynamo.reset()  # drop this case's compiled graphs before the next case

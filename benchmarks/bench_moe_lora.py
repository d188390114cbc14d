"""MoE-LoRA on ViT-B/16 linears: base / eager / dense / smart-dense / compiled / fused, forward, backward and both.

Headline number: `triton.testing.do_bench` median (CUDA events) with p20/p80 in `extra_info`, plus TFLOP/s, GB/s
and the percentage of the roofline floor from the explicit counts in `_bench_common.py`, and the peak memory of
one call. pytest-benchmark's own wall-clock rounds (synchronised) are kept as a cross-check (STYLE H2).

Selection (environment): IGSP_BENCH_CASES = default | all | headline | name,name...; IGSP_BENCH_PROVIDERS and
IGSP_BENCH_MODES = comma-separated subsets. The target case is `fc1-b128-E22-r16-bf16-sample`.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from _bench_common import (
    MODES,
    PROVIDERS,
    MoELoRABenchCase,
    make_problem,
    make_runner,
    measure,
    moe_lora_bytes,
    moe_lora_flops,
    provenance,
    roofline_seconds,
    selected,
    selected_cases,
)

CASES = selected_cases()
SEL_PROVIDERS = selected("IGSP_BENCH_PROVIDERS", PROVIDERS, PROVIDERS)
SEL_MODES = selected("IGSP_BENCH_MODES", MODES, MODES)


@lru_cache(maxsize=1)
def problem(case: MoELoRABenchCase):
    """One problem resident at a time (batch-256 fc1 activations and gradients are ~0.5 GB each)."""
    return make_problem(case)


@pytest.mark.parametrize("mode", SEL_MODES)
@pytest.mark.parametrize("provider", SEL_PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_moe_lora(benchmark, case: MoELoRABenchCase, provider: str, mode: str) -> None:
    benchmark.group = f"moe_lora {case.name} {mode}"
    p = problem(case)
    run = make_runner(provider, p, mode)
    stats = measure(run)
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=5, warmup_rounds=1, iterations=1)
    seconds = stats["median_ms"] / 1e3
    floor = roofline_seconds(case, mode, provider)
    prov = provenance()
    benchmark.extra_info.update(
        case.as_dict(),
        op="moe_lora",
        provider=provider,
        mode=mode,
        **stats,
        tflops=moe_lora_flops(case, mode, provider) / seconds / 1e12,
        gbps=moe_lora_bytes(case, mode, provider) / seconds / 1e9,
        roofline_ms=floor * 1e3,
        pct_roofline=100.0 * floor / seconds,
        gpu=prov.get("gpu"),
        torch=prov.get("torch"),
        triton=prov.get("triton"),
        git_sha=prov.get("git_sha"),
    )

"""The performance model (benchmarks/perf_model.py) on the CPU: its counts on a plain GEMM against the analytic
count, the per-sample path's launches, the design choice it reports, and the JSON schema scripts read."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def pm():
    spec = importlib.util.spec_from_file_location("perf_model", BENCH / "perf_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["perf_model"] = mod  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_plain_gemm_matches_the_analytic_count(pm):
    # One recorded torch.mm: 2 M N K FLOPs at the bf16 peak, each operand and the result moved once, and the
    # predicted time max(bytes / bandwidth, FLOPs / peak) from the H200 ceilings.
    M, K, N = 4096, 768, 3072
    a, b = torch.empty(M, K, dtype=torch.bfloat16), torch.empty(K, N, dtype=torch.bfloat16)
    with pm.recording() as (launches, _):
        torch.mm(a, b)
    assert [x.name for x in launches] == ["torch.mm"]
    (launch,) = launches
    assert launch.flops == {"bf16": 2.0 * M * N * K}
    assert launch.bytes_lo == launch.bytes_hi == (M * K + K * N + M * N) * 2
    want = max(2.0 * M * N * K / 790e12, (M * K + K * N + M * N) * 2 / 4.3e12)
    assert launch.seconds(pm.H200) == pytest.approx(want, rel=1e-12)
    assert launch.bound(pm.H200) == "compute"


def test_base_gemms_alone_are_the_kernels_md_numbers(pm):
    # KERNELS.md: the frozen base GEMM of a ViT-B/16 MLP linear at 256 images takes ~301 us at 790 TFLOP/s.
    assert 1e6 * pm.base_gemms_seconds(pm.HEADLINE["fc1"]) == pytest.approx(2 * 301.0, rel=0.01)


def test_per_sample_call_is_four_launches_and_counts_the_base_gemm(pm):
    # 16 images of fc1: the forward kernel, the pair sort and two backward launches, no torch op beside them; the
    # forward launch's FLOPs hold the base GEMM exactly (T = 16 x 197 rows in whole tiles is not needed: the
    # analytic base count is compared with the padded-row count of the model).
    case = pm.Case("fc1", 16, 22, 16, "bf16", "sample")
    res = pm.run_case(case, alternatives=False)
    assert [x.name for x in res.launches] == ["_ps_fwd_kernel", "_ps_pairs_kernel", "_ps_bwd_kernel",
                                              "_ps_bwd_kernel"]
    fwd = res.launches[0]
    base = 2.0 * case.T * case.d_in * case.d_out
    assert base < fwd.flops["bf16"] < base * 1.3  # the LoRA terms add a few percent, never less than the GEMM
    assert fwd.bytes_lo >= (case.T * (case.d_in + case.d_out) + case.d_in * case.d_out) * 2
    assert res.plan == "t_in_dgrad" and res.overhead_pct > 0
    assert res.saved_mb < res.saved_ref_mb  # h (T k r fp32) against the reference's (T, E, r)


def test_model_reports_both_plans_and_the_policy_picks_the_cheaper(pm):
    for layer in ("fc1", "fc2"):
        res = pm.run_case(pm.Case(layer, 16, 22, 16, "bf16", "sample"))
        (other, other_s), = res.alternative.items()
        assert other != res.plan and res.total_s <= other_s * 1.02, (layer, res.plan, other)


def test_json_schema(pm, monkeypatch, capsys):
    # Scripts read {"headline": {"fc1": {"overhead_pct": ...}, "fc2": {...}}, "cases": [...]}.
    small = {layer: pm.Case(layer, 8, 22, 16, "bf16", "sample") for layer in ("fc1", "fc2")}
    monkeypatch.setattr(pm, "HEADLINE", small)
    assert pm.main(["--json", "--cases", ",".join(c.name for c in small.values())]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["predicted"] is True and "perf-model" in doc["command"]
    for layer in ("fc1", "fc2"):
        head = doc["headline"][layer]
        assert head["overhead_pct"] == pytest.approx(100 * (head["total_us"] / head["base_gemms_us"] - 1))
        assert 0 <= head["metadata_pct"] < 100
    case = doc["cases"][0]
    assert {"kernels", "total_us", "base_gemms_us", "overhead_pct", "backward_plan"} <= set(case)
    assert {"name", "mb_lo", "mb_hi", "gflop", "us", "bound"} <= set(case["kernels"][0])

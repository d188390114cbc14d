"""The benchmark report renderer (benchmarks/report.py) on a small JSON fabricated here, and the benchmark
FLOP / byte counts on the headline case. Runs on the CPU; no benchmark is executed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load_module(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def bench(op, case, mode, provider, median, **extra):
    info = {"op": op, "case": case, "mode": mode, "provider": provider, "median_ms": median,
            "p20_ms": 0.95 * median, "p80_ms": 1.05 * median, **extra}
    return {"group": f"{op} {case} {mode}", "name": f"test[{case}-{provider}-{mode}]", "params": {},
            "stats": {"median": median / 1e3}, "extra_info": info}


def fabricated(headline: str) -> dict:
    mk = lambda p, t, **kw: bench("moe_lora", headline, "fwd+bwd", p, t, **kw)  # noqa: E731
    return {
        "machine_info": {"igsp": {"gpu": "NVIDIA H200", "driver": "570.00", "torch": "2.11", "triton": "3.6.0",
                                  "git_sha": "abc123def4567890"}},
        "datetime": "2026-11-29T00:00:00",
        "benchmarks": [
            mk("base", 1.00),
            mk("eager", 4.00, peak_mem_mb=900.0),
            mk("compiled", 1.80),
            mk("smart-dense", 1.50),
            mk("fused", 1.10, pct_roofline=70.0, peak_mem_mb=400.0),  # 3.6x eager, 1.6x compiled, +10% over base
            bench("moe_lora", "fc2-b128-E22-r16-bf16-sample", "fwd", "fused", 0.5, pct_roofline=50.0),
            bench("subspace_penalty_fwd+bwd", "24 layers", "penalty_fwd+bwd", "eager", 3.0),
            bench("subspace_penalty_fwd+bwd", "24 layers", "penalty_fwd+bwd", "fused", 0.1),  # 30x
        ],
    }


def test_report_renders_table_targets_plot_and_merge(tmp_path):
    report = load_module("report")
    path = tmp_path / "a.json"
    data = fabricated(report.HEADLINE_CASE)
    path.write_text(json.dumps(data))
    extra = tmp_path / "b.json"  # a second file (another suite step) is merged in
    extra.write_text(json.dumps({"benchmarks": [bench("route_topk", "N128-E22-k2", "fwd+bwd", "fused", 0.02)]}))
    md, png, merged = tmp_path / "r.md", tmp_path / "r.png", tmp_path / "m.json"
    assert report.main([str(path), str(extra), "--md", str(md), "--png", str(png), "--merge-out", str(merged)]) == 0
    text = md.read_text()
    assert "NVIDIA H200" in text and "abc123def456" in text
    assert "PASS: fused speedup vs eager (x) = 3.64" in text  # 4.0 / 1.1
    assert "PASS: fused speedup vs torch.compile (x) = 1.64" in text  # 1.8 / 1.1
    assert "PASS: fused time / roofline floor (x) = 1.43" in text  # 100 / 70
    assert "PASS: fused overhead over base (%) = 10.00" in text
    assert "PASS: fused peak memory / eager (x) = 0.44" in text
    assert "PASS: subspace penalty+grad, fused vs eager (x) = 30.00" in text
    assert "## route_topk" in text and "## moe_lora" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {report.HEADLINE_CASE} | fwd+bwd"))
    assert "3.64x" in row and "+10.0%" in row and "400/900" in row  # eager/fused, over base, peak memory
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert len(json.loads(merged.read_text())["benchmarks"]) == len(data["benchmarks"]) + 1


def test_report_flags_a_missed_target(tmp_path):
    report = load_module("report")
    data = fabricated(report.HEADLINE_CASE)
    data["benchmarks"][4]["extra_info"]["median_ms"] = 2.0  # fused slower than compiled: the check must fail
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    text, _ = report.render_markdown(report.load([path]))
    assert "FAIL: fused speedup vs torch.compile (x) = 0.90" in text
    assert "FAIL: fused overhead over base (%) = 100.00" in text


def test_report_rejects_empty_input(tmp_path):
    report = load_module("report")
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": []}))
    assert report.main([str(path)]) == 1


def test_headline_counts():
    torch = pytest.importorskip("torch")  # noqa: F841
    common = load_module("_bench_common")
    c = common.HEADLINE
    assert (c.T, c.d_in, c.d_out) == (25216, 768, 3072)
    base = 2 * 25216 * 768 * 3072
    lora = 2 * 25216 * 2 * 16 * (768 + 3072)
    assert common.moe_lora_flops(c, "fwd") == base + lora
    assert common.moe_lora_flops(c, "fwd+bwd", "base") == 2 * base
    assert common.moe_lora_flops(c, "fwd+bwd") == 2 * base + 3 * lora
    # forward bytes: x + W0 + b0 + A + B + routing + y, in bf16 (2 bytes)
    want = 2 * (25216 * 768 + 768 * 3072 + 3072 + 22 * 16 * (768 + 3072) + 25216 * 3072) + 25216 * 2 * 8
    assert common.moe_lora_bytes(c, "fwd") == want
    # the headline is compute-bound: the floor is FLOPs / 790 TFLOP/s (~0.33 ms for fwd+bwd)
    floor = common.roofline_seconds(c, "fwd+bwd")
    assert floor == pytest.approx((2 * base + 3 * lora) / 790e12)
    assert c in common.DEFAULT_CASES and len(common.ALL_CASES) == 3 * 3 * 2 * 3 * 2 * 2

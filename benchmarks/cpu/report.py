"""Render the CPU benchmark JSON (`make bench-cpu`) as markdown: times, ratios, peak memory, the targets.

Usage: python benchmarks/cpu/report.py [benchmarks/results/cpu_bench.json] > benchmarks/results/cpu_bench.md

Ratios: "overhead" = t / t_base - 1 (the LoRA's cost on top of the frozen linear); "x loop" = t_loop / t_cpp.
The "paired" columns come from the cpp test's interleaved base / loop / cpp calls (same seconds, same load) and
are the ones to trust on a shared machine ("paired-min": the fastest call of each, the least disturbed by other
processes); the other columns compare medians taken minutes apart.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

PROVIDERS = ("base", "loop", "reference", "compiled", "cpp")
# The targets, checked at forward + backward, r = 16 (both layers).
TARGET_OVERHEAD = 0.25
TARGET_SPEEDUP_VS_LOOP = 1.35


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f}"


def _mb(b) -> str:
    return f"{b / 2**20:.1f}" if isinstance(b, (int, float)) else "n/a"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render(data: dict) -> str:
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "provider" not in info:
            continue
        key = (info["layer"], info["r"], info["mode"])
        rows[key][info["provider"]] = {"median": b["stats"]["median"], **info}
    if not rows:
        return "No CPU benchmark results in the JSON.\n"
    any_info = next(iter(next(iter(rows.values())).values()))
    loads = [v[k] for r in rows.values() for v in r.values() for k in ("loadavg_1min_before", "loadavg_1min_after")
             if k in v]
    out = [
        "# MoE-LoRA on the CPU (C++ extension)",
        "",
        f"- machine: {any_info.get('cpu')}, {any_info.get('cores')} cores, torch {any_info.get('torch')} with "
        f"{any_info.get('torch_threads')} threads, {any_info.get('blas')} BLAS, {any_info.get('cpu_capability')}",
        f"- problem: {any_info.get('images')} images x 197 tokens = {any_info.get('T')} rows, E = {any_info.get('E')},"
        f" k = {any_info.get('k')}, per-sample routing, fp32; ViT-B/16 fc1 (768 -> 3072) and fc2 (3072 -> 768)",
        f"- load average (1 min) while measuring: {min(loads):.2f} to {max(loads):.2f} (a shared machine: compare"
        " the paired columns)" if loads else "- load average: not recorded",
        f"- generated from {data.get('datetime', 'an unknown date')} results",
        "",
        "## Median time per call (ms) and ratios",
        "",
        "| layer | r | mode | base | loop | reference | compiled | cpp | cpp overhead vs base | cpp x loop | "
        "cpp x reference | cpp x compiled | paired overhead | paired x loop | paired-min overhead | paired-min x loop"
        " | cpp GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (layer, r, mode), prov in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        t = {p: prov[p]["median"] if p in prov else None for p in PROVIDERS}
        cpp = prov.get("cpp", {})

        def ratio(a, b):
            return None if a is None or b is None else a / b

        overhead = None if ratio(t["cpp"], t["base"]) is None else ratio(t["cpp"], t["base"]) - 1.0
        out.append(
            f"| {layer} | {r} | {mode} | " + " | ".join(_ms(t[p]) for p in PROVIDERS)
            + f" | {_pct(overhead)} | {_x(ratio(t['loop'], t['cpp']))} | {_x(ratio(t['reference'], t['cpp']))}"
            f" | {_x(ratio(t['compiled'], t['cpp']))} | {_pct(cpp.get('paired_overhead_vs_base'))}"
            f" | {_x(cpp.get('paired_speedup_vs_loop'))} | {_pct(cpp.get('paired_min_overhead_vs_base'))}"
            f" | {_x(cpp.get('paired_min_speedup_vs_loop'))} | {cpp.get('gflops', 0):.0f} |"
        )
    out += ["", "## Peak resident memory one call adds (MiB)", "",
            "| layer | r | mode | " + " | ".join(PROVIDERS) + " |", "|---|---|---|" + "---|" * len(PROVIDERS)]
    for (layer, r, mode), prov in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        vals = [prov.get(p, {}).get("peak_mem_bytes") for p in PROVIDERS]
        out.append(f"| {layer} | {r} | {mode} | " + " | ".join(_mb(v) for v in vals) + " |")
    out += ["", f"## Targets (forward + backward, r = 16): overhead <= {TARGET_OVERHEAD:.0%}, "
            f">= {TARGET_SPEEDUP_VS_LOOP}x the loop, peak memory <= the loop's", ""]
    for layer in sorted({k[0] for k in rows}):
        prov = rows.get((layer, 16, "fwd+bwd"), {})
        cpp, loop = prov.get("cpp"), prov.get("loop")
        if not cpp:
            out.append(f"- {layer}: no cpp result")
            continue
        ov, sp = cpp.get("paired_overhead_vs_base"), cpp.get("paired_speedup_vs_loop")
        ov_min = cpp.get("paired_min_overhead_vs_base")
        m_cpp, m_loop = cpp.get("peak_mem_bytes"), (loop or {}).get("peak_mem_bytes")
        mem_ok = isinstance(m_cpp, (int, float)) and isinstance(m_loop, (int, float)) and m_cpp <= m_loop
        ov_ok = ov is not None and ov <= TARGET_OVERHEAD
        sp_ok = sp is not None and sp >= TARGET_SPEEDUP_VS_LOOP
        out.append(
            f"- {layer}: paired overhead {_pct(ov)} ({'met' if ov_ok else 'MISSED'}; fastest calls {_pct(ov_min)}),"
            f" {_x(sp)} the loop ({'met' if sp_ok else 'MISSED'}),"
            f" peak {_mb(m_cpp)} MiB vs loop {_mb(m_loop)} MiB ({'met' if mem_ok else 'MISSED'})"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "benchmarks/results/cpu_bench.json")
    sys.stdout.write(render(json.loads(path.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

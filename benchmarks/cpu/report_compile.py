"""Render benchmarks/cpu/test_cpu_compile.py's JSON as a markdown table (eager vs torch.compile, injected models).

Usage: python benchmarks/cpu/report_compile.py [benchmarks/results/cpu_compile.json]

`paired x` = eager median / compiled median over interleaved calls (the same seconds, the same load); `fastest x` =
the fastest eager call / the fastest compiled call (the least disturbed by other processes). Above 1: compiled is
faster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def render(data: dict) -> str:
    rows = [b["extra_info"] for b in data.get("benchmarks", []) if "paired_speedup" in b.get("extra_info", {})]
    if not rows:
        return "No compile benchmark results in the JSON.\n"
    first = rows[0]
    loads = [r[k] for r in rows for k in ("loadavg_1min_before", "loadavg_1min_after")]
    out = [
        f"{first['cpu']}, {first['cores']} cores, torch {first['torch']} ({first['torch_threads']} threads), "
        f"load average {min(loads):.1f} to {max(loads):.1f} while measuring; {data.get('datetime', '')}",
        "",
        "| model | mode | eager (ms) | compiled (ms) | paired x | fastest x | compile time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['model']} | {r['mode']} | {1e3 * r['paired_eager_median_s']:.2f} | "
                   f"{1e3 * r['paired_compiled_median_s']:.2f} | {r['paired_speedup']:.2f} | "
                   f"{r['paired_min_speedup']:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cpu_compile.json")
    sys.stdout.write(render(json.loads(source.read_text(encoding="utf-8"))))

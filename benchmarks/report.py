"""Render pytest-benchmark JSON from the GPU benchmarks into a markdown report and a PNG plot (STYLE H5).

    python benchmarks/report.py RESULT.json [MORE.json ...] --md bench.md --png bench.png [--merge-out bench.json]

Reads every benchmark's `extra_info` (written by bench_*.py: provider, mode, case, do_bench median/p20/p80 in ms,
TFLOP/s, GB/s, % of the roofline floor, peak memory) and the provenance in `machine_info["igsp"]`. The report has:
the provenance header; the target checks of the headline case (fused base + MoE-LoRA fwd+bwd, batch 128, r = 16,
E = 22, bf16); one table per op with a column per provider and the fused speedups; the plot shows the medians.
Several inputs (e.g. one JSON per suite step) are merged; `--merge-out` writes the merged JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

HEADLINE_CASE = "fc1-b128-E22-r16-bf16-sample"
PROVIDER_ORDER = ["base", "eager", "dense", "smart-dense", "compiled", "fused"]
# Targets of issue 3 for the headline case (fwd+bwd) and the subspace ops.
TARGETS = {
    "speedup_vs_eager": 3.0,
    "speedup_vs_compiled": 1.5,
    "roofline_factor": 1.6,  # fused time <= 1.6 x the roofline floor, i.e. >= 62.5 % of it
    "overhead_vs_base_pct": 15.0,
    "subspace_speedup": 20.0,
}


def load(paths: list[Path]) -> dict:
    """Merge pytest-benchmark JSON files: the first file's machine info, every benchmark of every file."""
    merged: dict = {"machine_info": {}, "commit_info": {}, "benchmarks": [], "sources": []}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not merged["machine_info"]:
            merged["machine_info"] = data.get("machine_info", {})
            merged["commit_info"] = data.get("commit_info", {})
            merged["datetime"] = data.get("datetime")
        merged["benchmarks"].extend(data.get("benchmarks", []))
        merged["sources"].append(str(path))
    return merged


def _rows(data: dict) -> list[dict]:
    rows = []
    for b in data["benchmarks"]:
        info = dict(b.get("extra_info", {}))
        if "median_ms" not in info:  # fall back to pytest-benchmark's wall-clock median
            info["median_ms"] = b.get("stats", {}).get("median", float("nan")) * 1e3
        info.setdefault("op", b.get("group", "?"))
        info.setdefault("provider", b.get("params", {}).get("provider", "?"))
        info.setdefault("mode", b.get("params", {}).get("mode", ""))
        info.setdefault("case", b.get("name", "?"))
        rows.append(info)
    return rows


def _fmt(v: float | None, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _table(rows: list[dict]) -> tuple[list[str], dict]:
    """Markdown lines for one op, and {(case, mode): {provider: row}} for the target checks."""
    grid: dict = defaultdict(dict)
    for r in rows:
        grid[(r["case"], r["mode"])][r["provider"]] = r
    providers = [p for p in PROVIDER_ORDER if any(p in v for v in grid.values())]
    providers += sorted({p for v in grid.values() for p in v} - set(providers))
    head = ["case", "mode"] + [f"{p} ms" for p in providers]
    fused = "fused" in providers
    if fused:
        head += ["fused vs eager", "vs compiled", "vs smart-dense", "% roofline", "over base", "peak MB fused/eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (case, mode), by in sorted(grid.items()):
        cells = [case, mode]
        for p in providers:
            r = by.get(p)
            spread = "" if r is None else f" ({_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))})"
            cells.append("-" if r is None else f"{_fmt(r['median_ms'])}{spread}")
        if fused:
            f = by.get("fused")
            fm = f and f["median_ms"]
            med = {p: by[p]["median_ms"] for p in by}
            over = None if not f or "base" not in by else 100.0 * (fm / med["base"] - 1.0)
            mem_f = f and f.get("peak_mem_mb")
            mem_e = by.get("eager", {}).get("peak_mem_mb")
            cells += [
                _fmt(_ratio(med.get("eager"), fm), ".2f") + "x" if f and "eager" in med else "-",
                _fmt(_ratio(med.get("compiled"), fm), ".2f") + "x" if f and "compiled" in med else "-",
                _fmt(_ratio(med.get("smart-dense"), fm), ".2f") + "x" if f and "smart-dense" in med else "-",
                _fmt(f.get("pct_roofline") if f else None, ".1f"),
                (_fmt(over, "+.1f") + "%") if over is not None else "-",
                f"{_fmt(mem_f, '.0f')}/{_fmt(mem_e, '.0f')}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, grid


def target_checks(grids: dict) -> list[str]:
    """PASS / FAIL / n/a lines for the issue's targets."""
    out = []

    def line(name: str, value: float | None, ok: bool | None, want: str) -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        out.append(f"- {status}: {name} = {_fmt(value, '.2f')} (target {want})")

    by = grids.get("moe_lora", {}).get((HEADLINE_CASE, "fwd+bwd"), {})
    f = by.get("fused")
    fm = f["median_ms"] if f else None
    se = _ratio(by["eager"]["median_ms"], fm) if f and "eager" in by else None
    sc = _ratio(by["compiled"]["median_ms"], fm) if f and "compiled" in by else None
    rf = 100.0 / f["pct_roofline"] if f and f.get("pct_roofline") else None
    ov = 100.0 * (fm / by["base"]["median_ms"] - 1.0) if f and "base" in by else None
    line("fused speedup vs eager (x)", se, None if se is None else se >= TARGETS["speedup_vs_eager"], ">= 3")
    line("fused speedup vs torch.compile (x)", sc, None if sc is None else sc >= TARGETS["speedup_vs_compiled"],
         ">= 1.5")
    line("fused time / roofline floor (x)", rf, None if rf is None else rf <= TARGETS["roofline_factor"], "<= 1.6")
    line("fused overhead over base (%)", ov, None if ov is None else ov <= TARGETS["overhead_vs_base_pct"], "<= 15")
    mf = f.get("peak_mem_mb") if f else None
    me = by.get("eager", {}).get("peak_mem_mb")
    line("fused peak memory / eager (x)", _ratio(mf, me), None if mf is None or me is None else mf <= me, "<= 1")
    sub = grids.get("subspace_penalty_fwd+bwd", {})
    for (_, _), prov in sub.items():
        s = _ratio(prov.get("eager", {}).get("median_ms"), prov.get("fused", {}).get("median_ms"))
        line("subspace penalty+grad, fused vs eager (x)", s, None if s is None else s >= TARGETS["subspace_speedup"],
             ">= 20")
    return out


def render_markdown(data: dict) -> tuple[str, dict]:
    rows = _rows(data)
    info = data.get("machine_info", {}).get("igsp", {})
    if not info:  # provenance copied into each benchmark's extra_info
        first = rows[0] if rows else {}
        info = {k: first.get(k) for k in ("gpu", "torch", "triton", "git_sha")}
    lines = ["# igsp_kernels GPU benchmarks", ""]
    lines.append(
        f"GPU **{info.get('gpu', '?')}**, driver {info.get('driver', '?')}, SM clock {info.get('sm_clock_mhz', '?')}/"
        f"{info.get('max_sm_clock_mhz', '?')} MHz, power {_fmt(info.get('power_w'), '.0f')}/"
        f"{_fmt(info.get('power_limit_w'), '.0f')} W; torch {info.get('torch', '?')}, "
        f"triton {info.get('triton', '?')}, git {(info.get('git_sha') or '?')[:12]}; {data.get('datetime', '')}"
    )
    lines += ["", "Times are `triton.testing.do_bench` medians in ms (p20-p80 in brackets). Roofline floor: "
              "max(FLOPs / 790 TFLOP/s bf16 (67 fp32), bytes / 4.3 TB/s) from the explicit counts in "
              "`_bench_common.py`.", ""]
    by_op: dict = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    grids = {}
    sections = []
    for op in sorted(by_op):
        table, grid = _table(by_op[op])
        grids[op] = grid
        sections += [f"## {op}", ""] + table + [""]
    lines += ["## Targets (headline: " + HEADLINE_CASE + ", fwd+bwd)", ""] + target_checks(grids) + [""]
    lines += sections
    return "\n".join(lines), grids


def render_plot(data: dict, path: Path) -> None:
    """One panel per op: grouped bars of the median time (log scale) per (case, mode), one bar per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(data)
    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(len(ops), 1, figsize=(14, 4.5 * max(len(ops), 1)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        sub = [r for r in rows if r["op"] == op]
        groups = sorted({(r["case"], r["mode"]) for r in sub})
        provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in sub)]
        provs += sorted({r["provider"] for r in sub} - set(provs))
        width = 0.8 / max(len(provs), 1)
        for i, p in enumerate(provs):
            vals = []
            for g in groups:
                match = [r["median_ms"] for r in sub if (r["case"], r["mode"]) == g and r["provider"] == p]
                vals.append(match[0] if match else float("nan"))
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median time (ms)")
        ax.set_title(op)
        ax.legend(fontsize=8, ncol=len(provs))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--md", type=Path, help="write the markdown report here (default: stdout)")
    parser.add_argument("--png", type=Path, help="write the plot here")
    parser.add_argument("--merge-out", type=Path, help="write the merged JSON here")
    args = parser.parse_args(argv)
    data = load(args.inputs)
    if not data["benchmarks"]:
        print(f"no benchmarks in {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return 1
    text, _ = render_markdown(data)
    if args.md:
        args.md.write_text(text + "\n")
    else:
        print(text)
    if args.png:
        render_plot(data, args.png)
    if args.merge_out:
        args.merge_out.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

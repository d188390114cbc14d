"""`igsp ablate PRESET --seeds N --grid key=v1,v2 [--grid ...]`: a config grid across seeds, in parallel processes.

Every cell of the grid (the cartesian product of the `--grid` values, in the order given) is trained with seeds
`--first-seed .. --first-seed + N - 1` (the seed goes to `--seed-key`, `train.seed` by default: the random
backbone init, the candidates' init, the data order and the router noise; `data.seed` keeps the data split
fixed). Each run is its own `igsp train` process writing `OUTPUT/runs/<cell>/seed<S>/`, at most `--jobs` at a
time (default: the cores divided by the preset's `train.cpu_threads`; with `--devices 0,1,...` one run per GPU,
each seeing only its own through CUDA_VISIBLE_DEVICES), with its output in `seed<S>.log` beside it. Runs are
resumable and the command is idempotent: a run whose results.json is complete is read, not rerun; one with a
checkpoint is continued with `igsp train --resume`; one without is started again. So after an interruption, a
failure, or with more seeds or grid values, the same command finishes what is missing.

The aggregate covers the cells and seeds of this invocation, whatever ran when, and is rewritten atomically
(igsp.checkpoint) every time: `OUTPUT/ablation.md` (a markdown table: per cell mean +- sample sd over seeds of
Transfer / Avg / Last, the mean trainable parameters per task and total added parameters, the mean phase-1
steps per task and the number of phase-1s ended by the cap) and `OUTPUT/ablation.json` (the same, plus every
run's numbers). A cell with a failed run is reported over the runs that finished, and the command exits 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igsp.checkpoint import atomic_write_bytes, atomic_write_json

__all__ = ["AblationRun", "add_cli_commands", "aggregate", "parse_grid", "plan_runs", "run_ablation"]

logger = logging.getLogger(__name__)

METRICS = ("transfer", "avg", "last")


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['a.b=v1,v2', ...] -> [('a.b', ['v1', 'v2']), ...] (values kept as override strings)."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",")] if sep else []
        if not key or "." not in key or not vals or not all(vals):
            raise ValueError(f"--grid: got {item!r}; expected 'section.key=v1,v2' (e.g. method.lam=0,0.1)")
        if key in (k for k, _ in grid):
            raise ValueError(f"--grid names {key!r} twice; give all its values in one --grid")
        if len(set(vals)) != len(vals):
            raise ValueError(f"--grid {key}: repeated values in {vals}")
        grid.append((key, vals))
    return grid


def _cell_name(cell: Sequence[tuple[str, str]]) -> str:
    """A directory name for a cell: 'method.lam=0.1__adapters.router_placement=block' (safe characters)."""
    if not cell:
        return "base"
    text = "__".join(f"{k}={v}" for k, v in cell)
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


@dataclass
class AblationRun:
    """One (cell, seed) run: its overrides and directories."""

    cell: tuple[tuple[str, str], ...]
    seed: int
    run_dir: Path
    log_path: Path
    overrides: list[str]

    @property
    def cell_name(self) -> str:
        return _cell_name(self.cell)


def plan_runs(output: Path, grid: Sequence[tuple[str, list[str]]], seeds: Sequence[int], sets: Sequence[str],
              seed_key: str) -> list[AblationRun]:
    """Every (cell, seed) of the grid with its run directory under OUTPUT/runs/ (cells outer, seeds inner)."""
    keys = [k for k, _ in grid]
    if seed_key in keys:
        raise ValueError(f"--seed-key {seed_key!r} is also a --grid key: seeds come from --seeds")
    runs = []
    for values in itertools.product(*[v for _, v in grid]):
        cell = tuple(zip(keys, values))
        for seed in seeds:
            run_dir = output / "runs" / _cell_name(cell) / f"seed{seed}"
            overrides = [*sets, *(f"{k}={v}" for k, v in cell), f"{seed_key}={seed}"]
            runs.append(AblationRun(cell, seed, run_dir, run_dir.with_name(f"seed{seed}.log"), overrides))
    return runs


def _complete(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return res if res.get("complete") else None


def _execute(run: AblationRun, preset: str, python: str, devices: queue.Queue | None = None) -> tuple[str, int]:
    """Train (or resume, or skip) one run in a child process; returns (what was done, exit code).

    With `devices`, the child sees one GPU (CUDA_VISIBLE_DEVICES), taken from the queue for the run's duration.
    """
    if _complete(run.run_dir) is not None:
        return "done before", 0
    if (run.run_dir / "checkpoints" / "latest.pt").is_file():
        action, argv = "resumed", ["train", "--resume", str(run.run_dir)]
    else:
        if run.run_dir.exists():  # started but killed before its first checkpoint: nothing to keep
            shutil.rmtree(run.run_dir)
        action = "trained"
        argv = ["train", preset, "--output", str(run.run_dir), *[a for o in run.overrides for a in ("--set", o)]]
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    device = devices.get() if devices is not None else None
    try:
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        with open(run.log_path, "a", encoding="utf-8") as log:
            log.write(f"$ igsp {' '.join(argv)}" + (f"  (CUDA_VISIBLE_DEVICES={device})" if device else "") + "\n")
            log.flush()
            rc = subprocess.run([python, "-m", "igsp", "-q", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env).returncode
    finally:
        if device is not None:
            devices.put(device)
    return action, rc


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, sd


def _cap_step(run_dir: Path) -> int | None:
    """The phase-1 cap of a run, ceil(method.max_fraction * train.iterations), from its config.json."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        return math.ceil(float(cfg["method"]["max_fraction"]) * int(cfg["train"]["iterations"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_numbers(res: dict[str, Any], cap: int | None = None) -> dict[str, Any]:
    """The numbers of one finished run that the table aggregates (`cap`: its phase-1 cap step, if known)."""
    m = res.get("metrics") or {}
    p = res.get("params") or {}
    conv = res.get("convergence") or []
    steps = [c["converged_at"] for c in conv if isinstance(c.get("converged_at"), int)]
    sub = res.get("subspace") or []  # igsp: per task with history, the candidates' out-of-subspace fractions

    def sub_mean(key: str) -> float | None:
        vals = [s[key] for s in sub if isinstance(s.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    return {**{k: m.get(k) for k in METRICS}, "A_outside": sub_mean("A_outside"), "B_outside": sub_mean("B_outside"),
            "trainable_avg": p.get("trainable_avg"), "total_added": p.get("total_added"),
            "phase1_steps": sum(steps) / len(steps) if steps else None,
            "phase1s": len(conv), "forced": sum(bool(c.get("forced")) for c in conv),
            # Ended by the criterion strictly before the cap (not at the cap's own, partial-window check).
            "early": (sum(1 for c in conv if not c.get("forced") and isinstance(c.get("converged_at"), int)
                          and c["converged_at"] < cap) if cap is not None else None)}


def aggregate(runs: Sequence[AblationRun], failed: dict[str, str]) -> list[dict[str, Any]]:
    """Per cell: its runs' numbers and mean / sd over the finished ones (module docstring)."""
    cells: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry = cells.setdefault(run.cell_name, {"cell": dict(run.cell), "name": run.cell_name, "runs": []})
        res = _complete(run.run_dir)
        item: dict[str, Any] = {"seed": run.seed, "run_dir": str(run.run_dir)}
        if res is None:
            item["status"] = "failed" if str(run.run_dir) in failed else "missing"
            item["error"] = failed.get(str(run.run_dir))
        else:
            item.update(status="done", **_run_numbers(res, _cap_step(run.run_dir)))
        entry["runs"].append(item)
    out = []
    for entry in cells.values():
        done = [r for r in entry["runs"] if r["status"] == "done"]
        summary: dict[str, Any] = {"runs": len(done), "planned": len(entry["runs"])}
        for key in (*METRICS, "trainable_avg", "total_added", "phase1_steps", "A_outside", "B_outside"):
            mean, sd = _mean_sd([r[key] for r in done if r.get(key) is not None])
            summary[key] = {"mean": mean, "sd": sd}
        summary["phase1s"] = sum(r["phase1s"] for r in done)
        summary["forced"] = sum(r["forced"] for r in done)
        early = [r.get("early") for r in done]
        summary["early"] = sum(early) if early and None not in early else None
        entry["summary"] = summary
        out.append(entry)
    return out


def _pm(stat: dict[str, Any], digits: int = 1) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _outside(s: dict[str, Any]) -> str:
    a, b = s["A_outside"]["mean"], s["B_outside"]["mean"]
    return "n/a" if a is None or b is None else f"{a:.2f} / {b:.2f}"


def _count(stat: dict[str, Any]) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:,.0f}"


def markdown(preset: str, cells: Sequence[dict[str, Any]], seeds: Sequence[int], command: str) -> str:
    """The ablation table (one row per cell) with how it was made."""
    keys = list(cells[0]["cell"]) if cells else []
    head = [*keys, "runs", "Transfer", "Avg", "Last", "trainable / task", "total added", "phase-1 steps",
            "before cap / forced / phase-1s", "A / B outside"]
    lines = [f"# Ablation: `{preset}`", "",
             f"Seeds {', '.join(map(str, seeds))}; mean ± sample sd over the finished runs of each cell "
             "(accuracies in %, parameters as element counts, phase-1 steps per task averaged over tasks; "
             "before cap / forced: phase-1s ended by the convergence criterion before the cap's step / by the cap; "
             "A / B outside: the mean fraction "
             "of a candidate's A and B outside the historical subspace when phase 1 ends, over tasks with "
             "history; a random matrix shows sqrt(1 - m/d) for an m-dimensional subspace of R^d).",
             "", f"Command: `{command}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        s = c["summary"]
        early = "?" if s["early"] is None else str(s["early"])
        forced = f"{early} / {s['forced']} / {s['phase1s']}" if s["phase1s"] else "n/a"
        row = [*(f"`{c['cell'][k]}`" for k in keys), f"{s['runs']}/{s['planned']}",
               _pm(s["transfer"]), _pm(s["avg"]), _pm(s["last"]), _count(s["trainable_avg"]),
               _count(s["total_added"]), _pm(s["phase1_steps"], 0), forced, _outside(s)]
        lines.append("| " + " | ".join(row) + " |")
    missing = [(c["name"], r["seed"], r["status"]) for c in cells for r in c["runs"] if r["status"] != "done"]
    if missing:
        lines += ["", "Runs not finished: " + ", ".join(f"{n} seed {s} ({st})" for n, s, st in missing)]
    return "\n".join(lines) + "\n"


def default_jobs(preset: str, sets: Sequence[str]) -> int:
    """Cores / threads per run (train.cpu_threads, else torch's default: all cores, one job)."""
    from igsp.config import load_config

    threads = load_config(preset, list(sets)).train.cpu_threads
    cores = os.cpu_count() or 1
    return max(1, cores // threads) if threads else 1


def run_ablation(preset: str, grid: Sequence[tuple[str, list[str]]], seeds: Sequence[int], output: Path, *,
                 sets: Sequence[str] = (), seed_key: str = "train.seed", jobs: int | None = None,
                 devices: Sequence[str] = (), python: str = sys.executable, command: str = "") -> dict[str, Any]:
    """Run (or finish) the ablation and write ablation.md / ablation.json; returns the JSON content.

    `devices`: GPU ids; each run gets one of them to itself (CUDA_VISIBLE_DEVICES) and `jobs` defaults to their
    number.
    """
    from igsp.config import load_config

    runs = plan_runs(output, grid, seeds, sets, seed_key)
    for run in runs[:: len(seeds)]:  # one check per cell: a bad key or value fails now, not in a child process
        load_config(preset, run.overrides)
    jobs = jobs or (len(devices) if devices else default_jobs(preset, sets))
    pool_devices: queue.Queue | None = None
    if devices:
        pool_devices = queue.Queue()
        for d in devices:
            pool_devices.put(str(d))
    output.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    logger.info("ablation of %s: %d runs (%d cells x %d seeds), %d at a time, under %s", preset, len(runs),
                len(runs) // len(seeds), len(seeds), jobs, output)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for run, (action, rc) in zip(runs, pool.map(lambda r: _execute(r, preset, python, pool_devices), runs)):
            if rc != 0:
                failed[str(run.run_dir)] = f"exit code {rc} (see {run.log_path})"
                logger.error("%s seed %d: %s failed with exit code %d (log %s)", run.cell_name, run.seed, action,
                             rc, run.log_path)
            else:
                logger.info("%s seed %d: %s", run.cell_name, run.seed, action)
    cells = aggregate(runs, failed)
    report = {"preset": preset, "grid": [[k, v] for k, v in grid], "seeds": list(seeds), "sets": list(sets),
              "seed_key": seed_key, "command": command, "cells": cells, "failed": failed}
    atomic_write_json(output / "ablation.json", report)
    atomic_write_bytes(output / "ablation.md", markdown(preset, cells, seeds, command).encode("utf-8"))
    return report


# ---------------------------------------------------------------------------------------------------- CLI
def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="preset name, JSON file or run directory (the base config of every cell)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--seed-key", default="train.seed", help="the config key the seed goes to (default train.seed)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis (repeatable): e.g. --grid method.basis=weights,activations")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="an override for every run (repeatable)")
    p.add_argument("--jobs", type=int, help="runs at a time (default: the --devices, else cores / train.cpu_threads)")
    p.add_argument("--devices", default="", metavar="IDS",
                   help="GPU ids, e.g. 0,1,2,3: each run gets one to itself (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--output", help="ablation directory (default runs/ablate-<preset>)")


def _command_line(args: argparse.Namespace) -> str:
    """The `igsp ablate` command that reproduces this invocation (from the parsed arguments, not sys.argv)."""
    parts = ["igsp ablate", shlex.quote(args.preset), f"--seeds {args.seeds}"]
    if args.first_seed:
        parts.append(f"--first-seed {args.first_seed}")
    if args.seed_key != "train.seed":
        parts.append(f"--seed-key {shlex.quote(args.seed_key)}")
    parts += [f"--grid {shlex.quote(g)}" for g in args.grid]
    parts += [f"--set {shlex.quote(o)}" for o in args.overrides]
    if args.jobs:
        parts.append(f"--jobs {args.jobs}")
    if args.devices:
        parts.append(f"--devices {shlex.quote(args.devices)}")
    if args.output:
        parts.append(f"--output {shlex.quote(args.output)}")
    return " ".join(parts)


def _run(args: argparse.Namespace) -> int:
    from igsp.config import ConfigError

    for flag, value, least in (("--seeds", args.seeds, 1), ("--first-seed", args.first_seed, 0),
                               ("--jobs", args.jobs, 1)):
        if value is not None and value < least:
            sys.stderr.write(f"igsp ablate: error: {flag}: got {value}; expected an int >= {least}\n")
            return 2
    try:
        grid = parse_grid(args.grid)
        output = Path(args.output or f"runs/ablate-{Path(args.preset).stem}")
        command = _command_line(args)
        report = run_ablation(args.preset, grid, list(range(args.first_seed, args.first_seed + args.seeds)), output,
                              sets=args.overrides, seed_key=args.seed_key, jobs=args.jobs,
                              devices=[d.strip() for d in args.devices.split(",") if d.strip()], command=command)
    except (ValueError, ConfigError) as exc:
        sys.stderr.write(f"igsp ablate: error: {exc}\n")
        return 2
    sys.stdout.write((output / "ablation.md").read_text(encoding="utf-8"))
    return 1 if report["failed"] else 0


def add_cli_commands(register: Any) -> None:
    """igsp.cli's hook for optional command modules: registers `igsp ablate`."""
    register("ablate", "a config grid across seeds in parallel processes: mean ± sd table (ablation.md / .json)",
             _configure, _run)

"""Run reports: `igsp report RUN_DIR [RUN_DIR ...] [--output DIR]` (METHOD.md sections 3, 5, 6).

Reads run directories as the engine writes them (docs/TRAINER_API.md):

- `RUN_DIR/config.json` (required): the resolved config; the report reads `method.name`, `method.eps`,
  `data.kind`, `data.order`, `data.few_shot`, `model.name`.
- `RUN_DIR/results.json` (required): `method`, `tasks`, `acc` (T x T, percent; k x T with k < T rows while a run
  is in progress: the engine rewrites results.json after every task), `params`
  (`trainable_per_task`, `trainable_phase2_per_task`, `trainable_avg`, `total_added`: a
  `igsp.metrics.parameter_report`), `wall_time_s`, `images_per_s`, `convergence`, `usage`.
- `RUN_DIR/log.jsonl` (optional): one JSON event per line; the fallback source of the convergence curves
  (`"convergence"` events) and of expert usage (events carrying a `usage` record).

Writes into the output directory (default: `RUN_DIR/report/` for one run, `./report/` for several):

- `report.md`: a table comparing the runs (method, Transfer, Avg, Last, mean trainable parameters per task,
  total added parameters, wall time, images/s); for MTIL runs a second table beside the published reference
  points (METHOD.md section 5, labelled as published figures); per run a per-task table (Transfer_j, Avg_j,
  Last_j, trainable parameters of phase 1 and phase 2) and its figures.
- `acc_<run>.png`: the accuracy matrix, rows = after training task i, columns = evaluated dataset j.
- `convergence_<run>.png`: router convergence (per check, the max-over-layers TV distance divided by the check's
  noise-floor threshold with the line at 1, or for runs without a noise floor the distance and the eps line;
  one panel per task, the converged_at marker says whether the criterion or the cap ended phase 1). Skipped for
  runs without convergence data (zeroshot, moe-adapters).
- `usage_<run>.png`: expert usage per task, a tasks x experts heatmap of each expert's usage share averaged over
  the adapted layers. Skipped for runs without usage data.
- `report.json`: every number of the tables (round-trips through `json.load`).

Every file is written atomically (temporary file in the same directory, then `os.replace`), so a reader never
sees half a report file. A run in progress (k < T rows) is reported with its partial matrix and no
Transfer / Avg / Last (they are defined on the full matrix). The numbers come from the accuracy matrix through
`igsp.metrics.mtil_metrics`, not from the run's stored `metrics` (a mismatch is logged as a warning).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from igsp.checkpoint import atomic_write_bytes
from igsp.metrics import mtil_metrics

__all__ = [
    "PUBLISHED_MTIL",
    "REPORT_FORMAT",
    "RunData",
    "RunDirError",
    "add_cli_commands",
    "add_report_arguments",
    "convergence_curves",
    "default_output_dir",
    "load_run",
    "main",
    "render_markdown",
    "report_command",
    "run_report",
    "summarize_run",
    "usage_matrix",
]

logger = logging.getLogger(__name__)

REPORT_FORMAT = 1

# METHOD.md section 5: published MTIL results, Order I, ViT-B/16, full-shot (Transfer / Avg / Last, percent).
# These are figures from the literature, not produced by this code; the report labels them as such.
PUBLISHED_MTIL: dict[str, Any] = {
    "setting": "MTIL Order I, ViT-B/16, full-shot",
    "source": "published figures (METHOD.md section 5), not reproduced by this code",
    "rows": [
        {"method": "Zero-shot CLIP", "transfer": 69.4, "avg": 65.3, "last": 65.3},
        {"method": "ZSCL", "transfer": 68.1, "avg": 75.4, "last": 83.6},
        {"method": "MoE-Adapters", "transfer": 68.9, "avg": 76.7, "last": 85.0},
    ],
}

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
LOG_FILE = "log.jsonl"

# Which log events a task's usage record is taken from, best first: the usage that pruning read (the converged
# distribution), then the task's final record, then the last convergence window.
_USAGE_EVENT_PRIORITY = ("prune", "task_end", "convergence")


class RunDirError(ValueError):
    """A run directory is malformed; the message names the path, the file and the field."""


@dataclass
class RunData:
    """One run directory, loaded and validated.

    Attributes:
        run_dir: the directory.
        label: a unique, file-name-safe name of the run inside one report (the directory's name by default).
        config: config.json as a dict.
        results: results.json as a dict.
        events: log.jsonl records in file order ([] without a log).
        tasks: task names in stream order (T,).
        acc: (k, T) float64 accuracy matrix in percent, rows = after task i, columns = dataset j; k = T once the
            run is complete, fewer rows while it is in progress.
    """

    run_dir: Path
    label: str
    config: dict[str, Any]
    results: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    acc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def complete(self) -> bool:
        """Every task trained and evaluated (the accuracy matrix is square)."""
        return self.acc.shape[0] == len(self.tasks)


# ----------------------------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"run directory {str(path.parent)!r} has no {path.name} (expected {str(path)!r})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_log(path: Path) -> list[dict[str, Any]]:
    """log.jsonl records; a torn last line (a run killed mid-write: no trailing newline) is skipped."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    events: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                logger.warning("%s:%d: skipping a truncated last line (%s)", path, number, exc)
                continue
            raise RunDirError(f"{path}:{number}: not valid JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise RunDirError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        events.append(record)
    return events


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name)
    return value if isinstance(value, Mapping) else {}


def load_run(run_dir: str | os.PathLike[str], label: str | None = None) -> RunData:
    """Load and validate one run directory.

    Args:
        run_dir: a directory holding config.json and results.json (log.jsonl optional).
        label: the run's name in the report (default: the directory's name).
    Raises:
        FileNotFoundError: the directory or one of its required files is missing (message names both).
        RunDirError: a file is not valid JSON or `acc` / `tasks` are malformed (message names file and field).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist or is not a directory")
    config = _read_json(path / CONFIG_FILE)
    results = _read_json(path / RESULTS_FILE)
    events = _read_log(path / LOG_FILE)
    where = path / RESULTS_FILE
    if "acc" not in results:
        raise RunDirError(f"{where}: missing field 'acc' (the T x T accuracy matrix); "
                          f"fields present: {sorted(results)}")
    try:
        acc = np.asarray(results["acc"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise RunDirError(f"{where}: field 'acc' must be a T x T matrix of numbers (rows: after task i, "
                          f"columns: dataset j), got {results['acc']!r}") from exc
    if acc.ndim != 2 or not 1 <= acc.shape[0] <= acc.shape[1] or not np.isfinite(acc).all():
        raise RunDirError(f"{where}: field 'acc' must be a T x T matrix of finite numbers (rows: after task i, "
                          f"columns: dataset j; fewer rows while the run is in progress, at least one), got "
                          f"shape {acc.shape}: {results['acc']!r}")
    T = acc.shape[1]
    tasks = results.get("tasks")
    if tasks is None:
        tasks = _section(config, "data").get("tasks") or [f"task{i}" for i in range(T)]
    if (not isinstance(tasks, list) or len(tasks) != T
            or not all(isinstance(t, str) and t for t in tasks)):
        raise RunDirError(f"{where}: field 'tasks' must be a list of {T} task names (acc has {T} columns), "
                          f"got {tasks!r}")
    stored = results.get("metrics")
    if isinstance(stored, Mapping) and acc.shape[0] == T:
        metrics_check = mtil_metrics(acc)
        for key in ("transfer", "avg", "last"):
            a, b = stored.get(key), metrics_check[key]
            if isinstance(a, (int, float)) and b is not None and not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6):
                logger.warning("%s: stored metrics[%r] = %s differs from mtil_metrics(acc) = %s; the report uses "
                               "the value recomputed from acc", where, key, a, b)
    return RunData(run_dir=path, label=label or _safe_label(path.resolve().name), config=config,
                   results=results, events=events, tasks=list(tasks), acc=acc)


def _safe_label(name: str) -> str:
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return label or "run"


def _unique_labels(paths: Sequence[Path]) -> list[str]:
    labels: list[str] = []
    for p in paths:
        base = _safe_label(p.resolve().name)
        label, n = base, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


# ------------------------------------------------------------------------------------------------- extraction
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _count_list(value: Any, what: str, T: int) -> list[int | None] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise RunDirError(f"{what} must be a list of {T} parameter counts, got {value!r}")
    out: list[int | None] = []
    for i, v in enumerate(value):
        if isinstance(v, Mapping):  # a trainable_adapter_params dict
            v = v.get("total")
        if v is None:
            out.append(None)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise RunDirError(f"{what}[{i}] must be a parameter count >= 0, got {v!r}")
        else:
            out.append(int(v))
    return out


def _setting(config: Mapping[str, Any]) -> str:
    data, model = _section(config, "data"), _section(config, "model")
    kind = data.get("kind", "?")
    if kind != "mtil":
        return f"{kind}, {model.get('name', '?')}"
    shots = data.get("few_shot")
    return (f"MTIL Order {data.get('order', '?')}, {model.get('name', '?')}, "
            f"{f'{shots}-shot' if shots else 'full-shot'}")


def _comparable_to_published(config: Mapping[str, Any]) -> bool:
    """Same protocol as PUBLISHED_MTIL: MTIL Order I, ViT-B/16, full-shot (METHOD.md section 5)."""
    data, model = _section(config, "data"), _section(config, "model")
    return (data.get("kind") == "mtil" and data.get("order", "I") == "I" and not data.get("few_shot")
            and model.get("name") == "ViT-B-16" and data.get("tasks") in (None, []))


def _no_metrics(T: int) -> dict[str, Any]:
    """mtil_metrics' keys for an incomplete run: Transfer / Avg / Last need every row of the matrix."""
    return {"transfer": None, "avg": None, "last": None, "transfer_per_task": [None] * T,
            "avg_per_task": [None] * T, "last_per_task": [None] * T}


def summarize_run(run: RunData) -> dict[str, Any]:
    """Every number the tables show for one run (JSON-ready).

    Returns:
        {"label", "run_dir", "method", "data_kind", "setting", "comparable_to_published", "tasks",
         "complete", "tasks_done" (rows of acc), "metrics" (mtil_metrics(acc): transfer, avg, last and
         per-dataset lists; all None while the run is incomplete), "acc" (k x T),
         "params": {"trainable_per_task", "trainable_phase2_per_task", "trainable_avg",
         "trainable_weighted_avg" (phase-step-weighted mean over tasks, as parameter_report), "total_added"},
         "wall_time_s", "images_per_s"}; absent values are None.
    """
    res, where = run.results, run.run_dir / RESULTS_FILE
    T = len(run.tasks)
    params = res.get("params") or {}
    if not isinstance(params, Mapping):
        raise RunDirError(f"{where}: field 'params' must be an object, got {params!r}")
    p1 = _count_list(params.get("trainable_per_task"), f"{where}: params.trainable_per_task", T)
    p2 = _count_list(params.get("trainable_phase2_per_task"), f"{where}: params.trainable_phase2_per_task", T)
    avg = _number(params.get("trainable_avg"))
    if avg is None and p1:
        known = [v for v in p1 if v is not None]
        avg = float(np.mean(known)) if known else None
    total = params.get("total_added")
    if isinstance(total, Mapping):
        total = total.get("total")
    if total is not None and (isinstance(total, bool) or not isinstance(total, (int, float)) or total < 0):
        raise RunDirError(f"{where}: params.total_added must be a parameter count >= 0, got {total!r}")
    method = res.get("method") or _section(run.config, "method").get("name") or "?"
    return {
        "label": run.label,
        "run_dir": str(run.run_dir),
        "method": str(method),
        "data_kind": _section(run.config, "data").get("kind"),
        "setting": _setting(run.config),
        "comparable_to_published": _comparable_to_published(run.config),
        "tasks": list(run.tasks),
        "complete": run.complete,
        "tasks_done": int(run.acc.shape[0]),
        "metrics": mtil_metrics(run.acc) if run.complete else _no_metrics(T),
        "acc": run.acc.tolist(),
        "params": {"trainable_per_task": p1, "trainable_phase2_per_task": p2, "trainable_avg": avg,
                   "trainable_weighted_avg": _number(params.get("trainable_weighted_avg")),
                   "total_added": None if total is None else int(total)},
        "wall_time_s": _number(res.get("wall_time_s")),
        "images_per_s": _number(res.get("images_per_s")),
    }


def _task_index(entry: Mapping[str, Any], tasks: Sequence[str], fallback: int | None, what: str) -> int:
    task = entry.get("task")
    if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(tasks):
        return task
    name = entry.get("task_name", task if isinstance(task, str) else None)
    if isinstance(name, str) and name in tasks:
        return tasks.index(name)
    if fallback is not None and 0 <= fallback < len(tasks):
        return fallback
    raise RunDirError(f"{what}: cannot tell which task this record belongs to (task={task!r}, "
                      f"task_name={entry.get('task_name')!r}; tasks: {list(tasks)})")


def convergence_curves(run: RunData) -> list[dict[str, Any]]:
    """The router-convergence curve of each task that has one (results.json 'convergence', else log.jsonl).

    Returns:
        [{"task": int, "task_name": str, "steps": [int], "distances": [float | None] (None: a check without a
          previous window), "ratios": [float | None] (distance / the check's noise-floor threshold, runs with
          method.noise_floor='permutation'; None otherwise), "converged_at": int | None, "forced": bool,
          "eps": float | None}], sorted by task;
        [] when the run has no convergence data (zeroshot, moe-adapters).
    """
    eps_default = _number(_section(run.config, "method").get("eps"))
    curves: dict[int, dict[str, Any]] = {}
    stored = run.results.get("convergence")
    where = run.run_dir / RESULTS_FILE
    if stored:
        if not isinstance(stored, list):
            raise RunDirError(f"{where}: field 'convergence' must be a list of {{task, converged_at, history}}, "
                              f"got {type(stored).__name__}")
        for i, entry in enumerate(stored):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("history", []), list):
                raise RunDirError(f"{where}: convergence[{i}] must be an object with a 'history' list, got {entry!r}")
            t = _task_index(entry, run.tasks, i, f"{where}: convergence[{i}]")
            history = [h for h in entry.get("history", []) if isinstance(h, Mapping) and "step" in h]
            forced = bool(entry.get("forced")) or any(bool(h.get("forced")) for h in history)
            curves[t] = {"task": t, "task_name": run.tasks[t], "steps": [int(h["step"]) for h in history],
                         "distances": [_number(h.get("distance")) for h in history],
                         "ratios": [_number(h.get("ratio")) for h in history],
                         "converged_at": entry.get("converged_at"), "forced": forced,
                         "eps": _number(entry.get("eps")) or eps_default}
    else:
        where = run.run_dir / LOG_FILE
        phase2_start: dict[int, int] = {}
        for n, ev in enumerate(run.events):
            kind = ev.get("event")
            if kind == "phase" and ev.get("phase") == 2 and isinstance(ev.get("step"), int):
                t = _task_index(ev, run.tasks, None, f"{where}: record {n + 1}")
                phase2_start.setdefault(t, ev["step"])
            if kind != "convergence" or not isinstance(ev.get("step"), int):
                continue
            t = _task_index(ev, run.tasks, None, f"{where}: record {n + 1}")
            c = curves.setdefault(t, {"task": t, "task_name": run.tasks[t], "steps": [], "distances": [],
                                      "ratios": [], "converged_at": None, "forced": False,
                                      "eps": _number(ev.get("eps")) or eps_default})
            c["steps"].append(ev["step"])
            c["distances"].append(_number(ev.get("distance")))
            c["ratios"].append(_number(ev.get("ratio")))
            if isinstance(ev.get("converged_at"), int):
                c["converged_at"] = ev["converged_at"]
            elif ev.get("converged") and c["converged_at"] is None:
                c["converged_at"] = ev["step"]
            c["forced"] = c["forced"] or bool(ev.get("forced"))
        for t, c in curves.items():
            if c["converged_at"] is None and t in phase2_start:
                c["converged_at"] = phase2_start[t]  # phase 2 starts where the router converged
    for c in curves.values():
        if not isinstance(c["converged_at"], int) or isinstance(c["converged_at"], bool):
            c["converged_at"] = None
    return [curves[t] for t in sorted(curves) if curves[t]["steps"]]


def _layer_shares(usage: Any, what: str) -> list[np.ndarray]:
    """Per-layer usage vectors {layer: [E numbers]} renormalised to shares (layers with no routing dropped)."""
    if not isinstance(usage, Mapping):
        raise RunDirError(f"{what} must be an object {{layer: [usage per expert]}}, got {type(usage).__name__}")
    out = []
    for layer, vec in usage.items():
        try:
            u = np.asarray(vec, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise RunDirError(f"{what}[{layer!r}] must be a list of numbers, got {vec!r}") from exc
        if u.ndim != 1 or not np.isfinite(u).all() or (u < 0).any():
            raise RunDirError(f"{what}[{layer!r}] must be a list of finite numbers >= 0, got {vec!r}")
        if u.sum() > 0:
            out.append(u / u.sum())
    return out


def usage_matrix(run: RunData) -> dict[str, Any] | None:
    """Expert usage per task: each expert's usage share averaged over the adapted layers.

    Expert e of a layer is the same expert in every record of that layer (MoELoRALinear keeps the order), and
    historical experts come first, so column e lines up across tasks within a layer. Layers may hold different
    numbers of experts (pruning): the mean over layers ignores layers without an expert e.

    Returns:
        None without usage data, else {"tasks": [int], "task_names": [str], "shares": (n_tasks, E_max) list of
        lists, float | None (None: no layer has expert e at that task), "layers": [int] layers per task}.
    """
    where = run.run_dir / RESULTS_FILE
    per_task: dict[int, list[np.ndarray]] = {}
    stored = run.results.get("usage")
    if stored:
        items: list[tuple[Any, Any, str]]
        if isinstance(stored, Mapping):  # {task name: {layer: [...]}}
            items = [({"task_name": k}, v, f"{where}: usage[{k!r}]") for k, v in stored.items()]
        elif isinstance(stored, list):
            items = []
            for i, entry in enumerate(stored):
                # [{task, task_name, usage: {layer: [...]}}, ...] or [{layer: [...]}, ...] in task order.
                if isinstance(entry, Mapping) and isinstance(entry.get("usage"), Mapping):
                    items.append((entry, entry["usage"], f"{where}: usage[{i}].usage"))
                else:
                    items.append(({"task": i}, entry, f"{where}: usage[{i}]"))
        else:
            raise RunDirError(f"{where}: field 'usage' must be a list (one record per task) or an object, "
                              f"got {type(stored).__name__}")
        for i, (meta, usage, what) in enumerate(items):
            t = _task_index(meta, run.tasks, i, what)
            per_task[t] = _layer_shares(usage, what)
    else:
        where = run.run_dir / LOG_FILE
        best: dict[int, tuple[int, int]] = {}  # task -> (priority, event index); later events of a kind win
        for n, ev in enumerate(run.events):
            if not isinstance(ev.get("usage"), Mapping) or not ev["usage"]:
                continue
            kind = ev.get("event")
            prio = _USAGE_EVENT_PRIORITY.index(kind) if kind in _USAGE_EVENT_PRIORITY else len(_USAGE_EVENT_PRIORITY)
            t = _task_index(ev, run.tasks, None, f"{where}: record {n + 1}")
            if t not in best or prio <= best[t][0]:
                best[t] = (prio, n)
        for t, (_, n) in best.items():
            per_task[t] = _layer_shares(run.events[n]["usage"], f"{where}: record {n + 1} usage")
    per_task = {t: v for t, v in per_task.items() if v}
    if not per_task:
        return None
    e_max = max(len(u) for shares in per_task.values() for u in shares)
    order = sorted(per_task)
    rows: list[list[float | None]] = []
    for t in order:
        padded = np.full((len(per_task[t]), e_max), np.nan)
        for k, u in enumerate(per_task[t]):
            padded[k, : len(u)] = u
        counts = (~np.isnan(padded)).sum(axis=0)
        sums = np.nansum(padded, axis=0)
        rows.append([float(s / c) if c else None for s, c in zip(sums, counts)])
    return {"tasks": order, "task_names": [run.tasks[t] for t in order], "shares": rows,
            "layers": [len(per_task[t]) for t in order]}


# ------------------------------------------------------------------------------------------------------ output
def _save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _new_figure(width: float, height: float) -> Any:
    # Figure + its own Agg canvas, without pyplot: no global figure registry, no backend switching in the
    # caller's process (a library must not change matplotlib's global state).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(acc: np.ndarray, tasks: Sequence[str], path: Path, title: str) -> None:
    """Heatmap of the (k, T) accuracy matrix (percent) with annotated cells; rows = after task i, cols = dataset j.

    k < T (a run in progress) draws the rows done so far.
    """
    k, T = acc.shape
    fig = _new_figure(2.5 + 0.75 * T, 2.0 + 0.6 * k)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(acc, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    fontsize = 9 if T <= 8 else 7
    for i in range(k):
        for j in range(T):
            # Light text on the dark (low) end of viridis, dark text on the bright end.
            ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=fontsize,
                    color="white" if acc[i, j] < 60.0 else "black")
    ax.set_xticks(range(T))
    ax.set_xticklabels(tasks, rotation=45, ha="right")
    ax.set_yticks(range(k))
    ax.set_yticklabels([f"after {t}" for t in tasks[:k]])
    ax.set_xlabel("evaluated dataset j")
    ax.set_ylabel("after training task i")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="top-1 accuracy (%)")
    _save_figure(fig, path)


def plot_convergence(curves: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """One panel per task: max-over-layers TV distance vs step, the eps line and the converged_at marker; for
    runs with a noise floor, the largest ratio of a layer's distance to its threshold, with the line at 1."""
    n = len(curves)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _new_figure(3.6 * cols, 2.8 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for k, c in enumerate(curves):
        ax = axes[k // cols][k % cols]
        ratios = c.get("ratios") or []
        use_ratio = any(r is not None for r in ratios)
        ys = ratios if use_ratio else c["distances"]
        pts = [(s, d) for s, d in zip(c["steps"], ys) if d is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, lw=1.2,
                    label="distance / threshold" if use_ratio else "distance")
        if use_ratio:
            ax.axhline(1.0, color="tab:red", ls="--", lw=1, label="noise floor (stable below)")
        elif c.get("eps") is not None:
            ax.axhline(c["eps"], color="tab:red", ls="--", lw=1, label=f"eps = {c['eps']:g}")
        if c.get("converged_at") is not None:
            what = "cap" if c.get("forced") else "converged"
            ax.axvline(c["converged_at"], color="tab:green", ls=":", lw=1.5, label=f"{what} @ {c['converged_at']}")
        ax.set_title(f"task {c['task']}: {c['task_name']}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(bottom=0.0)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    any_ratio = any(r is not None for c in curves for r in (c.get("ratios") or []))
    for ax_row in axes:
        ax_row[0].set_ylabel("max TV / threshold" if any_ratio else "max TV distance")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_usage(usage: Mapping[str, Any], path: Path, title: str) -> None:
    """Heatmap tasks x experts of each expert's usage share averaged over layers (blank: no such expert)."""
    shares = np.array([[np.nan if v is None else v for v in row] for row in usage["shares"]], dtype=np.float64)
    n_tasks, n_exp = shares.shape
    fig = _new_figure(2.5 + 0.45 * n_exp, 1.5 + 0.5 * n_tasks)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(shares), cmap="magma", vmin=0.0, aspect="auto")
    if n_exp <= 16:  # 22 experts (MoE-Adapters) leave no room for readable numbers in the cells
        for i in range(n_tasks):
            for j in range(n_exp):
                if not np.isnan(shares[i, j]):
                    ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if shares[i, j] < 0.5 * np.nanmax(shares) else "black")
    ax.set_xticks(range(n_exp))
    ax.set_xlabel("expert index (historical experts first)")
    ax.set_yticks(range(n_tasks))
    ax.set_yticklabels([f"{t}: {name}" for t, name in zip(usage["tasks"], usage["task_names"])])
    ax.set_ylabel("task (its router)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="usage share (mean over layers)")
    _save_figure(fig, path)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_count(value: float | None) -> str:
    return "–" if value is None else f"{round(value):,}"


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _setting_cell(r: Mapping[str, Any]) -> str:
    done = "" if r["complete"] else f"; in progress: {r['tasks_done']}/{len(r['tasks'])} tasks"
    return _cell(r["setting"] + done)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md from the dict `run_report` returns (see the module docstring for the sections)."""
    runs = report["runs"]
    out = ["# igsp run report", ""]
    out += ["Transfer / Avg / Last: METHOD.md section 5, from each run's accuracy matrix (percent). Trainable: "
            "parameters a task trains in phase 1 (router + candidates), mean over tasks; total added: experts + "
            "routers + selector stored after the last task (METHOD.md section 6). Wall time: h:mm:ss.", ""]
    out += ["| Run | Method | Setting | Transfer | Avg | Last | Trainable / task (mean) | Total added | Wall time "
            "| Images/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        m, p = r["metrics"], r["params"]
        out.append(f"| {_cell(r['label'])} | {_cell(r['method'])} | {_setting_cell(r)} | {_fmt(m['transfer'])} "
                   f"| {_fmt(m['avg'])} | {_fmt(m['last'])} | {_fmt_count(p['trainable_avg'])} "
                   f"| {_fmt_count(p['total_added'])} | {_fmt_duration(r['wall_time_s'])} "
                   f"| {_fmt(r['images_per_s'], 1)} |")
    out.append("")
    if report.get("published_mtil") is not None:
        pub = report["published_mtil"]
        out += ["## MTIL: our runs beside published reference points", "",
                f"Rows marked *published* are {pub['source']} ({pub['setting']}). Only our runs in that same "
                "setting are directly comparable.", "",
                "| Source | Method | Setting | Transfer | Avg | Last |", "|---|---|---|---:|---:|---:|"]
        for r in runs:
            if r["data_kind"] != "mtil":
                continue
            m = r["metrics"]
            note = "" if r["comparable_to_published"] else " (not the published setting)"
            out.append(f"| ours: {_cell(r['label'])} | {_cell(r['method'])} | {_setting_cell(r)}{note} "
                       f"| {_fmt(m['transfer'])} | {_fmt(m['avg'])} | {_fmt(m['last'])} |")
        for row in pub["rows"]:
            out.append(f"| *published* | {row['method']} | {pub['setting']} | {_fmt(row['transfer'], 1)} "
                       f"| {_fmt(row['avg'], 1)} | {_fmt(row['last'], 1)} |")
        out.append("")
    for r in runs:
        m, p = r["metrics"], r["params"]
        out += [f"## Run {r['label']}", "", f"`{r['run_dir']}`: {r['method']}, {_setting_cell(r)}.", "",
                "| # | Task | Transfer_j | Avg_j | Last_j | Trainable (phase 1) | Trainable (phase 2) |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        p1 = p["trainable_per_task"] or []
        p2 = p["trainable_phase2_per_task"] or []
        for j, name in enumerate(r["tasks"]):
            out.append(f"| {j} | {_cell(name)} | {_fmt(m['transfer_per_task'][j])} | {_fmt(m['avg_per_task'][j])} "
                       f"| {_fmt(m['last_per_task'][j])} | {_fmt_count(p1[j] if j < len(p1) else None)} "
                       f"| {_fmt_count(p2[j] if j < len(p2) else None)} |")
        out.append("")
        if p["trainable_weighted_avg"] is not None:
            out += [f"Trainable parameters per task weighted by the steps of each phase, mean over tasks: "
                    f"{_fmt_count(p['trainable_weighted_avg'])} (the main table shows phase 1's count, the "
                    "conservative one).", ""]
        figs = r["figures"]
        captions = {"accuracy": "Accuracy matrix (rows: after training task i; columns: evaluated dataset j)",
                    "convergence": "Router convergence (max TV distance over layers per check)",
                    "usage": "Expert usage per task (share, mean over layers)"}
        for key, caption in captions.items():
            if figs.get(key):
                out += [f"{caption}:", "", f"![{key} {r['label']}]({figs[key]})", ""]
        missing = [k for k in ("convergence", "usage") if not figs.get(k)]
        if missing:
            out += [f"No {' or '.join(missing)} data in this run: those plots are skipped.", ""]
    return "\n".join(out)


def default_output_dir(run_dirs: Sequence[str | os.PathLike[str]]) -> Path:
    """`RUN_DIR/report` for one run, `./report` (the current directory) for several."""
    return Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report")


def run_report(run_dirs: Sequence[str | os.PathLike[str]],
               output_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write report.md, report.json and the PNG figures of `run_dirs` into `output_dir`; return the summary.

    Args:
        run_dirs: one or more run directories (engine layout, docs/TRAINER_API.md).
        output_dir: where to write (created if needed); None: `default_output_dir(run_dirs)`.
    Returns:
        The dict saved as report.json: {"format", "output_dir", "runs": [summarize_run(...) + "figures" (file
        names relative to output_dir, None when skipped), "convergence" (converged_at per task)],
        "published_mtil": PUBLISHED_MTIL when any run is an MTIL run, else None}.
    Raises:
        FileNotFoundError / RunDirError: a run directory is missing or malformed (all are checked before
        anything is written).
    """
    if isinstance(run_dirs, (str, bytes, os.PathLike)) or not isinstance(run_dirs, Sequence) or not run_dirs:
        raise ValueError(f"run_dirs must be a non-empty list of run directories, got {run_dirs!r}")
    paths = [Path(p) for p in run_dirs]
    labels = _unique_labels(paths)
    runs = [load_run(p, label) for p, label in zip(paths, labels)]
    out_dir = Path(output_dir) if output_dir is not None else default_output_dir(paths)
    out_dir.mkdir(parents=True, exist_ok=True)

    summaries = []
    for run in runs:
        s = summarize_run(run)
        curves = convergence_curves(run)
        usage = usage_matrix(run)
        figures: dict[str, str | None] = {"accuracy": f"acc_{run.label}.png", "convergence": None, "usage": None}
        plot_accuracy(run.acc, run.tasks, out_dir / figures["accuracy"], f"{run.label} ({s['method']})")
        if curves:
            figures["convergence"] = f"convergence_{run.label}.png"
            plot_convergence(curves, out_dir / figures["convergence"], f"Router convergence: {run.label}")
        if usage is not None:
            figures["usage"] = f"usage_{run.label}.png"
            plot_usage(usage, out_dir / figures["usage"], f"Expert usage per task: {run.label}")
        s["figures"] = figures
        s["convergence"] = [{"task": c["task"], "task_name": c["task_name"], "converged_at": c["converged_at"],
                             "forced": c["forced"], "checks": len(c["steps"])} for c in curves]
        s["usage"] = usage
        summaries.append(s)
        logger.info("report: %s (%s) -> %s", run.run_dir, s["method"], out_dir)

    report = {"format": REPORT_FORMAT, "output_dir": str(out_dir), "runs": summaries,
              "published_mtil": PUBLISHED_MTIL if any(s["data_kind"] == "mtil" for s in summaries) else None}
    atomic_write_bytes(out_dir / "report.md", render_markdown(report).encode("utf-8"))
    atomic_write_bytes(out_dir / "report.json",
                        (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return report


# --------------------------------------------------------------------------------------------------------- CLI
def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `igsp report` arguments (RUN_DIR..., --output) to `parser`; returns it."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (config.json, results.json, log.jsonl) to report on")
    parser.add_argument("--output", "-o", default=None, metavar="DIR",
                        help="output directory (default: RUN_DIR/report for one run, ./report for several)")
    return parser


def report_command(args: argparse.Namespace) -> int:
    """Run the report for parsed arguments (for the `igsp` CLI's subcommand dispatch); 0 on success, 2 on error."""
    try:
        report = run_report(args.run_dirs, args.output)
    except (FileNotFoundError, RunDirError) as exc:
        sys.stderr.write(f"igsp report: error: {exc}\n")
        return 2
    sys.stdout.write(f"{Path(report['output_dir']) / 'report.md'}\n")
    return 0


def add_cli_commands(register: Any) -> None:
    """igsp.cli's hook for optional command modules: registers `igsp report` with `register(name, help,
    configure, run)` (igsp.cli.register_command)."""
    register("report", "tables and figures (report.md, PNGs, report.json) of one or more run directories",
             add_report_arguments, report_command)


def main(argv: list[str] | None = None) -> int:
    """`igsp report RUN_DIR [RUN_DIR ...] [--output DIR]` as a standalone entry point; returns the exit code."""
    parser = add_report_arguments(argparse.ArgumentParser(
        prog="igsp report", description="Tables and figures of one or more igsp run directories."))
    return report_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

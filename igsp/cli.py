"""The `igsp` command line: `train`, `eval`, `params`, `demo` (and whatever registers itself: `report`, `pretrain`).

    igsp train CONFIG [--set a.b=v ...] [--output DIR] [--kernels auto|reference|triton|cpp]
    igsp train --resume RUN_DIR [--set a.b=v ...]
    igsp eval RUN_DIR [--selector prototypes|oracle]
    igsp params CONFIG [--set a.b=v ...] [--survival F] [--baseline CONFIG]
    igsp demo [--stream offline-mtil|digits] [--output DIR]
    igsp pretrain [--output DIR] [--steps N] [...] [--tag TAG] [--install]
    torchrun --nproc_per_node N -m igsp.cli train CONFIG ...     (DDP; only rank 0 prints and writes)

CONFIG is a preset name (`igsp/configs/<name>.json`, listed by `igsp train --help`), a JSON file or a run
directory. Subcommands live in the `COMMANDS` registry: `register_command(name, help, configure, run)` adds one;
a module in `OPTIONAL_COMMAND_MODULES` that exists is imported and its `add_cli_commands(register_command)`
called, so a report module can add `igsp report` without editing this file.

Errors, for every command (registered ones included): `main()` turns any exception a command raises into one
line on stderr, `igsp CMD: error: MESSAGE`, where the message names the file or field (notes the library
attached follow it after "; "). Bad input (a config value, a missing or malformed file or folder, a corrupt or
foreign checkpoint, an unreadable image, a busy run folder, a diverged run: `input_error_types()`) exits 2,
like argparse's own usage errors. Anything else is a bug or an environment failure: the line names the
exception type and the command exits 1. `--debug` (before or after the command) prints the full traceback
too. Ctrl-C exits 130 with one line.

This module prints: its output is the command's output. The library underneath only logs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "DEMO_PRESETS", "DEMO_STREAMS", "EXIT_BUG", "EXIT_INPUT", "OPTIONAL_COMMAND_MODULES",
           "error_message", "format_matrix", "input_error_types", "main", "register_command"]

logger = logging.getLogger(__name__)

# `igsp demo` runs these presets of a stream, in order. offline-mtil (the default) runs on the CLIP pretrained
# offline (igsp-small-synthetic), so its zero-shot row and Transfer column mean something; digits (random-init
# tiny CLIP, ~1 minute a method) stays as the fastest smoke test.
DEMO_STREAMS: dict[str, tuple[str, ...]] = {
    "offline-mtil": ("offline-mtil-igsp", "offline-mtil-moe-adapters", "offline-mtil-lora", "offline-mtil-zeroshot"),
    "digits": ("digits-igsp", "digits-moe-adapters", "digits-zeroshot"),
}
DEMO_PRESETS = DEMO_STREAMS["offline-mtil"]
OPTIONAL_COMMAND_MODULES = ("igsp.report", "igsp.plan", "igsp.pretrain.command", "igsp.ablate")
EXIT_INPUT = 2  # bad input (argparse uses 2 for usage errors too)
EXIT_BUG = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def input_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (exit 2); imported on use, so `igsp --help` stays fast."""
    from igsp.model import PretrainedWeightsError
    from igsp.runlock import RunLockedError

    # OSError: missing or unreadable files and folders (FileNotFoundError, DatasetNotFoundError, BadImageError,
    # PermissionError); ValueError: ConfigError, CheckpointError, RunDirError and every library argument check;
    # ArithmeticError: NonFiniteError (a diverged run: its config's lr).
    return (OSError, ValueError, ArithmeticError, PretrainedWeightsError, RunLockedError)


@dataclass
class Command:
    """A subcommand: `configure` adds its arguments, `run` executes it and returns the exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> None:
    """Add (or replace) subcommand `name`."""
    COMMANDS[name] = Command(name, help, configure, run)


# ----------------------------------------------------------------------------------------------- output
def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _out(text: str = "") -> None:
    if _is_main_rank():
        print(text, flush=True)


def format_matrix(acc: Sequence[Sequence[float]], names: Sequence[str]) -> str:
    """The accuracy matrix as text: one row per 'after task i', one column per dataset j (percent)."""
    width = max(7, min(16, max((len(n) for n in names), default=0) + 2))
    short = [n[: width - 1] for n in names]
    label_w = width + 7
    lines = [" " * label_w + "".join(f"{s:>{width}}" for s in short)]
    for i, row in enumerate(acc):
        label = f"after {short[i] if i < len(short) else i}"
        lines.append(f"{label:<{label_w}}" + "".join(f"{v:>{width}.1f}" for v in row))
    return "\n".join(lines)


def _fmt_metric(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.1f}"


def _summary(results: dict[str, Any]) -> str:
    m = results.get("metrics") or {}
    p = results.get("params") or {}
    lines = [f"method {results['method']} ({results['name']}): {len(results['tasks'])} tasks, "
             f"wall time {results['wall_time_s']:.1f} s"
             + (f", {results['images_per_s']:.0f} train images/s" if results.get("images_per_s") else ""),
             format_matrix(results["acc"], results["tasks"])]
    if m:
        lines.append(f"Transfer {_fmt_metric(m['transfer'])}   Avg {_fmt_metric(m['avg'])}   "
                     f"Last {_fmt_metric(m['last'])}")
    if p:
        lines.append(f"trainable params per task {p.get('trainable_per_task')}  total added {p.get('total_added')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ train
def _configure_train(p: argparse.ArgumentParser) -> None:
    from igsp.config import list_presets

    p.add_argument("config", nargs="?", help=f"preset name, JSON file or run directory; presets: "
                                             f"{', '.join(list_presets())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config value (repeatable), e.g. --set train.iterations=20")
    p.add_argument("--output", help="run directory (default runs/<name>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--kernels", choices=["auto", "reference", "triton", "cpp"], help="MoE-LoRA backend")
    _add_data_arguments(p)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", metavar="DIR", help="MTIL data root holding every dataset's folder (data.root)")
    p.add_argument("--download", action="store_true",
                   help="let torchvision download missing MTIL datasets where it can (data.download)")


def _data_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "data_root", None):
        out.append(f"data.root={args.data_root}")
    if getattr(args, "download", False):
        out.append("data.download=true")
    return out


def _run_train(args: argparse.Namespace) -> int:
    from igsp.checkpoint import require_run_dir
    from igsp.config import load_config
    from igsp.engine import Trainer

    overrides = list(args.overrides) + _data_overrides(args)
    if args.kernels:
        overrides.append(f"train.kernels={args.kernels}")
    if args.resume:
        if args.config and Path(args.config).resolve() != Path(args.resume).resolve():
            logger.warning("--resume %s: using the run's own config.json, not %s", args.resume, args.config)
        config = load_config(require_run_dir(args.resume), overrides)
        trainer = Trainer(config, resume=args.resume)
    else:
        if not args.config:
            args._parser.error("give CONFIG (a preset, JSON file or run directory) or --resume RUN_DIR")
        config = load_config(args.config, overrides)
        if args.output:
            config.output_dir = args.output
        trainer = Trainer(config)
    try:
        results = trainer.fit()
    finally:
        trainer.close()
    _out(_summary(results))
    _out(f"run directory: {trainer.run_dir}")
    return 0


# ------------------------------------------------------------------------------------------------- eval
def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (config.json + checkpoints/latest.pt)")
    p.add_argument("--selector", choices=["prototypes", "oracle"],
                   help="task selection (default: the run's); 'oracle' uses the evaluated dataset's own router")
    _add_data_arguments(p)


def _run_eval(args: argparse.Namespace) -> int:
    from igsp.checkpoint import require_run_dir
    from igsp.config import load_config
    from igsp.engine import Trainer

    overrides = ([f"method.selector={args.selector}"] if args.selector else []) + _data_overrides(args)
    config = load_config(require_run_dir(args.run_dir), overrides)
    trainer = Trainer(config, resume=args.run_dir, read_only=True)
    try:
        row, stats = trainer.evaluate()
    finally:
        trainer.close()
    k = trainer.finished_tasks()
    _out(f"{config.method.name} after {k} of {len(trainer.task_names)} tasks "
         f"(selector: {config.method.selector}):")
    _out(f"{'dataset':<20}{'acc %':>8}{'own task':>10}{'zero-shot':>11}")
    for name, acc, st in zip(trainer.task_names, row, stats):
        _out(f"{name:<20}{acc:>8.2f}{100 * st['own_task']:>9.1f}%{100 * st['zero_shot']:>10.1f}%")
    _out(f"{'mean':<20}{sum(row) / len(row):>8.2f}")
    if _is_main_rank():
        out = {"acc": row, "selector": stats, "tasks": trainer.task_names, "finished_tasks": k,
               "selector_mode": config.method.selector}
        from igsp.checkpoint import atomic_write_json

        atomic_write_json(Path(args.run_dir) / "eval.json", out)
    return 0


# ----------------------------------------------------------------------------------------------- params
def _configure_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="preset name, JSON file or run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--survival", type=_fraction, default=1.0,
                   help="igsp: fraction of candidates that survive pruning, in [0, 1] (default 1.0: all)")
    p.add_argument("--baseline", metavar="CONFIG", help="another config (e.g. an moe-adapters preset) to compare")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (argparse names the option in its error)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"got {text}; allowed: a number in [0, 1]")
    return value


def _params_lines(rep: dict[str, Any]) -> list[str]:
    lines = [f"method {rep['method']}, {len(rep['tasks'])} tasks, frozen backbone {rep['backbone']:,} parameters"]
    p1, p2 = rep["trainable_per_task"], rep["trainable_phase2_per_task"]
    for t, name in enumerate(rep["tasks"]):
        extra = f", phase 2 {p2[t]:,}" if p2[t] is not None else ""
        lines.append(f"  task {t:>2} {name:<18} trainable {p1[t]:,}{extra}")
    lines.append(f"  trainable per task (avg) {rep['trainable_avg']:,.0f}")
    added = rep["added"] or {}
    experts, routers = added.get("experts", 0), added.get("routers", 0)
    lines.append(f"  total added after the last task {rep['total_added']:,} (experts {experts:,}, "
                 f"routers {routers:,}, selector {added.get('selector', 0):,}; experts + routers "
                 f"{experts + routers:,})")
    return lines


def _run_params(args: argparse.Namespace) -> int:
    from igsp.config import load_config
    from igsp.engine import parameter_plan
    from igsp.metrics import parameter_report

    rep = parameter_plan(load_config(args.config, args.overrides), survival=args.survival)
    base = None
    if args.baseline:
        base = parameter_plan(load_config(args.baseline), survival=1.0)
        ratio = parameter_report([{"phase1": v} for v in rep["trainable_per_task"]], rep["added"],
                                 baseline=base)
        rep["trainable_reduction"] = ratio["trainable_reduction"]
        rep["total_reduction"] = ratio["total_reduction"]
    if args.json:
        _out(json.dumps(rep, indent=1))
        return 0
    for line in _params_lines(rep):
        _out(line)
    if base is not None:
        _out(f"baseline {args.baseline}:")
        for line in _params_lines(base)[-2:]:
            _out(line)
        _out(f"reduction vs baseline: trainable per task {100 * (rep['trainable_reduction'] or 0):.1f}%, "
             f"total added {100 * (rep['total_reduction'] or 0):.1f}%")
    return 0


# ------------------------------------------------------------------------------------------------- demo
def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", choices=sorted(DEMO_STREAMS), default="offline-mtil",
                   help="offline-mtil (default: the pretrained small CLIP, ~7 tasks) or digits (random-init tiny "
                        "CLIP: the fastest smoke test)")
    p.add_argument("--output", default=None,
                   help="parent directory of the runs, one per method (default runs/demo-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a value in every preset of the demo (e.g. train.iterations=50)")


def _run_demo(args: argparse.Namespace) -> int:
    from igsp.config import load_config
    from igsp.engine import Trainer

    parent = Path(args.output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    all_results = []
    start = time.time()
    for preset in DEMO_STREAMS[args.stream]:
        config = load_config(preset, args.overrides)
        config.output_dir = str(parent / preset)
        _out(f"[demo] {preset}: {config.method.name} on the {args.stream} stream "
             f"({config.train.iterations} steps/task)")
        trainer = Trainer(config)
        try:
            all_results.append(trainer.fit())
        finally:
            trainer.close()
    _out()
    for res in all_results:
        _out(_summary(res))
        _out()
    _out(f"{'method':<14}{'Transfer':>9}{'Avg':>7}{'Last':>7}{'trainable/task':>16}{'total added':>13}")
    for res in all_results:
        m, p = res["metrics"], res["params"]
        _out(f"{res['method']:<14}{_fmt_metric(m['transfer']):>9}{_fmt_metric(m['avg']):>7}"
             f"{_fmt_metric(m['last']):>7}{p['trainable_avg']:>16,.0f}{p['total_added']:>13,}")
    _out(f"\ndemo finished in {time.time() - start:.0f} s; runs under {parent}")
    return 0


register_command("train", "train a config over its task stream (or --resume a run)", _configure_train, _run_train)
register_command("eval", "evaluate a run's latest checkpoint on every task (task-agnostic)", _configure_eval,
                 _run_eval)
register_command("params", "parameter counts of a config, without data or training", _configure_params,
                 _run_params)
register_command("demo", "igsp, moe-adapters, lora and zero-shot side by side on an offline stream",
                 _configure_demo, _run_demo)


def _load_optional_commands() -> None:
    for module_name in OPTIONAL_COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # the module is simply not there (yet): fine
                continue
            raise
        hook = getattr(module, "add_cli_commands", None)
        if callable(hook):
            hook(register_command)


def _add_debug_argument(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, print the full traceback (and log at debug level)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every registered subcommand."""
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="igsp", description="iGSP continual learning for CLIP (MoE-LoRA).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    _add_debug_argument(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        # SUPPRESS: `igsp --debug CMD` is not undone by the subcommand's default; `igsp CMD --debug` works too.
        _add_debug_argument(p, argparse.SUPPRESS)
        p.set_defaults(_command=cmd, _parser=p)
    return parser


def error_message(exc: BaseException) -> str:
    """`exc` as the text after `igsp CMD: error: ` (no traceback; notes appended after "; ").

    A KeyError's message is its argument (str() would quote it). An error re-raised from a DataLoader worker
    carries the worker's traceback in its message: only its last line (the original error) is kept.
    """
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc)
    if "Original Traceback (most recent call last)" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    text = text.strip() or type(exc).__name__
    notes = [n for n in getattr(exc, "__notes__", ()) if isinstance(n, str)]
    return "; ".join([text, *notes])


def _fail(command: str, exc: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    rank = int(os.environ.get("RANK", "0"))
    where = f"igsp {command}" + (f" (rank {rank})" if rank else "")  # DDP: every rank reports its own failure
    if isinstance(exc, input_error_types()):
        _err_line(f"{where}: error: {error_message(exc)}")
        return EXIT_INPUT
    first = error_message(exc).splitlines()[0]
    hint = "" if debug else " (rerun with --debug for the traceback)"
    _err_line(f"{where}: error: {type(exc).__name__}: {first}{hint}")
    return EXIT_BUG


def _err_line(text: str) -> None:
    # One write per line: print() writes the text and its newline separately, and under DDP the ranks share
    # stderr, so two ranks' errors could otherwise run together on one line.
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]), run the subcommand, return its exit code.

    0: success; 2: bad input (argparse usage errors included); 1: an unexpected error; 130: interrupted.
    Failures print one `igsp CMD: error: ...` line (module docstring); `--debug` adds the traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.getLogger("igsp").setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args._command.run(args)
    except KeyboardInterrupt:
        _err_line(f"igsp {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _fail(args.command, exc, args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""`igsp pretrain`: pretrain the small CLIP on the synthetic corpus and export it as a tag.

    igsp pretrain [--output DIR] [--model igsp-small] [--steps N] [--batch-size B] [--lr LR] [--seed S]
                  [--threads T] [...] [--tag TAG] [--install]
    igsp pretrain --output DIR --resume          (continue an interrupted run from its checkpoint)

Writes DIR/config.json, DIR/log.jsonl, DIR/checkpoints/latest.pt, and the export DIR/<tag>.pt + DIR/<tag>.json
(the manifest: sha256, the command, seed, corpus version, recorded zero-shot accuracies). `--install` also copies
the export into igsp/pretrained/, where `--set model.pretrained=<tag>` finds it. The committed tag was made by the
command its manifest records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_cli_commands", "configure", "run"]


def _fields() -> list[dataclasses.Field]:
    from igsp.pretrain.train import PretrainConfig

    return list(dataclasses.fields(PretrainConfig))


def configure(p: argparse.ArgumentParser) -> None:
    """The `igsp pretrain` arguments; config options default to None (= PretrainConfig's default, or the resumed
    run's value)."""
    p.add_argument("--output", metavar="DIR", help="run directory (default runs/pretrain-<model>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    for f in _fields():
        kind = {"int": int, "float": float, "str": str}[str(f.type).split(" ")[0]]
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                       metavar=f.name.upper(), help=f"{f.metadata['help']} (default {f.default})")
    p.add_argument("--tag", help="name of the export (default <model>-synthetic)")
    p.add_argument("--install", action="store_true",
                   help="also copy the export into igsp/pretrained/ (what model.pretrained=<tag> loads)")


def _command(args: argparse.Namespace, config: Any, tag: str) -> str:
    parts = ["igsp", "pretrain"]
    if args.output:
        parts += ["--output", args.output]
    for f in _fields():
        parts += [f"--{f.name.replace('_', '-')}", str(getattr(config, f.name))]
    parts += ["--tag", tag] + (["--install"] if args.install else [])
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Run `igsp pretrain`; prints the zero-shot table and the export paths; returns the exit code."""
    from igsp.config import ConfigError
    from igsp.pretrain.export import export_pretrained, install_pretrained
    from igsp.pretrain.train import PretrainConfig, pretrain

    given = {f.name: getattr(args, f.name) for f in _fields() if getattr(args, f.name) is not None}
    if args.resume:
        if not args.output:
            raise ConfigError("--resume: got no --output; allowed: the run directory to continue")
        saved_path = Path(args.output) / "config.json"
        if not saved_path.is_file():
            raise FileNotFoundError(f"--resume: {str(saved_path)!r} does not exist (not a pretraining run)")
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        clash = {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}
        if clash:
            raise ConfigError(f"--resume: options differ from the run's config.json (saved vs given): {clash}")
        config = PretrainConfig(**saved)
    else:
        config = PretrainConfig(**given)
    config.validate()
    out = Path(args.output or f"runs/pretrain-{config.model}-seed{config.seed}")
    tag = args.tag or f"{config.model}-synthetic"
    start = time.time()
    model, tokenizer, summary = pretrain(config, out, resume=args.resume)
    command = _command(args, config, tag)
    manifest_path = export_pretrained(model, tokenizer, config, tag, out, command=command, summary=summary)
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    w = sys.stdout.write
    w(f"pretrained {config.model} for {summary['steps']} steps in {summary['train_s']:.0f} s "
      f"(loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; CPU {summary['cpu_s']:.0f} s training, "
      f"{summary['cpu_workers_s']:.0f} s drawing)\n")
    probe = manifest["corpus_probe"] or {}
    w(f"held-out corpus: subject {probe.get('subject', float('nan')):.1f}%, colour "
      f"{probe.get('colour', float('nan')):.1f}%\n")
    w(f"zero-shot on offline-mtil (test, seed 0):\n{'task':<16}{'acc %':>8}{'chance %':>10}\n")
    for name, r in manifest["zero_shot"]["tasks"].items():
        w(f"{name:<16}{r['accuracy']:>8.1f}{r['chance']:>10.1f}\n")
    w(f"export: {out / manifest['file']} and {manifest_path} (sha256 {manifest['sha256'][:16]}...)\n")
    if args.install:
        w(f"installed: {install_pretrained(manifest_path)}\n")
    w(f"done in {time.time() - start:.0f} s\n")
    return 0


def add_cli_commands(register: Any) -> None:
    """igsp.cli's hook for optional command modules: registers `igsp pretrain`."""
    register("pretrain", "pretrain the small CLIP on the synthetic corpus and export it as a tag", configure, run)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="igsp pretrain")
    configure(parser)
    sys.exit(run(parser.parse_args()))

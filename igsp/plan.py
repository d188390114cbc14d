"""`igsp plan CONFIG`: what a run will do, task by task, without loading data or weights.

Users check a GPU run before paying for it: per task the dataset, its learning rate (and, for MTIL, the reference
scripts' rate for that dataset), iterations, batch size, shots, augmentation and number of prompt templates; the
shared optimisation settings; and, for MTIL presets, every setting that departs from the reference protocol
(MoE-Adapters' MTIL scripts, `igsp.data.mtil.REFERENCE_*`), with the deliberate departures named apart.

    igsp plan mtil-full-orderII-igsp                # table
    igsp plan mtil-fewshot-orderI-moe-adapters --json
    igsp plan RUN_DIR --set train.lr.mnist=5e-4     # a run directory's config.json, with an override

JSON form: `{"preset", "name", "method", "trains", "model": {...}, "data": {...}, "train": {...},
"tasks": [{"index", "name", "display_name", "lr", "reference_lr", "iterations", "batch_size", "few_shot",
"augmentation", "templates", "train_template", "classes"}, ...], "reference": {...} | null}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from igsp.config import Config, load_config
from igsp.data.augment import describe_augmentation
from igsp.data.mtil import REFERENCE_ITERATIONS, REFERENCE_SHOTS, REFERENCE_TRAIN, reference_lr
from igsp.data.stream import describe_task
from igsp.methods.moe_adapters import REFERENCE_SETTINGS as MOE_ADAPTERS_REFERENCE

__all__ = ["DELIBERATE_DIFFERENCES", "add_cli_commands", "build_plan", "format_plan"]

# Named next to every comparison with the published MoE-Adapters numbers (docs/method.md): the one departure
# from their code that is ours on purpose.
DELIBERATE_DIFFERENCES: dict[str, list[str]] = {
    "moe-adapters": [
        "task selection per test sample by frozen-CLIP prototypes (igsp.selector), where MoE-Adapters' DDAS picks "
        "one router per 128-image evaluation batch by autoencoder reconstruction error",
    ],
}


def _input_size(config: Config) -> int | None:
    """The training crop size: the model's input size for MTIL (open_clip config), else data.image_size."""
    if config.data.kind != "mtil":
        return config.data.image_size
    import open_clip

    model_cfg = open_clip.get_model_config(config.model.name) or {}
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    return size[0] if isinstance(size, (list, tuple)) else size


def _reference(config: Config, names: list[str]) -> dict[str, Any] | None:
    """Every departure of an MTIL config from the reference protocol (None for other streams)."""
    if config.data.kind != "mtil":
        return None
    few = config.data.few_shot is not None
    setting = "few_shot" if few else "full"
    t, d, m = config.train, config.data, config.model
    ours: dict[str, Any] = {"model": m.name, "pretrained": m.pretrained, "batch_size": t.batch_size,
                            "warmup": t.warmup, "label_smoothing": t.label_smoothing, "weight_decay": t.weight_decay,
                            "beta2": t.beta2, "grad_clip": t.grad_clip, "precision": t.precision,
                            "augment": d.augment, "train_templates": t.train_templates}
    where = {"model": "model.name", "pretrained": "model.pretrained", "augment": "data.augment"}
    differences = [f"{where.get(k, 'train.' + k)}: {json.dumps(ours[k])} (reference: {json.dumps(v)})"
                   for k, v in REFERENCE_TRAIN.items() if ours[k] != v]
    if config.method.name == "zeroshot":
        # Zero-shot CLIP trains nothing: only the model and the text side (fixed: ZSCL's templates) matter.
        differences = [x for x in differences if x.startswith("model.")]
    else:
        if t.iterations != REFERENCE_ITERATIONS[setting]:
            differences.append(f"train.iterations: {t.iterations} (reference: {REFERENCE_ITERATIONS[setting]})")
        if few and d.few_shot != REFERENCE_SHOTS:
            differences.append(f"data.few_shot: {d.few_shot} (reference: {REFERENCE_SHOTS})")
        for i, name in enumerate(names):
            lr, ref = t.lr_for_task(i, name), reference_lr(name, few)
            if lr != ref:
                differences.append(f"train.lr of {name}: {lr:g} (reference: {ref:g})")
    if config.method.name == "moe-adapters":  # the baseline's model and freezing rule, field by field
        for key, ref in MOE_ADAPTERS_REFERENCE.items():
            section, field_name = key.split(".")
            value = getattr(getattr(config, section), field_name)
            if value != ref:
                differences.append(f"{key}: {json.dumps(value)} (reference: {json.dumps(ref)})")
    return {
        "protocol": f"MoE-Adapters' MTIL {'few-shot' if few else 'full-shot'} scripts",
        "matches": not differences,
        "differences": differences,
        "deliberate": list(DELIBERATE_DIFFERENCES.get(config.method.name, [])),
    }


def build_plan(config: Config, *, preset: str | None = None) -> dict[str, Any]:
    """The plan of `config` (see the module docstring for the JSON form). Loads no data and no weights."""
    names = config.task_names()
    t, d = config.train, config.data
    trains = config.method.name != "zeroshot"
    few = d.few_shot is not None
    augmentation = describe_augmentation(d.augment, _input_size(config), few_shot=few)
    tasks = []
    for i, name in enumerate(names):
        info = describe_task(d.kind, name, num_classes=d.num_classes)
        tasks.append({
            "index": i, "name": name, "display_name": info["display_name"],
            "lr": t.lr_for_task(i, name),
            "reference_lr": reference_lr(name, few) if d.kind == "mtil" else None,
            "iterations": t.iterations if trains else 0, "batch_size": t.batch_size, "few_shot": d.few_shot,
            "augmentation": augmentation if trains else "none (no training)",
            "templates": info["templates"], "train_template": info["train_template"], "classes": info["classes"],
        })
    return {
        "preset": preset, "name": config.name, "method": config.method.name, "trains": trains,
        "model": {"name": config.model.name, "pretrained": config.model.pretrained},
        "data": {"kind": d.kind, "order": d.order if d.kind == "mtil" and d.tasks is None else None,
                 "tasks": names, "few_shot": d.few_shot, "seed": d.seed, "augment": d.augment, "root": d.root},
        "train": {"optimizer": "AdamW", "betas": [0.9, t.beta2], "weight_decay": t.weight_decay,
                  "schedule": f"{t.warmup} linear warm-up steps, then cosine to 0 over each task's iterations",
                  "warmup": t.warmup, "iterations": t.iterations, "batch_size": t.batch_size,
                  "label_smoothing": t.label_smoothing, "grad_clip": t.grad_clip, "precision": t.precision,
                  "seed": t.seed, "train_templates": t.train_templates},
        "tasks": tasks,
        "reference": _reference(config, names),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text: a header, one row per task, the reference comparison."""
    d, t = plan["data"], plan["train"]
    stream = f"MTIL order {d['order']}" if d["order"] else f"{d['kind']} stream"
    shots = f"{d['few_shot']}-shot" if d["few_shot"] else "full-shot"
    lines = [f"plan of {plan['preset'] or plan['name']}: method {plan['method']}, model {plan['model']['name']} "
             f"({plan['model']['pretrained'] or 'random init'}), {stream}, {shots}, {len(plan['tasks'])} tasks"]
    if plan["trains"]:
        clip = "off" if t["grad_clip"] is None else f"max norm {t['grad_clip']:g}"
        lines.append(f"optimizer AdamW (betas {t['betas'][0]:g}/{t['betas'][1]:g}, weight decay "
                     f"{t['weight_decay']:g}), {t['schedule']}, label smoothing {t['label_smoothing']:g}, gradient "
                     f"clipping {clip}, precision {t['precision']}, seed {t['seed']}, training prompts: "
                     f"{t['train_templates']} template")
        lines.append(f"augmentation: {plan['tasks'][0]['augmentation'] if plan['tasks'] else '-'}")
    else:
        lines.append("no training: one evaluation of the frozen model, repeated for every task")
    header = ("#", "dataset", "lr", "ref lr", "iterations", "batch", "shots", "templates", "classes",
              "train template")
    rows = [[_cell(x["index"]), x["name"], _cell(x["lr"]), _cell(x["reference_lr"]), _cell(x["iterations"]),
             _cell(x["batch_size"]), _cell(x["few_shot"] or "all"), _cell(x["templates"]), _cell(x["classes"]),
             _cell(x["train_template"])] for x in plan["tasks"]]
    widths = [max(len(r[c]) for r in [list(header), *rows]) for c in range(len(header) - 1)]
    for r in [list(header), *rows]:
        lines.append("  " + "  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + "  " + r[-1])
    ref = plan["reference"]
    if ref is not None:
        if ref["matches"]:
            lines.append(f"reference protocol ({ref['protocol']}): every setting matches")
        else:
            lines.append(f"reference protocol ({ref['protocol']}): {len(ref['differences'])} difference(s)")
            lines += [f"  - {x}" for x in ref["differences"]]
        lines += [f"deliberate difference: {x}" for x in ref["deliberate"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def add_plan_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", metavar="CONFIG", help="preset name, JSON file or run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config value (repeatable), e.g. --set train.lr.mnist=5e-4")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def plan_command(args: argparse.Namespace) -> int:
    plan = build_plan(load_config(args.config, args.overrides), preset=args.config)
    sys.stdout.write((json.dumps(plan, indent=1) if args.json else format_plan(plan)) + "\n")
    return 0


def add_cli_commands(register: Any) -> None:
    """igsp.cli's hook for optional command modules: registers `igsp plan`."""
    register("plan", "what a run will do per task (lr, iterations, batch, augmentation, templates), no data loaded",
             add_plan_arguments, plan_command)

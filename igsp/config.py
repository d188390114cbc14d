"""Run configuration: nested dataclasses validated on load, JSON presets, `a.b=value` overrides.

A run is described by one `Config` (model, adapters, method, data, train, output_dir). `load_config(name_or_path,
overrides)` reads a preset from `igsp/configs/<name>.json` (or any JSON file, e.g. a run directory's
`config.json`), applies the overrides and validates everything:

- an unknown key is rejected by name, with the allowed keys of its section;
- a wrong value raises `ConfigError` naming the field (`train.precision`), the value and what is allowed.

Presets may start with `"extends": "<other preset>"` or a list of them: the others are loaded first, in order,
and each later one (this file last) is merged into what came before key by key (one level of sections; lists and
mappings such as a per-dataset `train.lr` replaced whole). A list combines a base with a fragment, e.g. the MTIL
few-shot presets extend `["_mtil-igsp", "_mtil-fewshot"]`: the method's base, then the few-shot settings
(`_mtil-fewshot.json` extends nothing, so it cannot reset what the method's base chose). The resolved config (no
`extends`) is what a run saves as `RUN_DIR/config.json`, so a run directory always records exactly what ran.

Per-dataset hyperparameters: `train.lr` is one number, a mapping `{task name: lr}` (the MTIL presets: a dataset
keeps its learning rate in any order, as in the reference scripts) or a positional list (one per stream position;
older run configs use it and stay readable).

Override values are parsed as JSON when they parse (`train.lr=[1e-3,5e-4]`, `model.pretrained=null`,
`train.iterations=20`), otherwise taken as the literal string (`data.kind=digits`); a list-valued field also
accepts a comma-separated string (`data.tasks=digits,parity`); one entry of a mapping is set with a third key
(`train.lr.mnist=5e-4`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from igsp.adapters import AdapterConfig
from igsp.checkpoint import atomic_write_json
from igsp.methods import get_method, method_names

__all__ = [
    "PRESET_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "MethodConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "list_presets",
    "load_config",
    "resolve_preset",
    "save_config",
]

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent / "configs"

DATA_KINDS = ("mtil", "digits", "offline-mtil", "synthetic")
PRECISIONS = ("auto", "fp32", "bf16")
KERNELS = ("auto", "reference", "triton", "cpp")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field, the value and what is allowed."""


def _bad(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: got {value!r}; allowed: {allowed}")


def _choice(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _bad(path, value, " | ".join(repr(a) for a in allowed))


def _int_range(path: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise _bad(path, value, f"an int in [{low}, {'inf' if high is None else high}]")


def _float_range(path: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    """A finite number in [low, high] (`(low, ...` with low_open; no upper bound with high=None).

    Infinity is refused even without an upper bound: no float field has a meaning for it (train.lr = inf
    trained on NaN losses and crashed in linalg.svd at the end of task 0; issue 14); NaN fails every
    comparison, so it is refused too.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        lo = "(" if low_open else "["
        if high is None:
            raise _bad(path, value, f"a finite number {'>' if low_open else '>='} {low}")
        raise _bad(path, value, f"a number in {lo}{low}, {high}]")


# --------------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """The CLIP backbone (frozen)."""

    name: str = field(default="ViT-B-16", metadata={"help": "open_clip model name, or 'igsp-tiny' (CPU tests)"})
    pretrained: str | None = field(default="openai", metadata={
        "help": "open_clip tag ('openai'), a local checkpoint path, or null (random init: tests, `igsp params`)"})
    cache_dir: str | None = field(default=None, metadata={"help": "open_clip / Hugging Face cache directory"})

    def validate(self, path: str = "model") -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _bad(f"{path}.name", self.name, "a non-empty open_clip model name")


@dataclass
class MethodConfig:
    """The continual-learning method and its hyperparameters (METHOD.md sections 3-4)."""

    name: str = field(default="igsp", metadata={"help": f"one of {method_names()} (igsp/methods/)"})
    # iGSP phase 1 (METHOD.md section 3).
    candidates: int = field(default=4, metadata={"help": "igsp: candidate experts C added per layer per task"})
    lam: float = field(default=4.0, metadata={
        "help": "igsp: strength of the phase-1 subspace regularizer (decoupled: decay rate per unit of lr)"})
    reg_mode: str = field(default="decoupled", metadata={
        "help": "igsp: 'decoupled' (after each step the candidates' out-of-subspace part shrinks by lr * lam, as "
                "AdamW's weight decay) or 'loss' (lam * R added to the loss, through Adam; see docs/method.md)"})
    basis: str = field(default="weights", metadata={
        "help": "igsp: historical subspace from the frozen experts' 'weights' or from the layers' 'activations' "
                "(inputs and output gradients on past tasks, as GPM)"})
    basis_samples: int = field(default=256, metadata={
        "help": "igsp, basis='activations': training images per task whose representations are collected"})
    check_every: int = field(default=20, metadata={"help": "router convergence: steps per usage window"})
    eps: float = field(default=0.1, metadata={
        "help": "router convergence: smallest total-variation change that counts (the noise floor may be higher)"})
    patience: int = field(default=3, metadata={"help": "router convergence: stable checks in a row"})
    min_steps: int = field(default=50, metadata={"help": "router convergence: earliest step phase 1 may end"})
    max_fraction: float = field(default=0.5, metadata={"help": "phase 1 ends at the latest at this task fraction"})
    noise_floor: str = field(default="permutation", metadata={
        "help": "router convergence: compare each check with its sampling noise ('permutation') or with eps "
                "alone ('none')"})
    converge_on: str = field(default="vision", metadata={
        "help": "router convergence: layers that decide it, 'vision' (the text tower only monitored, when the vision "
                "tower is adapted) or 'all'"})
    alpha: float = field(default=0.05, metadata={
        "help": "router convergence: false-alarm rate of one check of a fixed router (noise_floor='permutation')"})
    tau: float = field(default=0.05, metadata={"help": "pruning: candidates with usage share < tau are removed"})
    rank_energy: float | None = field(default=None, metadata={
        "help": "pruning: also drop survivors' rank components outside this energy share (null = off)"})
    min_keep: int = field(default=0, metadata={
        "help": "pruning: candidates kept per layer at least (raised to top_k while a layer has no history)"})
    energy: float = field(default=0.95, metadata={"help": "historical bases keep this share of squared s.v."})
    # MoE-Adapters baseline (METHOD.md section 4).
    freeze_per_task: int = field(default=2, metadata={
        "help": "moe-adapters: experts per layer frozen after each task (chosen by freeze_rule)"})
    freeze_rule: str = field(default="weighted", metadata={
        "help": "moe-adapters: 'selected' (MoE-Adapters' code: the freeze_per_task experts selected most often in "
                "the task, over the whole pool, frozen ones included) or 'weighted' (the most used trainable "
                "experts by routing weight; older runs)"})
    # Task-agnostic deployment (METHOD.md section 3, last paragraph).
    selector: str = field(default="prototypes", metadata={
        "help": "'prototypes' (task-agnostic, the protocol) or 'oracle' (the evaluated dataset's own router "
                "when trained, else zero-shot: a diagnostic upper bound)"})
    selector_prototypes: int = field(default=5, metadata={"help": "k-means prototypes per task"})
    selector_quantile: float = field(default=0.05, metadata={
        "help": "zero-shot threshold: this quantile of the task's own training similarities"})
    selector_max_samples: int | None = field(default=None, metadata={
        "help": "training images per task used for prototypes (seeded subsample; null = all)"})

    def validate(self, path: str = "method") -> None:
        _choice(f"{path}.name", self.name, method_names())
        _int_range(f"{path}.candidates", self.candidates, 1)
        _float_range(f"{path}.lam", self.lam, 0.0)
        _choice(f"{path}.reg_mode", self.reg_mode, ("loss", "decoupled"))
        _choice(f"{path}.basis", self.basis, ("weights", "activations"))
        _int_range(f"{path}.basis_samples", self.basis_samples, 1)
        _int_range(f"{path}.check_every", self.check_every, 1)
        _float_range(f"{path}.eps", self.eps, 0.0, 1.0, low_open=True)
        _int_range(f"{path}.patience", self.patience, 1)
        _int_range(f"{path}.min_steps", self.min_steps, 0)
        _float_range(f"{path}.max_fraction", self.max_fraction, 0.0, 1.0, low_open=True)
        _choice(f"{path}.noise_floor", self.noise_floor, ("permutation", "none"))
        _float_range(f"{path}.alpha", self.alpha, 0.0, 0.5, low_open=True)
        _choice(f"{path}.converge_on", self.converge_on, ("vision", "all"))
        _float_range(f"{path}.tau", self.tau, 0.0, 1.0)
        if self.rank_energy is not None:
            _float_range(f"{path}.rank_energy", self.rank_energy, 0.0, 1.0, low_open=True)
        _int_range(f"{path}.min_keep", self.min_keep, 0)
        _float_range(f"{path}.energy", self.energy, 0.0, 1.0, low_open=True)
        _int_range(f"{path}.freeze_per_task", self.freeze_per_task, 0)
        _choice(f"{path}.freeze_rule", self.freeze_rule, ("selected", "weighted"))
        _choice(f"{path}.selector", self.selector, ("prototypes", "oracle"))
        _int_range(f"{path}.selector_prototypes", self.selector_prototypes, 1)
        _float_range(f"{path}.selector_quantile", self.selector_quantile, 0.0, 1.0)
        if self.selector_max_samples is not None:
            _int_range(f"{path}.selector_max_samples", self.selector_max_samples, 1)


@dataclass
class DataConfig:
    """The task stream."""

    kind: str = field(default="mtil", metadata={"help": f"one of {DATA_KINDS}"})
    root: str | None = field(default=None, metadata={"help": "mtil: data root holding every dataset's folder"})
    order: str = field(default="I", metadata={"help": "mtil: task order 'I' or 'II'"})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "task names in stream order (null = the whole stream of `kind`/`order`)"})
    few_shot: int | None = field(default=None, metadata={"help": "shots per class of each train split (null = full)"})
    image_size: int = field(default=224, metadata={"help": "digits/synthetic render size (mtil: the model's)"})
    seed: int = field(default=0, metadata={"help": "split / few-shot / rendering seed of the data"})
    download: bool = field(default=False, metadata={"help": "mtil: let torchvision download missing datasets"})
    augment: bool = field(default=False, metadata={
        "help": "train with the reference's RandomResizedCrop(scale=(0.9, 1.0), bicubic), seeded per sample "
                "(the MTIL presets; false = the evaluation preprocess, as older runs)"})
    num_tasks: int = field(default=3, metadata={"help": "synthetic: number of tasks"})
    num_classes: int = field(default=4, metadata={"help": "synthetic: classes per task"})
    samples_per_class: int = field(default=16, metadata={"help": "synthetic: items per class and split"})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "image files are header-checked before training; false: stop listing bad files, true: leave "
                "them out (the count is logged)"})

    def validate(self, path: str = "data") -> None:
        _choice(f"{path}.kind", self.kind, DATA_KINDS)
        _choice(f"{path}.order", self.order, ("I", "II"))
        if self.tasks is not None and (not self.tasks or len(set(self.tasks)) != len(self.tasks)):
            raise _bad(f"{path}.tasks", self.tasks, "null or a non-empty list of distinct task names")
        if self.few_shot is not None:
            _int_range(f"{path}.few_shot", self.few_shot, 1)
        _int_range(f"{path}.image_size", self.image_size, 4)
        _int_range(f"{path}.seed", self.seed, 0)
        _int_range(f"{path}.num_tasks", self.num_tasks, 1)
        _int_range(f"{path}.num_classes", self.num_classes, 1)
        _int_range(f"{path}.samples_per_class", self.samples_per_class, 1)


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpointing (METHOD.md section 5 for the MTIL values)."""

    iterations: int = field(default=1000, metadata={"help": "optimizer steps per task (both phases together)"})
    batch_size: int = field(default=64, metadata={"help": "global batch size (split across DDP ranks)"})
    lr: float | list[float] | dict[str, float] = field(default=1e-3, metadata={
        "help": "learning rate: one number, {task name: lr} (per dataset, any order) or a list by stream position"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps, then cosine decay to 0"})
    label_smoothing: float = 0.2
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (MoE-Adapters: 0)"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    grad_clip: float | None = field(default=1.0, metadata={"help": "max global grad norm (null = off)"})
    seed: int = 42
    num_workers: int = field(default=4, metadata={"help": "DataLoader workers (0 = load in the main process)"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16"})
    kernels: str = field(default="auto", metadata={"help": "MoE-LoRA backend: auto | reference | triton | cpp"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "torch intra-op threads on CPU (null = torch's default); 1 is fastest for the tiny model"})
    train_templates: str = field(default="first", metadata={
        "help": "prompts of the training text features: 'first' template (MoE-Adapters) or 'all' (averaged)"})
    eval_batch_size: int = 128
    log_every: int = field(default=10, metadata={"help": "steps between 'step' log records"})
    checkpoint_every: int = field(default=0, metadata={"help": "also checkpoint every N steps (0 = phase ends only)"})
    checkpoint_keep: str = field(default="all", metadata={
        "help": "'all' (task{i}_phase{p}.pt + latest.pt), 'latest' (latest.pt only) or 'none'"})

    def validate(self, path: str = "train") -> None:
        _int_range(f"{path}.iterations", self.iterations, 1)
        _int_range(f"{path}.batch_size", self.batch_size, 1)
        if isinstance(self.lr, dict):
            lrs = {f"{path}.lr.{k}": v for k, v in self.lr.items()}
            if not lrs or not all(isinstance(k, str) and k for k in self.lr):
                raise _bad(f"{path}.lr", self.lr, "a non-empty mapping {task name: learning rate}")
        elif isinstance(self.lr, list):
            lrs = {f"{path}.lr[{i}]": v for i, v in enumerate(self.lr)}
            if not lrs:
                raise _bad(f"{path}.lr", self.lr, "a positive number, a {task name: lr} mapping or a non-empty list")
        else:
            lrs = {f"{path}.lr": self.lr}
        for where, lr in lrs.items():
            _float_range(where, lr, 0.0, low_open=True)
        _int_range(f"{path}.warmup", self.warmup, 0)
        _float_range(f"{path}.label_smoothing", self.label_smoothing, 0.0, 1.0)
        _float_range(f"{path}.weight_decay", self.weight_decay, 0.0)
        _float_range(f"{path}.beta2", self.beta2, 0.0, 1.0)
        if self.grad_clip is not None:
            _float_range(f"{path}.grad_clip", self.grad_clip, 0.0, low_open=True)
        _int_range(f"{path}.seed", self.seed, 0)
        _int_range(f"{path}.num_workers", self.num_workers, 0)
        _choice(f"{path}.precision", self.precision, PRECISIONS)
        _choice(f"{path}.kernels", self.kernels, KERNELS)
        _choice(f"{path}.device", self.device, DEVICES)
        if self.cpu_threads is not None:
            _int_range(f"{path}.cpu_threads", self.cpu_threads, 1)
        _choice(f"{path}.train_templates", self.train_templates, ("first", "all"))
        _int_range(f"{path}.eval_batch_size", self.eval_batch_size, 1)
        _int_range(f"{path}.log_every", self.log_every, 1)
        _int_range(f"{path}.checkpoint_every", self.checkpoint_every, 0)
        _choice(f"{path}.checkpoint_keep", self.checkpoint_keep, ("all", "latest", "none"))

    def lr_for_task(self, task: int, name: str | None = None) -> float:
        """The learning rate of the task at stream position `task` named `name`.

        A mapping is read by `name` (required then), a list by position. ConfigError names the missing entry.
        """
        if isinstance(self.lr, dict):
            if name is None or name not in self.lr:
                raise _bad("train.lr", self.lr, f"a learning rate for every task of the stream; missing "
                                                f"{name!r} (task {task})")
            return float(self.lr[name])
        if not isinstance(self.lr, list):
            return float(self.lr)
        if task >= len(self.lr):
            raise _bad("train.lr", self.lr, f"a list of at least {task + 1} learning rates (one per task)")
        return float(self.lr[task])


@dataclass
class Config:
    """A whole run."""

    name: str = field(default="run", metadata={"help": "run name (default output: runs/<name>-<timestamp>)"})
    model: ModelConfig = field(default_factory=ModelConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str | None = field(default=None, metadata={"help": "run directory (null = runs/<name>-<time>)"})

    def validate(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise _bad("name", self.name, "a non-empty string without '/'")
        self.model.validate("model")
        self.method.validate("method")
        self.data.validate("data")
        self.train.validate("train")
        if self.train.kernels != "auto" and self.adapters.backend not in ("auto", self.train.kernels):
            raise _bad("adapters.backend", self.adapters.backend,
                       f"'auto' or {self.train.kernels!r} (train.kernels={self.train.kernels!r} already picks it)")
        get_method(self.method.name).validate_config(self)  # the method's own cross-section checks
        if isinstance(self.train.lr, dict):
            self._validate_per_task("train.lr", self.train.lr)

    def task_names(self) -> list[str]:
        """The task names of the configured stream, in order, without loading any data."""
        from igsp.data.stream import stream_task_names

        d = self.data
        return stream_task_names(d.kind, order=d.order, tasks=d.tasks, num_tasks=d.num_tasks)

    def _validate_per_task(self, path: str, mapping: dict[str, Any]) -> None:
        """A {task name: value} mapping names only tasks of the data kind and covers every task of the stream."""
        from igsp.data.stream import known_task_names

        known = known_task_names(self.data.kind, num_tasks=self.data.num_tasks)
        unknown = sorted(k for k in mapping if k not in known)
        if unknown:
            raise _bad(f"{path}.{unknown[0]}", mapping[unknown[0]],
                       f"keys naming tasks of data.kind={self.data.kind!r}: {', '.join(known)}")
        # Stream names outside `known` are data.tasks' error (reported when the stream is built), not this one's.
        missing = [n for n in self.task_names() if n in known and n not in mapping]
        if missing:
            raise _bad(path, mapping, f"an entry for every task of the stream; missing {', '.join(missing)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the resolved config)."""
        return dataclasses.asdict(self)

    @property
    def effective_backend(self) -> str:
        """The MoE-LoRA backend the run uses: train.kernels when set, else adapters.backend."""
        return self.train.kernels if self.train.kernels != "auto" else self.adapters.backend


_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "adapters": AdapterConfig, "method": MethodConfig, "data": DataConfig,
    "train": TrainConfig,
}


# --------------------------------------------------------------------------------------------- type checking
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (int, float, str, bool, None, list[...], unions, Literal)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try list and mapping alternatives last so that "a,b" for `str | list[str]` stays a string.
        for arg in sorted((a for a in args if a is not type(None)),
                          key=lambda a: typing.get_origin(a) in (list, dict)):
            try:
                return _coerce(path, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        allowed = " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
        raise _bad(path, value, allowed)
    if origin is Literal:
        _choice(path, value, typing.get_args(tp))
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise _bad(path, value, f"a mapping {{{_type_name(key_tp)}: {_type_name(value_tp)}}}")
        return {_coerce(f"{path} key", k, key_tp): _coerce(f"{path}.{k}", v, value_tp) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _bad(path, value, f"a list of {_type_name(item_tp)}")
        return [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(path, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _bad(path, value, "an int")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(path, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(path, value, "a string")
        return value
    if tp is type(None):
        if value is not None:
            raise _bad(path, value, "null")
        return None
    raise TypeError(f"{path}: unsupported annotation {tp!r} in the config schema")


def _section_from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise _bad(path, data, f"an object with keys {sorted(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(repr(f'{path}.{k}') for k in unknown)}; "
                          f"allowed keys of {path}: {', '.join(known)}")
    kwargs = {k: _coerce(f"{path}.{k}", v, hints[k]) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # AdapterConfig validates in __post_init__ with 'adapters.x: ...'
        raise ConfigError(str(exc) if str(exc).startswith(path) else f"{path}: {exc}") from exc
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a `Config` from a (resolved) plain dict; missing keys take their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: got {type(data).__name__}; allowed: a JSON object")
    known = [f.name for f in dataclasses.fields(Config)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed top-level keys: "
                          f"{', '.join(known)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            kwargs[key] = _section_from_dict(_SECTIONS[key], value, key)
        else:
            kwargs[key] = _coerce(key, value, typing.get_type_hints(Config)[key])
    config = Config(**kwargs)
    config.validate()
    return config


# -------------------------------------------------------------------------------------------- presets, merge
def list_presets() -> list[str]:
    """Names of the bundled presets (files starting with '_' are shared bases, not listed)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json") if not p.name.startswith("_"))


def resolve_preset(name_or_path: str | os.PathLike[str]) -> Path:
    """A JSON file path for a preset name (`igsp/configs/<name>.json`) or an existing file / run directory."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.json"
    if preset.is_file():
        return preset
    if path.is_dir():
        raise ConfigError(f"config: folder {str(name_or_path)!r} holds no config.json (not a run directory)")
    text = str(name_or_path)
    if os.sep in text or "/" in text or text.endswith(".json"):  # meant as a path, not a preset name
        raise ConfigError(f"config: no such file or folder: {text!r}")
    raise ConfigError(f"config: got {text!r}; allowed: a JSON file, a run directory or a preset "
                      f"name ({', '.join(list_presets())})")


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"extends: circular chain {' -> '.join(str(p) for p in (*seen, path))}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a JSON object, got {type(data).__name__}")
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not parents or not all(isinstance(p, str) and p for p in parents):
        raise _bad(f"{path.name}: extends", parents, "a preset name or JSON path, or a non-empty list of them")
    merged: dict[str, Any] = {}
    for parent in parents:
        parent_path = (path.parent / parent) if parent.endswith(".json") else resolve_preset(parent)
        merged = _merge(merged, _load_raw(parent_path, (*seen, path)))
    return _merge(merged, data)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `["a.b=value", ...]` to a raw config dict (unknown keys are caught by validation afterwards)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override: got {item!r}; allowed: 'section.key=value' (e.g. train.iterations=20)")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override: got key {key!r}; allowed: 'section.key' or a top-level key")
        node = out
        for depth, part in enumerate(parts[:-1]):
            if depth == 0 and part in _SECTIONS:
                node = node.setdefault(part, {})
            elif depth == 1 and len(parts) == 3 and isinstance(node.get(part), dict):
                entry = dict(node[part])  # one entry of a mapping field, e.g. train.lr.mnist
                node[part] = entry
                node = entry
            elif depth == 1 and len(parts) == 3:
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:2])} is {node.get(part)!r}, not a "
                                  "mapping; set the whole field instead")
            else:
                raise ConfigError(f"override {item!r}: unknown section {'.'.join(parts[:depth + 1])!r}; allowed "
                                  f"sections: {', '.join(_SECTIONS)}")
        node[parts[-1]] = _parse_value(text)
    return out


def load_config(name_or_path: str | os.PathLike[str], overrides: list[str] | None = None) -> Config:
    """Load a preset name, JSON file or run directory, apply `a.b=value` overrides and validate.

    The run name defaults to the preset / file stem when the file does not set one.
    """
    path = resolve_preset(name_or_path)
    raw = _load_raw(path)
    if "name" not in raw:
        raw["name"] = path.stem if path.name != "config.json" else path.parent.name
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw)


def save_config(config: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as JSON (atomically: igsp.checkpoint.atomic_write_json)."""
    atomic_write_json(path, config.to_dict(), indent=2)

"""The training engine: continual training of MoE-LoRA adapters on a frozen CLIP, task after task.

`Trainer(config).fit()` runs one method over one task stream and writes the run directory (docs/TRAINER_API.md):
`config.json` (resolved config), `log.jsonl`, `results.json`, `checkpoints/`.

The loop is method-agnostic: what a method adds before a task, its loss terms, what it does to gradients and
parameters around the optimizer step, when a phase ends and what it freezes after the task are the hooks of
`igsp.methods.Method` (igsp/methods/base.py documents the call order), one file per method in igsp/methods/
(igsp.py, moe_adapters.py, zeroshot.py). A method with `trains = False` (zeroshot) is evaluated once and that
row is repeated for every task. Per task the engine: resets the usage buffers, calls `begin_task`, builds a
fresh AdamW over whatever is trainable, runs the steps (a fresh AdamW again whenever a phase ends: the
trainable set changed), calls `end_task`, freezes and stores the task's router, adds the selector prototypes,
checkpoints and evaluates.

Loss: cross-entropy with label smoothing over logits = logit_scale * image_features @ text_features^T. The
text features of the task's class prompts are recomputed every step with gradients through the text adapters
(classes are few: at most 397 prompts for SUN397 with the first template). AdamW with linear warm-up and
cosine decay over the task's iterations (phase 2 continues the task's schedule with fresh moments); gradient
clipping; bf16 autocast on GPU, fp32 on CPU.

Evaluation (after every task, on every task's test set; task-agnostic): per sample the selector picks a task
from the frozen-CLIP image features (adapters off), or -1 below its threshold (zero-shot fallback).
`set_sample_tasks` then routes each sample through its task's router in one batched forward. Text side:
for each evaluated dataset the class prompts (all its templates) are encoded once under each trained task's
routing and once with adapters off; each sample is scored against the text features of its selected task.

Data order is a pure function of (seed, task, step): step s of a task reads positions [s*B, (s+1)*B) of the
concatenation of seeded per-epoch permutations. So a resumed run reads exactly the batches an uninterrupted
run reads, and with the RNG states, usage buffers, optimizer and detector restored from the checkpoint it
reproduces the uninterrupted run bit for bit on CPU. Training augmentation (`data.augment`, the MTIL presets:
the reference's RandomResizedCrop) keeps this: each crop is seeded by (seed, task, step, position in the global
batch) through `igsp.data.augment.seeded_batches`, never by the global RNG.

Distributed data parallel (torchrun): each rank takes a strided share (`rank::world`) of every global batch;
the loss is the rank's summed cross-entropy divided by the *global* batch size, and the gradients are summed
with one `all_reduce` per step over a flat buffer, which gives exactly the one-process gradient of the global
batch mean. We average gradients manually instead of wrapping the model in `DistributedDataParallel` because
the set of trainable parameters changes between phases and tasks (candidates added, pruned, frozen): DDP's
reducer would have to be rebuilt after each change, while a manual all_reduce over whatever is trainable now
is robust by construction (and with ~1 M adapter parameters its missing compute/communication overlap costs
nothing measurable). Usage statistics (read by the convergence detector, pruning and MoE-Adapters freezing)
are summed across ranks every step, so every rank takes the same structural decisions. Only rank 0 writes.

Test hook: the environment variable `IGSP_TEST_KILL_AT_STEP=N` makes the process exit hard (`os._exit(75)`,
no cleanup, like a SIGKILL) right after optimizer step N of the run (N counts steps over all tasks, 1-based,
after any checkpoint of that step). tests/trainer/ uses it to test resume-after-kill; it is not meant for users.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

import igsp_kernels
from igsp.adapters import adapter_layers, inject
from igsp.checkpoint import (
    CHECKPOINT_FORMAT,
    KILL_EXIT_CODE,
    adapter_state_dict,
    atomic_save,
    atomic_write_json,
    backbone_checksum,
    find_latest,
    load_adapter_state_dict,
    load_checkpoint,
    load_usage_state,
    restoring_from,
    usage_state,
)
from igsp.config import Config, ConfigError
from igsp.data import TaskDataset, TaskStreamConfig, build_task_stream
from igsp.data.augment import seeded_batches
from igsp.data.images import verify_stream_images
from igsp.data.stream import stream_task_names as data_stream_task_names
from igsp.health import NonFiniteError, add_context, check_params, check_step, trainable_tensors
from igsp.method.pruning import expert_grad_norms
from igsp.methods import Method, PlanLayer, get_method
from igsp.metrics import added_params, mtil_metrics, parameter_report, trainable_adapter_params
from igsp.model import create_clip
from igsp.runlock import RunLock, claim_run_dir, probe_run_dir
from igsp.selector import TaskSelector

__all__ = ["KILL_ENV", "KILL_EXIT_CODE", "DistContext", "StepBatchSampler", "Trainer", "lr_at", "method_state",
           "parameter_plan", "stream_task_names"]

logger = logging.getLogger(__name__)

KILL_ENV = "IGSP_TEST_KILL_AT_STEP"
# The records every run has (results.json maps them to fixed fields); a method may add more (results.json keeps
# them under their own names).
_ENGINE_RECORDS = ("convergence", "prune", "params", "usage", "eval", "orthogonality")
# Prompts per encode_text call at evaluation: CIFAR100 x 18 templates is 1,800 prompts; chunks of 1,024 keep
# the text tower's activations (77 tokens x width 512) around 0.3 GB in bf16.
_TEXT_CHUNK = 1024


# ------------------------------------------------------------------------------------------------ helpers
def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate of 0-based `step`: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`.

    As ZSCL / MoE-Adapters' `cosine_lr`: lr = base * (step + 1) / warmup during warm-up, then
    0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))) * base.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span)) * base_lr


class StepBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of the global batch of every step in [start, stop).

    Global batch of step s: positions [s*B, (s+1)*B) of the concatenation of per-epoch permutations of
    range(n), epoch e's drawn from a generator seeded with `seed * 1_000_003 + e`. Rank r takes the strided
    share `batch[r::world]`. A pure function of (seed, step): resuming at step s reads the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, *, rank: int = 0,
                 world: int = 1) -> None:
        if n < 1:
            raise ValueError(f"n (dataset size) must be >= 1, got {n}")
        if batch_size < world:
            raise ValueError(f"train.batch_size ({batch_size}) must be >= the number of ranks ({world})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world
        self._cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            if len(self._cache) > 2:  # a batch spans at most two epochs: keep the cache tiny
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._cache[epoch]

    def global_batch(self, step: int) -> list[int]:
        """The dataset indices of step `step`'s global batch (all ranks)."""
        out: list[int] = []
        pos = step * self.batch_size
        while len(out) < self.batch_size:
            epoch, off = divmod(pos, self.n)
            take = min(self.batch_size - len(out), self.n - off)
            out += self._perm(epoch)[off:off + take]
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.global_batch(step)[self.rank::self.world]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclasses.dataclass
class DistContext:
    """Rank, world size and whether this process created the process group (then it destroys it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _init_distributed(cuda: bool) -> DistContext:
    """Join an existing process group, or create one from torchrun's environment (WORLD_SIZE > 1)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistContext(rank, world, int(os.environ.get("LOCAL_RANK", rank)), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # NCCL for GPUs; gloo on CPU (CPU tests, debugging).
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)
    return DistContext()


def stream_task_names(config: Config) -> list[str]:
    """The task names of the configured stream, without loading any data."""
    d = config.data
    return data_stream_task_names(d.kind, order=d.order, tasks=d.tasks, num_tasks=d.num_tasks)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return float("nan")


class _JsonlLog:
    """Append-only JSON-lines log (rank 0 only; other ranks get a disabled instance)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def offset(self) -> int:
        return self._f.tell() if self._f is not None else 0

    def truncate(self, offset: int) -> None:
        if self._f is not None:
            self._f.truncate(offset)
            self._f.seek(offset)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# ------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """Continual training and task-agnostic evaluation of one config (see the module docstring).

    Args:
        config: a validated `Config`.
        resume: a run directory to continue from its `checkpoints/latest.pt` (the config should be the run's
            `config.json`).
        read_only: load (with `resume`) for evaluation only: no log, no checkpoint, no results written.
    """

    def __init__(self, config: Config, *, resume: str | os.PathLike[str] | None = None,
                 read_only: bool = False) -> None:
        config.validate()
        self.config = copy.deepcopy(config)
        cfg = self.config
        want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ConfigError("train.device: got 'cuda'; allowed: 'auto' or 'cpu' (no CUDA device is visible)")
        self.dist = _init_distributed(want_cuda)
        if want_cuda:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            if cfg.train.cpu_threads is not None:
                # Process-wide, on request: the tiny CPU model runs ~5x faster on 1 thread than on 2 busy cores
                # (77 ms vs 840 ms a step measured with another job on the same 2-core machine).
                torch.set_num_threads(cfg.train.cpu_threads)
        target = resume if resume is not None else cfg.output_dir
        if target is not None and not read_only:  # a busy or finished folder fails now, not after the set-up
            probe_run_dir(target, resume=resume is not None, rank=self.dist.rank, world=self.dist.world)
        if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda"):
            self.autocast_dtype: torch.dtype | None = torch.bfloat16
        else:
            self.autocast_dtype = None
        method_cls = get_method(cfg.method.name)
        self.backend = cfg.effective_backend
        self.read_only = read_only

        torch.manual_seed(cfg.train.seed)  # the backbone's random init (pretrained=None) depends on it
        model, preprocess_train, preprocess_val, tokenizer = create_clip(
            cfg.model.name, cfg.model.pretrained, device=self.device, precision="fp32",
            cache_dir=cfg.model.cache_dir)
        self.model: nn.Module = model
        self.tokenizer = tokenizer
        if method_cls.trains:
            inject(model, dataclasses.replace(cfg.adapters, backend=self.backend))
        else:
            model.requires_grad_(False)
        self.layers = adapter_layers(model)
        self._checksum = backbone_checksum(model)

        self.stream = self._build_stream(preprocess_val, preprocess_train)
        self.task_names = [train.name for train, _ in self.stream]
        for t, name in enumerate(self.task_names):  # a too-short lr list or a missing dataset fails now, not at task 7
            cfg.train.lr_for_task(t, name)

        self.selector = (TaskSelector(cfg.method.selector_prototypes, cfg.method.selector_quantile,
                                      seed=cfg.train.seed) if method_cls.trains else None)
        self.progress: dict[str, Any] = {"task": 0, "stage": "begin", "phase": 1, "step": 0, "phase1_steps": None}
        self.acc: list[list[float]] = []
        self.records: dict[str, list[Any]] = {"convergence": [], "prune": [], "params": [], "usage": [],
                                              "eval": [], "orthogonality": []}
        self.optimizer: torch.optim.Optimizer | None = None
        self.method: Method = method_cls(self)
        self.wall_time_prev = 0.0
        self.train_time = 0.0
        self.train_images = 0
        self._token_cache: dict[tuple[str, str, str], tuple[torch.Tensor, int]] = {}
        self._kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        self._lock: RunLock | None = None  # the run folder's lock (rank 0, while training: igsp.runlock)

        if resume is not None:
            self.run_dir = Path(resume)
            if not read_only:
                self._lock = claim_run_dir(self.run_dir, resume=True, rank=self.dist.rank, world=self.dist.world)
            try:
                latest = find_latest(self.run_dir)
                ckpt = load_checkpoint(latest)
                self.log = _JsonlLog(self.run_dir / "log.jsonl" if self.dist.is_main and not read_only else None)
                with restoring_from(latest):
                    self._restore(ckpt)
            except BaseException:
                if hasattr(self, "log"):
                    self.log.close()
                self._release_run_dir()
                raise
        else:
            if read_only:
                raise ValueError("read_only=True needs resume=RUN_DIR (there is nothing to evaluate otherwise)")
            self.run_dir = self._make_run_dir()
            self.log = _JsonlLog(self.run_dir / "log.jsonl" if self.dist.is_main else None)

    # ------------------------------------------------------------------------------------------- setup
    def _build_stream(self, preprocess_val: Any, preprocess_train: Any) -> list[tuple[TaskDataset, TaskDataset]]:
        d = self.config.data
        if d.kind == "mtil" and not d.root:
            raise ConfigError("data.root: got None; allowed: the MTIL data root (a directory holding every "
                              "dataset's folder, see docs/datasets.md)")
        if d.kind != "mtil":
            size = getattr(self.model.visual, "image_size", None)
            size = size[0] if isinstance(size, (tuple, list)) else size
            if size is not None and size != d.image_size:
                raise ConfigError(f"data.image_size: got {d.image_size}; allowed: {size} (the input size of "
                                  f"model {self.config.model.name!r})")
        try:
            scfg = TaskStreamConfig(kind=d.kind, root=d.root, order=d.order, tasks=d.tasks, few_shot=d.few_shot,
                                    image_size=d.image_size, seed=d.seed, download=d.download, augment=d.augment,
                                    num_tasks=d.num_tasks, num_classes=d.num_classes,
                                    samples_per_class=d.samples_per_class)
        except ValueError as exc:  # e.g. an unknown task name for the stream kind: a config error
            raise ConfigError(f"data: {exc}") from exc
        # MTIL: the validation preprocess evaluates (and feeds the selector); with data.augment the train splits
        # crop with open_clip's train preprocess (= the reference's), seeded per sample (igsp.data.augment).
        mtil = d.kind == "mtil"
        stream = build_task_stream(scfg, transform=preprocess_val if mtil else None,
                                   train_transform=preprocess_train if mtil and d.augment else None)
        return verify_stream_images(stream, skip_bad=d.skip_bad_images)

    def _make_run_dir(self) -> Path:
        cfg = self.config
        box = [cfg.output_dir or str(Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")]
        if self.dist.enabled:  # rank 0's name (its timestamp) for every rank
            dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
        # Locked before anything is written; refuses a folder holding a run (or a live one), cleans stale temps.
        self._lock = claim_run_dir(path, resume=False, rank=self.dist.rank, world=self.dist.world)
        cfg.output_dir = str(path)
        if self.dist.is_main:
            (path / "log.jsonl").write_text("", encoding="utf-8")
            atomic_write_json(path / "config.json", cfg.to_dict())
        return path

    def _release_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ----------------------------------------------------------------------------------------- helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().float().exp().clamp(max=100.0)

    def _tokens(self, ds: TaskDataset, which: str) -> tuple[torch.Tensor, int]:
        """Tokenized class prompts (C * n_templates, context) on the device and n_templates (class-major)."""
        key = (ds.name, ds.split, which)
        if key not in self._token_cache:
            templates = ds.templates[:1] if which == "first" else ds.templates
            prompts = [t.format(c) for c in ds.classnames for t in templates]
            self._token_cache[key] = (self.tokenizer(prompts).to(self.device), len(templates))
        return self._token_cache[key]

    def _encode_text(self, tokens: torch.Tensor, n_templates: int) -> torch.Tensor:
        """(C, D) fp32 class embeddings: per class the mean of its normalised prompt embeddings, re-normalised."""
        chunks = [self.model.encode_text(tokens[i:i + _TEXT_CHUNK]).float()
                  for i in range(0, tokens.shape[0], _TEXT_CHUNK)]
        feats = F.normalize(torch.cat(chunks), dim=-1)
        feats = feats.reshape(-1, n_templates, feats.shape[-1]).mean(dim=1)
        return F.normalize(feats, dim=-1)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _make_optimizer(self, task: int) -> torch.optim.Optimizer:
        t = self.config.train
        return torch.optim.AdamW(self._trainable(), lr=t.lr_for_task(task, self.task_names[task]),
                                 betas=(0.9, t.beta2), eps=1e-8,
                                 weight_decay=t.weight_decay)

    def _loader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        workers = self.config.train.num_workers
        # A private generator: DataLoader otherwise draws its base seed from the global RNG, which would make
        # the global RNG stream (router noise, candidate init) depend on when loaders were created.
        return DataLoader(dataset, num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, generator=torch.Generator().manual_seed(0), **kwargs)

    def _broadcast_adapters(self) -> None:
        """DDP: every rank takes rank 0's adapter tensors (candidate init draws from each rank's RNG)."""
        if not self.dist.enabled:
            return
        for _, layer in self.layers:
            for key, tensor in layer.state_dict(keep_vars=True).items():
                if not key.startswith("base_layer."):
                    dist.broadcast(tensor.data, src=0)

    def _usage_buffers(self) -> list[torch.Tensor]:
        return [b for _, layer in self.layers
                for b in (layer.usage_weight, layer.usage_prob, layer.usage_count, layer.usage_rows)]

    def _allreduce_step(self, usage_base: torch.Tensor | None) -> None:
        """Sum gradients (flat buffer, one all_reduce) and this step's usage increments over ranks."""
        params = self._trainable()
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        bufs = self._usage_buffers()
        n_grad = flat.numel()
        if usage_base is not None and bufs:
            now = torch.cat([b.reshape(-1).float() for b in bufs])
            flat = torch.cat([flat, now - usage_base])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
        if usage_base is not None and bufs:
            total = usage_base + flat[n_grad:]
            offset = 0
            for b in bufs:
                n = b.numel()
                b.copy_(total[offset:offset + n].view_as(b))
                offset += n

    def finished_tasks(self) -> int:
        """Number of tasks whose training is complete (their routers and selector entries exist)."""
        return len(self.selector) if self.selector is not None else 0

    # -------------------------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, Any]:
        """Train on every task of the stream (or continue a resumed run) and return results.json's content."""
        start = time.time()
        try:
            if not self.method.trains:
                self._fit_frozen()
            else:
                T = len(self.stream)
                while self.progress["task"] < T:
                    t, stage = self.progress["task"], self.progress["stage"]
                    if stage == "begin":
                        self._begin_task(t)
                    elif stage == "train":
                        self._train_task(t)
                    elif stage == "eval":
                        self._evaluate_task(t, start)
                    else:  # pragma: no cover - progress comes only from this class
                        raise RuntimeError(f"unknown stage {stage!r} in the run progress")
            self.wall_time_prev += time.time() - start
            start = time.time()
            results = self.results()
            if self.dist.is_main and not self.read_only:
                atomic_write_json(self.run_dir / "results.json", results)
            return results
        finally:
            self.log.close()
            self._release_run_dir()

    def close(self) -> None:
        """Release the run folder and destroy the process group if this trainer created it (after fit)."""
        self._release_run_dir()
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _fit_frozen(self) -> None:
        """A method without training (zeroshot): one evaluation (the model never changes), repeated as every row
        of the matrix."""
        row, stats = self.evaluate()
        T = len(self.stream)
        self.acc = [list(row) for _ in range(T)]
        self.records["eval"] = [stats for _ in range(T)]
        for t in range(T):
            self.records["params"].append({"task": t, "phase1": trainable_adapter_params(self.layers),
                                           "phase2": None, "phase1_steps": 0, "phase2_steps": None})
        self.log.write({"event": "eval", "task": T - 1, "task_name": self.task_names[-1], "acc": row,
                        "selector": stats, "note": f"{self.method.name}: one evaluation, repeated for every task"})
        self.progress = {"task": T, "stage": "done", "phase": 1, "step": 0, "phase1_steps": None}
        self._save(None)  # no adapters, but `igsp eval RUN_DIR` and --resume read a checkpoint

    # ------------------------------------------------------------------------------------------ tasks
    def _begin_task(self, t: int) -> None:
        for _, layer in self.layers:
            layer.reset_usage()
        self.method.begin_task(t)
        self._broadcast_adapters()
        igsp_kernels.set_task(self.model, t)
        self.optimizer = self._make_optimizer(t)
        p1 = trainable_adapter_params(self.layers, task=t)
        self.records["params"].append({"task": t, "phase1": p1, "phase2": None, "phase1_steps": None,
                                       "phase2_steps": None})
        self.progress = {"task": t, "stage": "train", "phase": 1, "step": 0, "phase1_steps": None}
        self.log.write({"event": "phase", "task": t, "task_name": self.task_names[t], "phase": 1, "step": 0,
                        "action": "start", "trainable": p1,
                        "pool": {n: [layer.num_frozen, layer.num_trainable] for n, layer in self.layers}})

    def _train_task(self, t: int) -> None:
        cfg = self.config
        train_ds = self.stream[t][0]
        total = cfg.train.iterations
        start_step = self.progress["step"]
        sampler = StepBatchSampler(len(train_ds), cfg.train.batch_size, cfg.train.seed * 1009 + t, start_step,
                                   total, rank=self.dist.rank, world=self.dist.world)
        loader = self._loader(train_ds.dataset, batch_sampler=seeded_batches(train_ds.dataset, sampler))
        tokens, n_tpl = self._tokens(train_ds, cfg.train.train_templates)
        self.model.train()
        igsp_kernels.set_task(self.model, t)
        bar = _progress_bar(total, start_step, f"task {t} {self.task_names[t]}",
                            self.dist.is_main and not self.read_only)
        window_t, window_imgs = time.time(), 0
        last = time.time()
        for images, labels in loader:
            step = self.progress["step"] + 1
            phase = self.progress["phase"]
            log_now = step % cfg.train.log_every == 0 or step == total
            try:
                stats = self._step(t, phase, step, images, labels, tokens, n_tpl, log_now)
            except Exception as exc:  # say where it happened (the type stays: the CLI maps it)
                if not isinstance(exc, NonFiniteError):
                    add_context(exc, f"while training task {t} ({self.task_names[t]}), step {step}, phase {phase}"
                                f"; if values became NaN/inf the run diverged: lower train.lr")
                raise
            now = time.time()
            # Training throughput end to end: data loading, the step, logging and periodic checkpoints.
            self.train_time += now - last
            last = now
            self.train_images += cfg.train.batch_size
            window_imgs += cfg.train.batch_size
            self.progress["step"] = step
            if log_now:
                now = time.time()
                record = {"event": "step", "task": t, "task_name": self.task_names[t], "step": step,
                          "phase": phase, **stats, "images_per_s": window_imgs / max(now - window_t, 1e-9),
                          "peak_mem_mb": _peak_mem_mb(self.device)}
                self.log.write(record)
                window_t, window_imgs = now, 0
                bar.set_postfix(loss=f"{stats['loss']:.3f}", phase=phase)
            saved = False
            if phase < self.method.phases and self.method.phase_done(t, phase, step):
                self._end_phase(t, phase, step)
                saved = True
            every = cfg.train.checkpoint_every
            if every and step % every == 0 and step < total and not saved:
                self._save(None)
            bar.update(1)
            self._maybe_kill(t, step)
        bar.close()
        self._end_task(t)

    def _step(self, t: int, phase: int, step: int, images: torch.Tensor, labels: torch.Tensor,
              tokens: torch.Tensor, n_tpl: int, log_now: bool) -> dict[str, Any]:
        cfg = self.config.train
        opt = self.optimizer
        assert opt is not None
        lr = lr_at(step - 1, cfg.lr_for_task(t, self.task_names[t]), cfg.warmup, cfg.iterations)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        usage_base = (torch.cat([b.reshape(-1).float() for b in self._usage_buffers()])
                      if self.dist.enabled and self.layers else None)
        # Sum over this rank's rows / global batch: the all_reduce sum is the global batch mean (module docs).
        ce = self._task_loss(images, labels, tokens, n_tpl, cfg.batch_size)
        reg = self.method.loss_terms(t, phase)
        loss = ce + reg / self.dist.world if reg is not None else ce
        loss.backward()
        for p in self._trainable():
            # A parameter this batch did not reach gets a zero gradient rather than none, so AdamW treats it
            # the same in one process and under DDP (where the all_reduce needs every gradient).
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.dist.enabled:
            self._allreduce_step(usage_base)
        grad_norms = None
        if log_now and self.layers:
            grad_norms = expert_grad_norms(self.layers)  # raw: before the method's hook and clipping
        self.method.before_step(t, phase)
        gnorm = None
        if cfg.grad_clip is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self._trainable(), cfg.grad_clip)) if log_now else \
                torch.nn.utils.clip_grad_norm_(self._trainable(), cfg.grad_clip)
        opt.step()
        self.method.after_step(t, phase)
        if log_now or self.device.type == "cpu":  # a host sync: free on the CPU, at logging steps elsewhere
            check_step(loss, trainable_tensors(self.model), task=t, task_name=self.task_names[t], step=step,
                       phase=phase, lr=lr)
        if not log_now:
            return {}
        ce_d = ce.detach().reshape(1).clone()
        if self.dist.enabled:
            dist.all_reduce(ce_d)
        ce_v = float(ce_d)
        reg_v = float(reg.detach()) if reg is not None else 0.0
        return {"loss": ce_v + reg_v, "ce": ce_v, "reg": reg_v, "lr": lr,
                "grad_norm": float(gnorm) if gnorm is not None else None,
                "usage": {n: [round(float(u), 6) for u in layer.usage()] for n, layer in self.layers},
                "grad_norms": grad_norms}

    def _end_phase(self, t: int, phase: int, step: int) -> None:
        """The method ended `phase` at `step`: its end_phase hook, then the next phase with a fresh optimizer."""
        cfg = self.config
        # The method's end_phase may take SVDs (igsp pruning with rank_energy); off the CPU this step was not
        # necessarily checked (igsp/health.py).
        check_params(trainable_tensors(self.model),
                     where=f"end of phase {phase} of task {t} ({self.task_names[t]}), step {step}")
        self.method.end_phase(t, phase, step)
        nxt = phase + 1
        self.progress.update(phase=nxt)
        if phase == 1:
            self.progress.update(phase1_steps=step)
        self.optimizer = self._make_optimizer(t)  # fresh moments: the structure and the objective changed
        trainable = trainable_adapter_params(self.layers, task=t)
        entry = self.records["params"][-1]
        started = sum(entry.get(f"phase{p}_steps") or 0 for p in range(1, phase))
        entry.update({f"phase{nxt}": trainable, f"phase{phase}_steps": step - started,
                      f"phase{nxt}_steps": cfg.train.iterations - step})
        self.log.write({"event": "phase", "task": t, "task_name": self.task_names[t], "phase": nxt, "step": step,
                        "action": "start", "trainable": trainable,
                        "pool": {n: [layer.num_frozen, layer.num_trainable] for n, layer in self.layers}})
        self._save(f"phase{phase}")

    def _end_task(self, t: int) -> None:
        cfg = self.config
        usage = {n: layer.usage().tolist() for n, layer in self.layers}
        self.method.end_task(t)
        entry = self.records["params"][-1]
        if entry["phase1_steps"] is None:  # phase 1 ran to the end of the task
            entry.update(phase1_steps=cfg.train.iterations)
        for _, layer in self.layers:
            if str(t) in layer.routers:  # a RouteFollower (block routing) has none
                layer.routers[str(t)].requires_grad_(False)  # gate weights and, with learned noise, noise weights
        self.records["usage"].append({"task": t, "usage": usage})
        feats = self._frozen_features(self.stream[t][0], t)
        assert self.selector is not None
        threshold = self.selector.add_task(t, feats)
        self.optimizer = None
        self.progress.update(stage="eval")
        phase = self.progress["phase"]
        self.log.write({"event": "phase", "task": t, "task_name": self.task_names[t], "phase": phase,
                        "step": self.progress["step"], "action": "end", "selector_threshold": threshold,
                        "pool": {n: [layer.num_frozen, layer.num_trainable] for n, layer in self.layers}})
        self._save(f"phase{phase}")

    def _evaluate_task(self, t: int, start: float) -> None:
        row, stats = self.evaluate()
        self.acc.append(row)
        self.records["eval"].append(stats)
        self.progress = {"task": t + 1, "stage": "begin", "phase": 1, "step": 0, "phase1_steps": None}
        wall = self.wall_time_prev + time.time() - start
        self.log.write({"event": "eval", "task": t, "task_name": self.task_names[t], "acc": row, "selector": stats})
        self.log.write({"event": "task_end", "task": t, "task_name": self.task_names[t], "wall_time_s": wall,
                        "images_per_s": self.train_images / max(self.train_time, 1e-9),
                        "peak_mem_mb": _peak_mem_mb(self.device)})
        self._save(None, wall_time=wall)
        if self.dist.is_main and not self.read_only:
            partial = self.results(wall_time=wall)
            atomic_write_json(self.run_dir / "results.json", partial)

    def _maybe_kill(self, t: int, step: int) -> None:
        if self._kill_at and t * self.config.train.iterations + step == self._kill_at:
            if self.dist.enabled:  # every rank has logged and saved this step before any of them dies
                dist.barrier()
            logger.warning("%s=%d: exiting hard after step %d of task %d (test hook)", KILL_ENV, self._kill_at,
                           step, t)
            os._exit(KILL_EXIT_CODE)

    # ------------------------------------------------------------------------------------- evaluation
    def _task_loss(self, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor, n_tpl: int,
                   normaliser: int) -> torch.Tensor:
        """Label-smoothed CE of the batch against the class prompts `tokens`, summed over rows / `normaliser`."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self._autocast():
            text = self._encode_text(tokens, n_tpl)  # (C, D), through the text adapters
            img = F.normalize(self.model.encode_image(images).float(), dim=-1)
        # Outside autocast: bf16 logits (scale up to 100) would carry ~0.4 of rounding error.
        logits = self._logit_scale() * img @ text.T
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.config.train.label_smoothing,
                               reduction="sum") / normaliser

    # ------------------------------------------------------------------ services for methods (TrainerView)
    def _sample_indices(self, n: int, cap: int | None, seed: int) -> list[int]:
        """All of range(n), or a sorted seeded subsample of `cap` indices (the same on every rank)."""
        if cap is None or n <= cap:
            return list(range(n))
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(n, generator=g)[:cap].tolist())

    def task_batches(self, t: int, max_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """This rank's share of a seeded subsample (`max_samples`, the same on every run and rank) of task t's
        training set, in eval batches: yields (images, labels) on the device and the subsample's global size.

        Draws from its own generator: the global RNG stream (and so a resumed run) is unaffected.
        """
        ds = self.stream[t][0]
        indices = self._sample_indices(len(ds), max_samples, self.config.train.seed * 7927 + t)
        loader = self._loader(Subset(ds.dataset, indices[self.dist.rank::self.dist.world]),
                              batch_size=self.config.train.eval_batch_size, shuffle=False)
        for images, labels in loader:
            yield images.to(self.device), labels.to(self.device), len(indices)

    def task_loss(self, t: int, images: torch.Tensor, labels: torch.Tensor, normaliser: int) -> torch.Tensor:
        """The training loss of task t on a batch (CE with label smoothing against the task's training prompts,
        through whatever routing is set), summed over the rows / `normaliser`."""
        ds = self.stream[t][0]
        tokens, n_tpl = self._tokens(ds, self.config.train.train_templates)
        return self._task_loss(images, labels, tokens, n_tpl, normaliser)

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the DDP ranks in place (a no-op in one process); returns it."""
        if self.dist.enabled:
            dist.all_reduce(tensor)
        return tensor

    @torch.no_grad()
    def _frozen_features(self, ds: TaskDataset, t: int) -> torch.Tensor:
        """(N, D) fp32 CPU frozen-CLIP image features (adapters off) of `ds` (or a seeded subsample)."""
        cfg = self.config
        indices = self._sample_indices(len(ds), cfg.method.selector_max_samples, cfg.train.seed * 7919 + t)
        mine = indices[self.dist.rank::self.dist.world]
        was_training = self.model.training
        self.model.eval()
        igsp_kernels.set_task(self.model, None)
        feats = []
        loader = self._loader(Subset(ds.dataset, mine), batch_size=cfg.train.eval_batch_size, shuffle=False)
        for images, _ in loader:
            with self._autocast():
                feats.append(F.normalize(self.model.encode_image(images.to(self.device)).float(), dim=-1))
        D = self.model.text_projection.shape[1] if getattr(self.model, "text_projection", None) is not None \
            else feats[0].shape[1]
        local = torch.cat(feats) if feats else torch.zeros(0, D, device=self.device)
        if self.dist.enabled:
            per = math.ceil(len(indices) / self.dist.world)
            padded = torch.zeros(per, local.shape[1], device=local.device, dtype=local.dtype)
            padded[:local.shape[0]] = local
            parts = [torch.zeros_like(padded) for _ in range(self.dist.world)]
            dist.all_gather(parts, padded)
            # Rank r holds indices[r::world]: interleave back to the original order.
            out = torch.zeros(len(indices), local.shape[1], dtype=local.dtype, device=local.device)
            for r, part in enumerate(parts):
                count = len(indices[r::self.dist.world])
                out[r::self.dist.world] = part[:count]
            local = out
        self.model.train(was_training)
        return local.cpu()

    @torch.no_grad()
    def evaluate(self, num_tasks: int | None = None) -> tuple[list[float], list[dict[str, Any]]]:
        """Task-agnostic top-1 accuracy (percent) on every task's test set, with the current model.

        Args:
            num_tasks: how many trained tasks (routers, selector entries) may be used; default all finished.
        Returns:
            (row of T accuracies, per-dataset selector statistics {"dataset", "own_task", "zero_shot", "n"}).
        """
        k = self.finished_tasks() if num_tasks is None else num_tasks
        was_training = self.model.training
        self.model.eval()
        row, stats = [], []
        for j, (_, test) in enumerate(self.stream):
            acc, st = self._evaluate_dataset(test, j, k)
            row.append(acc)
            stats.append(st)
        igsp_kernels.set_sample_tasks(self.model, None)
        igsp_kernels.set_task(self.model, None)
        self.model.train(was_training)
        return row, stats

    def _evaluate_dataset(self, ds: TaskDataset, j: int, k: int) -> tuple[float, dict[str, Any]]:
        cfg = self.config
        tokens, n_tpl = self._tokens(ds, "all")
        texts = []
        for task in [None, *range(k)]:  # index 0: zero-shot, index 1 + i: task i's routing
            igsp_kernels.set_task(self.model, task)
            with self._autocast():
                texts.append(self._encode_text(tokens, n_tpl))
        text = torch.stack(texts)  # (k + 1, C, D)
        igsp_kernels.set_task(self.model, None)
        mine = list(range(self.dist.rank, len(ds), self.dist.world))
        loader = self._loader(Subset(ds.dataset, mine), batch_size=cfg.train.eval_batch_size, shuffle=False)
        counts = torch.zeros(4, dtype=torch.float64)  # correct, total, zero-shot fallbacks, own task selected
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self._autocast():
                f0 = F.normalize(self.model.encode_image(images).float(), dim=-1)
            if k == 0:
                ids = torch.full((images.shape[0],), -1, dtype=torch.long, device=self.device)
            elif cfg.method.selector == "oracle":
                ids = torch.full((images.shape[0],), j if j < k else -1, dtype=torch.long, device=self.device)
            else:
                assert self.selector is not None
                ids = self.selector.select(f0).to(self.device)
                ids = torch.where(ids < k, ids, torch.full_like(ids, -1))
            feats = f0
            if bool((ids >= 0).any()):
                igsp_kernels.set_sample_tasks(self.model, ids)
                with self._autocast():
                    feats = F.normalize(self.model.encode_image(images).float(), dim=-1)
                igsp_kernels.set_sample_tasks(self.model, None)
            scores = torch.einsum("bd,kcd->bkc", feats, text)  # (B, k + 1, C)
            chosen = scores[torch.arange(scores.shape[0], device=scores.device), ids + 1]  # (B, C)
            pred = chosen.argmax(dim=1)
            counts += torch.tensor([float((pred == labels).sum()), float(labels.numel()), float((ids < 0).sum()),
                                    float((ids == j).sum())], dtype=torch.float64)
        if self.dist.enabled:
            counts_d = counts.to(self.device)
            dist.all_reduce(counts_d)
            counts = counts_d.cpu()
        correct, total, zs, own = counts.tolist()
        total = max(total, 1.0)
        return 100.0 * correct / total, {"dataset": ds.name, "n": int(total), "zero_shot": zs / total,
                                         "own_task": own / total}

    # --------------------------------------------------------------------------------------- results
    def results(self, wall_time: float | None = None) -> dict[str, Any]:
        """results.json's content for the current state (metrics once the matrix is complete)."""
        T = len(self.stream)
        complete = len(self.acc) == T
        added = added_params(self.layers, self.selector)
        params = parameter_report(self.records["params"], added)
        params["per_task"] = self.records["params"]
        wall = self.wall_time_prev if wall_time is None else wall_time
        return {
            "method": self.method.name,
            "name": self.config.name,
            "tasks": self.task_names,
            "acc": self.acc,
            "complete": complete,
            "metrics": mtil_metrics(self.acc) if complete else None,
            "params": params,
            "wall_time_s": wall,
            "train_time_s": self.train_time,
            "train_images": self.train_images,
            "images_per_s": self.train_images / self.train_time if self.train_time > 0 else None,
            "convergence": self.records["convergence"],
            "prune": self.records["prune"],
            "orthogonality": self.records["orthogonality"],
            # Whatever else the method records (igsp: "subspace", "bases"), under its own name.
            **{k: v for k, v in self.records.items() if k not in _ENGINE_RECORDS},
            "usage": self.records["usage"],
            "selector": self.records["eval"],
            "device": str(self.device),
            "world_size": self.dist.world,
            "precision": "bf16" if self.autocast_dtype is not None else "fp32",
            "backend": self.backend,
            "backend_used": self.layers[0][1].resolved_backend(self.autocast_dtype) if self.layers else None,
        }

    # ------------------------------------------------------------------------------------ checkpoints
    def _state(self, wall_time: float | None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.method.name,
            "task_names": list(self.task_names),
            "progress": dict(self.progress),
            "adapters": adapter_state_dict(self.model),
            "usage": usage_state(self.layers),
            "selector": self.selector.state_dict() if self.selector is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "method_state": self.method.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": list(torch.cuda.get_rng_state_all()) if self.device.type == "cuda" else []},
            "acc": self.acc,
            "records": self.records,
            "log_offset": self.log.offset(),
            "wall_time_s": self.wall_time_prev if wall_time is None else wall_time,
            "train_time_s": self.train_time,
            "train_images": self.train_images,
            "backbone_checksum": self._checksum,
        }

    def _save(self, tag: str | None, wall_time: float | None = None) -> None:
        """latest.pt, plus task{i}_{tag}.pt with checkpoint_keep='all' (rank 0; atomic)."""
        keep = self.config.train.checkpoint_keep
        if keep == "none" or self.read_only:
            return
        # Every rank checks (identical adapters: all stop together, none waits in a collective); one sync.
        check_params(trainable_tensors(self.model),
                     where=f"checkpoint at task {self.progress['task']}, step {self.progress['step']}")
        if not self.dist.is_main:
            return
        state = self._state(wall_time)
        ckpt_dir = self.run_dir / "checkpoints"
        if tag is not None and keep == "all":
            atomic_save(state, ckpt_dir / f"task{self.progress['task']}_{tag}.pt")
        atomic_save(state, ckpt_dir / "latest.pt")
        logger.info("checkpoint %s (task %d, stage %s, phase %d, step %d)", tag or "latest", self.progress["task"],
                    self.progress["stage"], self.progress["phase"], self.progress["step"])

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt["method"] != self.method.name or list(ckpt["task_names"]) != self.task_names:
            raise ValueError(f"checkpoint of method {ckpt['method']!r} on tasks {ckpt['task_names']} does not match "
                             f"this config (method {self.method.name!r}, tasks {self.task_names})")
        ref = ckpt["backbone_checksum"]
        if any(not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6) for a, b in zip(ref, self._checksum)):
            raise ValueError(f"the rebuilt backbone differs from the checkpoint's (checksum {self._checksum} vs "
                             f"{ref}): resume with the run's own config.json (same model, weights, seed)")
        load_adapter_state_dict(self.model, ckpt["adapters"])
        self.layers = adapter_layers(self.model)
        load_usage_state(self.layers, ckpt["usage"])
        self.progress = dict(ckpt["progress"])
        t, stage = self.progress["task"], self.progress["stage"]
        for _, layer in self.layers:
            for key, router in layer.routers.items():
                router.requires_grad_(stage == "train" and key == str(t))
        if self.selector is not None and ckpt["selector"] is not None:
            self.selector.load_state_dict(ckpt["selector"])
        self.acc = [list(r) for r in ckpt["acc"]]
        self.records = {k: list(v) for k, v in ckpt["records"].items()}
        self.wall_time_prev = float(ckpt["wall_time_s"])
        self.train_time = float(ckpt["train_time_s"])
        self.train_images = int(ckpt["train_images"])
        self.method.load_state_dict(method_state(ckpt), self.progress)
        if stage == "train":
            igsp_kernels.set_task(self.model, t)
            self.optimizer = self._make_optimizer(t)
            if ckpt["optimizer"] is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.log.truncate(int(ckpt["log_offset"]))
        if self.dist.is_main and not self.read_only:
            self.log.write({"event": "resume", "task": t, "stage": stage, "phase": self.progress["phase"],
                            "step": self.progress["step"]})
        logger.info("resumed %s at task %d, stage %s, phase %d, step %d", self.run_dir, t, stage,
                    self.progress["phase"], self.progress["step"])


# Top-level checkpoint keys that held the igsp method's state before the methods moved to igsp/methods/ (the
# checkpoint format is otherwise unchanged): read into "method_state" when a checkpoint has none.
_LEGACY_METHOD_KEYS = ("bases", "anchor", "detector", "grad_window")


def method_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's method state; a checkpoint written before igsp/methods/ existed is converted."""
    if "method_state" in ckpt:
        return ckpt["method_state"]
    return {k: ckpt[k] for k in _LEGACY_METHOD_KEYS if k in ckpt}


def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """tqdm over a task's steps, disabled when stderr is not a terminal (logs, CI) or off rank 0."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and sys.stderr.isatty()),
                leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------- parameter planning
def _router_numel_per_expert(layer: nn.Module) -> int:
    """Router elements per active expert of a layer, read off a probe router (0 for a layer without routers).

    Counts whatever a router holds (the gate, and the noise gate of learned noisy gating), so the plan follows
    the module rather than a formula. The probe expert and router are removed again (the plan's model is a
    throwaway anyway)."""
    layer.add_experts(1, active_in=[])
    router = layer.add_router("__plan__")
    per_expert = sum(p.numel() for p in router.parameters()) if router is not None else 0
    if router is not None:
        del layer.routers["__plan__"]
    layer.remove_experts([layer.num_experts - 1])
    return per_expert


def parameter_plan(config: Config, *, survival: float = 1.0, device: str = "cpu") -> dict[str, Any]:
    """Parameter counts of a config without data or training (`igsp params`).

    Builds the model with random weights (pretrained=None) and injects the adapters to read every layer's
    shape, then replays the pool bookkeeping of each task with integers (simulating it with real tensors takes
    ~15 s for ViT-B/16 x 11 tasks, all in copies) through each method's `plan_task` (igsp: C candidates per
    layer of which `round(survival * C)` survive, at least what the router's top_k needs while a layer has no
    history; moe-adapters: `freeze_per_task` experts frozen per task). Counts follow igsp.metrics: a router costs
    (active experts x d_route, twice that with learned gating noise), an expert A + B (+ biases); the selector
    `prototypes x embed_dim + 1` per task.
    tests/trainer/test_cli.py checks the result against hand counts and against real runs.

    Returns:
        parameter_report(...) plus "tasks", "method", "backbone" (frozen backbone elements), "survival".
    """
    if isinstance(survival, bool) or not isinstance(survival, (int, float)) or not 0.0 <= survival <= 1.0:
        raise ValueError(f"survival must be a fraction in [0, 1], got {survival!r}")
    cfg = config
    names = stream_task_names(cfg)
    T = len(names)
    torch.manual_seed(0)
    model, _, _, _ = create_clip(cfg.model.name, None, device=device, precision="fp32")
    backbone = sum(p.numel() for p in model.parameters())
    embed = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None else 0
    empty = {"experts": 0, "experts_effective": 0, "routers": 0, "routers_physical": 0, "selector": 0, "total": 0}
    method_cls = get_method(cfg.method.name)
    if not method_cls.trains:
        per_task = [{"phase1": 0, "phase2": None, "phase1_steps": 0, "phase2_steps": None} for _ in names]
        report = parameter_report(per_task, empty)
        return {**report, "tasks": names, "method": cfg.method.name, "backbone": backbone, "survival": survival}
    inject(model, dataclasses.replace(cfg.adapters, num_experts=0, backend="reference"))
    a = cfg.adapters
    plan = []
    for _, layer in adapter_layers(model):
        bias = (a.rank + layer.out_features) if a.expert_bias else 0
        plan.append(PlanLayer(_router_numel_per_expert(layer), a.rank * (layer.in_features + layer.out_features)
                              + bias, a.num_experts))
    per_task: list[dict[str, Any]] = []
    for _ in range(T):
        counts = method_cls.plan_task(cfg, plan, survival)
        per_task.append({"phase1": counts["phase1"], "phase2": counts["phase2"], "phase1_steps": None,
                         "phase2_steps": None})
    experts = sum(lay.pool * lay.expert_size for lay in plan)
    router_total = sum(sum(lay.routers) * lay.router_size for lay in plan)
    selector = T * (cfg.method.selector_prototypes * embed + 1)
    added = {"experts": experts, "experts_effective": experts, "routers": router_total,
             "routers_physical": router_total, "selector": selector, "total": experts + router_total + selector}
    report = parameter_report(per_task, added)
    return {**report, "tasks": names, "method": cfg.method.name, "backbone": backbone, "survival": survival}

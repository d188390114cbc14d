"""Contrastive pretraining of a small open_clip CLIP on the synthetic corpus (`igsp pretrain`).

Objective: CLIP's symmetric contrastive loss with *multi-positive* targets. In plain CLIP the only positive of a
caption is its own image; here a caption such as "a red shape" or "an even number" is true of many images of a
batch (igsp.pretrain.corpus.match_matrix), and treating those as negatives would teach the text tower that its
words mean nothing. So the target distribution of caption i over the batch's images is uniform over the images
it matches, and symmetrically for images over captions (the label-aware contrastive target of UniCL, Yang et al.
2022, "Unified Contrastive Learning in Image-Text-Label Space"; our own code). Its minimum is the entropy of the
targets, not 0; the log reports the loss as is.

Token embedding: open_clip's CLIP tokenizer has 49,408 tokens and the corpus uses ~130 of them. A dense embedding
would spend most of every AdamW step on rows that never get a gradient (6.3 M of the model's parameters at width
128), so pretraining swaps it for `CompactTokenEmbedding` (the corpus vocabulary's rows plus a fixed zero row for
every other token); export writes the full table back with zeros for the unused rows, so the result loads into a
stock open_clip model. A token the corpus never used reads as zero (plus its position), as it should: it has no
meaning to this model.

Determinism: batch `s` is corpus items `[s * B, (s + 1) * B)` of the corpus seed (a pure function of the step),
parameters are initialised from `torch.manual_seed(seed)`, and nothing else is random. On one machine with the
same thread count, a rerun gives bit-identical weights; a resumed run (checkpoint every `checkpoint_every` steps,
atomic) continues exactly where it stopped. BLAS reductions may round differently under another thread count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from igsp.checkpoint import atomic_save, atomic_write_json
from igsp.config import ConfigError, _bad, _float_range, _int_range
from igsp.engine import _JsonlLog, _progress_bar, lr_at
from igsp.model import create_clip, text_features
from igsp.pretrain.corpus import (
    COLOURS,
    CORPUS_VERSION,
    EVAL_OFFSET,
    SHAPES,
    SUBJECTS,
    caption_phrases,
    corpus_batch,
    match_matrix,
)

__all__ = [
    "CompactTokenEmbedding",
    "CorpusSteps",
    "PretrainConfig",
    "build_pretrain_model",
    "corpus_probe",
    "corpus_vocabulary",
    "multi_positive_clip_loss",
    "pretrain",
]

logger = logging.getLogger(__name__)

PRETRAIN_FORMAT = 1


@dataclass
class PretrainConfig:
    """One pretraining run. Validated by `validate()`; JSON-ready via `dataclasses.asdict`."""

    model: str = field(default="igsp-small", metadata={"help": "open_clip model config (igsp/model_configs)"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "image-caption pairs per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps, then cosine decay to 0"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of matrices (not of gains, "
                                                               "biases, embeddings, logit scale)"})
    init_logit_scale: float = field(default=50.0, metadata={"help": "initial multiplier of the cosine similarities "
                                                                    "(learned; open_clip starts at 1/0.07 = 14.3)"})
    seed: int = field(default=0, metadata={"help": "corpus and initialisation seed"})
    threads: int | None = field(default=1, metadata={"help": "torch intra-op threads (null = torch's default)"})
    workers: int = field(default=1, metadata={"help": "DataLoader processes drawing the corpus (0 = in-process)"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (0 = end only)"})
    eval_every: int = field(default=200, metadata={"help": "steps between held-out corpus probes (0 = end only)"})
    log_every: int = field(default=10, metadata={"help": "steps between log records"})

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise _bad("pretrain.model", self.model, "an open_clip model config name, e.g. 'igsp-small'")
        _int_range("pretrain.steps", self.steps, 1)
        _int_range("pretrain.batch_size", self.batch_size, 2)
        _float_range("pretrain.lr", self.lr, 0.0, low_open=True)
        _int_range("pretrain.warmup", self.warmup, 0)
        _float_range("pretrain.weight_decay", self.weight_decay, 0.0)
        _int_range("pretrain.seed", self.seed, 0)
        if self.threads is not None:
            _int_range("pretrain.threads", self.threads, 1)
        _int_range("pretrain.workers", self.workers, 0)
        _int_range("pretrain.checkpoint_every", self.checkpoint_every, 0)
        _int_range("pretrain.eval_every", self.eval_every, 0)
        _int_range("pretrain.log_every", self.log_every, 1)
        _float_range("pretrain.init_logit_scale", self.init_logit_scale, 1.0, 100.0)
        for name in ("lr", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise _bad(f"pretrain.{name}", getattr(self, name), "a finite number")


# ------------------------------------------------------------------------------------------------ model
def corpus_vocabulary(tokenizer: Any) -> torch.Tensor:
    """int64 `(V,)`: the sorted ids of every token the corpus captions can contain (start/end included)."""
    tokens = tokenizer(caption_phrases())
    return torch.unique(tokens[tokens != 0])


class CompactTokenEmbedding(nn.Module):
    """A token embedding that stores only the rows of `token_ids`; every other token embeds to zeros.

    Args:
        token_ids: int64 `(V,)`, the ids that get trainable rows.
        weight: float `(V, D)`, their initial rows.
        num_embeddings: the tokenizer's vocabulary size (49,408 for CLIP's BPE).
    forward(text int64 (B, L)) -> float (B, L, D).
    """

    def __init__(self, token_ids: torch.Tensor, weight: torch.Tensor, num_embeddings: int) -> None:
        super().__init__()
        if token_ids.dim() != 1 or weight.dim() != 2 or weight.shape[0] != token_ids.numel():
            raise ValueError(f"token_ids (V,) and weight (V, D) must agree, got {tuple(token_ids.shape)} and "
                             f"{tuple(weight.shape)}")
        self.num_embeddings = num_embeddings
        self.weight = nn.Parameter(weight.detach().clone())
        lut = torch.full((num_embeddings,), token_ids.numel(), dtype=torch.int64)
        lut[token_ids] = torch.arange(token_ids.numel())
        self.register_buffer("token_ids", token_ids.clone())
        self.register_buffer("lut", lut)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.weight, self.weight.new_zeros(1, self.weight.shape[1])])
        return F.embedding(self.lut[text], table)

    def full_weight(self) -> torch.Tensor:
        """The equivalent dense `(num_embeddings, D)` table (zeros outside `token_ids`)."""
        full = self.weight.new_zeros(self.num_embeddings, self.weight.shape[1])
        full[self.token_ids] = self.weight.detach()
        return full


def build_pretrain_model(config: PretrainConfig) -> tuple[nn.Module, Any]:
    """The randomly initialised model (seeded) with its token embedding made compact, and its tokenizer."""
    torch.manual_seed(config.seed)
    model, _, _, tokenizer = create_clip(config.model, None)
    # From scratch the towers first agree on what pixels show directly (colour) and only later on identity; a
    # sharper start (50 instead of CLIP's 14.3) amplifies the small early differences between identity captions:
    # held-out subject accuracy after 600 steps of 128 pairs rose from 9% to 14% (18% with bare-name captions).
    with torch.no_grad():
        model.logit_scale.fill_(math.log(config.init_logit_scale))
    ids = corpus_vocabulary(tokenizer)
    dense = model.token_embedding
    model.token_embedding = CompactTokenEmbedding(ids, dense.weight[ids], dense.num_embeddings)
    return model, tokenizer


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stock open_clip state dict of a model with a compact token embedding (dense, zero-filled table)."""
    emb = model.token_embedding
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("token_embedding.")}
    state["token_embedding.weight"] = emb.full_weight() if isinstance(emb, CompactTokenEmbedding) else emb.weight
    return state


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process, and of its finished children (the corpus workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def _image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ------------------------------------------------------------------------------------------------- data
class CorpusSteps(Dataset):
    """Item `s` is the whole batch of step `s`: images `(B, 3, S, S)`, tokens `(B, L)`, attrs and constraints
    `(B, 7)` (igsp.pretrain.corpus), for corpus items `[s * B, (s + 1) * B)` (offset by `offset`)."""

    def __init__(self, seed: int, batch_size: int, image_size: int, tokenizer: Any, offset: int = 0) -> None:
        self.seed, self.batch_size, self.image_size, self.offset = seed, batch_size, image_size, offset
        self.tokenizer = tokenizer

    def __len__(self) -> int:  # unbounded in principle; the sampler chooses the steps
        return 2**31

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        start = self.offset + step * self.batch_size
        images, captions, attrs, cons = corpus_batch(self.seed, range(start, start + self.batch_size),
                                                     self.image_size)
        return {"images": images, "tokens": self.tokenizer(captions), "attrs": attrs, "constraints": cons}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the drawing worker shares the 2 cores with the training threads


# ------------------------------------------------------------------------------------------------- loss
def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, match: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss whose targets are uniform over every matching pair.

    Args:
        image_features: float `(B, D)`, L2-normalised.
        text_features: float `(B, D)`, L2-normalised (caption i belongs to image i).
        match: bool `(B, B)`, `match[i, j]` = caption i is true of image j (the diagonal must be True).
        logit_scale: scalar, the multiplier of the cosine similarities.
    Returns:
        scalar: mean of the image->text and text->image cross-entropies against the soft targets.
    """
    if not bool(match.diagonal().all()):
        raise ValueError("match must hold every caption's own image (its diagonal must be all True)")
    logits_t = logit_scale * text_features @ image_features.T  # (captions, images)
    target_t = match.float() / match.sum(dim=1, keepdim=True)
    target_i = match.T.float() / match.sum(dim=0).unsqueeze(1)
    loss_t = -(target_t * logits_t.log_softmax(dim=1)).sum(dim=1).mean()
    loss_i = -(target_i * logits_t.T.log_softmax(dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_t + loss_i)


# ------------------------------------------------------------------------------------------------ probes
@torch.no_grad()
def corpus_probe(model: nn.Module, tokenizer: Any, seed: int, n: int = 512) -> dict[str, float]:
    """Zero-shot accuracy (percent) on `n` held-out corpus items (indices from `EVAL_OFFSET`, never trained on):
    `subject` among all 46 digits, letters and shapes; `colour` among the 10 colour names."""
    was_training = model.training
    model.eval()
    images, _, attrs, _ = corpus_batch(seed, range(EVAL_OFFSET, EVAL_OFFSET + n), _image_size(model))
    feats = F.normalize(model.encode_image(images).float(), dim=-1)
    subject_prompts = ([f"a photo of the digit {s}." for s in SUBJECTS[:10]]
                       + [f"a photo of the letter {s}." for s in SUBJECTS[10:36]]
                       + [f"a photo of a {s}." for s in SHAPES])
    subj = text_features(model, tokenizer, subject_prompts, ["{}"])
    col = text_features(model, tokenizer, [name for name, _ in COLOURS], ["a photo of something {}."])
    out = {"subject": 100.0 * float(((feats @ subj.T).argmax(1) == attrs[:, 1]).float().mean()),
           "colour": 100.0 * float(((feats @ col.T).argmax(1) == attrs[:, 2]).float().mean())}
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------- train
def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As open_clip's training: no decay on gains, biases, embeddings and the logit scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.startswith("token_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(config: PretrainConfig, output_dir: str | os.PathLike[str], *, resume: bool = False
             ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Run (or resume) a pretraining run in `output_dir`.

    Writes `config.json`, `log.jsonl` (step records: loss, lr, logit scale, pairs/s; probe records) and
    `checkpoints/latest.pt` (atomic; model, optimizer, step, log offset, elapsed time).

    Returns:
        (model with the compact embedding, tokenizer, summary dict: steps, final loss (mean of the last
        log window), first loss, wall and train seconds, probes).
    """
    config.validate()
    out = Path(output_dir)
    ckpt_path = out / "checkpoints" / "latest.pt"
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {str(ckpt_path)!r}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("format") != PRETRAIN_FORMAT:
            raise ValueError(f"{ckpt_path}: not an igsp pretraining checkpoint (format {state.get('format')!r})")
        saved = PretrainConfig(**state["config"])
        if saved != config:
            diff = {k: (v, getattr(config, k)) for k, v in dataclasses.asdict(saved).items()
                    if getattr(config, k) != v}
            raise ConfigError(f"--resume: the run in {out} was started with another config (saved vs given: "
                              f"{diff}); resume with the same options")
    else:
        if ckpt_path.exists():
            raise FileExistsError(f"output directory {str(out)!r} already holds a pretraining run; continue it with "
                                  "--resume or choose another --output")
        state = None
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    model, tokenizer = build_pretrain_model(config)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    start_step, elapsed = 0, 0.0
    out.mkdir(parents=True, exist_ok=True)
    log = _JsonlLog(out / "log.jsonl")
    summary: dict[str, Any] = {"first_loss": None, "probes": []}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, elapsed = int(state["step"]), float(state["elapsed_s"])
        summary = dict(state["summary"])
        log.truncate(int(state["log_offset"]))
        log.write({"event": "resume", "step": start_step})
        logger.info("resumed %s at step %d", out, start_step)
    else:
        atomic_write_json(out / "config.json", dataclasses.asdict(config))
        n_params = sum(p.numel() for p in dense_state_dict(model).values())
        log.write({"event": "start", "config": dataclasses.asdict(config), "corpus_version": CORPUS_VERSION,
                   "parameters": n_params, "vocabulary": int(model.token_embedding.token_ids.numel())})

    def cpu_total() -> dict[str, float]:
        own, kids = _cpu_seconds()
        return {"cpu_s": base_cpu[0] + own - cpu0[0], "cpu_workers_s": base_cpu[1] + kids - cpu0[1]}

    def save(step: int, spent: float) -> None:
        atomic_save({"format": PRETRAIN_FORMAT, "config": dataclasses.asdict(config), "step": step,
                     "model": model.state_dict(), "optimizer": optimizer.state_dict(), "elapsed_s": spent,
                     "log_offset": log.offset(), "summary": {**summary, **cpu_total()}}, ckpt_path)

    data = CorpusSteps(config.seed, config.batch_size, _image_size(model), tokenizer)
    loader = DataLoader(data, batch_size=None, sampler=range(start_step, config.steps), num_workers=config.workers,
                        worker_init_fn=_worker_init if config.workers else None,
                        prefetch_factor=2 if config.workers else None)
    model.train()
    bar = _progress_bar(config.steps, start_step, "pretrain", True)
    t0, cpu0, load0 = time.time(), _cpu_seconds(), os.getloadavg()[0]
    base_cpu = (summary.get("cpu_s", 0.0), summary.get("cpu_workers_s", 0.0))
    window: list[float] = []
    step = start_step
    try:
        for batch in loader:
            lr = lr_at(step, config.lr, config.warmup, config.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            img = F.normalize(model.encode_image(batch["images"]), dim=-1)
            txt = F.normalize(model.encode_text(batch["tokens"]), dim=-1)
            match = match_matrix(batch["constraints"], batch["attrs"])
            loss = multi_positive_clip_loss(img, txt, match, model.logit_scale.exp().clamp(max=100.0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"pretraining loss became {value} at step {step}; lower --lr")
            if summary["first_loss"] is None:
                summary["first_loss"] = value
            window.append(value)
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                spent = elapsed + time.time() - t0
                summary["last_loss"] = sum(window) / len(window)
                log.write({"event": "step", "step": step, "loss": summary["last_loss"], "lr": lr,
                           "logit_scale": float(model.logit_scale.detach().exp()), "elapsed_s": spent,
                           "pairs_per_s": config.batch_size * (step - start_step) / max(time.time() - t0, 1e-9)})
                bar.set_postfix(loss=f"{summary['last_loss']:.3f}")
                window = []
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                probe = corpus_probe(model, tokenizer, config.seed)
                summary["probes"].append({"step": step, **probe})
                log.write({"event": "probe", "step": step, **probe})
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                save(step, elapsed + time.time() - t0)
    finally:
        bar.close()
    spent = elapsed + time.time() - t0
    # CPU seconds (the training process; the drawing workers apart) and the 1-minute load average let a run on a
    # busy shared machine be translated into what an idle one takes: with one training thread and the drawing in
    # its own process, an idle 2-core machine needs about the training process's CPU time (wall time alone says
    # little on a loaded machine).
    summary.update(cpu_total())
    summary.setdefault("load_average", []).append([round(load0, 2), round(os.getloadavg()[0], 2)])
    probe = corpus_probe(model, tokenizer, config.seed)
    summary["probes"].append({"step": step, **probe})
    summary.update(steps=step, train_s=spent)
    log.write({"event": "probe", "step": step, **probe})
    log.write({"event": "end", "step": step, "elapsed_s": spent})
    save(step, spent)
    log.close()
    return model, tokenizer, summary

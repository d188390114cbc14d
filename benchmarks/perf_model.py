"""Performance model of the fused MoE-LoRA op: one recorded call on the CPU, a predicted time on a named GPU.

    python benchmarks/perf_model.py                 # the table (`make perf-model`): every case, predicted
    python benchmarks/perf_model.py --json          # the same as JSON, with the headline case under "headline"
    python benchmarks/perf_model.py --measure OUT   # on a GPU: measured beside predicted per kernel (gpu_suite.sh)

How (issue 9 item 4, shared/KERNELS.md "Predicting GPU time without a GPU"): the real op runs once, forward and
backward, on CPU tensors of the full size (uninitialised activations; real routing), with every Triton launch
intercepted instead of run: its kernel, grid, config (the one a GPU launch pins: the first default surviving the
pruner, under the H200 tiling policy, 132 SMs) and tensors are recorded, and every torch op the op runs between
launches is recorded too (a TorchDispatchMode). For each launch a counter below gives
- bytes, lower bound: every tensor it touches moved once (weights and small operand tiles live in L2);
- bytes, upper bound: every activation row re-read from DRAM by each program that reads it (gathered rows read
  k times, rows read by several N-groups read that many times);
- FLOPs as executed, padding included (rank tiles of 16, the slot axis of a tile, partial row tiles), each at the
  peak of its operand type (bf16 tensor cores, or the fp32 FMA rate for fp32 "ieee" dots);
and its time is max(bytes / bandwidth, sum FLOPs / peak, launch floor), summed over the launches of the op. A
launch that mixes compute-bound GEMM tiles with memory-bound weight-gradient programs is one kernel to the model:
its traffic overlaps its MMAs (the GPU run checks that assumption first). The baseline is the two base GEMMs
alone (y = x W0^T and dx = dy W0, each max(FLOPs / peak, bytes / bandwidth)); the overhead is ours / that - 1.

Everything here is a prediction (labelled so in the output) until a GPU run commits its measured table under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import triton
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

from igsp_kernels._dtypes import cast_frozen
from igsp_kernels.ops import _utils
from igsp_kernels.ops import moe_lora as ml
from igsp_kernels.ops import moe_lora_sample as ms
from igsp_kernels.ops._roofline import GPU, H200, peak_flops
from igsp_kernels.reference import moe_lora_ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import TOKENS_PER_IMAGE, MoELoRABenchCase, provenance  # noqa: E402

MODEL_LAYERS = ("fc1", "fc2")
IMAGES = (64, 128, 256)
RANKS = (8, 16, 64)
COMMAND = "make perf-model  (python benchmarks/perf_model.py)"


# --------------------------------------------------------------------------------------------- cases
# One MoE-LoRA layer call as the trainer makes it: bf16 activations under autocast, fp32 master A / B and an fp32
# frozen base weight (cast once to bf16 and cached), per-sample routing ("sample": tokens_per_sample = 197) or the
# general path ("token": routing per token), forward + backward. The benchmarks' case, shared.
Case = MoELoRABenchCase


HEADLINE = {layer: Case(layer, 256, 22, 16, "bf16", "sample") for layer in MODEL_LAYERS}


def parse_case(name: str) -> Case:
    """The Case called `name` (e.g. fc1-b256-E22-r16-bf16-sample, the format of `Case.name`)."""
    m = re.fullmatch(r"(fc1|fc2)-b(\d+)-E(\d+)-r(\d+)-(bf16|fp16|fp32)-(sample|token)", name.strip())
    if m is None:
        raise ValueError(f"case name {name!r} does not read like {HEADLINE['fc1'].name}")
    layer, b, E, r, dt, routing = m.groups()
    return Case(layer, int(b), int(E), int(r), dt, routing)


def default_cases() -> list[Case]:
    """fc1 and fc2 at 64 / 128 / 256 images and r = 8 / 16 / 64 (per-sample), then the headline on the token path."""
    cases = [Case(layer, b, 22, r, "bf16", "sample") for layer, b, r in itertools.product(MODEL_LAYERS, IMAGES,
                                                                                          RANKS)]
    return cases + [Case(layer, 256, 22, 16, "bf16", "token") for layer in MODEL_LAYERS]


# --------------------------------------------------------------------------------------------- launches
@dataclass
class Launch:
    """One kernel launch (a Triton kernel or a torch op) with its counted traffic and work."""

    name: str
    phase: str  # "fwd" | "bwd"
    role: str  # "gemm" (a base-GEMM launch), "lora", "metadata", "glue"
    grid: int = 1
    config: str = ""
    bytes_lo: float = 0.0
    bytes_hi: float = 0.0
    flops: dict[str, float] = field(default_factory=dict)  # peak name -> FLOPs

    def seconds(self, gpu: GPU, hi: bool = False) -> float:
        mem = (self.bytes_hi if hi else self.bytes_lo) / gpu.bandwidth
        comp = sum(f / gpu.peaks[p] for p, f in self.flops.items())
        return max(mem, comp, gpu.launch_floor)

    def bound(self, gpu: GPU) -> str:
        mem = self.bytes_lo / gpu.bandwidth
        comp = sum(f / gpu.peaks[p] for p, f in self.flops.items())
        if max(mem, comp) < gpu.launch_floor:
            return "launch"
        return "compute" if comp >= mem else "memory"

    @property
    def gflop(self) -> float:
        return sum(self.flops.values()) / 1e9


def nb(t: torch.Tensor | None) -> float:
    return 0.0 if t is None else float(t.numel() * t.element_size())


def _peak_name(dtype: Any, precision: str = "ieee") -> str:
    """The ceiling an MMA on operands of `dtype` (a Triton or torch dtype) runs at."""
    name = str(dtype).replace("torch.", "")
    for key, peak in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"),
                      ("fp64", "fp64"), ("float64", "fp64")):
        if name == key:
            return peak
    return "tf32" if precision == "tf32" else "fp32"


def _cfg(c: triton.Config) -> str:
    short = {"BLOCK_N": "BN", "BLOCK_K": "BK", "BLOCK_M": "BM", "BLOCK_WN": "WN", "BLOCK_L": "BL", "GROUP_M": "G"}
    parts = [f"{short.get(k, k)}{v}" for k, v in c.kwargs.items()]
    return " ".join(parts + [f"w{c.num_warps}", f"s{c.num_stages}"])


# --------------------------------------------------------------------------------------------- counters
# Each counter: (meta = the launch's kwargs + config, grid) -> (bytes_lo, bytes_hi, {peak: flops}).
def _slot_rows(m: dict) -> tuple[float, float, float]:
    """(rows x slot-axis width, rows x bias-lane width, padded rows) summed over the row tiles: a tile inside one
    sample runs the k-slot code path (SLOTS1), the others the full slot axis (SLOTS)."""
    T, L, bm, rt = m["T"], m["L"], m["BLOCK_M"], m["BLOCK_R"]
    blocks = triton.cdiv(T, bm)
    single = sum(1 for b in range(blocks) if (b * bm) // L == (min(b * bm + bm, T) - 1) // L)
    multi = blocks - single
    return (bm * (single * m["SLOTS1"] + multi * m["SLOTS"]) * rt, bm * (single * m["SB1"] + multi * m["SB"]),
            float(blocks * bm))


def _count_ps_fwd(m: dict, grid: int) -> tuple[float, float, dict[str, float]]:
    d_in, d_out, bn, G = m["d_in"], m["d_out"], m["BLOCK_N"], m["n_groups"]
    rows_sr, rows_sb, tp = _slot_rows(m)
    n_pad = triton.cdiv(d_out, bn) * bn
    x = m["x_ptr"]
    lo = nb(x) + nb(m["a_ptr"]) + nb(m["b_ptr"]) + nb(m["idx_ptr"]) + nb(m["w_ptr"]) + nb(m["y_ptr"])
    lo += nb(m["hpre_ptr"]) + (nb(m["w0_ptr"]) if m["HAS_BASE"] else 0) + (nb(m["b0_ptr"]) if m["HAS_B0"] else 0)
    lo += (nb(m["ba_ptr"]) if m["HAS_BA"] else 0) + (nb(m["bb_ptr"]) if m["HAS_BB"] else 0)
    hi = lo + (G - 1) * nb(x)
    f = 2.0 * rows_sr * d_in * G + 2.0 * rows_sr * n_pad  # shrink (per group) + expansion
    f += 2.0 * tp * d_in * n_pad if m["HAS_BASE"] else 0.0
    f += 2.0 * rows_sb * n_pad if m["HAS_BB"] else 0.0
    return lo, hi, {_peak_name(m["OP_DT"], m["PRECISION"]): f}


def _count_ps_bwd(m: dict, grid: int) -> tuple[float, float, dict[str, float]]:
    T, d_in, d_out, k, L = m["T"], m["d_in"], m["d_out"], m["k"], m["L"]
    bn, wn, bl, rt, G = m["BLOCK_N"], m["BLOCK_WN"], m["BLOCK_L"], m["BLOCK_R"], m["n_groups"]
    op = _peak_name(m["OP_DT"], m["PRECISION"])
    acc = "fp64" if op == "fp64" else "fp32"
    rows_sr, rows_sb, tp = _slot_rows(m)
    dy, x, rank_rows = m["dy_ptr"], m["x_ptr"], nb(m["hpre_ptr"])  # (T, k, r) accumulation-dtype tensors
    lo = hi = 0.0
    flops: dict[str, float] = {}

    def add(p: str, f: float) -> None:
        flops[p] = flops.get(p, 0.0) + f

    if m["HAS_MAIN"]:
        n_pad = triton.cdiv(d_in, bn) * bn
        base = m["NEED_DX"] and m["HAS_BASE"]
        main = nb(dy) + nb(m["idx_ptr"]) + nb(m["w_ptr"]) + (nb(m["w0_ptr"]) if base else 0)
        main += nb(m["dx_ptr"]) if m["NEED_DX"] else 0
        if m["T_IN_LOOP"]:
            main += nb(m["b_ptr"]) + rank_rows + (rank_rows if m["STORE_D"] else 0)
            main += T * k * 4 if m["NEED_DGATE"] else 0
            add(op, 2.0 * rows_sr * d_out * G)  # t = dy [B_e ...]^T, per N-group
            if m["NEED_DGATE"]:
                add(acc, 2.0 * rows_sr * m["SB"])  # the d gate selection dot (FMA, accumulation dtype)
                if m["HAS_BB"]:
                    main += nb(m["bb_ptr"])
                    add(op, 2.0 * rows_sb * d_out * G)
        else:
            main += rank_rows  # D
        if m["NEED_DX"]:
            main += nb(m["a_ptr"])
            add(op, 2.0 * rows_sr * n_pad)  # D [A_e ...]^T
            if base:
                add(op, 2.0 * tp * d_out * n_pad)
        lo += main
        hi += main + (G - 1) * nb(dy)
    rows_exec = float(m["n_samples"]) * k * triton.cdiv(L, bl) * bl  # row chunks of every (sample, expert) pair
    pairs = nb(m["pairs_ptr"]) + nb(m["pair_off_ptr"]) + nb(m["w_ptr"])
    if m["HAS_SIDE_A"]:
        part = pairs + rank_rows + (nb(m["da_ptr"]) if m["NEED_DA"] else 0)
        part += nb(m["dba_ptr"]) if m["NEED_DBA"] else 0
        part += T * k * 4 + nb(m["dw_ptr"]) if m["NEED_DGATE"] else 0  # the d gate terms in, d topk_w out
        lo += part + (nb(x) if m["NEED_DA"] else 0)
        hi += part + (k * nb(x) if m["NEED_DA"] else 0)
        if m["NEED_DA"]:
            add(op, 2.0 * rows_exec * triton.cdiv(d_in, wn) * wn * rt)
    if m["HAS_SIDE_B"]:
        part = pairs + rank_rows + (nb(m["db_ptr"]) if m["NEED_DB"] else 0)
        part += nb(m["dbb_ptr"]) if m["NEED_DBB"] else 0
        lo += part + nb(dy)
        hi += part + k * nb(dy)
        if m["NEED_DB"]:
            add(op, 2.0 * rows_exec * triton.cdiv(d_out, wn) * wn * rt)
    return lo, hi, flops


def _count_ps_pairs(m: dict, grid: int) -> tuple[float, float, dict[str, float]]:
    b = nb(m["idx_ptr"]) + nb(m["pairs_ptr"]) + nb(m["pair_off_ptr"])
    return b, b, {}


def _tile_experts(idx: torch.Tensor, order: torch.Tensor, bm: int, E: int) -> float:
    """Sum over row tiles (rows in `order`) of the distinct experts present: the token path's epilogue runs one
    MMA per expert present in a tile."""
    T, k = idx.shape
    rows = idx.long()[order.long()]
    pad = (-T) % bm
    if pad:
        rows = torch.cat([rows, rows[:1].expand(pad, k)])
    tiles = rows.view(-1, bm * k)
    hit = torch.zeros(tiles.shape[0], E, dtype=torch.bool)
    hit.scatter_(1, tiles, True)
    return float(hit.sum())


def _used_blocks(block_expert: torch.Tensor, E: int) -> int:
    return int((block_expert < E).sum())


def _count_tok_shrink(m: dict, grid: int) -> tuple[float, float, dict[str, float]]:
    k, s = m["k"], m["BLOCK_S"]
    x, used = m["x_ptr"], _used_blocks(m["block_expert_ptr"], m["E"])
    meta = nb(m["sorted_ptr"]) + nb(m["block_expert_ptr"]) + nb(m["block_order_ptr"])
    rest = nb(m["a_ptr"]) + nb(m["hpre_ptr"]) + meta + (nb(m["ba_ptr"]) if m["HAS_BA"] else 0)
    f = 2.0 * used * s * m["d_in"] * m["BLOCK_R"]
    return nb(x) + rest, k * nb(x) + rest, {_peak_name(m["OP_DT"], m["PRECISION"]): f}


def _count_tok_gemm(m: dict, grid: int, fwd: bool) -> tuple[float, float, dict[str, float]]:
    T, bm, bn, E = m["T"], m["BLOCK_M"], m["BLOCK_N"], m["E"]
    n_out, k_main = (m["d_out"], m["d_in"]) if fwd else (m["d_in"], m["d_out"])
    n_pad, tp = triton.cdiv(n_out, bn) * bn, triton.cdiv(T, bm) * bm
    inp, out = (m["x_ptr"], m["y_ptr"]) if fwd else (m["dy_ptr"], m["dx_ptr"])
    coef = m["hpre_ptr"] if fwd else m["d_ptr"]
    lora = m["b_ptr"] if fwd else m["a_ptr"]
    b = nb(inp) + nb(out) + nb(lora) + nb(coef) + nb(m["idx_ptr"]) + nb(m["token_order_ptr"])
    b += nb(m["w0_ptr"]) if m["HAS_BASE"] else 0
    if fwd:
        b += nb(m["gate_ptr"]) + (nb(m["b0_ptr"]) if m["HAS_B0"] else 0) + (nb(m["bb_ptr"]) if m["HAS_BB"] else 0)
    experts = _tile_experts(m["idx_ptr"], m["token_order_ptr"], bm, E)
    f = 2.0 * experts * bm * m["BLOCK_R"] * n_pad
    f += 2.0 * tp * k_main * n_pad if m["HAS_BASE"] else 0.0
    return b, b, {_peak_name(m["OP_DT"], m["PRECISION"]): f}


def _count_tok_rank(m: dict, grid: int) -> tuple[float, float, dict[str, float]]:
    k, s, rt = m["k"], m["BLOCK_S"], m["BLOCK_R"]
    used = _used_blocks(m["block_expert_ptr"], m["E"])
    rows = used * s
    dy, x = m["dy_ptr"], m["x_ptr"]
    assign = m["T"] * k if "T" in m else m["hpre_ptr"].shape[0]
    rank = nb(m["hpre_ptr"])
    b = rank + nb(m["gate_ptr"]) + nb(m["b_ptr"]) + nb(m["sorted_ptr"]) + nb(m["block_expert_ptr"])
    b += rank if m["NEED_D"] else 0
    b += assign * 4 if m["NEED_DGATE"] else 0
    f = 2.0 * rows * m["d_out"] * rt if m["NEED_T"] else 0.0
    lo, hi = b + nb(dy), b + k * nb(dy)
    r = m["r"]
    if m["FUSE"] and m["NEED_DB"]:
        lo += used * r * m["d_out"] * 4
        hi += used * r * m["d_out"] * 4
        f += 2.0 * rows * rt * m["d_out"]
    if m["FUSE"] and m["NEED_DA"]:
        lo += used * r * m["d_in"] * 4 + nb(x)
        hi += used * r * m["d_in"] * 4 + k * nb(x)
        f += 2.0 * rows * m["d_in"] * rt
    if m["NEED_DBB"]:
        lo += used * m["d_out"] * 4
        hi += used * m["d_out"] * 4
    return lo, hi, {_peak_name(m["OP_DT"], m["PRECISION"]): f}


def _count_tok_dw(m: dict, grid: int) -> tuple[float, float, dict[str, float]]:
    k, s, N, rt = m["k"], m["BLOCK_S"], m["N"], m["BLOCK_R"]
    used = triton.cdiv(int(m["sorted_ptr"].numel()), s)  # an upper bound on the used blocks (chunks read them)
    act, coef, part = m["act_ptr"], m["coef_ptr"], m["part_ptr"]
    b = nb(coef) + nb(part) + nb(m["sorted_ptr"])
    f = 2.0 * used * s * N * rt
    return b + nb(act), b + k * nb(act), {_peak_name(m["OP_DT"], m["PRECISION"]): f}


def _count_tok_reduce(m: dict, grid: int) -> tuple[float, float, dict[str, float]]:
    b = nb(m["part_ptr"]) + nb(m["out_ptr"])
    return b, b, {}


COUNTERS: dict[str, Callable[[dict, int], tuple[float, float, dict[str, float]]]] = {
    "_ps_fwd_kernel": _count_ps_fwd,
    "_ps_bwd_kernel": _count_ps_bwd,
    "_ps_pairs_kernel": _count_ps_pairs,
    "_moe_lora_shrink_kernel": _count_tok_shrink,
    "_moe_lora_fwd_kernel": lambda m, g: _count_tok_gemm(m, g, True),
    "_moe_lora_bwd_dx_kernel": lambda m, g: _count_tok_gemm(m, g, False),
    "_moe_lora_bwd_rank_kernel": _count_tok_rank,
    "_moe_lora_bwd_dw_kernel": _count_tok_dw,
    "_moe_lora_reduce_kernel": _count_tok_reduce,
}
ROLES = {"_ps_pairs_kernel": "metadata", "_ps_fwd_kernel": "gemm", "_moe_lora_fwd_kernel": "gemm",
         "_moe_lora_bwd_dx_kernel": "gemm"}


# --------------------------------------------------------------------------------------------- recording
# aten ops that launch nothing (views, metadata, allocation): not counted as launches.
_NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "t", "transpose", "select", "slice", "as_strided",
    "detach", "alias", "unsqueeze", "squeeze", "empty", "empty_like", "empty_strided", "new_empty", "lift_fresh",
    "_to_copy_noop", "split", "unbind", "numel", "sym_size", "sym_stride", "is_same_size", "_reshape_alias",
}
_WRITE_ONLY = {"zero_", "fill_", "zeros", "zeros_like", "full", "full_like", "arange", "ones", "ones_like"}


class _Recorder(TorchDispatchMode):
    """Records every torch op the op runs (one launch each) and runs igsp_kernels custom ops through their Python
    implementation so the Triton launches inside are intercepted too. Also tallies what the backward allocates
    besides its outputs (temporaries) and notes the backward plan the launches reveal."""

    def __init__(self, launches: list[Launch]) -> None:
        super().__init__()
        self.launches = launches
        self.phase = "fwd"
        self.region = "glue"
        self.plan = "token path"
        self._bwd_alloc = 0.0
        self._bwd_out = 0.0

    @property
    def temporaries_mb(self) -> float:
        return max(0.0, self._bwd_alloc - self._bwd_out) / 2**20

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        qual = func._schema.name
        if qual in OPDEFS:  # our custom op: record what its implementation runs
            region = "metadata" if qual.endswith("routing_metadata") else self.region
            prev, self.region = self.region, region
            try:
                with self:
                    out = OPDEFS[qual]._init_fn(*args, **kwargs)
            finally:
                self.region = prev
            if self.phase == "bwd" and "_bwd" in qual:
                self._bwd_out += sum(nb(o) for o in _flatten(out) if isinstance(o, torch.Tensor))
            return out
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.phase == "bwd" and name in ("empty", "empty_like", "empty_strided", "new_empty"):
            self._bwd_alloc += sum(nb(o) for o in _flatten(out) if isinstance(o, torch.Tensor))
        if name in _NO_LAUNCH or name.startswith("_local_scalar") or name.startswith("sym_"):
            return out
        ins = [a for a in _flatten((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in _flatten(out) if isinstance(o, torch.Tensor)]
        read = 0.0 if name in _WRITE_ONLY else sum(nb(t) for t in {id(t): t for t in ins}.values())
        if name.endswith("_") and name not in _WRITE_ONLY:  # in place: the output is an input already counted
            outs = []
        b = read + sum(nb(t) for t in outs)
        flops = {}
        if name in ("mm", "addmm", "bmm", "matmul"):
            a, bmat = [t for t in ins if t.dim() >= 2][-2:]
            flops = {_peak_name(a.dtype): 2.0 * a.shape[-2] * a.shape[-1] * bmat.shape[-1] * (
                a.shape[0] if name == "bmm" else 1)}
        self.launches.append(Launch(f"torch.{name}", self.phase, self.region, 1, "", b, b, flops))
        return out


def _flatten(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten(o)
    else:
        yield obj


@contextlib.contextmanager
def recording(gpu: GPU = H200) -> Iterator[tuple[list[Launch], _Recorder]]:
    """Intercept every Triton launch (recorded with the config a GPU launch pins, never run) under the GPU tiling
    policy of `gpu`, and every torch op, into the yielded list."""
    launches: list[Launch] = []
    rec = _Recorder(launches)

    def record(self: _utils.KernelLauncher, grid, **kwargs):
        cfg = _utils.CONFIG_OVERRIDES.get(self.name) or self.pinned_config(kwargs)
        meta = {**kwargs, **cfg.kwargs}
        g = grid(meta)
        programs = math.prod(g)
        counter = COUNTERS.get(self.name)
        if counter is None:
            raise KeyError(f"no traffic counter for kernel {self.name}: add one to COUNTERS")
        lo, hi, flops = counter(meta, programs)
        role = ROLES.get(self.name, "lora")
        if self.name == "_ps_bwd_kernel" and meta["HAS_MAIN"] and meta["NEED_DX"]:
            role = "gemm"
            rec.plan = "t_in_dgrad" if meta["T_IN_LOOP"] else "rank_first"
        launches.append(Launch(self.name, rec.phase, role, programs, _cfg(cfg), lo, hi, flops))

    patches = [
        (_utils.KernelLauncher, "__call__", record),
        (ms, "check_moe_lora_launchable", lambda *a: None),
        (ml, "check_moe_lora_launchable", lambda *a: None),
        (ms, "num_sms", lambda dev: gpu.sms),
        (ml, "sort_block_size", lambda n, r, dev: ml.gpu_sort_block(n, r, gpu.sms)),
        (_utils, "interpreting", lambda: False),
        (ms, "interpreting", lambda: False),
        (ml, "interpreting", lambda: False),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, new in patches:
        setattr(obj, attr, new)
    try:
        with rec:
            yield launches, rec
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)


# --------------------------------------------------------------------------------------------- one case
@dataclass
class Result:
    """The recorded launches of one case and what the model predicts from them."""

    case: Case
    gpu: GPU
    plan: str
    launches: list[Launch]
    base_s: float
    saved_mb: float  # activation memory saved for backward (beyond inputs and weights)
    saved_ref_mb: float  # the same for the reference (moe_lora_ref under autograd)
    temp_mb: float  # what the backward allocates besides its outputs
    alternative: dict[str, float] = field(default_factory=dict)  # other backward plan -> predicted total (s)

    @property
    def total_s(self) -> float:
        return sum(x.seconds(self.gpu) for x in self.launches)

    @property
    def total_hi_s(self) -> float:
        return sum(x.seconds(self.gpu, hi=True) for x in self.launches)

    @property
    def overhead_pct(self) -> float:
        return 100.0 * (self.total_s / self.base_s - 1.0)

    @property
    def overhead_hi_pct(self) -> float:
        return 100.0 * (self.total_hi_s / self.base_s - 1.0)

    @property
    def metadata_pct(self) -> float:
        """Routing metadata's share of the layer's predicted time."""
        return 100.0 * sum(x.seconds(self.gpu) for x in self.launches if x.role == "metadata") / self.total_s

    def as_dict(self) -> dict[str, Any]:
        g = self.gpu
        return {
            "case": self.case.name, **asdict(self.case), "T": self.case.T, "d_in": self.case.d_in,
            "d_out": self.case.d_out, "backward_plan": self.plan,
            "kernels": [{"name": x.name, "phase": x.phase, "role": x.role, "grid": x.grid, "config": x.config,
                         "mb_lo": x.bytes_lo / 1e6, "mb_hi": x.bytes_hi / 1e6, "gflop": x.gflop,
                         "us": 1e6 * x.seconds(g), "us_hi": 1e6 * x.seconds(g, hi=True), "bound": x.bound(g)}
                        for x in self.launches],
            "launches": len(self.launches), "total_us": 1e6 * self.total_s, "total_us_hi": 1e6 * self.total_hi_s,
            "base_gemms_us": 1e6 * self.base_s, "overhead_pct": self.overhead_pct,
            "overhead_pct_hi": self.overhead_hi_pct, "metadata_pct": self.metadata_pct,
            "saved_for_backward_mb": self.saved_mb, "reference_saved_for_backward_mb": self.saved_ref_mb,
            "backward_temporaries_mb": self.temp_mb,
            "alternative_plans_us": {k: 1e6 * v for k, v in self.alternative.items()},
        }


def base_gemms_seconds(case: Case, gpu: GPU = H200) -> float:
    """The two base GEMMs alone (y = x W0^T, dx = dy W0), each max(FLOPs / peak, bytes / bandwidth)."""
    dt = case.torch_dtype
    elt = torch.empty((), dtype=dt).element_size()
    flops = 2.0 * case.T * case.d_in * case.d_out
    bytes_ = (case.T * case.d_in + case.d_in * case.d_out + case.T * case.d_out) * elt
    return 2.0 * max(flops / peak_flops(gpu, dt), bytes_ / gpu.bandwidth)


def _inputs(case: Case, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The trainer's layout at full size: activations in the compute dtype (uninitialised on the CPU: never read),
    fp32 master A / B, the frozen fp32 base weight's cached compute-dtype copy, a random top-k routing per sample
    (or per token)."""
    g = torch.Generator().manual_seed(seed)
    dt = case.torch_dtype
    rows = case.images if case.routing == "sample" else case.T
    idx = torch.rand(rows, case.E, generator=g).argsort(1)[:, : case.k].to(torch.int32).to(device)
    w = torch.softmax(torch.randn(rows, case.k, generator=g), -1).to(device)
    new = torch.empty if device in ("cpu", "meta") else torch.randn
    w0 = new(case.d_out, case.d_in, device=device) / (case.d_in ** 0.5 if new is torch.randn else 1)
    return {
        "x": new(case.T, case.d_in, device=device).to(dt).requires_grad_(),
        "A": (new(case.E, case.d_in, case.r, device=device) * 0.02).requires_grad_(),
        "B": (new(case.E, case.r, case.d_out, device=device) * 0.02).requires_grad_(),
        "idx": idx, "w": w.requires_grad_(),
        "W0": cast_frozen(w0, dt) if device != "meta" else w0.to(dt), "b0": new(case.d_out, device=device).to(dt),
        "dy": new(case.T, case.d_out, device=device).to(dt),
        "L": TOKENS_PER_IMAGE if case.routing == "sample" else 1,
    }


def _call(p: dict[str, Any]) -> torch.Tensor:
    return ml.moe_lora_triton(p["x"], p["A"], p["B"], p["idx"], p["w"], p["W0"], p["b0"], 0.5, "identity", None,
                              None, p["L"])


def _saved_mb(fn: Callable[[], Any], inputs: list[torch.Tensor]) -> float:
    """MB of activation memory an op saves for backward (tensors other than `inputs`)."""
    keep = {id(t) for t in inputs}
    seen: dict[int, float] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in keep:
            seen.setdefault(id(t), nb(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def _reference_saved_mb(case: Case) -> float:
    """What moe_lora_ref saves for backward at this size (meta tensors: shapes only, nothing computed)."""
    p = _inputs(case, device="meta")
    ins = [p["x"], p["A"], p["B"], p["w"], p["idx"], p["W0"], p["b0"]]
    return _saved_mb(lambda: moe_lora_ref(p["x"], p["A"], p["B"], p["idx"], p["w"], base_weight=p["W0"],
                                          base_bias=p["b0"], scale=0.5, tokens_per_sample=p["L"]), ins)


@contextlib.contextmanager
def _overrides(target: dict, values: dict) -> Iterator[None]:
    old = dict(target)
    target.update(values)
    try:
        yield
    finally:
        target.clear()
        target.update(old)


def run_case(case: Case, gpu: GPU = H200, plan: str | None = None, alternatives: bool = True) -> Result:
    """Record one forward + backward of `case` and predict its time; `plan` forces a backward plan; with
    `alternatives`, the other plan is recorded too and its total kept for the design table."""
    p = _inputs(case)
    leaves = [p["x"], p["A"], p["B"], p["w"]]
    with _overrides(ms.TUNING_OVERRIDES, {"plan": plan} if plan else {}), recording(gpu) as (launches, rec):
        y = _call(p)
        rec.phase = "bwd"
        torch.autograd.grad(y, leaves, p["dy"])
    used = plan or rec.plan
    with recording(gpu):  # a second forward, its launches discarded: what the op saves for backward
        saved = _saved_mb(lambda: _call(p), [p["x"], p["A"], p["B"], p["w"], p["idx"], p["W0"], p["b0"]])
    result = Result(case, gpu, used, launches, base_gemms_seconds(case, gpu), saved, _reference_saved_mb(case),
                    rec.temporaries_mb)
    if alternatives and case.routing == "sample":
        for other in ("t_in_dgrad", "rank_first"):
            if other != used:
                result.alternative[other] = run_case(case, gpu, other, alternatives=False).total_s
    return result


# --------------------------------------------------------------------------------------------- output
def format_case(r: Result) -> str:
    g = r.gpu
    c = r.case
    lines = [f"{c.name}: {c.layer} {c.d_in}->{c.d_out}, {c.images} images x {TOKENS_PER_IMAGE} tokens (T = {c.T}), "
             f"r = {c.r}, E = {c.E}, k = {c.k}, {c.dtype} activations, fp32 master A/B, "
             f"{'per-sample' if c.routing == 'sample' else 'per-token (general path)'} routing; "
             f"backward plan: {r.plan}",
             f"  {'phase':5} {'kernel':28} {'grid':>6} {'config':26} {'MB lo-hi':>15} {'GFLOP':>7} "
             f"{'us lo-hi':>15} {'bound':8}"]
    for x in r.launches:
        mb = f"{x.bytes_lo / 1e6:.1f}" + (f"-{x.bytes_hi / 1e6:.1f}" if x.bytes_hi > x.bytes_lo * 1.0005 else "")
        us_lo, us_hi = 1e6 * x.seconds(g), 1e6 * x.seconds(g, hi=True)
        us = f"{us_lo:.1f}" + (f"-{us_hi:.1f}" if us_hi > us_lo * 1.0005 else "")
        lines.append(f"  {x.phase:5} {x.name[:28]:28} {x.grid:>6} {x.config[:26]:26} {mb:>15} {x.gflop:>7.2f} "
                     f"{us:>15} {x.bound(g):8}")
    alt = "".join(f"; {k}: {1e6 * v:.1f} us" for k, v in r.alternative.items())
    lines.append(f"  predicted total {1e6 * r.total_s:.1f} us (upper {1e6 * r.total_hi_s:.1f}) in {len(r.launches)} "
                 f"launches vs the two base GEMMs alone {1e6 * r.base_s:.1f} us: overhead {r.overhead_pct:+.1f} % "
                 f"(upper {r.overhead_hi_pct:+.1f} %), routing metadata {r.metadata_pct:.1f} % of the layer{alt}")
    lines.append(f"  saved for backward {r.saved_mb:.1f} MB (reference {r.saved_ref_mb:.1f} MB), backward "
                 f"temporaries {r.temp_mb:.1f} MB")
    return "\n".join(lines)


def summary_table(results: list[Result]) -> str:
    """One markdown row per case (the README table)."""
    rows = ["| layer | images | r | routing | plan | predicted us (fwd+bwd) | base GEMMs us | overhead | upper | "
            "metadata |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        c = r.case
        rows.append(f"| {c.layer} | {c.images} | {c.r} | {c.routing} | {r.plan} | {1e6 * r.total_s:.0f} | "
                    f"{1e6 * r.base_s:.0f} | {r.overhead_pct:+.1f} % | {r.overhead_hi_pct:+.1f} % | "
                    f"{r.metadata_pct:.1f} % |")
    return "\n".join(rows)


def report(results: list[Result], gpu: GPU = H200) -> dict[str, Any]:
    """The JSON document: every case, and the headline case per layer under "headline"."""
    headline = {}
    for r in results:
        for layer, case in HEADLINE.items():
            if r.case == case:
                headline[layer] = {"overhead_pct": r.overhead_pct, "overhead_pct_hi": r.overhead_hi_pct,
                                   "metadata_pct": r.metadata_pct, "total_us": 1e6 * r.total_s,
                                   "base_gemms_us": 1e6 * r.base_s, "backward_plan": r.plan, "case": r.case.name}
    return {
        "predicted": True, "command": COMMAND,
        "gpu": {"name": gpu.name, "sms": gpu.sms, "bandwidth_Bps": gpu.bandwidth, "peaks_flops": gpu.peaks,
                "launch_floor_s": gpu.launch_floor},
        "headline": headline, "cases": [r.as_dict() for r in results],
    }


# --------------------------------------------------------------------------------------------- measuring (GPU)
def measure_case(case: Case, gpu: GPU = H200, iters: int = 20) -> dict[str, Any]:
    """On a GPU: the predicted launches of `case` beside their measured device times (torch.profiler, kernels
    grouped by name over `iters` forward+backward calls, the same backward plan and pinned configs as the model),
    and the two base GEMMs measured alone (F.linear and dy @ W0, do_bench medians)."""
    import torch.nn.functional as F
    import triton.testing
    from torch.profiler import ProfilerActivity, profile

    res = run_case(case, gpu, alternatives=False)
    p = _inputs(case, device="cuda")
    leaves = [p["x"], p["A"], p["B"], p["w"]]
    plan = {"plan": res.plan} if case.routing == "sample" else {}

    def call() -> None:
        torch.autograd.grad(_call(p), leaves, p["dy"])

    with _overrides(ms.TUNING_OVERRIDES, plan):
        call()  # compile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                call()
            torch.cuda.synchronize()
    measured: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us:
            name = ev.key if ev.key in COUNTERS else "other (torch kernels)"
            measured[name] = measured.get(name, 0.0) + us / iters
    predicted: dict[str, float] = {}
    for x in res.launches:
        name = x.name if x.name in COUNTERS else "other (torch kernels)"
        predicted[name] = predicted.get(name, 0.0) + 1e6 * x.seconds(gpu)
    x2, w0, dy = p["x"].detach(), p["W0"], p["dy"]
    base = sum(triton.testing.do_bench(fn, warmup=10, rep=50) for fn in (lambda: F.linear(x2, w0),
                                                                        lambda: dy @ w0)) * 1e3
    rows = [{"kernel": k, "predicted_us": predicted.get(k, 0.0), "measured_us": measured.get(k, 0.0),
             "error_pct": 100.0 * (predicted.get(k, 0.0) / measured[k] - 1.0) if measured.get(k) else None}
            for k in sorted(set(predicted) | set(measured))]
    total_m, total_p = sum(measured.values()), 1e6 * res.total_s
    return {"case": case.name, "backward_plan": res.plan, "kernels": rows, "predicted_total_us": total_p,
            "measured_total_us": total_m, "predicted_base_us": 1e6 * res.base_s, "measured_base_us": base,
            "predicted_overhead_pct": res.overhead_pct,
            "measured_overhead_pct": 100.0 * (total_m / base - 1.0) if base else None}


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def measure(out_path: str, budget_s: float, cases: list[Case]) -> int:
    """The GPU suite's calibration step: measured beside predicted per kernel, case by case until the time budget
    is spent (headline cases first), printed and written as JSON with provenance."""
    import time

    os.environ.setdefault("IGSP_KERNELS_AUTOTUNE", "0")  # the model predicts the pinned (default) configs
    start, results = time.time(), []
    for case in cases:
        if time.time() - start > budget_s:
            _say(f"budget of {budget_s:.0f} s spent: {len(cases) - len(results)} cases not measured")
            break
        r = measure_case(case)
        results.append(r)
        _say(f"\n{r['case']} (backward plan {r['backward_plan']}): measured {r['measured_total_us']:.1f} us vs "
             f"predicted {r['predicted_total_us']:.1f} us; base GEMMs measured {r['measured_base_us']:.1f} us vs "
             f"predicted {r['predicted_base_us']:.1f} us; overhead measured {r['measured_overhead_pct']:+.1f} % vs "
             f"predicted {r['predicted_overhead_pct']:+.1f} %")
        for row in r["kernels"]:
            err = "" if row["error_pct"] is None else f"{row['error_pct']:+.0f} %"
            _say(f"  {row['kernel']:28} predicted {row['predicted_us']:9.1f} us  measured "
                 f"{row['measured_us']:9.1f} us  model error {err}")
    with open(out_path, "w") as f:
        json.dump({"provenance": provenance(), "gpu_model": H200.name, "command": COMMAND, "results": results}, f,
                  indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Predicted GPU time of the fused MoE-LoRA op, per kernel (issue 9).")
    ap.add_argument("--json", action="store_true", help="print JSON (with the headline case under 'headline')")
    ap.add_argument("--cases", default="default", help="default | headline | comma-separated case names")
    ap.add_argument("--summary", action="store_true", help="print only the markdown summary table")
    ap.add_argument("--measure", metavar="OUT_JSON", help="on a GPU: measured beside predicted per kernel")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for --measure (cases in order)")
    args = ap.parse_args(argv)
    cases = default_cases()
    if args.cases == "headline":
        cases = list(HEADLINE.values())
    elif args.cases != "default":
        try:
            cases = [parse_case(name) for name in args.cases.split(",")]
        except ValueError as exc:
            ap.error(str(exc))
    if args.measure:
        if not torch.cuda.is_available():
            ap.error("--measure needs a CUDA GPU")
        order = list(HEADLINE.values()) + [c for c in cases if c not in HEADLINE.values()]
        return measure(args.measure, args.budget, order)
    results = []
    for case in cases:
        results.append(run_case(case))
    if args.json:
        json.dump(report(results), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    out.write(f"PREDICTED by the performance model on {H200.name} (no GPU measurement); command: {COMMAND}\n\n")
    if not args.summary:
        for r in results:
            out.write(format_case(r) + "\n\n")
    out.write(summary_table(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark cases, providers and metrics shared by the GPU benchmarks (STYLE H1-H5).

Cases are frozen dataclasses drawn from CLIP ViT-B/16 shapes via itertools.product (STYLE H4). FLOPs and bytes
come from explicit count functions (STYLE H3); the roofline floor uses the H200 ceilings of
shared/KERNELS.md (~790 TFLOP/s dense bf16/fp16, ~4.3 TB/s) and, for fp32 without TF32, the ~67 TFLOP/s
FMA peak of the H100/H200 SXM data sheet (an assumption, labelled as such in the report).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache

import torch

from igsp_kernels.reference import moe_lora_dense, moe_lora_loop, moe_lora_ref, moe_lora_smart_dense

TOKENS_PER_IMAGE = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token
# Layers of a ViT-B/16 block (width 768, MLP 3072): name -> (d_in, d_out)
LAYERS = {"fc1": (768, 3072), "fc2": (3072, 768), "attn_out": (768, 768)}
IMAGES = (64, 128, 256)
EXPERTS = (22, 32)
RANKS = (8, 16, 64)
DTYPES = ("bf16", "fp32")
ROUTINGS = ("sample", "token")
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("base", "eager", "dense", "smart-dense", "compiled", "fused")

PEAK_TFLOPS = {"bf16": 790.0, "fp16": 790.0, "fp32": 67.0}
PEAK_TBPS = 4.3
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class MoELoRABenchCase:
    """One fused MoE-LoRA problem on a ViT-B/16 linear."""

    layer: str
    images: int
    E: int
    r: int
    dtype: str
    routing: str
    k: int = 2

    @property
    def d_in(self) -> int:
        return LAYERS[self.layer][0]

    @property
    def d_out(self) -> int:
        return LAYERS[self.layer][1]

    @property
    def T(self) -> int:
        return self.images * TOKENS_PER_IMAGE

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def name(self) -> str:
        return f"{self.layer}-b{self.images}-E{self.E}-r{self.r}-{self.dtype}-{self.routing}"

    def as_dict(self) -> dict:
        return {**asdict(self), "d_in": self.d_in, "d_out": self.d_out, "T": self.T, "case": self.name}


ALL_CASES = tuple(
    MoELoRABenchCase(layer, images, E, r, dtype, routing)
    for layer, images, E, r, dtype, routing in itertools.product(LAYERS, IMAGES, EXPERTS, RANKS, DTYPES, ROUTINGS)
)

HEADLINE = MoELoRABenchCase("fc1", 128, 22, 16, "bf16", "sample")
# The curated default: the headline target case, then one axis varied at a time around it.
DEFAULT_CASES = (
    HEADLINE,
    MoELoRABenchCase("fc2", 128, 22, 16, "bf16", "sample"),
    MoELoRABenchCase("attn_out", 128, 22, 16, "bf16", "sample"),
    MoELoRABenchCase("fc1", 128, 22, 8, "bf16", "sample"),
    MoELoRABenchCase("fc1", 128, 22, 64, "bf16", "sample"),
    MoELoRABenchCase("fc1", 128, 32, 16, "bf16", "token"),
    MoELoRABenchCase("fc1", 64, 22, 16, "bf16", "sample"),
    MoELoRABenchCase("fc1", 256, 22, 16, "bf16", "sample"),
    MoELoRABenchCase("fc1", 128, 22, 16, "fp32", "sample"),
)


def selected_cases() -> tuple[MoELoRABenchCase, ...]:
    """IGSP_BENCH_CASES: "default" (curated), "all" (the full product), "headline", or comma-separated names."""
    sel = os.environ.get("IGSP_BENCH_CASES", "default").strip()
    if sel == "default":
        return DEFAULT_CASES
    if sel == "all":
        return ALL_CASES
    if sel == "headline":
        return (HEADLINE,)
    names = {s.strip() for s in sel.split(",")}
    chosen = tuple(c for c in ALL_CASES if c.name in names)
    if not chosen:
        raise ValueError(f"IGSP_BENCH_CASES={sel!r} names no case; e.g. {HEADLINE.name}")
    return chosen


def selected(env: str, default: tuple[str, ...], universe: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated environment selection (providers, modes) restricted to `universe`."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    chosen = tuple(p.strip() for p in raw.split(",") if p.strip())
    bad = [p for p in chosen if p not in universe]
    if bad:
        raise ValueError(f"{env} names unknown entries {bad}; known: {list(universe)}")
    return chosen


# --------------------------------------------------------------------------------------------- counts
def moe_lora_flops(case: MoELoRABenchCase, mode: str, provider: str = "fused") -> float:
    """Useful FLOPs (the routed computation, whatever a provider actually executes).

    forward: base 2 T d_in d_out + LoRA 2 T k r (d_in + d_out); backward: base dgrad 2 T d_in d_out (W0 frozen)
    + LoRA dx, t = dy B^T, dA, dB = 4 T k r (d_in + d_out). The base provider counts the base terms only.
    """
    T, k, r, di, do = case.T, case.k, case.r, case.d_in, case.d_out
    base = 2.0 * T * di * do
    lora_f = 0.0 if provider == "base" else 2.0 * T * k * r * (di + do)
    lora_b = 0.0 if provider == "base" else 4.0 * T * k * r * (di + do)
    return {"fwd": base + lora_f, "bwd": base + lora_b, "fwd+bwd": 2 * base + lora_f + lora_b}[mode]


def moe_lora_bytes(case: MoELoRABenchCase, mode: str, provider: str = "fused") -> float:
    """Compulsory DRAM traffic: every operand read once, every result written once.

    forward: x, W0, b0, A, B, routing (idx int32 + w fp32) in, y out; backward: dy, W0, A, B, x, routing in,
    dx, dA, dB, dw out (the base provider: dy, W0 in, dx out).
    """
    s = torch.tensor([], dtype=case.torch_dtype).element_size()
    T, k, r, di, do, E = case.T, case.k, case.r, case.d_in, case.d_out, case.E
    weights = di * do * s + do * s
    experts = 0 if provider == "base" else E * r * (di + do) * s
    routing = 0 if provider == "base" else T * k * 8
    fwd = T * di * s + weights + experts + routing + T * do * s
    bwd = T * do * s + weights + experts + routing + T * di * s
    if provider != "base":
        bwd += T * di * s + experts + T * k * 4  # x re-read for dA; dA, dB and dw written
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def roofline_seconds(case: MoELoRABenchCase, mode: str, provider: str = "fused") -> float:
    """Lower bound on the time: the larger of the compute time at peak FLOP/s and the traffic time at peak B/s."""
    return max(moe_lora_flops(case, mode, provider) / (PEAK_TFLOPS[case.dtype] * 1e12),
               moe_lora_bytes(case, mode, provider) / (PEAK_TBPS * 1e12))


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class Problem:
    x: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    W0: torch.Tensor
    b0: torch.Tensor
    dy: torch.Tensor
    scale: float = 0.5
    tokens_per_sample: int | None = None  # per-sample routing: idx / w are (images, k)


def make_problem(case: MoELoRABenchCase, device: str = "cuda", seed: int = 0) -> Problem:
    """Activations and weights in the case dtype; routing per sample ((images, k) rows with tokens_per_sample = 197,
    the layout MoELoRALinear passes) or per token."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    T, E, k, r, di, do = case.T, case.E, case.k, case.r, case.d_in, case.d_out

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt)

    x = randn(T, di).requires_grad_()
    A = randn(E, di, r, std=1 / math.sqrt(di)).requires_grad_()
    B = randn(E, r, do, std=1 / math.sqrt(r)).requires_grad_()
    rows = case.images if case.routing == "sample" else T
    logits = torch.randn(rows, E, generator=g, device=device)
    top, idx = torch.softmax(logits, -1).topk(k, -1)
    w = top / top.sum(-1, keepdim=True)
    L = TOKENS_PER_IMAGE if case.routing == "sample" else None
    W0 = randn(do, di, std=1 / math.sqrt(di))
    b0 = randn(do)
    dy = randn(T, do)
    return Problem(x, A, B, idx.to(torch.int32), w.contiguous().requires_grad_(), W0, b0, dy, tokens_per_sample=L)


@cache
def _compiled_ref() -> Callable:
    return torch.compile(moe_lora_ref)


def provider_fn(provider: str, p: Problem) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """(forward callable, the tensors whose gradients its backward computes)."""
    import torch.nn.functional as F

    import igsp_kernels

    kw = {"base_weight": p.W0, "base_bias": p.b0, "scale": p.scale}
    if provider == "base":
        return (lambda: F.linear(p.x, p.W0, p.b0)), [p.x]
    if provider == "fused":
        return (lambda: igsp_kernels.moe_lora(p.x, p.A, p.B, p.idx, p.w, backend="triton",
                                              tokens_per_sample=p.tokens_per_sample, **kw)), [p.x, p.A, p.B, p.w]
    kw["tokens_per_sample"] = p.tokens_per_sample or 1
    ref = {"eager": moe_lora_loop, "dense": moe_lora_dense, "smart-dense": moe_lora_smart_dense,
           "compiled": _compiled_ref()}[provider]
    return (lambda: ref(p.x, p.A, p.B, p.idx, p.w, **kw)), [p.x, p.A, p.B, p.w]


def make_runner(provider: str, p: Problem, mode: str) -> Callable[[], object]:
    """A no-argument callable running `mode` of `provider` (backward replays one retained graph)."""
    fwd, leaves = provider_fn(provider, p)
    if mode == "fwd":
        return fwd  # with autograd recording, as in training (the graph and saved tensors are part of the cost)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fwd(), leaves, p.dy)
    y = fwd()
    return lambda: torch.autograd.grad(y, leaves, p.dy, retain_graph=True)


# --------------------------------------------------------------------------------------------- measuring
def measure(run: Callable[[], object]) -> dict:
    """do_bench (CUDA events) median / p20 / p80 in ms, and the peak memory of one call above the resident set."""
    import triton.testing

    run()  # warm-up: compile, autotune
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(run, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - resident
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_mem_mb": peak / 2**20}


@cache
def provenance() -> dict:
    """GPU name, driver, clocks and power (nvidia-ml-py), torch / triton versions and the git SHA."""
    info: dict = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, gpu_mem_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        info.update(
            driver=_s(pynvml.nvmlSystemGetDriverVersion()),
            sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            power_limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
        )
    except Exception as exc:  # no NVML (CPU machine, container without the driver library): say so
        info["nvml_error"] = f"{type(exc).__name__}: {exc}"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                         timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_sha"] = None
    return info


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)

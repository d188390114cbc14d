"""Cases, providers, FLOP counts and the peak-memory probe of the CPU MoE-LoRA benchmarks (benchmarks/cpu/).

Shapes: the two MLP linears of a CLIP ViT-B/16 block (fc1 768 -> 3072, fc2 3072 -> 768) on 8 images x 197 tokens =
1576 rows, E = 22 experts, top-2, per-sample routing (each image's 197 tokens share its experts, the MoE-Adapters
mode, expanded with `expand_sample_routing`), fp32, rank 8 / 16 / 64, forward only (inference, no_grad) and
forward + backward (training; the frozen base contributes dx only).

Providers:
- base: the frozen linear alone (F.linear, the floor every provider pays);
- loop: `moe_lora_loop`, the eager per-expert loop of MoE-Adapters / PEFT;
- reference: `moe_lora_ref`, the dense-gate oracle and CPU fallback;
- compiled: `torch.compile(moe_lora_ref)` (inductor, CPU C++ codegen);
- cpp: the C++ extension (`igsp_kernels._cpp.moe_lora_cpp`, the function dispatch calls; called directly so the
  timings compare kernels, not the validation in `igsp_kernels.moe_lora`, which costs ~0.1 ms here).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from igsp_kernels.reference import expand_sample_routing, moe_lora_loop, moe_lora_ref

HERE = Path(__file__).resolve().parent
IMAGES = 8
TOKENS_PER_IMAGE = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token
LAYERS = {"fc1": (768, 3072), "fc2": (3072, 768)}
RANKS = (8, 16, 64)
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("base", "loop", "reference", "compiled", "cpp")
E, K = 22, 2


@dataclass(frozen=True)
class CpuCase:
    """One benchmark problem: a ViT-B/16 MLP linear at rank r, forward or forward + backward."""

    layer: str
    r: int
    mode: str

    @property
    def d_in(self) -> int:
        return LAYERS[self.layer][0]

    @property
    def d_out(self) -> int:
        return LAYERS[self.layer][1]

    @property
    def T(self) -> int:
        return IMAGES * TOKENS_PER_IMAGE

    @property
    def name(self) -> str:
        return f"{self.layer}-r{self.r}-{self.mode}"

    def as_dict(self) -> dict:
        return {**asdict(self), "d_in": self.d_in, "d_out": self.d_out, "T": self.T, "E": E, "k": K,
                "images": IMAGES, "dtype": "fp32", "routing": "sample", "case": self.name}


CASES = tuple(CpuCase(layer, r, mode) for layer, r, mode in itertools.product(LAYERS, RANKS, MODES))


def flops(case: CpuCase, provider: str) -> float:
    """Useful FLOPs of one call (the same count for every LoRA provider, so GFLOP/s compare like with like).

    Forward: base 2 T d_in d_out, LoRA 2 T k r (d_in + d_out). Backward: base dx 2 T d_in d_out; LoRA dx and dA
    2 T k r d_in each, dy B^T and dB 2 T k r d_out each (x A is saved by the forward, not recomputed).
    """
    T, d_in, d_out, r = case.T, case.d_in, case.d_out, case.r
    base = 2.0 * T * d_in * d_out
    lora = 2.0 * T * K * r * (d_in + d_out)
    total = base + (0.0 if provider == "base" else lora)
    if case.mode == "fwd+bwd":
        total += base + (0.0 if provider == "base" else 2.0 * T * K * r * (2 * d_in + 2 * d_out))
    return total


@dataclass
class Inputs:
    x: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    W0: torch.Tensor
    b0: torch.Tensor
    dy: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        return [self.x, self.A, self.B, self.w]


def make_inputs(case: CpuCase, seed: int = 0) -> Inputs:
    """Unit-scale fp32 inputs; routing drawn per image (softmax top-2 of random logits) and expanded to rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.T, case.d_in, generator=g)
    A = torch.randn(E, case.d_in, case.r, generator=g).div_(case.d_in ** 0.5)
    B = torch.randn(E, case.r, case.d_out, generator=g).div_(case.r ** 0.5)
    W0 = torch.randn(case.d_out, case.d_in, generator=g).div_(case.d_in ** 0.5)
    b0 = torch.randn(case.d_out, generator=g)
    probs = torch.softmax(torch.randn(IMAGES, E, generator=g), dim=-1)
    w, idx = probs.topk(K, dim=-1)
    idx, w = expand_sample_routing(idx.to(torch.int32), w / w.sum(-1, keepdim=True), TOKENS_PER_IMAGE)
    dy = torch.randn(case.T, case.d_out, generator=g)
    grad = case.mode == "fwd+bwd"
    return Inputs(x.requires_grad_(grad), A.requires_grad_(grad), B.requires_grad_(grad), idx.contiguous(),
                  w.contiguous().requires_grad_(grad), W0, b0, dy)


def _cpp_fn(x, A, B, idx, w, *, base_weight, base_bias):
    from igsp_kernels import _cpp

    return _cpp.moe_lora_cpp(x, A, B, idx, w, base_weight, base_bias, 1.0, "identity", None, None)


def provider_fn(provider: str) -> Callable[..., torch.Tensor]:
    """f(x, A, B, idx, w, *, base_weight, base_bias) -> y for a provider (compiled: a fresh torch.compile)."""
    if provider == "base":
        return lambda x, A, B, idx, w, *, base_weight, base_bias: F.linear(x, base_weight, base_bias)
    if provider == "loop":
        return moe_lora_loop
    if provider == "reference":
        return moe_lora_ref
    if provider == "compiled":
        return torch.compile(moe_lora_ref, dynamic=False)
    if provider == "cpp":
        return _cpp_fn
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


def make_call(case: CpuCase, provider: str, inp: Inputs) -> Callable[[], None]:
    """One timed call: forward under no_grad, or forward + backward with the leaves' grads reset first."""
    fn = provider_fn(provider)
    kw = {"base_weight": inp.W0, "base_bias": inp.b0}
    if case.mode == "fwd":
        def call() -> None:
            with torch.no_grad():
                fn(inp.x, inp.A, inp.B, inp.idx, inp.w, **kw)
        return call

    leaves = inp.leaves()

    def reset() -> None:
        for t in leaves:
            t.grad = None

    def call_bwd() -> None:
        reset()  # gradients are written, not accumulated: every provider pays the same allocation
        fn(inp.x, inp.A, inp.B, inp.idx, inp.w, **kw).backward(inp.dy)

    call_bwd.reset = reset  # type: ignore[attr-defined]  (lets the memory probe start from no gradients)
    return call_bwd


def cpu_info() -> dict:
    """What the CPU numbers depend on: cores, threads, BLAS, ISA, load while measuring."""
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


# ------------------------------------------------------------------------------------------- peak memory
# tracemalloc cannot see torch's C++ allocations and torch.cuda's peak counters do not exist for CPU tensors, so
# the peak is the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs = 5) above the
# resident set before the call, in a separate process: there glibc is told (mallopt M_MMAP_THRESHOLD = 64 KiB,
# which also turns off its adaptive threshold) to map every tensor-sized block and unmap it on free, so freed
# tensors leave the resident set at once and one provider's freed memory cannot hide the next one's peak. That
# setting would slow the timed process (fresh pages fault in on every call), hence the separate process. It counts
# everything the call makes resident: outputs, saved activations, gradients, temporaries, BLAS workspace.
_M_MMAP_THRESHOLD = -3


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_bytes(call: Callable[[], None]) -> int:
    """Peak resident bytes that one `call()` adds (after a warm-up call); Linux only."""
    import gc

    call()
    reset = getattr(call, "reset", None)
    if reset is not None:
        reset()  # the warm-up's gradients would otherwise be freed inside the measured call
    gc.collect()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")  # reset VmHWM to the current resident set (Linux >= 4.0)
    call()
    return max(0, _status_kb("VmHWM") - before) * 1024


def measure_case_memory_subprocess(case: CpuCase, providers: tuple[str, ...]) -> dict:
    """{provider: peak bytes or an error string}, measured in a fresh Python process (see above)."""
    cmd = [sys.executable, str(HERE / "_cpu_bench_common.py"), case.layer, str(case.r), case.mode, *providers]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        return {p: f"memory probe failed: {proc.stderr.strip()[-300:]}" for p in providers}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_main(argv: list[str]) -> None:
    layer, r, mode, *providers = argv
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, 65536)  # as MALLOC_MMAP_THRESHOLD_ in the environment; both, to be sure
    case = CpuCase(layer, int(r), mode)
    out: dict = {}
    for provider in providers:
        if provider == "cpp":
            from igsp_kernels import _cpp

            if not _cpp.is_available():
                out[provider] = f"C++ extension unavailable: {_cpp.load_error()}"
                continue
        try:
            out[provider] = peak_memory_bytes(make_call(case, provider, make_inputs(case)))
        except Exception as exc:  # report, do not lose the other providers' numbers
            out[provider] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))


if __name__ == "__main__":
    _memory_main(sys.argv[1:])

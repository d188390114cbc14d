"""The GPU ceilings that the kernels' launch policy and the performance model (benchmarks/perf_model.py) share.

Numbers from shared/KERNELS.md (measured once on an H200: ~790 TFLOP/s dense bf16, ~4.3 TB/s copy bandwidth);
fp32 without TF32 and fp64 are the H100/H200 SXM data-sheet values (67 TFLOP/s each), TF32 half the bf16 rate.
The first GPU run of benchmarks/gpu_suite.sh prints measured beside predicted per kernel and calibrates them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GPU", "H200", "peak_flops"]


@dataclass(frozen=True)
class GPU:
    """A GPU's ceilings: streaming multiprocessors, DRAM bandwidth (B/s), dense MMA peaks (FLOP/s) per operand
    type, and a per-launch floor (s) for tiny kernels (launch + drain; taken from the CUDA launch latency)."""

    name: str
    sms: int
    bandwidth: float
    peaks: dict[str, float] = field(default_factory=dict)
    launch_floor: float = 2.0e-6


H200 = GPU(
    name="NVIDIA H200 (KERNELS.md ceilings)",
    sms=132,
    bandwidth=4.3e12,
    peaks={"bf16": 790e12, "fp16": 790e12, "tf32": 395e12, "fp32": 67e12, "fp64": 67e12},
)


def peak_flops(gpu: GPU, dtype: torch.dtype, tf32: bool = False) -> float:
    """The MMA peak for operands of `dtype` (fp32 at the TF32 rate when TF32 is allowed)."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(dtype)
    if name is None:
        name = "tf32" if tf32 else "fp32"
    return gpu.peaks[name]

"""Compiling the Triton kernels for Hopper (sm_90) without a GPU, and reading their registers with ptxas.

Shared by tests/kernels/test_triton_compile.py (every config a launch can select must compile and fit shared
memory) and tests/kernels/test_triton_registers.py (no default config may spill; CTAs per SM).

The real launchers run on CPU tensors with the kernel launch intercepted (`capture`): each interception records
the kernel and its exact arguments under the GPU tiling policy of an H100/H200 (132 SMs), and `compile_for_hopper`
compiles a recorded launch with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, the arguments
specialised exactly as `JITFunction.run` would (pointer alignment, integer divisibility). `ptxas_report` runs the
ptxas bundled with Triton (`-arch=sm_90a -v`) on the kernel's PTX.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from igsp_kernels.ops import _utils, moe_lora_sample, routing, subspace
from igsp_kernels.ops import moe_lora as ml

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
SMEM_LIMIT = _utils.SMEM_LIMIT_BYTES
# Hopper SM limits (H100/H200): 64K 32-bit registers, 228 KB shared memory (1 KB reserved per CTA), 2048 threads,
# 32 CTAs; registers are allocated per warp in units of 256.
REGS_PER_SM = 65536
SMEM_PER_SM = 233472
SMEM_RESERVED_PER_CTA = 1024
THREADS_PER_SM = 2048
CTAS_PER_SM = 32


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def capture(monkeypatch, body) -> list[tuple[_utils.KernelLauncher, dict]]:
    """Run `body` with every kernel launch recorded instead of run, under the Hopper tiling policy."""
    launches: list[tuple[_utils.KernelLauncher, dict]] = []

    def record(self, grid, **kwargs):
        launches.append((self, kwargs))

    monkeypatch.setattr(_utils.KernelLauncher, "__call__", record)
    monkeypatch.setattr(ml, "_check_launchable", lambda *a: None)
    monkeypatch.setattr(moe_lora_sample, "_check_launchable", lambda *a: None)
    monkeypatch.setattr(moe_lora_sample, "num_sms", lambda dev: H100_SMS)
    monkeypatch.setattr(routing, "_check_device", lambda *a: None)
    monkeypatch.setattr(subspace, "_check_device", lambda *a: None)
    monkeypatch.setattr(ml, "sort_block_size", lambda n, r, dev: ml.gpu_sort_block(n, r, H100_SMS))
    body()
    return launches


def compile_for_hopper(launcher: _utils.KernelLauncher, kwargs: dict, cfg) -> object:
    """Compile one launch exactly as `JITFunction.run` would specialise it, for sm_90."""
    fn = launcher.fn
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    call = {**kwargs, **cfg.kwargs}
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    bound_args, specialization, opts = binder(**call, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, {**call, **options}, bound_args, specialization,
                                                        opts)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=opts.__dict__)


def job_key(launcher: _utils.KernelLauncher, kwargs: dict, cfg) -> tuple:
    """What changes the compiled code: the kernel, tensor dtypes, constexprs and the config."""
    sig = tuple(sorted((k, str(v.dtype) if isinstance(v, torch.Tensor) else repr(v))
                       for k, v in kwargs.items() if not isinstance(v, int) or k.isupper()))
    return launcher.name, sig, repr(cfg)


def unique_jobs(launches, full: bool):
    """(launcher, kwargs, config) to compile, deduplicated on what changes the compiled code; `full`: every
    candidate config a launch may run, else only the default (the first surviving the pruner)."""
    seen, jobs = set(), []
    for launcher, kwargs in launches:
        configs = launcher.candidates(kwargs) if full else [launcher.candidates(kwargs)[0]]
        for cfg in configs:
            key = job_key(launcher, kwargs, cfg)
            if key not in seen:
                seen.add(key)
                jobs.append((launcher, kwargs, cfg))
    return jobs


@dataclass(frozen=True)
class Registers:
    """ptxas -v of one compiled kernel, with the occupancy it implies."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    threads: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def ctas_per_sm(self) -> int:
        warps = self.threads // 32
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = REGS_PER_SM // (regs_per_warp * warps)
        by_smem = SMEM_PER_SM // (self.shared + SMEM_RESERVED_PER_CTA)
        return max(0, min(by_regs, by_smem, THREADS_PER_SM // self.threads, CTAS_PER_SM))

    @property
    def limit(self) -> str:
        """What caps the CTAs per SM: registers or shared memory."""
        warps = self.threads // 32
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = REGS_PER_SM // (regs_per_warp * warps)
        by_smem = SMEM_PER_SM // (self.shared + SMEM_RESERVED_PER_CTA)
        return "registers" if by_regs <= by_smem else "shared memory"


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(compiled) -> Registers:
    """Registers and spills of a compiled kernel from `ptxas -arch=sm_90a -v` on its PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas_path(), "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(f"ptxas failed: {out.stderr[-2000:]}")
    used, spill = _USED.search(out.stderr), _SPILL.search(out.stderr)
    if used is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output: {out.stderr[-2000:]}")
    return Registers(int(used.group(1)), int(spill.group(2)), int(spill.group(3)), int(spill.group(1)),
                     compiled.metadata.shared, compiled.metadata.num_warps * 32)


def skip_unless_compilable() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("compiling needs real JIT functions; run without TRITON_INTERPRET", allow_module_level=True)

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

import functools
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
from igsp_kernels.testing import MoELoRACase, SubspaceCase, make_moe_lora_inputs, make_subspace_inputs

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
    monkeypatch.setattr(ml, "check_moe_lora_launchable", lambda *a: None)
    monkeypatch.setattr(moe_lora_sample, "check_moe_lora_launchable", lambda *a: None)
    monkeypatch.setattr(moe_lora_sample, "num_sms", lambda dev: H100_SMS)
    monkeypatch.setattr(routing, "_check_device", lambda *a: None)
    monkeypatch.setattr(subspace, "_check_device", lambda *a: None)
    monkeypatch.setattr(ml, "sort_block_size", lambda n, r, dev: ml.gpu_sort_block(n, r, H100_SMS))
    body()
    return launches


_COMPILED: dict[tuple, object] = {}


def compile_for_hopper(launcher: _utils.KernelLauncher, kwargs: dict, cfg) -> object:
    """Compile one launch exactly as `JITFunction.run` would specialise it, for sm_90 (memoised per process: the
    compile and register tests share the default configs)."""
    key = job_key(launcher, kwargs, cfg)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(launcher, kwargs, cfg)
    return _COMPILED[key]


def _compile(launcher: _utils.KernelLauncher, kwargs: dict, cfg) -> object:
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

    def _ctas_by(self) -> tuple[int, int]:
        """CTAs per SM allowed by registers (allocated per warp in units of 256) and by shared memory."""
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        return (REGS_PER_SM // (regs_per_warp * (self.threads // 32)),
                SMEM_PER_SM // (self.shared + SMEM_RESERVED_PER_CTA))

    @property
    def ctas_per_sm(self) -> int:
        by_regs, by_smem = self._ctas_by()
        return max(0, min(by_regs, by_smem, THREADS_PER_SM // self.threads, CTAS_PER_SM))

    @property
    def limit(self) -> str:
        """What caps the CTAs per SM: registers or shared memory."""
        by_regs, by_smem = self._ctas_by()
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


# --------------------------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    """One forward+backward of the fused op on shapes the benchmarks and the trainer use; `full` compiles every
    autotune candidate in the compile test, otherwise only the default (the first surviving the pruner)."""

    name: str
    case: MoELoRACase
    dtype: torch.dtype
    param_dtype: torch.dtype | None = None
    base: bool = True
    expert_bias: bool = False
    activation: str = "identity"
    full: bool = False
    per_sample: bool = False


_FC1, _FC2 = (768, 3072), (3072, 768)


def _sample(name, T, dims, r, dtype, param_dtype=None, **kw) -> Scenario:
    case = MoELoRACase(name, T, *dims, r, 22, 2, routing="sample", tokens_per_sample=197)
    return Scenario(name, case, dtype, param_dtype, per_sample=True, **kw)


SCENARIOS = [
    # the trainer's layout (bf16 activations under autocast, fp32 master A / B, the frozen weight's bf16 copy), per
    # sample: the headline fc1 / fc2 at 256 images, r = 16 (both backward plans; fc1 with every candidate config)
    _sample("ps_fc1_b256_r16", 50432, _FC1, 16, torch.bfloat16, torch.float32, full=True),
    _sample("ps_fc2_b256_r16", 50432, _FC2, 16, torch.bfloat16, torch.float32),
    # r = 64 (64-row tiles, 256-column slot axis), 64 images (64-row tiles, 2 CTAs/SM), the MoE-Adapters form
    _sample("ps_fc1_b256_r64", 50432, _FC1, 64, torch.bfloat16, torch.float32),
    _sample("ps_fc2_b64_r64_adapter", 12608, _FC2, 64, torch.bfloat16, torch.float32, base=False, expert_bias=True,
            activation="relu"),
    _sample("ps_fc1_b64_r8", 12608, _FC1, 8, torch.bfloat16, torch.float32),
    _sample("ps_fc2_fp32", 12608, _FC2, 16, torch.float32, expert_bias=True),
    Scenario("ps_small_fp64", MoELoRACase("small", 196, 96, 80, 4, 6, 2, routing="sample", tokens_per_sample=49),
             torch.float64, expert_bias=True, activation="relu", per_sample=True),
    # the general (per-token) path: fc1 at 128 images, bf16 activations with fp32 weights (the compile test's
    # autocast case), BLOCK_S = 256 and fused weight gradients, every candidate
    Scenario("tok_fc1_bf16_r16", MoELoRACase("fc1", 25216, 768, 3072, 16, 22, 2), torch.bfloat16, torch.float32,
             full=True),
    # fc2 at 64 images, r = 64, MoE-Adapters form -> BLOCK_S = 64, split weight gradients, every candidate
    Scenario("tok_fc2_bf16_r64_adapter", MoELoRACase("fc2", 12608, 3072, 768, 64, 32, 2), torch.bfloat16,
             base=False, expert_bias=True, activation="relu", full=True),
    # fp32 and fp16 (attn out-proj, 64 images), default configs; a small problem (BLOCK_S = 16) and fp64
    Scenario("tok_attn_fp32_r8", MoELoRACase("attn", 12608, 768, 768, 8, 22, 2), torch.float32, expert_bias=True),
    Scenario("tok_attn_fp16_fp32params", MoELoRACase("attn", 12608, 768, 768, 16, 22, 2), torch.float16,
             param_dtype=torch.float32),
    Scenario("tok_small_fp32", MoELoRACase("small", 197, 96, 80, 4, 6, 1), torch.float32),
    Scenario("tok_small_fp64", MoELoRACase("small", 197, 96, 80, 4, 6, 2), torch.float64, expert_bias=True,
             activation="relu"),
]


@functools.cache
def scenario_launches(sc: Scenario) -> list:
    """The launches of one forward+backward of `sc` (cached per process: building batch-256 inputs takes
    seconds). Per-sample scenarios run both backward plans."""
    inp = make_moe_lora_inputs(sc.case, dtype=sc.dtype, param_dtype=sc.param_dtype, base=sc.base,
                               expert_bias=sc.expert_bias, activation=sc.activation, per_sample=sc.per_sample)
    L = sc.case.tokens_per_sample if sc.per_sample else 1

    def body():
        y = ml.moe_lora_triton(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, inp.base_weight, inp.base_bias, 0.5,
                               sc.activation, inp.bias_a, inp.bias_b, L)
        torch.autograd.grad(y, inp.leaves(), torch.zeros_like(y))

    launches = []
    plans = ("t_in_dgrad", "rank_first") if sc.per_sample else (None,)
    for plan in plans:
        with pytest.MonkeyPatch.context() as mp:
            if plan:
                mp.setitem(moe_lora_sample.TUNING_OVERRIDES, "plan", plan)
            launches += capture(mp, body)
    return launches


def routing_launches(monkeypatch):
    def body():
        for E, k in ((22, 2), (64, 4)):  # the ViT pool, and a large candidate pool with a wider k
            z = torch.randn(256, E, requires_grad=True)
            _, w, p = routing.route_topk_triton(z, k, torch.ones(E, dtype=torch.bool), 0.0, None)
            torch.autograd.grad((w.sum() + p.sum()), z)

    return capture(monkeypatch, body)


def subspace_launches(monkeypatch, dtype):
    def body():
        # ViT-B/16 sizes: A_c (8, 768, 16) with a 120-column basis, B_c^T (8, 3072, 16) with 300 columns
        cases = [SubspaceCase("A", 8, 768, 16, 120), SubspaceCase("Bt", 8, 3072, 16, 300, transposed=True)]
        mats, bases, _ = make_subspace_inputs(cases, dtype=dtype)
        subspace.subspace_penalty_forward(mats, bases)
        subspace.project_grad_forward([M.detach() for M in mats], bases)

    return capture(monkeypatch, body)

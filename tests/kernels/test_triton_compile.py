"""Every kernel config that a GPU launch can select compiles for Hopper (sm_90), with no GPU present.

The real launchers run on CPU tensors with the kernel launch intercepted: each interception records the kernel
and its exact arguments (the ViT-B/16 shapes of the benchmarks, every dtype and feature flag), the GPU tiling
policy of an H100/H200 (132 SMs) is applied, and each config the launch may run (the autotuner's pruned list, or
the single pinned one) is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, the
arguments specialised exactly as `JITFunction.run` would (pointer alignment, integer divisibility). A compiled
kernel must fit Hopper's 227 KiB of shared memory.

Runs in the normal (not interpreted) test process: with TRITON_INTERPRET set the kernels are interpreter objects.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("compiling needs real JIT functions; run without TRITON_INTERPRET", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import igsp_kernels.ops  # noqa: E402,F401
from igsp_kernels.ops import _utils, routing, subspace  # noqa: E402
from igsp_kernels.ops import moe_lora as ml  # noqa: E402
from igsp_kernels.testing import (  # noqa: E402
    MoELoRACase,
    SubspaceCase,
    make_moe_lora_inputs,
    make_subspace_inputs,
)

TARGET = GPUTarget("cuda", 90, 32)
H100_SMS = 132
SMEM_LIMIT = _utils.SMEM_LIMIT_BYTES


@dataclass(frozen=True)
class Scenario:
    """One forward+backward of the fused op on shapes the benchmarks and the trainer use; `full` compiles every
    autotune candidate, otherwise only the pinned (first surviving) config."""

    name: str
    case: MoELoRACase
    dtype: torch.dtype
    param_dtype: torch.dtype | None = None
    base: bool = True
    expert_bias: bool = False
    activation: str = "identity"
    full: bool = False


SCENARIOS = [
    # the headline case: ViT-B/16 fc1 at batch 128, r = 16, E = 22, bf16 -> BLOCK_S = 256, fused weight grads
    Scenario("fc1_bf16_r16", MoELoRACase("fc1", 25216, 768, 3072, 16, 22, 2), torch.bfloat16, full=True),
    # fc2 at batch 64, r = 64, E = 32, MoE-Adapters form (ReLU, biases, no base) -> BLOCK_S = 64, split weight grads
    Scenario("fc2_bf16_r64_adapter", MoELoRACase("fc2", 12608, 3072, 768, 64, 32, 2), torch.bfloat16, base=False,
             expert_bias=True, activation="relu", full=True),
    # fp32 and fp16 (attn out-proj, batch 64), pinned configs; fp16 activations with fp32 params (autocast)
    Scenario("attn_fp32_r8", MoELoRACase("attn", 12608, 768, 768, 8, 22, 2), torch.float32, expert_bias=True),
    Scenario("attn_fp16_fp32params", MoELoRACase("attn", 12608, 768, 768, 16, 22, 2), torch.float16,
             param_dtype=torch.float32),
    # a small problem (BLOCK_S = 16) and fp64 (gradcheck precision)
    Scenario("small_fp32", MoELoRACase("small", 197, 96, 80, 4, 6, 1), torch.float32),
    Scenario("small_fp64", MoELoRACase("small", 197, 96, 80, 4, 6, 2), torch.float64, expert_bias=True,
             activation="relu"),
]


def capture(monkeypatch, body) -> list[tuple[_utils.KernelLauncher, dict]]:
    """Run `body` with every kernel launch recorded instead of run, under the Hopper tiling policy."""
    launches: list[tuple[_utils.KernelLauncher, dict]] = []

    def record(self, grid, **kwargs):
        launches.append((self, kwargs))

    monkeypatch.setattr(_utils.KernelLauncher, "__call__", record)
    monkeypatch.setattr(ml, "_check_launchable", lambda *a: None)
    monkeypatch.setattr(routing, "_check_device", lambda *a: None)
    monkeypatch.setattr(subspace, "_check_device", lambda *a: None)
    monkeypatch.setattr(ml, "sort_block_size", lambda n, r, dev: ml.gpu_sort_block(n, r, H100_SMS))
    body()
    return launches


@functools.cache
def moe_lora_jobs(sc: Scenario) -> list:
    """The compile jobs of one scenario (cached per process: building batch-128 inputs takes seconds)."""
    inp = make_moe_lora_inputs(sc.case, dtype=sc.dtype, param_dtype=sc.param_dtype, base=sc.base,
                               expert_bias=sc.expert_bias, activation=sc.activation)

    def body():
        y = ml.moe_lora_triton(inp.x, inp.A, inp.B, inp.topk_idx, inp.topk_w, inp.base_weight, inp.base_bias, 0.5,
                               sc.activation, inp.bias_a, inp.bias_b)
        torch.autograd.grad(y, inp.leaves(), torch.zeros_like(y))

    with pytest.MonkeyPatch.context() as mp:
        launches = capture(mp, body)
    names = {launcher.name for launcher, _ in launches}
    assert {"_moe_lora_shrink_kernel", "_moe_lora_fwd_kernel", "_moe_lora_bwd_rank_kernel",
            "_moe_lora_reduce_kernel", "_moe_lora_bwd_dx_kernel"} <= names
    return unique_jobs(launches, sc.full)


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


def unique_jobs(launches, full: bool):
    """(launcher, kwargs, config) to compile, deduplicated on what changes the compiled code."""
    seen, jobs = set(), []
    for launcher, kwargs in launches:
        configs = launcher.candidates(kwargs) if full else [launcher.candidates(kwargs)[0]]
        for cfg in configs:
            sig = tuple(sorted((k, str(v.dtype) if isinstance(v, torch.Tensor) else repr(v))
                               for k, v in kwargs.items() if not isinstance(v, int) or k.isupper()))
            key = (launcher.name, sig, repr(cfg))
            if key not in seen:
                seen.add(key)
                jobs.append((launcher, kwargs, cfg))
    return jobs


def check_jobs(jobs, allow_empty: bool = False) -> None:
    assert jobs or allow_empty, "no kernel launch was captured"
    for launcher, kwargs, cfg in jobs:
        compiled = compile_for_hopper(launcher, kwargs, cfg)
        shared = compiled.metadata.shared
        assert shared <= SMEM_LIMIT, f"{launcher.name} {cfg} needs {shared} B of shared memory > {SMEM_LIMIT}"


SHARDS = 3  # each scenario's jobs are split in shards so that pytest-xdist spreads the compiles over the workers


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s.name)
def test_moe_lora_configs_compile_for_hopper(sc, shard):
    jobs = moe_lora_jobs(sc)
    check_jobs(jobs[shard::SHARDS], allow_empty=True)


def test_routing_configs_compile_for_hopper(monkeypatch):
    launches = routing_launches(monkeypatch)
    assert {launcher.name for launcher, _ in launches} == {"_route_topk_fwd_kernel", "_route_topk_bwd_kernel"}
    check_jobs(unique_jobs(launches, full=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_subspace_configs_compile_for_hopper(dtype, monkeypatch):
    launches = subspace_launches(monkeypatch, dtype)
    assert {launcher.name for launcher, _ in launches} == {"_subspace_project_kernel"}
    check_jobs(unique_jobs(launches, full=True))


def test_policy_picks_expected_tiling():
    # The tiling the compile scenarios rely on: batch 128 fc1 at r = 16 uses 256-row blocks and fused weight
    # gradients; r = 64 caps the block at 64 rows (registers) and splits the weight gradients.
    assert ml.gpu_sort_block(25216 * 2, 16, H100_SMS) == 256 and ml.fuse_weight_grads(256, 16)
    assert ml.gpu_sort_block(12608 * 2, 64, H100_SMS) == 64 and not ml.fuse_weight_grads(64, 64)
    assert ml.gpu_sort_block(197, 4, H100_SMS) == 16

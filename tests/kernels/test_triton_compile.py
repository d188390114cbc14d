"""Every kernel config that a GPU launch can select compiles for Hopper (sm_90), with no GPU present.

The real launchers run on CPU tensors with the kernel launch intercepted (`hopper.capture`): each interception
records the kernel and its exact arguments (the ViT-B/16 shapes of the benchmarks and the trainer: bf16 activations
with fp32 master weights, per-sample and per-token routing, every dtype and feature flag), the GPU tiling policy of
an H100/H200 (132 SMs) is applied, and each config the launch may run (the autotuner's pruned list, or the single
pinned one) is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`. A compiled kernel
must fit Hopper's 227 KiB of shared memory. Registers and spills: test_triton_registers.py.

Runs in the normal (not interpreted) test process: with TRITON_INTERPRET set the kernels are interpreter objects.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import hopper  # noqa: E402

hopper.skip_unless_compilable()

import igsp_kernels.ops  # noqa: E402,F401
from igsp_kernels.ops import moe_lora as ml  # noqa: E402
from igsp_kernels.ops import moe_lora_sample as ms  # noqa: E402


def check_jobs(jobs, allow_empty: bool = False) -> None:
    assert jobs or allow_empty, "no kernel launch was captured"
    for launcher, kwargs, cfg in jobs:
        compiled = hopper.compile_for_hopper(launcher, kwargs, cfg)
        shared = compiled.metadata.shared
        assert shared <= hopper.SMEM_LIMIT, f"{launcher.name} {cfg} needs {shared} B of shared memory"


SHARDS = 3  # each scenario's jobs are split in shards so that pytest-xdist spreads the compiles over the workers


@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("sc", hopper.SCENARIOS, ids=lambda s: s.name)
def test_moe_lora_configs_compile_for_hopper(sc, shard):
    launches = hopper.scenario_launches(sc)
    names = {launcher.name for launcher, _ in launches}
    if sc.per_sample:
        assert {"_ps_fwd_kernel", "_ps_bwd_kernel", "_ps_pairs_kernel"} <= names
    else:
        assert {"_moe_lora_shrink_kernel", "_moe_lora_fwd_kernel", "_moe_lora_bwd_rank_kernel",
                "_moe_lora_reduce_kernel", "_moe_lora_bwd_dx_kernel"} <= names
    jobs = hopper.unique_jobs(launches, sc.full)
    check_jobs(jobs[shard::SHARDS], allow_empty=True)


def test_routing_configs_compile_for_hopper(monkeypatch):
    launches = hopper.routing_launches(monkeypatch)
    assert {launcher.name for launcher, _ in launches} == {"_route_topk_fwd_kernel", "_route_topk_bwd_kernel"}
    check_jobs(hopper.unique_jobs(launches, full=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_subspace_configs_compile_for_hopper(dtype, monkeypatch):
    launches = hopper.subspace_launches(monkeypatch, dtype)
    assert {launcher.name for launcher, _ in launches} == {"_subspace_project_kernel"}
    check_jobs(hopper.unique_jobs(launches, full=True))


def test_policy_picks_expected_tiling():
    # The token path's tiling the scenarios rely on: batch 128 fc1 at r = 16 uses 256-row blocks and fused weight
    # gradients; r = 64 caps the block at 64 rows (registers) and splits the weight gradients.
    assert ml.gpu_sort_block(25216 * 2, 16, hopper.H100_SMS) == 256 and ml.fuse_weight_grads(256, 16)
    assert ml.gpu_sort_block(12608 * 2, 64, hopper.H100_SMS) == 64 and not ml.fuse_weight_grads(64, 64)
    assert ml.gpu_sort_block(197, 4, hopper.H100_SMS) == 16
    # The per-sample path: 128-row tiles (4 slots of 16) at 256 images, 64-row tiles where 128 would leave SMs idle
    # (64 images: 99 blocks < 132 SMs) or the slot axis is wide (r = 64: 4 slots of 64 columns).
    assert ms.row_block(197, 2, 16, 50432, hopper.H100_SMS) == 128
    assert ms.row_block(197, 2, 16, 12608, hopper.H100_SMS) == 64
    assert ms.row_block(197, 2, 64, 50432, hopper.H100_SMS) == 64
    # fc1 computes t in its dgrad (dy is the large activation), fc2 runs a rank pass first (x is)
    plan = lambda di, do: ms.backward_plan(50432, di, do, 197, 2, 16, 128, 1, torch.bfloat16, True, True)  # noqa: E731
    assert plan(768, 3072) == "t_in_dgrad" and plan(3072, 768) == "rank_first"

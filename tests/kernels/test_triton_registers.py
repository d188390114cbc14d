"""Register and spill report for Hopper (issue 9 item 5): every default config compiled for sm_90 and read with the
ptxas that ships inside Triton (`-arch=sm_90a -v`). A default config is what a GPU launch runs without autotuning
(IGSP_KERNELS_AUTOTUNE=0) and the autotuner's first candidate: the first config that survives the pruner.

Fails on any spill (a spill in a GEMM kernel means local-memory round trips in its inner loop). Reports CTAs per
SM from registers and shared memory; a default config below 2 CTAs per SM needs a written reason in REASONS (two
resident CTAs hide each other's epilogue and pipeline bubbles, so a kernel that cannot have them says why).
Shares compilations with test_triton_compile.py (hopper.compile_for_hopper is memoised per process, and Triton's
own cache holds the binaries across processes).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import hopper  # noqa: E402

hopper.skip_unless_compilable()

# Why a default config runs one CTA per SM (ptxas numbers from this test, sm_90a).
REASONS = {
    "_ps_fwd_kernel": "128-row tiles at 8 warps: the 128 x 128 fp32 output tile is 64 registers a thread and the "
                      "coefficients 16 more beside a 3-stage operand pipeline (~200-230 registers in use; 2 CTAs "
                      "need <= 128). 64-row tiles (the policy below 132 row blocks, and r = 64) reach 2 CTAs/SM "
                      "where the 4-warp config is chosen.",
    "_ps_bwd_kernel": "the dgrad rows share _ps_fwd_kernel's tiles (same register budget); the weight-gradient "
                      "programs of the same launch are small (48-72 registers) but a launch has one register count.",
    "_moe_lora_fwd_kernel": "128 x 128 tiles at 8 warps with the LoRA epilogue (Triton's Hopper matmul tutorial "
                            "tile): the fp32 accumulator and the epilogue's expert tiles hold ~170-200 registers.",
    "_moe_lora_bwd_dx_kernel": "same tile and epilogue as _moe_lora_fwd_kernel.",
    "_moe_lora_bwd_rank_kernel": "256-row expert blocks hold h, gate phi(h) and t (3 x 256 x 16 fp32) plus the "
                                 "fused weight-gradient tiles in registers.",
    "_moe_lora_shrink_kernel": "256-row expert blocks at 4 warps: the gathered x tile and the fp32 rank accumulator.",
    "_moe_lora_bwd_dw_kernel": "the split-token weight-gradient tile (BLOCK_N x BLOCK_R fp32) and its gathered rows.",
    "_subspace_project_kernel": "the basis chunk (64 x 128) and its projection (128 x 64) in fp32 registers.",
    "_route_topk_fwd_kernel": "one program per 64-row block; registers hold the (rows x E) softmax tile.",
    "_route_topk_bwd_kernel": "as the forward.",
    "_ps_pairs_kernel": "a single program.",
}


def default_jobs():
    jobs, seen = [], set()
    with pytest.MonkeyPatch.context() as mp:
        groups = [hopper.scenario_launches(sc) for sc in hopper.SCENARIOS]
        groups.append(hopper.routing_launches(mp))
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            groups.append(hopper.subspace_launches(mp, dtype))
    for launches in groups:
        for launcher, kwargs, cfg in hopper.unique_jobs(launches, full=False):
            key = hopper.job_key(launcher, kwargs, cfg)
            if key not in seen:
                seen.add(key)
                jobs.append((launcher, kwargs, cfg))
    return jobs


SHARDS = 4
FLAGS = ("T_IN_LOOP", "NEED_DX", "HAS_MAIN", "HAS_SIDE_A", "HAS_SIDE_B", "FUSE", "IN_PLACE")


@pytest.mark.parametrize("shard", range(SHARDS))
def test_default_configs_do_not_spill(shard, capsys):
    jobs = default_jobs()
    assert len(jobs) > 20, "the scenarios must reach every kernel"
    rows, spilled, unexplained = [], [], []
    for launcher, kwargs, cfg in jobs[shard::SHARDS]:
        rep = hopper.ptxas_report(hopper.compile_for_hopper(launcher, kwargs, cfg))
        flags = ",".join(k for k in FLAGS if kwargs.get(k))
        dtype = next((str(v.dtype).replace("torch.", "") for v in kwargs.values() if isinstance(v, torch.Tensor)
                      and v.is_floating_point()), "")
        row = (f"{launcher.name:28} {dtype:9} {flags:38} {cfg.num_warps}w {rep.registers:3} regs "
               f"{rep.spills:5} B spilled {rep.shared:6} B smem {rep.ctas_per_sm} CTA/SM ({rep.limit})")
        rows.append(row)
        if rep.spills:
            spilled.append(row)
        if rep.ctas_per_sm < 2 and launcher.name not in REASONS:
            unexplained.append(row)
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert not spilled, "default configs spill registers:\n" + "\n".join(spilled)
    assert not unexplained, "default configs below 2 CTAs/SM without a written reason:\n" + "\n".join(unexplained)

"""iGSP subspace ops over all 24 adapted layers: the eager per-layer loop against one fused launch.

Layers: the fc1 of 12 vision and 12 text blocks (ViT-B/16 widths, d_in 768, d_out 3072), each with C = 8 rank-16
candidates, so 48 candidate matrices: A_c (8, 768, 16) against U_in (768, 96) and B_c^T (8, 3072, 16) against
U_out (3072, 96). Two ops: the penalty value + gradient (forward and backward), and the in-place phase-2
projection of the gradients. The work is tiny (~4 MB per layer); the eager loop is bound by its ~300 launches.
"""

from __future__ import annotations

import pytest
import torch
from _bench_common import provenance, selected

import igsp_kernels
from igsp_kernels.testing import SubspaceCase, make_subspace_inputs

LAYERS = 24
CANDIDATES = 8
RANK = 16
BASIS = 96
# torch.compile of the 48-matrix loop compiles slowly: opt in with
# IGSP_BENCH_SUBSPACE_PROVIDERS=eager,compiled,fused.
PROVIDERS = selected("IGSP_BENCH_SUBSPACE_PROVIDERS", ("eager", "fused"), ("eager", "compiled", "fused"))


def inputs():
    cases = []
    for _ in range(LAYERS):
        cases.append(SubspaceCase("A", CANDIDATES, 768, RANK, BASIS))
        cases.append(SubspaceCase("Bt", CANDIDATES, 3072, RANK, BASIS, transposed=True))
    return make_subspace_inputs(cases, dtype=torch.float32, device="cuda")


def subspace_bytes() -> float:
    """Compulsory traffic: each matrix read and its gradient written, each basis read (fp32)."""
    per_layer = 2 * CANDIDATES * RANK * (768 + 3072) + BASIS * (768 + 3072)
    return 4.0 * LAYERS * per_layer


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", ["penalty_fwd+bwd", "project_grad"])
def test_subspace(benchmark, op: str, provider: str) -> None:
    from _bench_common import measure

    benchmark.group = f"subspace {op} x{LAYERS} layers"
    mats, bases, leaves = inputs()
    backend = "reference" if provider in ("eager", "compiled") else "triton"
    if op == "penalty_fwd+bwd":
        def fn():
            return torch.autograd.grad(igsp_kernels.subspace_penalty(mats, bases, 0.1, backend=backend), leaves)
    else:
        grads = [M.detach().clone() for M in mats]

        def fn():
            igsp_kernels.project_grad_(grads, bases, backend=backend)

    run = torch.compile(fn) if provider == "compiled" else fn
    stats = measure(run)
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2, iterations=1)
    prov = provenance()
    benchmark.extra_info.update(
        op=f"subspace_{op}", provider=provider, mode=op, case=f"{LAYERS}x(A,B^T) C{CANDIDATES} r{RANK} m{BASIS}",
        layers=LAYERS, **stats, gbps=subspace_bytes() / (stats["median_ms"] / 1e3) / 1e9,
        gpu=prov.get("gpu"), torch=prov.get("torch"), triton=prov.get("triton"), git_sha=prov.get("git_sha"),
    )

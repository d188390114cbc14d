"""Top-k gating: the reference (softmax, topk, renormalise: several launches) against the fused Triton kernel.

Per-token routing of a batch of 128 ViT-B/16 images (25,216 rows) and per-sample routing (128 rows), E = 22 and
32, k = 2, forward and backward of (topk_w, probs).
"""

from __future__ import annotations

import pytest
import torch
from _bench_common import measure, provenance

import igsp_kernels


@pytest.mark.parametrize("provider", ["eager", "fused"])
@pytest.mark.parametrize("E", [22, 32])
@pytest.mark.parametrize("rows", [128, 25216], ids=["per_sample", "per_token"])
def test_route_topk(benchmark, rows: int, E: int, provider: str) -> None:
    benchmark.group = f"route_topk N{rows} E{E}"
    logits = torch.randn(rows, E, device="cuda", requires_grad=True)
    backend = "reference" if provider == "eager" else "triton"

    def run():
        _, w, probs = igsp_kernels.route_topk(logits, 2, backend=backend)
        return torch.autograd.grad((w.sum() + probs.sum()), logits)

    stats = measure(run)
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2, iterations=1)
    prov = provenance()
    benchmark.extra_info.update(op="route_topk", provider=provider, mode="fwd+bwd", case=f"N{rows}-E{E}-k2",
                                rows=rows, E=E, **stats, gpu=prov.get("gpu"), torch=prov.get("torch"),
                                triton=prov.get("triton"), git_sha=prov.get("git_sha"))

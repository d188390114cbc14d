"""torch.compile of injected models against eager on the CPU, on the models of tests/embedding (issue 13 item 2).

Models: the injected two-layer MLP (16 -> 32 -> 16, fc1 and fc2 wrapped, 4 experts, rank 4, top-2; input 8 x 32
tokens) and timm's ViT-tiny at 32 px (2 blocks, qkv/proj/fc1/fc2 wrapped: 8 layers; batch 8), the shapes of the
compile tests. Modes: eval forward under no_grad, and a training forward + backward. Compiled = torch.compile with
Inductor (default mode, fullgraph=True).

pytest-benchmark times the compiled call (the median of `ROUNDS`); `paired_*` time eager and compiled call by call
in turn (`PAIRED_ROUNDS` pairs, the same seconds and load on a shared machine): `paired_speedup` = eager median /
compiled median is the figure to quote ("not slower" means >= 1).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from _cpu_bench_common import cpu_info

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "embedding"))
from embedding_helpers import injected_mlp, tiny_vit  # noqa: E402  (the models the tests compile)

pytestmark = pytest.mark.cpu_bench

# One intra-op thread for both sides: on the shared 2-core machine two threads time the other processes' load more
# than the model (tiny ViT eval, eager: median 85 ms with 2 threads vs 22 ms with 1, load average ~9).
THREADS = 1
ROUNDS = 20
PAIRED_ROUNDS = 30
MODELS = {
    "mlp": (lambda: injected_mlp(), lambda: torch.randn(8, 32, 16)),
    "vit-tiny-2": (lambda: tiny_vit(), lambda: torch.randn(8, 3, 32, 32)),
}


def _step(model: torch.nn.Module, x: torch.Tensor, mode: str):
    if mode == "eval":
        def call():
            with torch.no_grad():
                model(x)
    else:
        def call():
            model(x).square().mean().backward()
    return call


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_vs_eager(benchmark, name, mode):
    if name.startswith("vit"):
        pytest.importorskip("timm")
    build, make_x = MODELS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        _measure(benchmark, name, mode, build, make_x)
    finally:
        torch.set_num_threads(threads)


def _measure(benchmark, name: str, mode: str, build, make_x) -> None:
    torch._dynamo.reset()
    model = build().train(mode == "train")
    x = make_x()
    eager = _step(model, x, mode)
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = _step(compiled_model, x, mode)
    t0 = time.perf_counter()
    compiled()  # the compilation
    compile_s = time.perf_counter() - t0
    eager()
    load_before = os.getloadavg()[0]
    times = {"eager": [], "compiled": []}
    for _ in range(PAIRED_ROUNDS):
        for label, call in (("eager", eager), ("compiled", compiled)):
            t = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    benchmark.group = f"compile-cpu-{name}-{mode}"
    benchmark.pedantic(compiled, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update({
        "model": name, "mode": mode, "compile_s": compile_s,
        "paired_eager_median_s": med["eager"], "paired_compiled_median_s": med["compiled"],
        "paired_speedup": med["eager"] / med["compiled"],
        "paired_min_speedup": min(times["eager"]) / min(times["compiled"]),
        "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0], **cpu_info(),
    })
    torch._dynamo.reset()

"""Non-finite values never become silent garbage (issue 14 item 2): what every backend does, and what is refused.

- An expert that no row selects never contributes, whatever it holds (NaN, inf): all backends agree.
- Router logits must be finite: a ValueError on CPU (a free host check); on accelerators an async device assert;
  where no check runs (tracing, IGSP_KERNELS_CHECK_FINITE=0) NaN propagates to the row's weights and output.
- subspace_basis refuses non-finite input; subspace_penalty needs a finite lam >= 0; scale and noise_std finite.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import igsp_kernels as ik
from igsp_kernels.backends import available_backends

CPU_BACKENDS = [b for b in ("reference", "cpp")
                if b in available_backends(ik.OpRequest("moe_lora", torch.device("cpu"), torch.float32))]


def poisoned_inputs(value: float):
    """Expert 2 of 4 holds `value` everywhere and no row selects it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    A = torch.randn(4, 8, 3, generator=g)
    B = torch.randn(4, 3, 5, generator=g)
    ba, bb = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    idx = torch.tensor([[0, 1], [1, 3], [3, 0], [0, 0], [1, 1], [3, 1]], dtype=torch.int32)  # never expert 2
    w = torch.softmax(torch.randn(6, 2, generator=g), -1)
    clean = [t.clone() for t in (A, B, ba, bb)]
    for t in (A, B, ba, bb):
        t[2] = value
    return x, (A, B, ba, bb), clean, idx, w


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_unselected_expert_never_contributes(backend, value, activation):
    x, poisoned, clean, idx, w = poisoned_inputs(value)
    W0 = torch.randn(5, 8)
    outs = []
    for A, B, ba, bb in (poisoned, clean):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, w, ba, bb)]
        lx, lA, lB, lw, lba, lbb = leaves
        y = ik.moe_lora(lx, lA, lB, idx, lw, base_weight=W0, scale=0.5, activation=activation,
                        expert_bias=(lba, lbb), backend=backend)
        grads = torch.autograd.grad(y.square().sum(), leaves)
        outs.append((y, grads))
    (y, grads), (y_ref, grads_ref) = outs
    torch.testing.assert_close(y, y_ref)
    for name, g, g_ref in zip("x A B w ba bb".split(), grads, grads_ref):
        if name in ("A", "B", "ba", "bb"):  # the unselected expert gets no gradient; the others are unchanged
            assert torch.equal(g[2], torch.zeros_like(g[2])), f"d{name} of the unselected expert"
            g, g_ref = torch.cat([g[:2], g[3:]]), torch.cat([g_ref[:2], g_ref[3:]])
        torch.testing.assert_close(g, g_ref, msg=lambda m: f"d{name}: {m}")


@pytest.mark.interpret
def test_unselected_expert_never_contributes_triton():
    pytest.importorskip("triton")
    if "triton" not in available_backends(ik.OpRequest("moe_lora", torch.device("cpu"), torch.float32)):
        pytest.skip("the triton backend cannot run here (TRITON_INTERPRET=1 is needed on the CPU)")
    x, poisoned, clean, idx, w = poisoned_inputs(float("nan"))
    ys = [ik.moe_lora(x, A, B, idx, w, expert_bias=(ba, bb), backend="triton") for A, B, ba, bb in (poisoned, clean)]
    torch.testing.assert_close(ys[0], ys[1])


@pytest.mark.parametrize("value,what", [(float("nan"), r"1 NaN and 0 infinite"),
                                        (float("inf"), r"0 NaN and 1 infinite"),
                                        (float("-inf"), r"0 NaN and 1 infinite")])
def test_route_topk_refuses_non_finite_logits_on_cpu(value, what):
    logits = torch.randn(3, 4)
    logits[1, 2] = value
    with pytest.raises(ValueError, match=rf"logits must be finite, got {what} value\(s\) in shape \(3, 4\) "
                                         r"\(mask experts out with active=, not with -inf logits\)"):
        ik.route_topk(logits, 2)


def test_nan_propagation_rule_where_no_check_runs(monkeypatch):
    monkeypatch.setenv("IGSP_KERNELS_CHECK_FINITE", "0")
    logits = torch.randn(4, 5)
    logits[0, 1] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    _, w, probs = ik.route_topk(logits, 2)
    assert torch.isnan(w[:3]).all(dim=1).all() and torch.isnan(probs[:3]).all()  # the three bad rows
    assert torch.isfinite(w[3]).all() and torch.isfinite(probs[3]).all()  # the clean row is untouched


def test_nan_logits_under_torch_compile_propagate_instead_of_breaking_the_graph():
    logits = torch.randn(3, 4)
    logits[0, 0] = float("nan")
    fn = torch.compile(lambda z: ik.route_topk(z, 2), fullgraph=True, backend="eager")
    _, w, _ = fn(logits)
    assert torch.isnan(w[0]).all() and torch.isfinite(w[1:]).all()


def test_module_with_nan_input_refuses_on_cpu():
    m = ik.MoELoRALinear.from_linear(nn.Linear(6, 4), num_experts=2, rank=2)
    m.add_router(0)
    m.set_task(0)
    x = torch.randn(2, 3, 6)
    x[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"logits must be finite, got 2 NaN"):  # one bad feature, 2 logits
        m(x)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_subspace_basis_refuses_non_finite_input_eager_and_compiled(value):
    M = torch.randn(6, 4)
    M[2, 1] = value
    with pytest.raises(ValueError, match=r"M must be finite, got .* value\(s\) in shape \(6, 4\)"):
        ik.subspace_basis(M)
    with pytest.raises(Exception, match=r"M must be finite"):
        torch.compile(lambda m: ik.subspace_basis(m), fullgraph=True, backend="eager")(M)


@pytest.mark.parametrize("lam,exc", [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                     (True, TypeError)])
def test_subspace_penalty_needs_a_finite_non_negative_lam(lam, exc):
    with pytest.raises(exc, match=r"lam must be a finite float >= 0 \(a negative weight rewards leaving"):
        ik.subspace_penalty([torch.randn(5, 3)], [torch.zeros(5, 0)], lam)


@pytest.mark.gpu
def test_route_topk_on_cuda_refuses_non_finite_logits_by_a_device_assert():
    # The check must not sync with the host, so it is an async device assert: fatal to the CUDA context, hence a
    # subprocess. Its message reaches stderr through CUDA's "device-side assert triggered".
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    code = ("import torch, igsp_kernels as ik\n"
            "z = torch.randn(3, 4, device='cuda'); z[0, 0] = float('nan')\n"
            "ik.route_topk(z, 2)\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "device-side assert" in proc.stderr or "logits must be finite" in proc.stderr

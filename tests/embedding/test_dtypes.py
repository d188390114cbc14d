"""An injected model works after `.to(bf16 | fp16 | fp64)` and under autocast, on every backend, forward and backward.

Where a backend cannot run a dtype (the C++ extension has no fp16 kernel), the documented behaviour is asserted
instead: `backend="auto"` picks one that can, and forcing it raises BackendNotSupportedError with the reason.
"""

from __future__ import annotations

import pytest
import torch
from embedding_helpers import backends_for, injected_mlp

import igsp_kernels as ik
from igsp_kernels.testing import tolerance

DTYPES = [torch.bfloat16, torch.float16, torch.float64]


def reference_output(x: torch.Tensor, train: bool) -> torch.Tensor:
    """The fp64 output of the same model (same seed) on the reference backend."""
    net = injected_mlp(backend="reference").double().train(train)
    torch.manual_seed(1)  # the same noise/dropout draws (none here) in every variant
    return net(x.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_to_dtype_forward_backward_on_every_backend(device, dtype, train):
    x = torch.randn(3, 5, 16, device=device)
    want = reference_output(x.cpu(), train).to(device)
    backends = ["auto"] + backends_for(device, torch.float32)
    for backend in backends:
        net = injected_mlp(backend=backend).to(device=device, dtype=dtype).train(train)
        if backend != "auto" and backend not in backends_for(device, dtype):
            with pytest.raises(ik.BackendNotSupportedError, match=rf"dtype {str(dtype)[6:]} not in supported dtypes"):
                net(x.to(dtype))
            continue
        y = net(x.to(dtype))
        assert y.dtype == dtype, backend
        atol, rtol = tolerance(dtype, 32)
        # Low precision: the model's own weights are rounded to `dtype`, so compare at that dtype's resolution.
        scale = 1.0 if dtype == torch.float64 else 8.0
        torch.testing.assert_close(y.double(), want, atol=atol * scale + (0.05 if dtype != torch.float64 else 0),
                                   rtol=0.05 if dtype != torch.float64 else rtol, msg=lambda m: f"{backend}: {m}")
        y.float().square().mean().backward()
        for name, layer in ik.moe_lora_layers(net):
            assert layer.A_train.grad is not None and layer.A_train.grad.dtype == dtype, (backend, name)
            assert torch.isfinite(layer.A_train.grad).all(), (backend, name)
            assert layer.usage_weight.dtype == torch.float32  # statistics stay fp32 whatever the model dtype
        if train:
            assert all(layer.usage_rows.item() == 3 for _, layer in ik.moe_lora_layers(net))


@pytest.mark.parametrize("ac_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_on_every_backend(device, ac_dtype):
    x = torch.randn(3, 5, 16, device=device)
    want = reference_output(x.cpu(), True).to(device)
    for backend in ["auto"] + backends_for(device):
        net = injected_mlp(backend=backend).to(device).train()
        if backend != "auto" and backend not in backends_for(device, ac_dtype):
            with pytest.raises(ik.BackendNotSupportedError, match=rf"dtype {str(ac_dtype)[6:]} not in supported"):
                with torch.autocast(device, dtype=ac_dtype):
                    net(x)
            continue
        with torch.autocast(device, dtype=ac_dtype):
            y = net(x)
        assert y.dtype == ac_dtype, backend  # as nn.Linear under autocast
        torch.testing.assert_close(y.double(), want, atol=0.1, rtol=0.05, msg=lambda m: f"{backend}: {m}")
        y.float().square().mean().backward()
        for _, layer in ik.moe_lora_layers(net):  # fp32 parameters get fp32 gradients
            assert layer.A_train.grad.dtype == torch.float32 and torch.isfinite(layer.A_train.grad).all()
            assert layer.routers["0"].weight.grad.dtype == torch.float32


def test_routers_compute_logits_in_fp32_under_autocast():
    net = injected_mlp()
    layer = net.fc1
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.routers["0"](x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ layer.routers["0"].weight.T)


def test_new_experts_and_routers_follow_the_model_dtype():
    net = injected_mlp().to(torch.float64)
    ik.add_router(net, 1)
    for _, layer in ik.moe_lora_layers(net):
        layer.add_experts(2, active_in=[1])
        assert layer.A_train.dtype == torch.float64 and layer.routers["1"].weight.dtype == torch.float64
    ik.set_task(net, 1)
    net.train()(torch.randn(2, 3, 16, dtype=torch.float64)).sum().backward()

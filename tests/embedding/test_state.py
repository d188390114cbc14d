"""Self-describing state (issue 13 item 4): routing settings and routing state travel with the state_dict."""

from __future__ import annotations

import pytest
import torch
from embedding_helpers import MLP, injected_mlp
from torch import nn

import igsp_kernels as ik
from igsp_kernels import MoELoRALinear


def fresh_like(**options) -> MLP:
    """What a user does before loading: rebuild and inject the same way (no routers, no set_task)."""
    torch.manual_seed(123)
    net = MLP()
    kw = dict(num_experts=4, rank=4, top_k=2)
    kw.update(options)
    ik.inject_moe_lora(net, ["fc1", "fc2"], **kw)
    return net


def test_reload_reproduces_outputs_without_any_call():
    net = injected_mlp().eval()
    x = torch.randn(3, 5, 16)
    want = net(x)
    other = fresh_like().eval()
    other.load_state_dict(net.state_dict())  # strict: every key, extra state included
    torch.testing.assert_close(other(x), want)  # no add_router / set_task needed


@pytest.mark.parametrize("state", ["off", "sample"])
def test_reload_restores_off_and_per_sample_tasks(state):
    net = injected_mlp().eval()
    ik.add_router(net, "b")
    if state == "off":
        ik.set_task(net, None)
    else:
        ik.set_sample_tasks(net, torch.tensor([1, -1, 0]))
    x = torch.randn(3, 5, 16)
    want = net(x)
    other = fresh_like().eval()
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other(x), want)


def test_router_order_is_the_saved_one():
    # Per-sample task ids index the routers: a layer that already has them in another order takes the saved order.
    layer = MoELoRALinear(6, 6, num_experts=2, rank=2)
    for t in ("a", "b"):
        layer.add_router(t)
    other = MoELoRALinear(6, 6, num_experts=2, rank=2)
    for t in ("b", "a"):
        other.add_router(t)
    other.load_state_dict(layer.state_dict())
    assert other.task_names == ["a", "b"]


@pytest.mark.parametrize("setting,value,shown", [
    ("top_k", 1, "top_k=2 (this layer: 1)"),
    ("scale", 0.5, "scale=1.0 (this layer: 0.5)"),
    ("activation", "relu", "activation='identity' (this layer: 'relu')"),
    ("routing", "token", "routing='sample' (this layer: 'token')"),
    ("noise", "learned", "noise='fixed' (this layer: 'learned')"),
])
def test_loading_into_other_routing_settings_is_a_clear_error(setting, value, shown):
    net = injected_mlp()
    other = fresh_like(**{setting: value})
    with pytest.raises(RuntimeError, match=r"fc1: saved with other routing settings: .*" + shown.replace("(", r"\(")
                       .replace(")", r"\)") + r".*build the layer with the saved settings"):
        other.load_state_dict(net.state_dict())


def test_a_state_dict_without_routing_state_still_loads():
    # Version 0 (before settings were saved): the weights load, the routing state is left to set_task as then.
    net = injected_mlp().eval()
    old = {k: v for k, v in net.state_dict().items() if not k.endswith("_extra_state")}
    other = fresh_like().eval()
    other.load_state_dict(old)
    with pytest.raises(RuntimeError, match=r"no task is set"):
        other(torch.randn(2, 16))
    ik.set_task(other, 0)
    torch.testing.assert_close(other(torch.ones(2, 16)), net(torch.ones(2, 16)))


def test_forward_with_experts_and_no_router_says_what_to_call():
    net = fresh_like().train()
    with pytest.raises(RuntimeError, match=r"forward: this MoELoRALinear has 4 experts but no router yet: call "
                                           r"add_router\(task\) and set_task\(task\)"):
        net(torch.randn(2, 16)).sum().backward()
    ik.add_router(net, 0)
    with pytest.raises(RuntimeError, match=r"forward: no task is set on this MoELoRALinear \(routers: \['0'\]\)"):
        net(torch.randn(2, 16))
    ik.set_task(net, None)  # explicitly off: the base model
    net(torch.randn(2, 16))


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \['triton', 'cpp', 'reference'\], "
                                         r"got 'warp'"):
        MoELoRALinear.from_linear(nn.Linear(4, 4), backend="warp")


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(scale=float("nan")), r"scale must be a finite float, got nan"),
    (dict(noise_std=float("nan")), r"noise_std must be a finite float >= 0, got nan"),
    (dict(noise_std=float("inf")), r"noise_std must be a finite float >= 0, got inf"),
    (dict(router_init_std=-1.0), r"router_init_std must be a finite float >= 0, got -1.0"),
])
def test_non_finite_settings_are_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoELoRALinear(4, 4, **kwargs)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.10+ deprecates torch.jit.script itself
def test_torch_jit_script_fails_clearly():
    with pytest.raises(RuntimeError, match=r"MoELoRALinear does not support torch.jit.script .* use torch.compile"):
        torch.jit.script(injected_mlp())


def test_extra_state_is_a_tensor_so_tensor_only_consumers_work(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    net = injected_mlp()
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    safetensors.save_file(sd, str(tmp_path / "m.safetensors"))
    other = fresh_like()
    other.load_state_dict(safetensors.load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(2, 16)
    torch.testing.assert_close(other.eval()(x), net.eval()(x))

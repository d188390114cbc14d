"""The PEFT-grade surface (issue 13 item 6), each piece tested against real PEFT or a plain-torch equivalent.

PEFT is a test dependency (the `dev` extra); the parity tests are skipped where it is not installed.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from embedding_helpers import MLP, injected_mlp
from torch import nn

import igsp_kernels as ik
from igsp_kernels import MoELoRAConfig


class Classifier(nn.Module):
    """An MLP body and a head: the head is what modules_to_save trains in full."""

    def __init__(self) -> None:
        super().__init__()
        self.body = MLP()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# ------------------------------------------------------------------------------------------------- config
def test_config_round_trips_through_dict_and_json():
    cfg = MoELoRAConfig(target_modules=["fc1", "fc2"], num_experts=4, rank=8, alpha=16, top_k=2,
                        expert_dropout=0.1, noise="learned", modules_to_save=["head"], task="t0")
    assert MoELoRAConfig.from_dict(cfg.to_dict()) == cfg
    assert MoELoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.effective_scale == 2.0  # alpha / rank, PEFT's lora_alpha / r
    assert MoELoRAConfig(target_modules="fc.", rank=16, alpha=8, use_rslora=True).effective_scale == 2.0  # 8 / 4
    assert MoELoRAConfig(target_modules=["fc1"]).effective_scale == 1.0


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(alpha=16, scale=2.0), ValueError, r"give alpha \(scale = alpha / rank\) or scale, not both"),
    (dict(rank=0), ValueError, r"rank must be an int >= 1, got 0"),
    (dict(top_k="2"), ValueError, r"top_k must be an int >= 1, got '2'"),
    (dict(routing="batch"), ValueError, r"routing must be 'sample' or 'token', got 'batch'"),
    (dict(expert_dropout=1.5), ValueError, r"expert_dropout must be a float in \[0, 1\), got 1.5"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a finite float, got nan"),
    (dict(backend="warp"), ValueError, r"backend must be 'auto' or one of"),
    (dict(target_modules=[]), ValueError, r"target_modules must name at least one module"),
    (dict(modules_to_save="head"), TypeError, r"modules_to_save must be a list of module name suffixes or None"),
    (dict(task="a.b"), ValueError, r"task must be a non-empty name without '.' or None, got 'a.b'"),
])
def test_config_validates(kwargs, exc, pattern):
    kw = dict(target_modules=["fc1"])
    kw.update(kwargs)
    with pytest.raises(exc, match=pattern):
        MoELoRAConfig(**kw)


def test_config_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match=r"MoELoRAConfig: unknown field\(s\) \['lora_alpha'\]; known: "):
        MoELoRAConfig.from_dict({"target_modules": ["fc1"], "lora_alpha": 8})


def test_inject_with_a_config_is_trainable_at_once():
    net = MLP()
    names = ik.inject_moe_lora(net, MoELoRAConfig(target_modules=["fc1", "fc2"], num_experts=2, rank=2))
    assert names == ["fc1", "fc2"]
    assert net.fc1.task_names == ["default"] and net.fc1.active_task == "default"
    net(torch.randn(3, 16)).sum().backward()  # no add_router / set_task needed
    with pytest.raises(TypeError, match=r"takes its options from the config; got also \['rank'\]"):
        ik.inject_moe_lora(MLP(), MoELoRAConfig(target_modules=["fc1"]), rank=4)


# --------------------------------------------------------------------------------------------- PEFT parity
def peft_pair(use_rslora: bool = False):
    """(our model, PEFT's model) on the same base weights with the same LoRA weights: one expert, k = 1."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = MLP()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_dropout=0.0, use_rslora=use_rslora))
    ours = copy.deepcopy(base)
    ik.inject_moe_lora(ours, MoELoRAConfig(target_modules=["fc1", "fc2"], num_experts=1, top_k=1, rank=4, alpha=8,
                                           use_rslora=use_rslora))
    for name in ("fc1", "fc2"):
        lora = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            lora.lora_B["default"].weight.normal_(std=0.3)  # PEFT's B starts at zero: make the term live
            mine = ours.get_submodule(name)
            mine.A_train[0].copy_(lora.lora_A["default"].weight.T)  # PEFT stores A (r, d_in), B (d_out, r)
            mine.B_train[0].copy_(lora.lora_B["default"].weight.T)
    return ours, theirs


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha", "rslora"])
def test_one_expert_k1_equals_peft_lora_forward_and_every_gradient(train, use_rslora):
    ours, theirs = peft_pair(use_rslora)
    ours.train(train)
    theirs.train(train)
    x = torch.randn(3, 5, 16)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    torch.testing.assert_close(yo, yt, atol=2e-6, rtol=1e-5)  # fp32 round-off
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yt.backward(dy)
    torch.testing.assert_close(xo.grad, xt.grad, atol=2e-6, rtol=1e-5)
    for name in ("fc1", "fc2"):
        mine, lora = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(mine.A_train.grad[0], lora.lora_A["default"].weight.grad.T, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(mine.B_train.grad[0], lora.lora_B["default"].weight.grad.T, atol=2e-6, rtol=1e-5)
        assert mine.base_layer.weight.grad is None  # the base is frozen in both
    trainable_ours = {n for n, p in ours.named_parameters() if p.requires_grad and "routers" not in n}
    assert len(trainable_ours) == sum(p.requires_grad for p in theirs.parameters())


def test_merge_and_unload_and_disable_match_peft():
    ours, theirs = peft_pair()
    x = torch.randn(4, 16)
    with ik.disable_adapters(ours), theirs.disable_adapter():
        torch.testing.assert_close(ours(x), theirs(x))
    plain_ours = ik.merge_and_unload(ours)
    plain_theirs = theirs.merge_and_unload()
    assert isinstance(plain_ours.fc1, nn.Linear) and type(plain_ours.fc1) is type(plain_theirs.fc1)
    torch.testing.assert_close(plain_ours.fc1.weight, plain_theirs.fc1.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain_ours(x), plain_theirs(x), atol=2e-6, rtol=1e-5)


def test_print_trainable_parameters_has_peft_format(caplog):
    peft = pytest.importorskip("peft")
    ours, theirs = peft_pair()
    with caplog.at_level(logging.INFO, logger="igsp_kernels.adapters"):
        line = ik.print_trainable_parameters(ours)
    trainable, total = ik.get_nb_trainable_parameters(ours)
    assert trainable == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in ours.parameters())
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: " \
                   f"{100 * trainable / total:.4f}"
    assert caplog.records[-1].getMessage() == line
    t_trainable, t_total = theirs.get_nb_trainable_parameters()
    router = sum(p.numel() for n, p in ours.named_parameters() if "routers" in n)
    assert (trainable - router, total - router) == (t_trainable, t_total)  # the same count but our routers
    assert peft.__version__  # the format above is PEFT's: "trainable params: ... || all params: ... || trainable%"


# ------------------------------------------------------------------------------------------------- merging
def test_merge_folds_one_expert_and_unmerge_restores():
    net = injected_mlp(num_experts=1, top_k=1).eval()
    x = torch.randn(3, 5, 16)
    want = net(x)
    W = net.fc1.base_layer.weight.detach().clone()
    assert ik.merge_(net) == ["fc1", "fc2"]
    assert net.fc1.merged == "0"
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"add_experts: the experts of task '0' are merged .* unmerge\(\) .* first"):
        net.fc1.add_experts(1)
    ik.unmerge_(net)
    torch.testing.assert_close(net.fc1.base_layer.weight, W, atol=1e-6, rtol=0)  # round-off, as PEFT's unmerge
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)


def test_merge_of_a_uniform_fixed_routing_over_several_experts():
    # Zero-initialised routers (MoE-Adapters' choice) with top_k = all experts: uniform weights, input-independent.
    net = injected_mlp(num_experts=3, top_k=3)
    for _, layer in ik.moe_lora_layers(net):
        with torch.no_grad():
            layer.routers["0"].weight.zero_()
    net.eval()
    x = torch.randn(4, 16)
    want = net(x)
    ik.merge_(net, task=0)
    torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)


def test_merge_refuses_input_dependent_routing_and_changes_nothing():
    net = injected_mlp(num_experts=4, top_k=2)
    W = net.fc1.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge: the routing of task '0' depends on the input \(4 active experts, "
                                         r"top_k=2, distinct router rows\)"):
        ik.merge_(net)
    assert torch.equal(net.fc1.base_layer.weight, W) and net.fc1.merged is None
    relu = injected_mlp(num_experts=1, top_k=1, activation="relu")
    with pytest.raises(ValueError, match=r"activation 'relu' is not linear"):
        ik.merge_(relu)


# ------------------------------------------------------------------------------------------- save / load
def _trained_classifier():
    torch.manual_seed(0)
    net = Classifier()
    cfg = MoELoRAConfig(target_modules=["fc1", "fc2"], num_experts=3, rank=2, top_k=2, alpha=4,
                        modules_to_save=["head"], noise="learned")
    ik.inject_moe_lora(net, cfg)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 5, 16)).square().mean().backward()
        opt.step()
    return net.eval()


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "torch"])
def test_save_then_load_into_the_plain_base_model(tmp_path, safetensors, monkeypatch):
    if not safetensors:  # the fallback when safetensors is not installed
        monkeypatch.setattr(ik.adapters, "_safetensors", lambda: None)
    net = _trained_classifier()
    x = torch.randn(4, 5, 16)
    want = net(x)
    weights = ik.save_adapters(net, tmp_path)
    assert weights.name == ("adapter_model.safetensors" if safetensors else "adapter_model.pt")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["config"]["target_modules"] == ["body.fc1", "body.fc2"] and saved["modules_to_save"] == ["head"]
    torch.manual_seed(0)
    fresh = Classifier().eval()  # the same base weights (same seed), no adapters
    assert ik.load_adapters(fresh, tmp_path) == ["body.fc1", "body.fc2"]
    torch.testing.assert_close(fresh(x), want)
    assert isinstance(fresh.head, ik.ModulesToSaveWrapper) and fresh.head.modules_to_save.weight.requires_grad
    stored = set(ik.adapter_state_dict(net))
    assert not any("base_layer" in k or "original_module" in k for k in stored)  # never the frozen base


def test_load_into_an_injected_model_and_errors(tmp_path):
    net = _trained_classifier()
    ik.save_adapters(net, tmp_path)
    torch.manual_seed(0)
    other = Classifier()
    ik.inject_moe_lora(other, MoELoRAConfig(target_modules=["fc1", "fc2"], num_experts=3, rank=2, top_k=2, alpha=4,
                                            modules_to_save=["head"], noise="learned", task=None))
    ik.load_adapters(other, tmp_path)
    x = torch.randn(2, 16)
    torch.testing.assert_close(other.eval()(x), net(x))
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json \(not a save_adapters folder\)"):
        ik.load_adapters(Classifier(), tmp_path / "nowhere")
    mismatched = Classifier()
    ik.inject_moe_lora(mismatched, ["fc1"], num_experts=1)
    with pytest.raises(ValueError, match=r"differ from the saved ones"):
        ik.load_adapters(mismatched, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")  # a truncated / foreign file
    with pytest.raises(ValueError, match=r"cannot read adapter weights .*adapter_model.safetensors"):
        ik.load_adapters(Classifier(), tmp_path)


def test_save_refuses_merged_layers(tmp_path):
    net = injected_mlp(num_experts=1, top_k=1)
    ik.merge_(net)
    with pytest.raises(ValueError, match=r"merged into their base weights: unmerge_\(model\) before saving"):
        ik.save_adapters(net, tmp_path)


# --------------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_trains_a_copy_and_disable_uses_the_original():
    torch.manual_seed(0)
    net = Classifier()
    original = copy.deepcopy(net)
    ik.inject_moe_lora(net, MoELoRAConfig(target_modules=["fc1"], modules_to_save=["head"]))
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    assert "head.modules_to_save.weight" in trainable and "head.original_module.weight" not in trainable
    assert net.head.weight is net.head.modules_to_save.weight  # attribute reads reach the module in use
    with torch.no_grad():
        net.head.modules_to_save.weight.add_(1.0)
        net.body.fc1.B_train.normal_()
    x = torch.randn(3, 16)
    with ik.disable_adapters(net):
        torch.testing.assert_close(net(x), original(x))  # exactly the base model
        assert net.head.weight is net.head.original_module.weight
    assert not torch.allclose(net(x), original(x))  # back on
    with pytest.raises(ValueError, match=r"modules_to_save names \['tail'\], which match no module"):
        ik.inject_moe_lora(Classifier(), MoELoRAConfig(target_modules=["fc1"], modules_to_save=["tail"]))

"""Lean routers: adapters.router_placement='block' (one router per block, c_fc's, shared with c_proj)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import igsp_kernels as ik
from igsp.adapters import AdapterConfig, BlockRoutedMLP, RouteFollower, adapter_layers, inject, route_followers
from igsp.checkpoint import adapter_state_dict, load_adapter_state_dict
from igsp.method.pruning import prune_candidates
from igsp.metrics import added_params, trainable_adapter_params
from igsp.model import TINY_MODEL, create_clip
from igsp_kernels.reference.moe_lora import moe_lora_ref

CFG = AdapterConfig(num_experts=3, rank=2, top_k=2, router_placement="block", backend="reference")


def _block_model(config: AdapterConfig = CFG):
    torch.manual_seed(0)
    model, *_ = create_clip(TINY_MODEL)
    inject(model, config)
    ik.add_router(model, 0)
    ik.set_task(model, 0)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.B_train.normal_(std=0.3)  # B = 0 at init would make every check below trivially pass
    return model


def test_block_placement_needs_both_mlp_linears():
    with pytest.raises(ValueError, match="router_placement.*'mlp.c_fc' and 'mlp.c_proj'"):
        AdapterConfig(targets=["mlp.c_fc"], router_placement="block")
    with pytest.raises(ValueError, match="router_placement: got 'tower'"):
        AdapterConfig(router_placement="tower")


def test_c_proj_follows_c_fc_and_has_no_router():
    model = _block_model()
    layers = adapter_layers(model)
    follows = route_followers(layers)
    # Two blocks per tower, two towers: four followers, each naming its own block's c_fc.
    assert len(follows) == 4
    for f, leader in follows.items():
        assert f.endswith("mlp.c_proj") and leader == f[: -len("c_proj")] + "c_fc"
    for name, layer in layers:
        assert (len(layer.routers) == 0) == isinstance(layer, RouteFollower)
    assert isinstance(model.visual.transformer.resblocks[0].mlp, BlockRoutedMLP)
    # The parameter names are those of the per-layer placement (checkpoints and logs read the same).
    assert {n for n, _ in layers} == {n for n, _ in adapter_layers(_layer_model())}


def _layer_model():
    torch.manual_seed(0)
    model, *_ = create_clip(TINY_MODEL)
    inject(model, dataclasses.replace(CFG, router_placement="layer"))
    return model


def _eval_mlp(block: int, batch: int):
    """(model in eval mode, the vision MLP of `block`, an input (batch, 5 tokens, width))."""
    model = _block_model()
    model.eval()
    mlp = model.visual.transformer.resblocks[block].mlp
    return model, mlp, torch.randn(batch, 5, mlp.c_fc.in_features)


def test_block_forward_applies_c_fc_decision_to_both_linears():
    _, mlp, x = _eval_mlp(1, 3)
    with torch.no_grad():
        y = mlp(x)
        idx, w, _ = mlp.c_fc.route(x)  # per sample: (3, 2)
        tok_idx, tok_w = idx.repeat_interleave(5, 0), w.repeat_interleave(5, 0)

        def ref(layer, inp):
            A, B, _ = layer.expert_weights()
            out = moe_lora_ref(inp.reshape(-1, layer.in_features), A, B, tok_idx, tok_w,
                               base_weight=layer.base_layer.weight, base_bias=layer.base_layer.bias,
                               scale=layer.scale)
            return out.reshape(*inp.shape[:-1], layer.out_features)

        expected = ref(mlp.c_proj, mlp.gelu(ref(mlp.c_fc, x)))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_shared_router_learns_from_both_linears():
    model = _block_model()
    mlp = model.visual.transformer.resblocks[0].mlp
    x = torch.randn(4, 5, mlp.c_fc.in_features)
    mlp(x).square().sum().backward()
    g_both = mlp.c_fc.routers["0"].weight.grad.clone()
    mlp.zero_grad()
    # Without c_proj's experts the router's gradient changes: c_proj's loss reaches c_fc's router.
    with torch.no_grad():
        mlp.c_proj.B_train.zero_()
    mlp(x).square().sum().backward()
    assert (g_both - mlp.c_fc.routers["0"].weight.grad).abs().max() > 1e-6


def test_adapters_off_and_per_sample_tasks():
    model, mlp, x = _eval_mlp(0, 2)
    with torch.no_grad():
        base = mlp.c_proj.base_layer(mlp.gelu(mlp.c_fc.base_layer(x)))
        ik.set_task(model, None)
        torch.testing.assert_close(mlp(x), base)
        # Task-agnostic deployment: sample 0 goes to task 0, sample 1 falls back to zero-shot (-1).
        ik.set_sample_tasks(model, torch.tensor([0, -1]))
        mixed = mlp(x)
        ik.set_sample_tasks(model, None)
        ik.set_task(model, 0)
        routed = mlp(x)
    torch.testing.assert_close(mixed[1], base[1])
    torch.testing.assert_close(mixed[0], routed[0])
    assert (routed[0] - base[0]).abs().max() > 1e-4


def test_accounting_counts_one_router_per_block():
    block, layer = _block_model(), _layer_model()
    ik.add_router(layer, 0)
    a_block, a_layer = added_params(block), added_params(layer)
    # Per block: c_fc's router (3 experts x 64) in both; c_proj's (3 x 256) only per layer.
    assert a_block["routers"] == 4 * 3 * 64
    assert a_layer["routers"] == 4 * 3 * (64 + 256)
    assert a_block["experts"] == a_layer["experts"]
    assert trainable_adapter_params(block, task=0)["router"] == 4 * 3 * 64


def test_pruning_removes_the_same_experts_from_leader_and_follower():
    model = _block_model()
    layers = adapter_layers(model)
    follows = route_followers(layers)
    leaders = [(n, layer) for n, layer in layers if n not in follows]
    # The leader's usage decides; a follower's own (deliberately different) usage is ignored.
    usage = {n: torch.tensor([0.7, 0.29, 0.01]) for n, _ in leaders}
    usage.update({n: torch.tensor([0.01, 0.01, 0.98]) for n in follows})
    removed = prune_candidates(layers, usage, tau=0.05, followers=follows)
    for f, leader in follows.items():
        assert removed[f] == removed[leader] == [2]
    by_name = dict(layers)
    assert all(by_name[f].num_experts == by_name[leader].num_experts == 2 for f, leader in follows.items())
    with pytest.raises(ValueError, match="pools must mirror"):
        by_name[next(iter(follows))].add_experts(1, active_in=[])
        prune_candidates(layers, usage, tau=0.05, followers=follows)


def test_block_model_state_round_trips():
    model = _block_model()
    state = adapter_state_dict(model)
    assert not any(".mlp.c_proj.routers." in k for k in state)
    torch.manual_seed(0)  # the same random backbone
    fresh, *_ = create_clip(TINY_MODEL)
    inject(fresh, dataclasses.replace(CFG, num_experts=0))
    load_adapter_state_dict(fresh, state)
    ik.set_task(fresh, 0)
    model.eval()
    fresh.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_image(images), model.encode_image(images))


@pytest.mark.parametrize("placement", ["layer", "block"])
def test_params_plan_matches_the_built_model(placement):
    # `igsp params` replays the pools with integers and probes a router per layer for its size; the first task's
    # phase-1 count must equal the real model's (C candidates per layer + the task router).
    from igsp.config import load_config
    from igsp.engine import parameter_plan

    config = load_config("tiny", [f"adapters.router_placement={placement}"])
    plan = parameter_plan(config)
    torch.manual_seed(0)
    model, *_ = create_clip(TINY_MODEL)
    inject(model, dataclasses.replace(config.adapters, backend="reference"))
    for _, layer in adapter_layers(model):
        layer.add_experts(config.method.candidates, active_in=[])
        layer.add_router(0)
    assert plan["trainable_per_task"][0] == trainable_adapter_params(model, task=0)["total"]

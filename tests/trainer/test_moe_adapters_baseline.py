"""The faithful MoE-Adapters baseline: its settings, its parameter count (51.06 M for ViT-B/16), the residual-stream
adapter input, first-token routing with learned noisy gating, and freezing by selection count over the pool."""

from __future__ import annotations

import json
import types

import pytest
import torch
from trainer_helpers import run_tiny

from igsp.adapters import AdapterConfig, ParallelAdapter, adapter_layers, inject
from igsp.checkpoint import load_usage_state, usage_state
from igsp.config import ConfigError, list_presets, load_config
from igsp.engine import parameter_plan
from igsp.methods.moe_adapters import REFERENCE_SETTINGS, MoEAdaptersMethod
from igsp.model import create_clip
from igsp_kernels import MoELoRALinear

MOE_PRESETS = [p for p in list_presets() if p.startswith("mtil-") and p.endswith("moe-adapters")]
# The tiny model with the baseline's adapter settings (scaled down: 6 experts, rank 4).
FAITHFUL = dict(targets=["mlp_parallel"], towers=["visual", "text"], num_experts=6, rank=4, top_k=2, scale=0.1,
                activation="relu", expert_bias=True, parallel_input="residual", route_token="first",
                text_route_token="first", noise="learned", noise_floor=0.01, router_init_std=0.0,
                expert_dropout=0.1, backend="reference")


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_presets_hold_the_reference_settings(preset):
    c = load_config(preset)
    for key, ref in REFERENCE_SETTINGS.items():
        section, name = key.split(".")
        assert getattr(getattr(c, section), name) == ref, key
    assert c.train.grad_clip is None and c.train.precision == "fp32"  # their code: no clipping, fp32
    assert c.method.selector == "prototypes"  # the one deliberate difference (named by `igsp plan`)


def test_parameter_count_is_the_one_counted_from_their_code():
    # mtil/clip/model.py, per block: 22 Adapter(d, 64) (down d x 64 + 64, up 64 x d + d) and, for 11 tasks,
    # router_list[i] and w_noise_list[i] (d x 22 each); 12 blocks of the visual (d = 768) and text (d = 512) towers.
    per_block = {d: 22 * (d * 64 + 64 + 64 * d + d) + 11 * 2 * d * 22 for d in (768, 512)}
    assert 12 * (per_block[768] + per_block[512]) == 51_059_712
    rep = parameter_plan(load_config("mtil-full-orderI-moe-adapters"))
    assert rep["added"]["experts"] + rep["added"]["routers"] == 51_059_712
    # A task trains its router (gate and noise weights) and the experts not yet frozen (2 per block and task).
    routers = 12 * sum(2 * 22 * d for d in (768, 512))
    experts = 12 * sum(d * 64 + 64 + 64 * d + d for d in (768, 512))
    assert rep["trainable_per_task"] == [routers + (22 - 2 * t) * experts for t in range(11)]


def _tiny(config: AdapterConfig):
    torch.manual_seed(0)
    model = create_clip("igsp-tiny", None)[0]
    inject(model, config)
    return model


def test_residual_input_reads_the_stream_before_ln_2():
    # MoE-Adapters: x + mlp(ln_2(x)) + adapter(x) with x the residual stream after attention.
    model = _tiny(AdapterConfig(**FAITHFUL))
    block = model.visual.transformer.resblocks[0]
    assert isinstance(block.mlp, ParallelAdapter) and isinstance(block.ln_2, torch.nn.Identity)
    seen = {}
    block.mlp.adapter.register_forward_pre_hook(lambda m, a: seen.__setitem__("adapter", a[0]))
    block.mlp.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm", a[0]))
    block.mlp.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("mlp", a[0]))
    for _, layer in adapter_layers(model):
        layer.add_router(0)
        with torch.no_grad():  # non-zero experts and routers, so the adapter term is visible
            layer.B_train.normal_()
            layer.routers["0"].weight.normal_()
    model.eval()
    import igsp_kernels

    igsp_kernels.set_task(model, 0)
    x = torch.randn(2, 3, 32, 32)
    model.encode_image(x)
    assert seen["adapter"] is seen["norm"]  # the adapter reads what ln_2 reads: the residual stream
    assert torch.allclose(seen["mlp"], block.mlp.norm(seen["norm"]))
    s = seen["adapter"]
    with torch.no_grad():
        expected = block.mlp.mlp(block.mlp.norm(s)) + block.mlp.adapter(s)
        assert torch.allclose(block.mlp(s), expected)
    # The older placement reads ln_2's output instead.
    plain = _tiny(AdapterConfig(**{**FAITHFUL, "parallel_input": "ln_2"}))
    assert plain.visual.transformer.resblocks[0].mlp.norm is None
    with pytest.raises(ValueError, match="parallel_input"):
        AdapterConfig(**{**FAITHFUL, "targets": ["mlp.c_fc"], "num_experts": 0})


def test_layers_route_on_the_first_token_with_learned_noise_and_dropout():
    model = _tiny(AdapterConfig(**FAITHFUL))
    layers = adapter_layers(model)
    assert len(layers) == 4  # 2 blocks x 2 towers, one adapter per block
    for name, layer in layers:
        assert layer.route_token == "first" and layer.noise == "learned" and layer.expert_dropout == 0.1
        router = layer.add_router(0)
        assert router.weight.abs().sum() == 0 and router.noise_weight.abs().sum() == 0  # zero-initialised
    import igsp_kernels

    igsp_kernels.set_task(model, 0)
    _, layer = layers[0]
    x = torch.randn(3, 5, layer.in_features)
    layer.train()
    a, b = layer.route(x), layer.route(x)
    assert not torch.equal(a.topk_idx, b.topk_idx) or not torch.equal(a.topk_w, b.topk_w)  # noise in training
    layer.eval()
    c, d = layer.route(x), layer.route(x)
    assert torch.equal(c.topk_idx, d.topk_idx)  # none at evaluation
    # Only the first token decides: changing the others changes nothing.
    y = x.clone()
    y[:, 1:] = torch.randn_like(y[:, 1:])
    with torch.no_grad():
        layer.routers["0"].weight.normal_()
    assert torch.equal(layer.route(x).topk_idx, layer.route(y).topk_idx)


def _layer_with_counts(counts: list[float], frozen: int) -> MoELoRALinear:
    layer = MoELoRALinear(4, 4, num_experts=len(counts), rank=2, top_k=2)
    layer.freeze_experts(range(frozen))
    layer.usage_count = torch.tensor(counts)
    layer.usage_weight = torch.tensor(counts[::-1])  # the weighted rule ranks the other way round
    return layer


@pytest.mark.parametrize("counts, frozen, rule, expect_new", [
    # the 2 most selected (experts 3 and 1) are trainable: both freeze
    ([5.0, 9.0, 1.0, 12.0, 0.0], 0, "selected", [1, 3]),
    # expert 0 is already frozen and among the 2 most selected: only expert 3 freezes (their frozen list is a set)
    ([20.0, 1.0, 2.0, 12.0, 0.0], 1, "selected", [3]),
    # the older rule: the 2 trainable experts with the most routing weight (usage_weight = reversed counts)
    ([20.0, 1.0, 2.0, 12.0, 0.0], 1, "weighted", [1, 4]),
])
def test_freezing_rules(counts, frozen, rule, expect_new):
    layer = _layer_with_counts(counts, frozen)
    before = layer.expert_weights()[0].clone()  # A of every expert, by id: freezing re-indexes the pool
    cfg = types.SimpleNamespace(method=types.SimpleNamespace(freeze_per_task=2, freeze_rule=rule))
    trainer = types.SimpleNamespace(config=cfg, layers=[("l", layer)])
    MoEAdaptersMethod(trainer).end_task(0)
    assert layer.num_frozen == frozen + len(expect_new)
    newly = layer.A_frozen[frozen:]
    assert all(any(torch.equal(n, before[e]) for n in newly) for e in expect_new)
    # The counts follow the re-indexed pool: each expert keeps its own.
    assert sorted(layer.usage_count[frozen:frozen + len(expect_new)].tolist()) == sorted(counts[e] for e in expect_new)
    assert sorted(layer.usage_count.tolist()) == sorted(counts)
    with pytest.raises(ConfigError, match="method.freeze_rule"):
        load_config("tiny", ["method.freeze_rule=random"])


def test_faithful_baseline_trains_and_counts_selections(tmp_path):
    # The tiny model with the baseline's settings, 2 synthetic tasks: selections are counted in training (one per
    # routed sample and chosen expert), 2 experts freeze per layer after task 0, and the checkpoint keeps counts.
    sets = ["method.name=moe-adapters", "data.num_tasks=2", "train.iterations=6", "train.grad_clip=null",
            "method.freeze_rule=selected"]
    sets += [f"adapters.{k}={json.dumps(v)}" for k, v in FAITHFUL.items() if k != "backend"]
    sets += ["train.kernels=reference"]
    res = run_tiny(tmp_path / "run", sets)
    assert res["complete"] and len(res["acc"]) == 2
    ck = torch.load(tmp_path / "run" / "checkpoints" / "task0_phase1.pt", weights_only=True)
    for name, (w, p, rows, count) in ck["usage"].items():
        # top-2 per routed row: the counts sum to 2 x the rows routed in the task
        assert float(count.sum()) == pytest.approx(2 * float(rows)) and float(rows) > 0, name
    frozen = {k: v for k, v in ck["adapters"].items() if k.endswith("A_frozen")}
    assert frozen and all(v.shape[0] == 2 for v in frozen.values())
    assert res["params"]["trainable_per_task"][1] < res["params"]["trainable_per_task"][0]


def test_usage_state_of_older_checkpoints_loads():
    # Checkpoints written before selection counts hold three usage buffers: counts restart at zero.
    layer = MoELoRALinear(4, 4, num_experts=3, rank=2, top_k=2)
    state = usage_state([("l", layer)])
    assert len(state["l"]) == 4
    old = {"l": state["l"][:3]}
    layer.usage_count = torch.ones(3)
    load_usage_state([("l", layer)], old)
    assert torch.equal(layer.usage_count, torch.zeros(3))

"""Injection into open_clip CLIP models: every target kind is live, the backbone is frozen, counts are right."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import igsp_kernels as ik
from igsp.adapters import AdaptedMultiheadAttention, AdapterConfig, adapter_layers, inject
from igsp.model import TINY_MODEL, PretrainedWeightsError, create_clip


@pytest.fixture(scope="module")
def tiny_inputs():
    _, _, _, tok = create_clip(TINY_MODEL)
    return torch.randn(2, 3, 32, 32), tok(["a photo of a cat.", "a photo of a dog."])


def encode(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


# (target kind, layers per tower block): the tiny model has 2 blocks per tower and 2 towers.
TARGET_CASES = [("mlp.c_fc", 1), ("mlp.c_proj", 1), ("attn.out_proj", 1), ("mlp_parallel", 1)]


@pytest.mark.parametrize("target,per_block", TARGET_CASES)
def test_each_target_is_live_in_both_towers(target, per_block, tiny_inputs):
    images, tokens = tiny_inputs
    torch.manual_seed(0)
    model, *_ = create_clip(TINY_MODEL)
    ref_img, ref_txt = encode(model, images, tokens)
    names = inject(model, AdapterConfig(targets=[target], num_experts=2, top_k=1))
    assert len(names) == 2 * 2 * per_block
    ik.add_router(model, 0)
    ik.set_task(model, 0)
    img, txt = encode(model, images, tokens)  # experts initialised with B = 0: nothing changes yet
    torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, ref_txt, rtol=1e-5, atol=1e-5)
    for name, layer in adapter_layers(model):
        with torch.no_grad():
            layer.B_train.normal_(std=0.5)
        img, txt = encode(model, images, tokens)
        tower_out, tower_ref = (img, ref_img) if name.startswith("visual.") else (txt, ref_txt)
        assert (tower_out - tower_ref).abs().max() > 1e-3, f"{name} does not change its tower's output"
        with torch.no_grad():
            layer.B_train.zero_()


def test_nn_multihead_attention_out_proj_wrapper_alone_would_be_dead(tiny_inputs):
    # Why AdaptedMultiheadAttention exists: nn.MultiheadAttention never calls out_proj.forward.
    images, tokens = tiny_inputs
    model, *_ = create_clip(TINY_MODEL)
    ref_img, _ = encode(model, images, tokens)
    attn = model.visual.transformer.resblocks[0].attn
    naive = ik.MoELoRALinear.from_linear(attn.out_proj, num_experts=1, rank=2)
    naive.add_router(0)
    naive.set_task(0)
    with torch.no_grad():
        naive.B_train.normal_()
    attn.out_proj = naive
    img, _ = encode(model, images, tokens)
    torch.testing.assert_close(img, ref_img)


def test_adapted_attention_matches_torch_mha_with_masks():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    wrapped = AdaptedMultiheadAttention(mha, mha.out_proj)
    x = torch.randn(2, 5, 16)
    causal = torch.triu(torch.full((5, 5), float("-inf")), 1)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for kwargs in (dict(), dict(attn_mask=causal), dict(key_padding_mask=pad),
                   dict(attn_mask=causal.isinf(), key_padding_mask=pad)):
        want = mha(x, x, x, need_weights=False, **kwargs)[0]
        got = wrapped(x, x, x, need_weights=False, **kwargs)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="need_weights=False"):
        wrapped(x, x, x)


def test_backbone_frozen_and_only_adapters_train(tiny_inputs):
    model, *_ = create_clip(TINY_MODEL)
    inject(model, AdapterConfig(num_experts=2, top_k=1))
    ik.add_router(model, 0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("A_train" in n) or ("B_train" in n) or (".routers." in n) for n in trainable)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"adapters.targets: got \['mlp.fc1'\], expected a non-empty list of"):
        AdapterConfig(targets=["mlp.fc1"])
    with pytest.raises(ValueError, match=r"adapters.top_k: got 3, expected <= num_experts \(2\)"):
        AdapterConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match=r"adapters: unknown field\(s\) \['rnk'\]"):
        AdapterConfig.from_dict({"rnk": 4})


def test_vit_b16_counts_and_unchanged_output_at_init():
    # The real MTIL backbone, random weights (pretrained=None): 12 blocks x 2 towers x 2 MLP linears.
    torch.manual_seed(0)
    model, *_ = create_clip("ViT-B-16", pretrained=None)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model.encode_image(images)
    frozen_before = sum(p.numel() for p in model.parameters())
    names = inject(model, AdapterConfig(num_experts=2, rank=16, top_k=1))
    assert len(names) == 48
    ik.add_router(model, "t0")
    ik.set_task(model, "t0")
    # Per layer: 2 experts x (d_in + d_out) x r, plus a router (2 x d_in). Vision width 768, text width 512.
    vis = 12 * (2 * (768 + 3072) * 16 + 2 * 768 + 2 * (3072 + 768) * 16 + 2 * 3072)
    txt = 12 * (2 * (512 + 2048) * 16 + 2 * 512 + 2 * (2048 + 512) * 16 + 2 * 2048)
    assert ik.count_parameters(model, trainable_only=True) == vis + txt
    assert sum(p.numel() for p in model.parameters()) == frozen_before + vis + txt
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref, rtol=1e-5, atol=1e-5)


def test_missing_pretrained_weights_say_how_to_supply_them(tmp_path):
    with pytest.raises(PretrainedWeightsError, match=r"does not exist"):
        create_clip(TINY_MODEL, str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match=r"is not a tag of ViT-B-16"):
        create_clip("ViT-B-16", "not-a-tag")
    with pytest.raises(ValueError, match=r"model.name: unknown open_clip model 'ViT-Q-99'"):
        create_clip("ViT-Q-99")


def test_pretrained_from_local_checkpoint_path(tmp_path):
    torch.manual_seed(1)
    model, *_ = create_clip(TINY_MODEL)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded, *_ = create_clip(TINY_MODEL, str(path))
    for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n


def test_offline_tag_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache, whatever this machine has cached
    with pytest.raises(PretrainedWeightsError, match=r"HF_HUB_OFFLINE=1.*--set model.pretrained="):
        create_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))

"""Targets whose parent bypasses them are handled, never silently dead (issue 13 item 5).

- nn.MultiheadAttention never calls `out_proj` (F.multi_head_attention_forward reads its weight): targeting it
  wraps the attention as well (AdaptedMultiheadAttention), so the adapter is live.
- nn.TransformerEncoderLayer / nn.TransformerEncoder in eval mode take torch's fused fast path, which reads the
  weights directly: it is turned off for every injected layer, so the adapters run in eval mode too.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import igsp_kernels as ik


def encoder(batch_first: bool = True) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


def make_live(model: nn.Module) -> None:
    for _, layer in ik.moe_lora_layers(model):
        with torch.no_grad():
            layer.B_train.normal_(std=0.5)


@pytest.mark.parametrize("targets", [["self_attn.out_proj"], ["linear1", "linear2"],
                                     ["self_attn.out_proj", "linear1", "linear2"]])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # torch's own fast path, before
def test_transformer_encoder_adapters_are_live_in_eval_mode(targets, caplog):
    enc = encoder()
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True  # a padded sample: what makes nn.TransformerEncoder take its nested-tensor fast path
    with torch.no_grad():
        base = enc.eval()(x, src_key_padding_mask=mask)
    with caplog.at_level(logging.INFO, logger="igsp_kernels.modules"):
        names = ik.inject_moe_lora(enc, ik.MoELoRAConfig(target_modules=targets, num_experts=2, top_k=1, rank=2))
    assert len(names) == 2 * len(targets)
    assert any("disabled torch's Transformer fast path of 2 nn.TransformerEncoderLayer and 1 "
               "nn.TransformerEncoder" in r.getMessage() for r in caplog.records)
    keep = ~mask  # padded positions are unspecified (the fast path returns zeros there)
    with torch.no_grad():
        same = enc.eval()(x, src_key_padding_mask=mask)
        torch.testing.assert_close(same[keep], base[keep], atol=1e-5, rtol=1e-5)  # B = 0: the same model
        make_live(enc)
        ev = enc.eval()(x, src_key_padding_mask=mask)
        tr = enc.train()(x, src_key_padding_mask=mask)  # the slow path (dropout 0): the reference computation
    assert (ev - base)[keep].abs().max() > 1e-2, "the adapters were bypassed in eval mode"
    torch.testing.assert_close(ev[keep], tr[keep], atol=1e-5, rtol=1e-5)


def test_multihead_attention_out_proj_is_wrapped_with_its_attention():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    block = Block()
    x = torch.randn(2, 6, 16)
    base = block(x)
    ik.inject_moe_lora(block, ik.MoELoRAConfig(target_modules=["attn.out_proj"], num_experts=1, rank=2))
    assert isinstance(block.attn, ik.AdaptedMultiheadAttention)
    assert isinstance(block.attn.out_proj, ik.MoELoRALinear)
    torch.testing.assert_close(block(x), base, atol=1e-5, rtol=1e-5)  # the same attention while B = 0
    make_live(block)
    out_proj = block.attn.out_proj
    assert (block(x) - base).abs().max() > 1e-2  # live
    # the adapter term is exactly what the wrapped out-projection adds to the attention output
    heads = nn.functional.scaled_dot_product_attention(
        *(t.reshape(2, 6, 4, 4).transpose(1, 2) for t in nn.functional.linear(x, block.attn.in_proj_weight,
                                                                                block.attn.in_proj_bias).chunk(3, -1)))
    torch.testing.assert_close(block(x), out_proj(heads.transpose(1, 2).reshape(2, 6, 16)), atol=1e-5, rtol=1e-5)


def test_targeting_the_attention_module_itself_names_the_fix():
    enc = encoder()
    with pytest.raises(ValueError, match=r"matched modules that are not nn.Linear: .*for an nn.MultiheadAttention "
                                         r"target its out_proj"):
        ik.inject_moe_lora(enc, ["self_attn"])


def test_save_and_load_adapters_rewrap_the_attention(tmp_path):
    enc = encoder()
    ik.inject_moe_lora(enc, ik.MoELoRAConfig(target_modules=["self_attn.out_proj", "linear2"], num_experts=2, rank=2))
    make_live(enc)
    x = torch.randn(2, 4, 16)
    want = enc.eval()(x)
    ik.save_adapters(enc, tmp_path)
    fresh = encoder().eval()  # the same base (same seed), plain torch modules
    names = ik.load_adapters(fresh, tmp_path)
    assert "layers.0.self_attn.out_proj" in names
    assert isinstance(fresh.layers[0].self_attn, ik.AdaptedMultiheadAttention)
    torch.testing.assert_close(fresh(x), want)

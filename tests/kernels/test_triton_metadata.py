"""Routing metadata invariants (STYLE G6): the padded expert-sorted order is an inverse permutation, blocks are
expert-pure, offsets sum to T*k, indices are in range; sized from shapes alone.

The metadata is built from torch ops only, so this runs in the normal CPU process (no interpreter needed).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from igsp_kernels.ops.routing import max_blocks, routing_metadata  # noqa: E402
from igsp_kernels.testing import MOE_LORA_EDGE_CASES, MoELoRACase, make_routing  # noqa: E402

CASES = list(MOE_LORA_EDGE_CASES) + [
    MoELoRACase("many_blocks", 300, 8, 8, 4, 7, 3, why="300 x 3 assignments over 7 experts: ~8 blocks of 16 each"),
    MoELoRACase("empty", 0, 8, 8, 4, 3, 2, why="T = 0: empty metadata, zero-size grids"),
]


def check_invariants(idx: torch.Tensor, E: int, block: int) -> None:
    T, k = idx.shape
    n = T * k
    sorted_assign, assign_pos, block_expert, off, order, tokens = routing_metadata(idx, E, block)
    nb = max_blocks(n, E, block)
    # sizes are the shape-only upper bounds (no host sync needed to size a grid)
    assert sorted_assign.shape == (nb * block,) and block_expert.shape == (nb,)
    assert assign_pos.shape == (n,) and off.shape == (E + 1,)
    assert all(t.dtype == torch.int32 for t in (sorted_assign, assign_pos, block_expert, off, order, tokens))
    # token_order is a permutation of the tokens that groups equal expert sets (consecutive in the order)
    assert torch.equal(torch.sort(tokens.long()).values, torch.arange(T))
    sets = [tuple(sorted(row)) for row in idx[tokens.long()].tolist()]
    assert len({s for i, s in enumerate(sets) if i == 0 or s != sets[i - 1]}) == len(set(sets))
    # the visiting order is a permutation of the blocks: used blocks by first token, then the unused ones
    assert torch.equal(torch.sort(order.long()).values, torch.arange(nb))
    used = int(off[-1])
    first_tok = sorted_assign.view(nb, block)[:, 0].long() // max(k, 1) if nb else torch.zeros(0, dtype=torch.long)
    visit = first_tok[order[:used].long()]
    assert bool((visit[1:] >= visit[:-1]).all()) and bool((block_expert[order[used:].long()] == E).all())
    valid = sorted_assign >= 0
    # every assignment appears exactly once, and assign_pos is the inverse permutation
    assert int(valid.sum()) == n
    assert torch.equal(torch.sort(sorted_assign[valid].long()).values, torch.arange(n))
    assert torch.equal(sorted_assign[assign_pos.long()].long(), torch.arange(n))
    # per-expert offsets: blocks = ceil(count / block), they sum to the used blocks, and counts sum to T*k
    counts = torch.bincount(idx.reshape(-1).long(), minlength=E)
    assert int(counts.sum()) == n
    assert torch.equal((off[1:] - off[:-1]).long(), (counts + block - 1) // block)
    assert int(off[0]) == 0 and int(off[-1]) <= nb
    # block_expert: expert e owns blocks [off[e], off[e+1]); later blocks are marked E (unused, exit early)
    for e in range(E):
        assert bool((block_expert[off[e]:off[e + 1]] == e).all())
    assert bool((block_expert[int(off[-1]):] == E).all())
    assert bool(((block_expert >= 0) & (block_expert <= E)).all())
    # every valid slot of a block holds an assignment of the block's expert; experts appear in increasing order
    flat = idx.reshape(-1).long()
    slot_expert = block_expert.long().repeat_interleave(block)
    assert torch.equal(flat[sorted_assign[valid].long()], slot_expert[valid])
    # within an expert, assignments keep their original order (stable sort: deterministic layout)
    for e in range(E):
        run = sorted_assign[off[e] * block:off[e + 1] * block]
        run = run[run >= 0].long()
        assert torch.equal(run, torch.sort(run).values)
        assert bool(((torch.arange(len(run)) < counts[e]) | (run < 0)).all())


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_routing_metadata_invariants(case, block):
    idx, _ = make_routing(case, torch.Generator().manual_seed(0))
    check_invariants(idx, case.E, block)


def test_int64_indices_are_accepted():
    # topk_idx may arrive as int64 (torch.topk's dtype)
    idx, _ = make_routing(MOE_LORA_EDGE_CASES[0], torch.Generator().manual_seed(0))
    check_invariants(idx.long(), MOE_LORA_EDGE_CASES[0].E, 16)


def test_block_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="block must be a power of two"):
        routing_metadata(torch.zeros(2, 1, dtype=torch.int32), 2, 24)

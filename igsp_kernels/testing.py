"""Shared by the tests and the benchmarks: the tolerance table, input factories and named edge-case shape lists.

Imports only torch (STYLE A1). Nothing here asserts on its own except `assert_close_lowp`, the relative-to-eager
bound of STYLE rule 8 (flash-attn's method): max|ours - ref| <= 2 * max|eager - ref| + atol, with `ref` computed
in float64 and `eager` the published-style loop (`moe_lora_loop`) run in the low precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "MOE_LORA_EDGE_CASES",
    "MOE_LORA_SAMPLE_CASES",
    "ROUTE_EDGE_CASES",
    "SUBSPACE_EDGE_CASES",
    "TOLERANCES",
    "MoELoRACase",
    "MoELoRAInputs",
    "RouteCase",
    "SubspaceCase",
    "assert_close_lowp",
    "make_moe_lora_inputs",
    "make_routing",
    "make_subspace_inputs",
    "tolerance",
]

Routing = Literal["token", "sample", "one_expert", "skip_expert", "all_experts", "repeat", "zero_gate"]

# Per-dtype (atol, rtol) for a result whose entries are sums of ~1 terms of unit size; `tolerance` widens atol
# with the square root of the reduction length (rounding errors of a sum grow like sqrt(n)). fp16/bf16 entries are
# the atol of the relative-to-eager bound; their real check is `assert_close_lowp`.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-11, 1e-9),
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-3, 0.0),
    torch.bfloat16: (1.6e-2, 0.0),
}


def tolerance(dtype: torch.dtype, reduction: int = 1) -> tuple[float, float]:
    """(atol, rtol) for `dtype` with atol scaled by sqrt(reduction length) (STYLE G2)."""
    atol, rtol = TOLERANCES[dtype]
    return atol * math.sqrt(max(reduction, 1)), rtol


def assert_close_lowp(ours: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor, atol: float, name: str = "") -> None:
    """max|ours - ref| <= 2 max|eager - ref| + atol (ref in high precision, eager in the same low precision)."""
    ours64, ref64, eager64 = ours.double(), ref.double(), eager.double()
    err = (ours64 - ref64).abs().max().item() if ours.numel() else 0.0
    eager_err = (eager64 - ref64).abs().max().item() if ours.numel() else 0.0
    bound = 2.0 * eager_err + atol
    if not err <= bound:
        raise AssertionError(f"{name}: max|ours - ref| = {err:.3e} exceeds 2 * max|eager - ref| + atol = "
                             f"2 * {eager_err:.3e} + {atol:.1e} = {bound:.3e}")


# --------------------------------------------------------------------------------------------- MoE-LoRA
@dataclass(frozen=True)
class MoELoRACase:
    """One MoE-LoRA problem. `why` says which boundary it hits (STYLE G5)."""

    name: str
    T: int
    d_in: int
    d_out: int
    r: int
    E: int
    k: int
    routing: Routing = "token"
    tokens_per_sample: int = 1
    why: str = field(default="", compare=False)


# The named edge cases every backend must pass. Small on purpose: the interpreter runs ~1000x slower than a GPU.
MOE_LORA_EDGE_CASES: tuple[MoELoRACase, ...] = (
    MoELoRACase("odd", 37, 40, 36, 5, 5, 2, why="odd T, rank 5 padded to 16, d spanning two tiles, per-token"),
    MoELoRACase("single_token", 1, 33, 19, 3, 4, 2, why="T = 1: one row, most experts and blocks empty"),
    MoELoRACase("k_equals_E", 9, 24, 20, 4, 4, 4, routing="all_experts", why="k = E: every expert in every row"),
    MoELoRACase("empty_expert", 23, 24, 20, 4, 5, 2, routing="skip_expert",
                why="expert E-1 gets no rows: a zero gradient and no block"),
    MoELoRACase("one_expert", 40, 24, 20, 4, 4, 1, routing="one_expert",
                why="every row on expert 0: one expert spans 3 blocks of 16, the others are empty"),
    MoELoRACase("per_sample", 30, 24, 20, 4, 6, 2, routing="sample", tokens_per_sample=10,
                why="per-sample routing expanded to 3 samples of 10 tokens (the default MoE-Adapters mode)"),
    MoELoRACase("repeat", 11, 24, 20, 4, 3, 2, routing="repeat",
                why="the same expert twice in a row: its two slots add up (the reference's scatter_add)"),
)

# Per-sample routing passed natively (topk_idx (T / L, k), `tokens_per_sample=L`): each case's L crosses the
# interpreter's 16-row tiles differently. Inputs from `make_moe_lora_inputs(case, per_sample=True)`.
MOE_LORA_SAMPLE_CASES: tuple[MoELoRACase, ...] = (
    MoELoRACase("odd_L", 39, 40, 36, 5, 5, 2, routing="sample", tokens_per_sample=13,
                why="L = 13 is a multiple of no block: every 16-row tile spans 2-3 samples; rank 5 padded to 16"),
    MoELoRACase("one_sample", 37, 33, 19, 3, 4, 2, routing="sample", tokens_per_sample=37,
                why="B = 1: one sample, one routing row, most experts empty"),
    MoELoRACase("zero_gate", 30, 24, 20, 4, 6, 2, routing="zero_gate", tokens_per_sample=10,
                why="a sample routed to an expert with gate 0 (pruned/off): no contribution, d topk_w still exact"),
    MoELoRACase("k_equals_E", 27, 24, 20, 4, 3, 3, routing="all_experts", tokens_per_sample=9,
                why="k = E: every expert in every sample, 3 samples"),
    MoELoRACase("one_expert", 48, 24, 20, 4, 4, 2, routing="one_expert", tokens_per_sample=16,
                why="every sample's first expert is 0: expert 0 takes every sample; L = 16 = one tile"),
    MoELoRACase("long_L", 66, 24, 20, 4, 5, 2, routing="sample", tokens_per_sample=33,
                why="L = 33 > 2 tiles: tiles inside one sample and tiles crossing a boundary"),
)


@dataclass
class MoELoRAInputs:
    """Inputs of `igsp_kernels.moe_lora`; `leaves()` lists the differentiable ones in a fixed order."""

    x: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    topk_idx: torch.Tensor
    topk_w: torch.Tensor
    base_weight: torch.Tensor | None
    base_bias: torch.Tensor | None
    bias_a: torch.Tensor | None
    bias_b: torch.Tensor | None
    scale: float
    activation: str
    #: None: topk_idx / topk_w have one row per token; L: one row per sample of L consecutive tokens.
    tokens_per_sample: int | None = None

    def leaves(self) -> list[torch.Tensor]:
        out = [self.x, self.A, self.B, self.topk_w]
        return out + [t for t in (self.bias_a, self.bias_b) if t is not None]

    def leaf_names(self) -> list[str]:
        out = ["x", "A", "B", "topk_w"]
        return out + [n for n, t in (("bias_a", self.bias_a), ("bias_b", self.bias_b)) if t is not None]

    def kwargs(self) -> dict:
        """Keyword arguments of `igsp_kernels.moe_lora` (besides x, A, B, topk_idx, topk_w)."""
        eb = None if self.bias_a is None and self.bias_b is None else (self.bias_a, self.bias_b)
        return {"base_weight": self.base_weight, "base_bias": self.base_bias, "scale": self.scale,
                "activation": self.activation, "expert_bias": eb, "tokens_per_sample": self.tokens_per_sample}

    def ref_kwargs(self) -> dict:
        """Keyword arguments of the reference functions (`moe_lora_ref`, `moe_lora_loop`, ...)."""
        return {"base_weight": self.base_weight, "base_bias": self.base_bias, "scale": self.scale,
                "activation": self.activation, "bias_a": self.bias_a, "bias_b": self.bias_b,
                "tokens_per_sample": self.tokens_per_sample or 1}

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
           param_dtype: torch.dtype | None = None) -> MoELoRAInputs:
        """A detached copy in `dtype` (x, base) / `param_dtype` (A, B, expert biases), leaves requiring grad.

        The gates keep their dtype (routers emit fp32) except for a float64 copy (the oracle), which is all fp64.
        """
        def cv(t: torch.Tensor | None, dt: torch.dtype | None, grad: bool) -> torch.Tensor | None:
            if t is None:
                return None
            out = t.detach().to(device=device, dtype=dt if t.is_floating_point() else None).clone()
            return out.requires_grad_(grad and t.is_floating_point())

        pdt = param_dtype or dtype
        gate_dt = torch.float64 if dtype == torch.float64 else None
        return MoELoRAInputs(
            cv(self.x, dtype, True), cv(self.A, pdt, True), cv(self.B, pdt, True), cv(self.topk_idx, None, False),
            cv(self.topk_w, gate_dt, True), cv(self.base_weight, dtype, False), cv(self.base_bias, dtype, False),
            cv(self.bias_a, pdt, True), cv(self.bias_b, pdt, True), self.scale, self.activation,
            self.tokens_per_sample,
        )


def make_routing(case: MoELoRACase, generator: torch.Generator, *, per_sample: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx int32, topk_w fp32 rows summing to 1) following `case.routing`: (T, k) token rows, or with
    `per_sample` the (T / L, k) sample rows of native per-sample routing (L = case.tokens_per_sample)."""
    L = case.tokens_per_sample
    if case.T % L:
        raise ValueError(f"T={case.T} must be a multiple of tokens_per_sample={L}")
    if case.routing != "sample" and L > 1:  # any other pattern drawn per sample, then (unless native) per token
        idx, w = make_routing(MoELoRACase(case.name, case.T // L, case.d_in, case.d_out, case.r, case.E, case.k,
                                          routing=case.routing), generator)
        return (idx, w) if per_sample else (idx.repeat_interleave(L, 0), w.repeat_interleave(L, 0))
    T, E, k, g = case.T, case.E, case.k, generator

    def distinct(n_rows: int, pool: int) -> torch.Tensor:  # k distinct experts per row, uniformly at random
        return torch.rand(n_rows, pool, generator=g).argsort(dim=1)[:, :k]

    if case.routing == "token":
        idx = distinct(T, E)
    elif case.routing == "sample":
        idx = distinct(T // L, E).repeat_interleave(L, dim=0)
    elif case.routing == "one_expert":
        if k == 1:
            idx = torch.zeros(T, 1, dtype=torch.long)
        else:
            idx = torch.cat([torch.zeros(T, 1, dtype=torch.long), 1 + distinct(T, E - 1)[:, : k - 1]], dim=1)
    elif case.routing == "skip_expert":
        idx = distinct(T, E - 1)
    elif case.routing == "all_experts":
        if k != E:
            raise ValueError(f"routing 'all_experts' needs k == E, got k={k}, E={E}")
        idx = distinct(T, E)
    elif case.routing == "repeat":
        idx = distinct(T, E)
        idx[:, -1] = idx[:, 0]
    elif case.routing == "zero_gate":
        idx = distinct(T, E)
    else:
        raise ValueError(f"unknown routing {case.routing!r}")
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    if case.routing == "zero_gate":  # row 0's last expert is switched off (a pruned expert, or a task set off)
        w[0, -1] = 0.0
    if case.routing == "sample":
        w = w[::L].repeat_interleave(L, dim=0)
        if per_sample:
            idx, w = idx[::L], w[::L]
    return idx.to(torch.int32), w


def make_moe_lora_inputs(
    case: MoELoRACase,
    *,
    dtype: torch.dtype = torch.float32,
    param_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    base: bool = True,
    expert_bias: bool = False,
    activation: str = "identity",
    scale: float = 0.5,
    seed: int = 0,
    per_sample: bool = False,
) -> MoELoRAInputs:
    """Random inputs of unit-scale outputs: x ~ N(0, 1), A ~ N(0, 1/d_in), B ~ N(0, 1/r), W0 ~ N(0, 1/d_in).

    B is random (not LoRA's zero init) so every gradient path carries signal. Differentiable leaves require grad.
    `per_sample`: routing as (T / L, k) sample rows with `tokens_per_sample = L` (native per-sample routing).
    """
    g = torch.Generator().manual_seed(seed)
    T, d_in, d_out, r, E = case.T, case.d_in, case.d_out, case.r, case.E
    x = torch.randn(T, d_in, generator=g)
    A = torch.randn(E, d_in, r, generator=g) / math.sqrt(d_in)
    B = torch.randn(E, r, d_out, generator=g) / math.sqrt(r)
    idx, w = make_routing(case, g, per_sample=per_sample)
    W0 = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in) if base else None
    b0 = torch.randn(d_out, generator=g) if base else None
    ba = torch.randn(E, r, generator=g) if expert_bias else None
    bb = torch.randn(E, d_out, generator=g) if expert_bias else None
    raw = MoELoRAInputs(x, A, B, idx, w, W0, b0, ba, bb, scale, activation,
                        case.tokens_per_sample if per_sample else None)
    return raw.to(dtype=dtype, device=device, param_dtype=param_dtype)


# --------------------------------------------------------------------------------------------- routing
@dataclass(frozen=True)
class RouteCase:
    """One top-k gating problem; `active`: None, "shared" (an (E,) mask) or "row" (an (N, E) mask)."""

    name: str
    N: int
    E: int
    k: int
    active: Literal["shared", "row"] | None = None
    why: str = field(default="", compare=False)


ROUTE_EDGE_CASES: tuple[RouteCase, ...] = (
    RouteCase("plain", 13, 7, 3, why="odd N and E (E padded to 8 lanes), k = 3"),
    RouteCase("k1", 5, 22, 1, why="k = 1 (weights all 1) with the ViT pool size E = 22"),
    RouteCase("k_equals_E", 6, 4, 4, why="k = E: every expert chosen, the full softmax renormalised"),
    RouteCase("pruned_shared", 9, 7, 2, active="shared", why="pruned experts (shared mask) are never chosen"),
    RouteCase("pruned_rows", 9, 7, 3, active="row",
              why="a per-row mask (per-sample task routers) with exactly k active"),
    RouteCase("single_row", 1, 5, 2, why="N = 1"),
)


def make_route_inputs(case: RouteCase, *, device: torch.device | str = "cpu", seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits (N, E) fp32 requiring grad, active mask or None); masks keep at least k experts per row."""
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(case.N, case.E, generator=g)).to(device).requires_grad_()
    active = None
    if case.active == "shared":
        active = torch.ones(case.E, dtype=torch.bool)
        active[torch.randperm(case.E, generator=g)[: case.E - case.k - 1]] = False
    elif case.active == "row":
        active = torch.zeros(case.N, case.E, dtype=torch.bool)
        for n in range(case.N):  # exactly k active: the choice is forced, the mask is what is tested
            active[n, torch.randperm(case.E, generator=g)[: case.k]] = True
    return logits, None if active is None else active.to(device)


# --------------------------------------------------------------------------------------------- subspace
@dataclass(frozen=True)
class SubspaceCase:
    """One layer's candidate matrix: C batch entries of (d, n), a basis of width m; `transposed` builds M as the
    transposed view of a (C, n, d) tensor (how B^T reaches the op)."""

    name: str
    C: int
    d: int
    n: int
    m: int
    transposed: bool = False
    why: str = field(default="", compare=False)


SUBSPACE_EDGE_CASES: tuple[SubspaceCase, ...] = (
    SubspaceCase("A_like", 3, 40, 5, 20, why="A_c (C, d_in, r): basis wider than one 16-column chunk"),
    SubspaceCase("B_transposed", 2, 30, 6, 18, transposed=True, why="B_c^T as a strided view, written through"),
    SubspaceCase("no_basis", 2, 24, 8, 0, why="m = 0 (first task): no constraint, R = M"),
    SubspaceCase("wide", 1, 33, 17, 7, why="n = 17 > one 16-column tile, odd d"),
    SubspaceCase("full_basis", 2, 16, 4, 16, why="m = d: the projection removes everything"),
)


def make_subspace_inputs(cases: tuple[SubspaceCase, ...] | list[SubspaceCase], *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", seed: int = 0
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(mats, bases, leaves): mats[i] (C, d, n) (a transposed view when asked), bases[i] (d, m) orthonormal,
    leaves[i] the tensor requiring grad behind mats[i]."""
    g = torch.Generator().manual_seed(seed)
    mats, bases, leaves = [], [], []
    for c in cases:
        if c.transposed:
            leaf = torch.randn(c.C, c.n, c.d, generator=g).to(device=device, dtype=dtype).requires_grad_()
            M = leaf.transpose(1, 2)
        else:
            leaf = torch.randn(c.C, c.d, c.n, generator=g).to(device=device, dtype=dtype).requires_grad_()
            M = leaf
        if c.m:
            q, _ = torch.linalg.qr(torch.randn(c.d, c.m, generator=g, dtype=torch.float64))
            U = q[:, : c.m].to(device=device, dtype=dtype)
        else:
            U = torch.zeros(c.d, 0, device=device, dtype=dtype)
        mats.append(M)
        bases.append(U)
        leaves.append(leaf)
    return mats, bases, leaves

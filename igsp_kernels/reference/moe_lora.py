"""Reference MoE-LoRA: eager PyTorch formulations of one op (METHOD.md section 2).

Semantics: y[t] = x[t] @ W0^T + b0 + s * sum_j w[t,j] * (phi(x[t] @ A[e] + ba[e]) @ B[e] + bb[e]),  e = idx[t,j].

Shapes: x (T, d_in); A (E, d_in, r); B (E, r, d_out); topk_idx (T / L, k) int; topk_w (T / L, k) float;
base_weight (d_out, d_in); base_bias (d_out,); bias_a (E, r); bias_b (E, d_out). L = tokens_per_sample: with
L = 1 each row routes itself; with L > 1 routing row b covers the L consecutive rows b L .. b L + L - 1 of x (one
sample of a (B, L, d) input flattened to (B L, d)), so y[t] uses idx[t // L] and w[t // L].

Four formulations, each with a role:
- `moe_lora_ref`: the oracle and CPU fallback. A gate matrix G (T / L, E) scattered from the routing turns the
  routed sum into two dense GEMMs (x @ A_all, then (G * H) @ B_all, G broadcast over the L tokens of a sample):
  no host sync, no Python loop over experts, deterministic, differentiable by autograd, `torch.compile`-able.
  It computes every expert's rank-r projection, i.e. E/k times the routed rank FLOPs; at r <= 16 and E = 22
  that is still below half the base GEMM (22 * 16 = 352 inner columns against 768), so it is also a reasonable
  CPU path.
- `moe_lora_loop`: the eager loop that MoE-Adapters and PEFT's mixed-batch forward use (sort, per-expert
  gather, two matmuls, gated `index_add`; per-sample routing expanded to its tokens first, as they do). It syncs
  with the host once per call; benchmark baseline `eager`.
- `moe_lora_dense`: every expert's full output (T, E, d_out) then a gated sum; benchmark baseline `dense`.
- `moe_lora_smart_dense`: one GEMM over [x | G*H] against [W0^T ; B_all]; benchmark baseline `smart-dense`.

All accumulate in fp32 (or fp64 for fp64 inputs) and keep the rank intermediate in that precision: a bf16
rank intermediate gave wrong outputs in vLLM's LoRA ops (KERNELS.md lesson 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from igsp_kernels.reference.routing import expand_sample_routing

__all__ = ["acc_dtype", "apply_activation", "moe_lora_dense", "moe_lora_loop", "moe_lora_ref", "moe_lora_smart_dense"]

ACTIVATIONS = ("identity", "relu")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of `dtype`: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "identity":
        return h
    if activation == "relu":
        return F.relu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _gates(topk_idx: torch.Tensor, topk_w: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(T, E) gate matrix: G[t, e] = sum_j w[t, j] [idx[t, j] == e]; a repeated expert in a row adds up."""
    T = topk_idx.shape[0]
    gates = torch.zeros(T, num_experts, dtype=dtype, device=topk_w.device)
    return gates.scatter_add(1, topk_idx.long(), topk_w.to(dtype))


def _token_routing(topk_idx: torch.Tensor, topk_w: torch.Tensor, tokens_per_sample: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) token rows of per-sample routing (B, k) (the eager baselines' form); token routing is returned as is."""
    if tokens_per_sample == 1:
        return topk_idx, topk_w
    return expand_sample_routing(topk_idx, topk_w, tokens_per_sample)


def _base(x: torch.Tensor, base_weight: torch.Tensor | None, base_bias: torch.Tensor | None) -> torch.Tensor | None:
    if base_weight is None:
        return None if base_bias is None else base_bias.to(x.dtype).expand(x.shape[0], -1)
    return F.linear(x, base_weight.to(x.dtype), None if base_bias is None else base_bias.to(x.dtype))


def moe_lora_ref(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    *,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    activation: str = "identity",
    bias_a: torch.Tensor | None = None,
    bias_b: torch.Tensor | None = None,
    tokens_per_sample: int = 1,
) -> torch.Tensor:
    """Semantics: y[t] = x[t] W0^T + b0 + s * sum_j w[b,j] * (phi(x[t] A[e] + ba[e]) B[e] + bb[e]), e = idx[b,j],
    b = t // tokens_per_sample.

    Returns y (T, d_out) in x.dtype, computed in `acc_dtype(x.dtype)`.
    """
    acc = acc_dtype(x.dtype)
    E, _, r = A.shape
    T, L = x.shape[0], tokens_per_sample
    xf = x.to(acc)
    h = torch.einsum("td,edr->ter", xf, A.to(acc))  # (T, E, r): every expert's projection, no gather
    if bias_a is not None:
        h = h + bias_a.to(acc)
    h = apply_activation(h, activation)
    gates = _gates(topk_idx, topk_w, E, acc)  # (T / L, E), broadcast over each sample's L tokens (no (T, k))
    gh = h.view(T // L if L else 0, L, E, r) * gates[:, None, :, None]
    z = gh.reshape(T, E * r) @ B.to(acc).reshape(E * r, -1)
    if bias_b is not None:
        z = z + (gates @ bias_b.to(acc)).repeat_interleave(L, dim=0)
    y = scale * z
    base = _base(xf, base_weight, base_bias)
    if base is not None:
        y = y + base
    return y.to(x.dtype)


def moe_lora_loop(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    *,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    activation: str = "identity",
    bias_a: torch.Tensor | None = None,
    bias_b: torch.Tensor | None = None,
    tokens_per_sample: int = 1,
) -> torch.Tensor:
    """The eager per-expert loop (gather, two matmuls, gated index_add). Same semantics as `moe_lora_ref`.

    Runs in the input dtype as the published code does (no upcast), so it is the low-precision "eager" error
    that STYLE rule 8 measures against. One host sync per call (the per-expert counts).
    """
    topk_idx, topk_w = _token_routing(topk_idx, topk_w, tokens_per_sample)
    T, k = topk_idx.shape
    base = _base(x, base_weight, base_bias)
    y = base.clone() if base is not None else x.new_zeros(T, B.shape[2])
    flat_e = topk_idx.reshape(-1).long()
    order = torch.argsort(flat_e, stable=True)
    counts = torch.bincount(flat_e, minlength=A.shape[0]).tolist()  # the host sync
    rows = order // k
    w = topk_w.reshape(-1)[order].to(x.dtype)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(start, start + n)
        start += n
        xe = x.index_select(0, rows[sl])
        h = xe @ A[e].to(x.dtype)
        if bias_a is not None:
            h = h + bias_a[e].to(x.dtype)
        out = apply_activation(h, activation) @ B[e].to(x.dtype)
        if bias_b is not None:
            out = out + bias_b[e].to(x.dtype)
        y = y.index_add(0, rows[sl], out * (scale * w[sl]).unsqueeze(1))
    return y


def moe_lora_dense(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    *,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    activation: str = "identity",
    bias_a: torch.Tensor | None = None,
    bias_b: torch.Tensor | None = None,
    tokens_per_sample: int = 1,
) -> torch.Tensor:
    """Every expert's full output (T, E, d_out), then the gated sum: the naive all-experts einsum."""
    topk_idx, topk_w = _token_routing(topk_idx, topk_w, tokens_per_sample)
    h = torch.einsum("td,edr->ter", x, A.to(x.dtype))
    if bias_a is not None:
        h = h + bias_a.to(x.dtype)
    out = torch.einsum("ter,erd->ted", apply_activation(h, activation), B.to(x.dtype))
    if bias_b is not None:
        out = out + bias_b.to(x.dtype)
    gates = _gates(topk_idx, topk_w, A.shape[0], x.dtype)
    y = scale * torch.einsum("te,ted->td", gates, out)
    base = _base(x, base_weight, base_bias)
    return y if base is None else y + base


def moe_lora_smart_dense(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_w: torch.Tensor,
    *,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    scale: float = 1.0,
    activation: str = "identity",
    bias_a: torch.Tensor | None = None,
    bias_b: torch.Tensor | None = None,
    tokens_per_sample: int = 1,
) -> torch.Tensor:
    """One GEMM over [x | s * G*H] against [W0^T ; B_all]: the strongest cheap baseline at small rank."""
    topk_idx, topk_w = _token_routing(topk_idx, topk_w, tokens_per_sample)
    T = x.shape[0]
    E, _, r = A.shape
    h = torch.einsum("td,edr->ter", x, A.to(x.dtype))
    if bias_a is not None:
        h = h + bias_a.to(x.dtype)
    gates = _gates(topk_idx, topk_w, E, x.dtype)
    gh = (apply_activation(h, activation) * (scale * gates).unsqueeze(-1)).reshape(T, E * r)
    right = [B.to(x.dtype).reshape(E * r, -1)]
    left = [gh]
    if base_weight is not None:
        left.insert(0, x)
        right.insert(0, base_weight.to(x.dtype).t())
    if bias_b is not None:
        left.append(scale * gates)
        right.append(bias_b.to(x.dtype))
    y = torch.cat(left, dim=1) @ torch.cat(right, dim=0)
    if base_bias is not None:
        y = y + base_bias.to(x.dtype)
    return y

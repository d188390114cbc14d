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


def _only_used(t: torch.Tensor, used: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t (E, ...) in `dtype` with the rows of unused experts zeroed (`where`, not a multiply: 0 x NaN = NaN)."""
    return torch.where(used.view(-1, *([1] * (t.dim() - 1))), t.to(dtype), 0)


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
    hidden_mask: torch.Tensor | None = None,
    tokens_per_sample: int = 1,
) -> torch.Tensor:
    """Semantics: y[t] = x[t] W0^T + b0 + s * sum_j w[b,j] * ((m[t,j] * phi(x[t] A[e] + ba[e])) B[e] + bb[e]),
    e = idx[b,j], b = t // tokens_per_sample.

    `hidden_mask` m (T, k, r), optional (all ones when None), multiplies each assignment's rank-r activation
    before the up-projection: expert dropout (`MoELoRALinear(expert_dropout=p)` passes an inverted-dropout mask;
    the fused backends take no mask). Returns y (T, d_out) in x.dtype, computed in `acc_dtype(x.dtype)`.
    """
    acc = acc_dtype(x.dtype)
    E, _, r = A.shape
    T, L = x.shape[0], tokens_per_sample
    if hidden_mask is not None and L > 1:  # the mask is per token (T, k, r): so are its gates
        topk_idx, topk_w = _token_routing(topk_idx, topk_w, L)
        L = 1
    xf = x.to(acc)
    # Experts that no row selects must not contribute whatever they hold: the dense GEMMs below would turn a NaN or
    # inf in one of them into 0 x inf = NaN in every row (the gather-based backends never read them). Zero them
    # first, on the device (no host sync): O(E d r), next to the O(T E d r) projection.
    used = torch.zeros(E, dtype=torch.bool, device=x.device).index_fill_(0, topk_idx.reshape(-1).long(), True)
    A, B = _only_used(A, used, acc), _only_used(B, used, acc)
    h = torch.einsum("td,edr->ter", xf, A)  # (T, E, r): every expert's projection, no gather
    if bias_a is not None:
        h = h + _only_used(bias_a, used, acc)
    h = apply_activation(h, activation)
    gates = _gates(topk_idx, topk_w, E, acc)  # (T / L, E), broadcast over each sample's L tokens (no (T, k))
    if hidden_mask is None:
        gh = h.view(T // L if L else 0, L, E, r) * gates[:, None, :, None]
    else:  # per-assignment gates w[t, j] * m[t, j, :] scattered to (T, E, r); a repeated expert adds up
        k = topk_idx.shape[1]
        wm = topk_w.to(acc).unsqueeze(-1) * hidden_mask.to(acc)
        gh = h * torch.zeros_like(h).scatter_add(1, topk_idx.long().unsqueeze(-1).expand(T, k, r), wm)
    z = gh.reshape(T, E * r) @ B.reshape(E * r, -1)
    if bias_b is not None:
        zb = gates @ _only_used(bias_b, used, acc)
        z = z + (zb.repeat_interleave(L, dim=0) if L > 1 else zb)
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

// Shared helpers of the igsp_kernels C++ CPU extension (csrc/cpu). Header-only: every kernel folder includes it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace igsp_cpp {

// Every op is registered with TORCH_LIBRARY_IMPL(igsp_kernels_cpp, CPU, m); the schemas are defined in Python,
// in igsp_kernels/_cpp.py (SCHEMAS), so another backend can register kernels for the same ops.

#define IGSP_CHECK_CPU(t, name) \
  TORCH_CHECK((t).device().is_cpu(), name " must be a CPU tensor, got device ", (t).device())
#define IGSP_CHECK_FLOAT(t, name)                                                                 \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), name " must have a floating dtype, got ", \
              (t).scalar_type())
#define IGSP_CHECK_DIM(t, d, name) \
  TORCH_CHECK((t).dim() == (d), name " must have ", d, " dimensions, got shape ", (t).sizes())

// fp64 inputs compute in fp64 (so float64 gradcheck is exact); every other float dtype accumulates in fp32,
// including the rank-r intermediate (a bf16 rank intermediate gave wrong outputs in vLLM, KERNELS.md lesson 2).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` in dtype `acc`, contiguous; no copy when it already is.
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

}  // namespace igsp_cpp

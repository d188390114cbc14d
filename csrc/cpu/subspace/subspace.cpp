// iGSP subspace ops on the CPU, over lists of matrices (all layers and experts in one call).
//
// Semantics (igsp_kernels/reference/subspace.py), M_i (..., d, n), U_i (d, m_i) with orthonormal columns:
//   subspace_penalty: R = lam * sum_i ||M_i - U_i (U_i^T M_i)||_F^2, and (when asked) its gradient
//                     dR/dM_i = 2 lam (M_i - U_i (U_i^T M_i)), computed here while the residual is at hand
//                     (STYLE D6: the autograd backward only scales it by grad_output).
//   project_grad_:    G_i <- G_i - U_i (U_i^T G_i) in place (a transposed view writes through).
// Both compute in fp32 (fp64 for fp64 inputs), like the reference. m_i = 0 means no constraint.
#include <tuple>
#include <vector>

#include "../common.h"

namespace igsp_cpp {
namespace {

void check_pairs(at::TensorList mats, at::TensorList bases, const char* what) {
  TORCH_CHECK(mats.size() == bases.size(), what, " and bases must have the same length, got ", mats.size(), " and ",
              bases.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& M = mats[i];
    const at::Tensor& U = bases[i];
    IGSP_CHECK_CPU(M, "every matrix");
    IGSP_CHECK_CPU(U, "every basis");
    IGSP_CHECK_FLOAT(M, "every matrix");
    IGSP_CHECK_FLOAT(U, "every basis");
    TORCH_CHECK(M.dim() >= 2, what, "[", i, "] must have shape (..., d, n), got ", M.sizes());
    TORCH_CHECK(U.dim() == 2 && U.size(0) == M.size(-2), "bases[", i, "] must have shape (", M.size(-2),
                ", m), got ", U.sizes());
  }
}

// M - U (U^T M) in the accumulation dtype; M itself when U has no columns.
at::Tensor residual(const at::Tensor& M, const at::Tensor& U, at::ScalarType acc) {
  const at::Tensor Ma = M.to(acc);
  if (U.size(1) == 0) return Ma;
  const at::Tensor Ua = U.to(acc);
  return Ma - at::matmul(Ua, at::matmul(Ua.t(), Ma));
}

std::tuple<at::Tensor, std::vector<at::Tensor>> subspace_penalty(at::TensorList mats, at::TensorList bases,
                                                                  double lam, bool compute_grads) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_pairs(mats, bases, "mats");
  TORCH_CHECK(!mats.empty(), "mats must hold at least one tensor");
  const at::ScalarType acc = acc_dtype(mats[0].scalar_type());  // as the reference: the first matrix decides
  at::Tensor total = at::zeros({}, mats[0].options().dtype(acc));
  std::vector<at::Tensor> grads;
  if (compute_grads) grads.reserve(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor R = residual(mats[i], bases[i], acc);
    total.add_(R.square().sum());
    // 2 lam (I - U U^T) M in the accumulation dtype, contiguous whatever M's layout (a transposed B^T view makes R
    // transposed): the fake implementation promises contiguous outputs.
    if (compute_grads) grads.push_back(R.mul(2.0 * lam).contiguous());
  }
  return std::make_tuple(total.mul_(lam), std::move(grads));
}

void project_grad_(at::TensorList grads, at::TensorList bases) {
  at::AutoDispatchBelowADInplaceOrView guard;
  check_pairs(grads, bases, "grads");
  for (size_t i = 0; i < grads.size(); ++i) {
    at::Tensor G = grads[i];
    const at::Tensor& U = bases[i];
    if (U.size(1) == 0 || G.numel() == 0) continue;  // an empty basis constrains nothing
    const at::ScalarType acc = acc_dtype(G.scalar_type());
    const at::Tensor Ua = U.to(acc);
    if (G.scalar_type() == acc && G.dim() == 2) {
      // One fused BLAS update G += -1 * U (U^T G); BLAS writes a transposed (column-major) view in place too.
      G.addmm_(Ua, at::mm(Ua.t(), G), /*beta=*/1, /*alpha=*/-1);
    } else {
      const at::Tensor Ga = G.to(acc);
      G.copy_(Ga - at::matmul(Ua, at::matmul(Ua.t(), Ga)));
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(igsp_kernels_cpp, CPU, m) {
  m.impl("subspace_penalty", TORCH_FN(subspace_penalty));
  m.impl("project_grad_", TORCH_FN(project_grad_));
}

}  // namespace igsp_cpp

// Shared pieces of fastedit's compiled ops: input checks and the device-generic ATen
// composition, used by the CPU registrations (ops.cpp) and the CUDA ones (cuda_ops.cpp).
#pragma once

#include <functional>
#include <tuple>

#include <ATen/ATen.h>

namespace fastedit {

// Checks A (..., n, n) float32/float64 and returns (A viewed as (batch, n, n), L viewed the
// same way, info (...) int32, min_pivot (...)), with L and the LAPACK info already computed by
// at::linalg_cholesky_ex; the caller rewrites info and fills min_pivot on its device.
struct CholeskyParts {
  at::Tensor A3, L, L3, info, info1, min_pivot, min_pivot1;
};
CholeskyParts cholesky_factor(const at::Tensor& A);

// S[b, i, i] += 1 / w[b, i] for S (batch, m, m) and w (batch, m).
using AddReciprocalDiagonal = std::function<void(at::Tensor& S, const at::Tensor& w)>;

// (L L^T + U diag(s) U^T)^{-1} B by the Woodbury identity; see ops.cpp.
at::Tensor woodbury_solve_impl(const at::Tensor& L, const at::Tensor& U, const at::Tensor& s,
                               const at::Tensor& B, const AddReciprocalDiagonal& add_diag);

}  // namespace fastedit

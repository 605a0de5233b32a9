// fastedit's compiled ops: CPU kernels and the ATen composition the CUDA registrations share.
// The schemas (namespace fastedit) and fake (meta) implementations live in fastedit/_ext.py,
// beside the Python wrappers; this file registers implementations only.
//
//   cholesky_ex(A) -> (L, info, min_pivot)
//     torch.linalg.cholesky_ex plus what it lacks: the failing pivot value of a failed matrix
//     (and the smallest pivot of a good one), gathered without a host synchronisation.
//   woodbury_solve(L, U, s, B) -> X = (L L^T + U diag(s) U^T)^{-1} B
//     one fused op for a cached Cholesky factor plus a signed low-rank term.
#include "ops.h"

#include <limits>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

namespace fastedit {
namespace {

std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

bool is_supported_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

int64_t batch_count(at::IntArrayRef batch) {
  int64_t count = 1;
  for (int64_t size : batch) count *= size;
  return count;
}

// The CPU twin of the CUDA pivot kernel (csrc/cholesky_pivots.cu), one matrix per task.
template <typename T>
void cholesky_pivots_cpu(const at::Tensor& A3, const at::Tensor& L3, int32_t* info,
                         T* min_pivot) {
  const int64_t batch = A3.size(0), n = A3.size(1);
  const T* A = A3.const_data_ptr<T>();
  const T* L = L3.const_data_ptr<T>();
  const int64_t a_batch = A3.stride(0), a_row = A3.stride(1), a_col = A3.stride(2);
  const int64_t l_batch = L3.stride(0), l_row = L3.stride(1), l_col = L3.stride(2);
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* Ab = A + b * a_batch;
      const T* Lb = L + b * l_batch;
      // LAPACK accepted the columns before its failing one; some LAPACKs let NaN pivots
      // through, so those are still checked for a diagonal that is not > 0.
      const int64_t accepted = info[b] > 0 ? static_cast<int64_t>(info[b]) - 1 : n;
      int64_t f = info[b] > 0 ? accepted : n;
      T smallest = std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < accepted; ++j) {
        const T d = Lb[j * (l_row + l_col)];
        if (!(d > T(0))) {
          f = j;
          break;
        }
        smallest = std::min(smallest, d * d);
      }
      if (f == n) {
        info[b] = 0;
        min_pivot[b] = smallest;
        continue;
      }
      T sum = T(0);
      for (int64_t k = 0; k < f; ++k) {
        const T v = Lb[f * l_row + k * l_col];
        sum += v * v;
      }
      info[b] = static_cast<int32_t>(f + 1);
      min_pivot[b] = Ab[f * (a_row + a_col)] - sum;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_ex_cpu(const at::Tensor& A) {
  CholeskyParts p = cholesky_factor(A);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "fastedit::cholesky_ex", [&] {
    cholesky_pivots_cpu<scalar_t>(p.A3, p.L3, p.info1.data_ptr<int32_t>(),
                                  p.min_pivot1.data_ptr<scalar_t>());
  });
  return {p.L, p.info, p.min_pivot};
}

void add_reciprocal_diagonal_cpu(at::Tensor& S, const at::Tensor& w) {
  S.diagonal(0, -2, -1).add_(w.reciprocal());
}

at::Tensor woodbury_solve_cpu(const at::Tensor& L, const at::Tensor& U, const at::Tensor& s,
                              const at::Tensor& B) {
  return woodbury_solve_impl(L, U, s, B, add_reciprocal_diagonal_cpu);
}

void check_woodbury_inputs(const at::Tensor& L, const at::Tensor& U, const at::Tensor& s,
                           const at::Tensor& B) {
  const char* op = "fastedit::woodbury_solve";
  TORCH_CHECK(L.dim() >= 2 && L.size(-1) == L.size(-2), op,
              ": L must be a (batch of) square lower Cholesky factor(s) (..., n, n); got shape ",
              shape_str(L));
  TORCH_CHECK(is_supported_float(L), op, ": L must be float32 or float64; got ",
              L.scalar_type(), " (convert with .double() or .float())");
  const int64_t n = L.size(-1);
  const auto batch = L.sizes().slice(0, L.dim() - 2);
  const std::vector<std::pair<const char*, const at::Tensor*>> others = {
      {"U", &U}, {"s", &s}, {"B", &B}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->device() == L.device(), op, ": ", name, " is on ", t->device(),
                " but L is on ", L.device(), "; move all inputs to one device");
    TORCH_CHECK(t->scalar_type() == L.scalar_type(), op, ": ", name, " is ",
                t->scalar_type(), " but L is ", L.scalar_type(), "; use one dtype for all inputs");
  }
  TORCH_CHECK(U.dim() == L.dim() && U.size(-2) == n &&
                  U.sizes().slice(0, U.dim() - 2) == batch,
              op, ": U must have shape (..., n, m) with L's batch dims and n = ", n,
              " (L is ", shape_str(L), "); got ", shape_str(U));
  const int64_t m = U.size(-1);
  TORCH_CHECK(s.dim() == L.dim() - 1 && s.size(-1) == m && s.sizes().slice(0, s.dim() - 1) == batch,
              op, ": s must have shape (..., m) with L's batch dims and m = ", m,
              " columns of U (U is ", shape_str(U), "); got ", shape_str(s));
  TORCH_CHECK(B.dim() == L.dim() && B.size(-2) == n &&
                  B.sizes().slice(0, B.dim() - 2) == batch,
              op, ": B must have shape (..., n, k) with L's batch dims and n = ", n,
              " (L is ", shape_str(L), "); got ", shape_str(B));
}

}  // namespace

CholeskyParts cholesky_factor(const at::Tensor& A) {
  const char* op = "fastedit::cholesky_ex";
  TORCH_CHECK(A.dim() >= 2 && A.size(-1) == A.size(-2), op,
              ": A must be a (batch of) square matrix(es) (..., n, n); got shape ", shape_str(A));
  TORCH_CHECK(is_supported_float(A), op, ": A must be float32 or float64; got ",
              A.scalar_type(), " (convert with .double() or .float())");
  const int64_t n = A.size(-1);
  const auto batch = A.sizes().slice(0, A.dim() - 2);
  const int64_t count = batch_count(batch);
  CholeskyParts p;
  at::Tensor lapack_info;
  std::tie(p.L, lapack_info) = at::linalg_cholesky_ex(A, /*upper=*/false, /*check_errors=*/false);
  // A fresh int32 tensor that the pivot pass rewrites in place.
  p.info = lapack_info.contiguous();
  p.min_pivot = at::empty(batch, A.options());
  // reshape: a view when the batch dims allow it, else a copy; both are only read.
  p.A3 = A.reshape({count, n, n});
  p.L3 = p.L.reshape({count, n, n});
  p.info1 = p.info.view({count});
  p.min_pivot1 = p.min_pivot.view({count});
  return p;
}

// X = (L L^T + U diag(s) U^T)^{-1} B with A0 = L L^T, computed as
//   W = L^{-1} [U B]                       (one forward solve on m + k columns)
//   [S0 | T] = W_U^T W,  S = S0 + diag(1/s) (= diag(1/s) + U^T A0^{-1} U, one GEMM)
//   Z = S^{-1} T                           (LU: S is indefinite when the signs are mixed)
//   X = L^{-T} (W_B - W_U Z)               (one backward solve on k columns)
// which is A0^{-1}B - A0^{-1}U S^{-1} U^T A0^{-1}B, the Woodbury identity, with the backward
// solve on the m columns of U never needed: n^2 (m + 2k) solve flops instead of 2 n^2 (m + k).
// X is returned column-major per matrix (like torch.linalg.solve), every element written.
at::Tensor woodbury_solve_impl(const at::Tensor& L, const at::Tensor& U, const at::Tensor& s,
                               const at::Tensor& B, const AddReciprocalDiagonal& add_diag) {
  check_woodbury_inputs(L, U, s, B);
  const int64_t n = L.size(-1), m = U.size(-1), k = B.size(-1);
  const auto batch = L.sizes().slice(0, L.dim() - 2);
  const int64_t count = batch_count(batch);
  const at::Tensor L3 = L.reshape({count, n, n});
  const at::Tensor B3 = B.reshape({count, n, k});

  std::vector<int64_t> x_shape(batch.begin(), batch.end());
  x_shape.push_back(k);
  x_shape.push_back(n);
  at::Tensor X = at::empty(x_shape, B.options()).transpose(-2, -1);
  at::Tensor X3 = X.view({count, n, k});
  if (m == 0) {
    X3.copy_(B3);
    at::linalg_solve_triangular_out(X3, L3, X3, /*upper=*/false);
    at::linalg_solve_triangular_out(X3, L3.transpose(-2, -1), X3, /*upper=*/true);
    return X;
  }
  // Column-major W so that the in-place triangular solve needs no copy.
  at::Tensor W = at::empty({count, m + k, n}, B.options()).transpose(-2, -1);
  at::Tensor W_U = W.narrow(-1, 0, m);
  at::Tensor W_B = W.narrow(-1, m, k);
  W_U.copy_(U.reshape({count, n, m}));
  W_B.copy_(B3);
  at::linalg_solve_triangular_out(W, L3, W, /*upper=*/false);

  at::Tensor G = at::matmul(W_U.transpose(-2, -1), W);  // (count, m, m + k)
  at::Tensor S = G.narrow(-1, 0, m);
  add_diag(S, s.reshape({count, m}));
  at::Tensor Z = std::get<0>(
      at::linalg_solve_ex(S, G.narrow(-1, m, k), /*left=*/true, /*check_errors=*/false));
  at::baddbmm_out(X3, W_B, W_U, Z, /*beta=*/1, /*alpha=*/-1);
  at::linalg_solve_triangular_out(X3, L3.transpose(-2, -1), X3, /*upper=*/true);
  return X;
}

}  // namespace fastedit

TORCH_LIBRARY_IMPL(fastedit, CPU, m) {
  m.impl("cholesky_ex", &fastedit::cholesky_ex_cpu);
  m.impl("woodbury_solve", &fastedit::woodbury_solve_cpu);
}

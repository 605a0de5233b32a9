// CUDA registrations of fastedit's compiled ops: the ATen composition of ops.cpp plus the raw
// kernels of csrc/*.cu, launched on the current stream. Compiled only with a CUDA-enabled torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.h"
#include "ops.h"

namespace fastedit {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_ex_cuda(const at::Tensor& A) {
  const c10::cuda::CUDAGuard guard(A.device());
  CholeskyParts p = cholesky_factor(A);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "fastedit::cholesky_ex", [&] {
    C10_CUDA_CHECK(launch_cholesky_pivots<scalar_t>(
        p.A3.const_data_ptr<scalar_t>(), p.A3.stride(0), p.A3.stride(1), p.A3.stride(2),
        p.L3.const_data_ptr<scalar_t>(), p.L3.stride(0), p.L3.stride(1), p.L3.stride(2),
        p.info1.data_ptr<int32_t>(), p.min_pivot1.data_ptr<scalar_t>(), p.A3.size(0),
        p.A3.size(1), stream));
  });
  return {p.L, p.info, p.min_pivot};
}

void add_reciprocal_diagonal_cuda(at::Tensor& S, const at::Tensor& w) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "fastedit::woodbury_solve", [&] {
    C10_CUDA_CHECK(launch_add_reciprocal_diagonal<scalar_t>(
        S.data_ptr<scalar_t>(), S.stride(0), S.stride(1), S.stride(2),
        w.const_data_ptr<scalar_t>(), w.stride(0), w.stride(1), S.size(0), S.size(1),
        stream));
  });
}

at::Tensor woodbury_solve_cuda(const at::Tensor& L, const at::Tensor& U, const at::Tensor& s,
                               const at::Tensor& B) {
  const c10::cuda::CUDAGuard guard(L.device());
  return woodbury_solve_impl(L, U, s, B, add_reciprocal_diagonal_cuda);
}

}  // namespace
}  // namespace fastedit

TORCH_LIBRARY_IMPL(fastedit, CUDA, m) {
  m.impl("cholesky_ex", &fastedit::cholesky_ex_cuda);
  m.impl("woodbury_solve", &fastedit::woodbury_solve_cuda);
}

// The one elementwise step of the Woodbury solve that ATen would spend two kernels on
// (a reciprocal, then an add into a strided diagonal view): S_ii += 1 / w_i.
#include "kernels.h"

namespace fastedit {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
add_reciprocal_diagonal_kernel(T* __restrict__ S, int64_t s_batch, int64_t s_row, int64_t s_col,
                               const T* __restrict__ w, int64_t w_batch, int64_t w_stride,
                               int64_t batch, int64_t m) {
  const int64_t total = batch * m;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / m;
    const int64_t i = idx - b * m;
    S[b * s_batch + i * (s_row + s_col)] += T(1) / w[b * w_batch + i * w_stride];
  }
}

}  // namespace

template <typename T>
cudaError_t launch_add_reciprocal_diagonal(T* S, int64_t s_batch, int64_t s_row, int64_t s_col,
                                           const T* w, int64_t w_batch, int64_t w_stride,
                                           int64_t batch, int64_t m, cudaStream_t stream) {
  const int64_t total = batch * m;
  if (total == 0) return cudaSuccess;
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 ? wanted : 65535);
  add_reciprocal_diagonal_kernel<T><<<blocks, kThreads, 0, stream>>>(
      S, s_batch, s_row, s_col, w, w_batch, w_stride, batch, m);
  return cudaGetLastError();
}

template cudaError_t launch_add_reciprocal_diagonal<float>(float*, int64_t, int64_t, int64_t,
                                                           const float*, int64_t, int64_t,
                                                           int64_t, int64_t, cudaStream_t);
template cudaError_t launch_add_reciprocal_diagonal<double>(double*, int64_t, int64_t, int64_t,
                                                            const double*, int64_t, int64_t,
                                                            int64_t, int64_t, cudaStream_t);

}  // namespace fastedit

// Pivot diagnostics of a batched Cholesky factorisation, read on the device so that neither
// the failing column nor the failing pivot value needs a host synchronisation.
#include "kernels.h"

namespace fastedit {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T positive_infinity();
template <>
__device__ __forceinline__ float positive_infinity<float>() { return __int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double positive_infinity<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

// One block per matrix: the diagonal scan and the failing row's dot product are block
// reductions, so a single n = 14336 matrix costs a few microseconds, not a serial scan.
template <typename T>
__global__ void __launch_bounds__(kThreads)
cholesky_pivots_kernel(const T* __restrict__ A, int64_t a_batch, int64_t a_row, int64_t a_col,
                       const T* __restrict__ L, int64_t l_batch, int64_t l_row, int64_t l_col,
                       int32_t* __restrict__ info, T* __restrict__ min_pivot, int64_t n) {
  __shared__ int64_t first_bad[kThreads];
  __shared__ T reduced[kThreads];
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const T* Ab = A + b * a_batch;
  const T* Lb = L + b * l_batch;
  const int32_t lapack_info = info[b];
  // LAPACK accepted the columns before its failing one; some LAPACKs let NaN pivots through,
  // so those columns are still checked for a diagonal that is not > 0.
  const int64_t accepted = lapack_info > 0 ? static_cast<int64_t>(lapack_info) - 1 : n;

  int64_t bad = n;
  T smallest = positive_infinity<T>();
  for (int64_t j = tid; j < accepted; j += kThreads) {
    const T d = Lb[j * (l_row + l_col)];
    if (!(d > T(0))) {
      bad = j < bad ? j : bad;
    } else {
      const T p = d * d;
      smallest = p < smallest ? p : smallest;
    }
  }
  first_bad[tid] = bad;
  reduced[tid] = smallest;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (tid < half) {
      if (first_bad[tid + half] < first_bad[tid]) first_bad[tid] = first_bad[tid + half];
      if (reduced[tid + half] < reduced[tid]) reduced[tid] = reduced[tid + half];
    }
    __syncthreads();
  }
  const int64_t f = first_bad[0] < n ? first_bad[0] : (lapack_info > 0 ? accepted : n);
  if (f == n) {
    if (tid == 0) {
      info[b] = 0;
      min_pivot[b] = reduced[0];
    }
    return;
  }
  __syncthreads();  // every thread has read reduced[0] before it is reused below

  T partial = T(0);
  for (int64_t k = tid; k < f; k += kThreads) {
    const T v = Lb[f * l_row + k * l_col];
    partial += v * v;
  }
  reduced[tid] = partial;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (tid < half) reduced[tid] += reduced[tid + half];
    __syncthreads();
  }
  if (tid == 0) {
    info[b] = static_cast<int32_t>(f + 1);
    min_pivot[b] = Ab[f * (a_row + a_col)] - reduced[0];
  }
}

}  // namespace

template <typename T>
cudaError_t launch_cholesky_pivots(const T* A, int64_t a_batch, int64_t a_row, int64_t a_col,
                                   const T* L, int64_t l_batch, int64_t l_row, int64_t l_col,
                                   int32_t* info, T* min_pivot, int64_t batch, int64_t n,
                                   cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch > 0x7fffffff) return cudaErrorInvalidConfiguration;
  cholesky_pivots_kernel<T><<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      A, a_batch, a_row, a_col, L, l_batch, l_row, l_col, info, min_pivot, n);
  return cudaGetLastError();
}

template cudaError_t launch_cholesky_pivots<float>(const float*, int64_t, int64_t, int64_t,
                                                   const float*, int64_t, int64_t, int64_t,
                                                   int32_t*, float*, int64_t, int64_t,
                                                   cudaStream_t);
template cudaError_t launch_cholesky_pivots<double>(const double*, int64_t, int64_t, int64_t,
                                                    const double*, int64_t, int64_t, int64_t,
                                                    int32_t*, double*, int64_t, int64_t,
                                                    cudaStream_t);

}  // namespace fastedit

// Launchers of fastedit's raw CUDA kernels.
//
// Plain pointers, strides in elements and a cudaStream_t: no torch headers here or in the .cu
// files, so CI compiles csrc/*.cu with bare nvcc on machines without a CUDA-enabled torch.
// The torch-facing glue (cuda_ops.cpp) calls these and checks the returned cudaError_t.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastedit {

// Per matrix b of a batch of n x n matrices, given torch's Cholesky factor L and its LAPACK
// info (read from info[b]), rewrites info[b] and writes min_pivot[b]:
//   info[b]      = 1-based column of the first non-positive or NaN pivot, 0 if none;
//   min_pivot[b] = min_j L_jj^2 for a good matrix, else the failing pivot
//                  A_ff - sum_{k<f} L_fk^2 recomputed from A and the row of L before it.
// Element (b, i, j) of A sits at A[b * a_batch + i * a_row + j * a_col]; likewise for L.
template <typename T>
cudaError_t launch_cholesky_pivots(const T* A, int64_t a_batch, int64_t a_row, int64_t a_col,
                                   const T* L, int64_t l_batch, int64_t l_row, int64_t l_col,
                                   int32_t* info, T* min_pivot, int64_t batch, int64_t n,
                                   cudaStream_t stream);

// S[b, i, i] += 1 / w[b, i] for a batch of m x m matrices S and weights w (b < batch, i < m).
template <typename T>
cudaError_t launch_add_reciprocal_diagonal(T* S, int64_t s_batch, int64_t s_row, int64_t s_col,
                                           const T* w, int64_t w_batch, int64_t w_stride,
                                           int64_t batch, int64_t m, cudaStream_t stream);

}  // namespace fastedit

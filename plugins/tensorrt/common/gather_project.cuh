// The output projection both ops end with, on the GPU: only the kept rows of a row-major [N, D]
// weight are read (a neuron owns one row of w_out_t, a head E rows of w_o_t).
#pragma once

#include "cuda_common.cuh"

namespace shadowllm {
namespace cuda {

// y[b, s, :] = bias + sum_{r < counts[b]} coeff[(b*R + r)*S + s] * w_t[rows[b*R + r], :]
// Grid (ceil(D/256), B*S), 256 threads: thread d walks the kept rows, reads coalesced across d.
template <typename T>
__global__ void GatherProjectKernel(const int32_t* rows, const int32_t* counts, int64_t R, const float* coeff,
                                    const T* w_t, const T* bias, T* y, int64_t S, int64_t D) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t bs = blockIdx.y, b = bs / S, s = bs % S;
  if (d >= D) return;
  float acc = bias ? ToFloat(bias[d]) : 0.f;
  const int32_t* r_b = rows + b * R;
  const float* c_b = coeff + b * R * S + s;
  for (int32_t r = 0; r < counts[b]; ++r) acc += c_b[static_cast<int64_t>(r) * S] * ToFloat(w_t[r_b[r] * D + d]);
  y[bs * D + d] = FromFloat<T>(acc);
}

}  // namespace cuda
}  // namespace shadowllm

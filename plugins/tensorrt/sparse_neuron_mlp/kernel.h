// SparseNeuronMLP on the GPU (DESIGN §3): y = sum over kept n of h_n(x) * w_out_t[n] + b_out.
#pragma once

#include "../../common/activation.h"
#include "../common/launch_types.h"

namespace shadowllm {
namespace cuda {

struct MLPLaunch {
  const void* x;        // [B, S, D] dtype
  const void* w_in;     // [F, D]
  const void* b_in;     // [F] or null
  const void* w_gate;   // [F, D] or null (ungated, OPT)
  const void* w_out_t;  // [F, D]
  const void* b_out;    // [D] or null
  const bool* mask;     // [B, F]
  void* y;              // [B, S, D]
  int64_t B, S, D, F;
  Activation activation;
  DType dtype;
};

// Bytes of scratch the launch needs (kept-row lists and the kept activations, fp32).
size_t MLPWorkspaceBytes(int64_t B, int64_t S, int64_t F);

// Three kernels on `stream`: compact the mask per batch row; one warp per (kept neuron, token)
// reads its w_in (and w_gate) row; the output projection reads the kept w_out_t rows.
cudaError_t LaunchSparseNeuronMLP(const MLPLaunch& a, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace shadowllm

// SparseNeuronMLP on the GPU (docs/export-format.md): y = sum over kept n of h_n(x) * w_out_t[n] + b_out, with
// the optional activation thresholds of the op contract (docs/export-format.md).
#pragma once

#include "../../common/activation.h"
#include "../common/launch_types.h"

namespace shadowllm {
namespace cuda {

struct MLPLaunch {
  const void* x;        // [B, S, D] dtype
  const void* w_in;     // [F, D] (row_major) or [D, F] (channel_major)
  const void* b_in;     // [F] or null
  const void* w_gate;   // like w_in, or null (ungated, OPT)
  const void* w_out_t;  // [F, D]
  const void* b_out;    // [D] or null
  const void* mask;     // [B, F]: row b's kept neurons, bool (or int32: mask_int32)
  const float* t_x;     // device fp32 scalar or null: x entries with |x| < t_x count as zero
  const float* t_h;     // device fp32 scalar or null: likewise for the hidden h
  void* y;              // [B, S, D]
  int64_t B, S, D, F;
  Activation activation;
  DType dtype;
  bool channel_major;    // weight_layout=channel_major: w_in / w_gate stored [D, F]
  bool workspace_clean;  // the workspace is left as the previous launch of this op left it (or zeroed)
  bool mask_int32;       // the mask holds int32 (TensorRT plugins), not bool
};

// Bytes of scratch one launch of up to B*S tokens needs.
size_t MLPWorkspaceBytes(int64_t B, int64_t S, int64_t D, int64_t F, bool channel_major);

// On `stream`, no host synchronisation. Row-major: one row-dot kernel computes h of the neurons
// some token keeps (gate and up rows read together), one split-K gather kernel reads the w_out_t
// rows of the neurons whose h is nonzero. Channel-major: a gather kernel over the x channels above
// t_x for gate and up (its last CTAs apply the activation, mask and t_h), then the same output
// gather. The workspace's accumulators are zeroed first unless workspace_clean.
cudaError_t LaunchSparseNeuronMLP(const MLPLaunch& a, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace shadowllm

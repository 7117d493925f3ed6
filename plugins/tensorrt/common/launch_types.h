// Host-side types shared by the CUDA launchers, the plugins and the C ABI (no CUDA device code here).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace shadowllm {
namespace cuda {

// Storage type of every float tensor of one launch; kernels accumulate in fp32 whatever it is.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline size_t DTypeBytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Launch shape knobs the GPU benchmark sweeps (scripts/gpu_bench.py through the C ABI). Defaults
// are the values that benchmark picked on an H200; any positive value is correct.
struct Tuning {
  int gather_ctas_per_sm = 4;   // split-K CTAs of the kept-row projections, per multiprocessor (at most what fits)
  int rowdot_warps_per_sm = 64; // warps of the row-dot projections, per multiprocessor
  int attend_ctas_per_sm = 4;   // flash-decoding CTAs per multiprocessor
  int attend_min_keys = 128;    // keys per flash-decoding split at least (fewer splits to merge)
};
Tuning& GlobalTuning();

}  // namespace cuda
}  // namespace shadowllm

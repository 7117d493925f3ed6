// Host-side types shared by the CUDA launchers, the plugins and the C ABI (no CUDA device code here).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace shadowllm {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1 };

inline size_t DTypeBytes(DType t) { return t == DType::kFloat16 ? 2 : 4; }

}  // namespace cuda
}  // namespace shadowllm

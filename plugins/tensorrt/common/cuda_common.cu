#include "cuda_common.cuh"

namespace shadowllm {
namespace cuda {

Tuning& GlobalTuning() {
  static Tuning tuning;
  return tuning;
}

int Multiprocessors() {
  constexpr int kDevices = 64;
  static int counts[kDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) return 132;
  if (counts[device] == 0) {
    int n = 0;
    counts[device] = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && n > 0 ? n : 132;
  }
  return counts[device];
}

}  // namespace cuda
}  // namespace shadowllm

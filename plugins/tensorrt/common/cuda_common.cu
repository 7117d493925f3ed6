#include "cuda_common.cuh"

#include <mutex>
#include <unordered_map>

#include "sparse_projections.cuh"

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

int ResidentBlocks(const void* kernel, int threads) {
  static std::mutex lock;
  static std::unordered_map<const void*, int> cache;
  std::lock_guard<std::mutex> hold(lock);
  auto found = cache.find(kernel);
  if (found != cache.end()) return found->second;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess || n < 1) n = 1;
  cache.emplace(kernel, n);
  return n;
}

}  // namespace cuda
}  // namespace shadowllm

// Device helpers shared by the CUDA kernels: fp32 / fp16 / bf16 conversion, 16-byte vector loads,
// vector atomics, warp reductions, workspace carving. Every kernel accumulates in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "launch_types.h"

namespace shadowllm {
namespace cuda {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The widest vector (elements of T) one 16-byte load moves.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ void Unpack(uint4 raw, const float*, float (&out)[4]) {
  out[0] = __uint_as_float(raw.x), out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z), out[3] = __uint_as_float(raw.w);
}
__device__ __forceinline__ void Unpack(uint4 raw, const __half*, float (&out)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void Unpack(uint4 raw, const __nv_bfloat16*, float (&out)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}

// N consecutive elements at p as floats. N is 1 (any address) or kVec16<T> (p 16-byte aligned).
// Streamed: weights, read once per call (evict-first, so they do not push x or the KV out of L2).
template <int N, typename T>
__device__ __forceinline__ void LoadStream(const T* p, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = ToFloat(p[0]);
  } else {
    static_assert(N == kVec16<T>, "vector loads move 16 bytes");
    Unpack(__ldcs(reinterpret_cast<const uint4*>(p)), p, out);
  }
}
// Reused: activations, read by many warps (kept in L1 / L2).
template <int N, typename T>
__device__ __forceinline__ void LoadReused(const T* p, float (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = ToFloat(__ldg(p));
  } else {
    static_assert(N == kVec16<T>, "vector loads move 16 bytes");
    Unpack(__ldg(reinterpret_cast<const uint4*>(p)), p, out);
  }
}

// p[i] += v[i] for i < N in fp32 global memory; one vector atomic per 4 floats where the chip has
// them (sm_90), p 16-byte aligned when N is a multiple of 4.
template <int N>
__device__ __forceinline__ void AtomicAddVec(float* p, const float (&v)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) atomicAdd(p + i, v[i]);
  }
#else
#pragma unroll
  for (int i = 0; i < N; ++i) atomicAdd(p + i, v[i]);
#endif
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over groups of `width` consecutive lanes (a power of two); every lane of a group gets it.
__device__ __forceinline__ float GroupSum(float v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// A keep mask as the caller stores it: bool (the ONNX contract, the C ABI, torch) or int32 (the
// TensorRT plugins: TensorRT does not hand plugins bool tensors, so the prepared graph casts them).
struct MaskView {
  const void* data;
  bool int32;
  __device__ __forceinline__ bool operator[](int64_t i) const {
    return int32 ? static_cast<const int32_t*>(data)[i] != 0 : static_cast<const bool*>(data)[i];
  }
};

__device__ __forceinline__ bool KeepLarge(float v, const float* threshold) {
  return threshold == nullptr || fabsf(v) >= *threshold;
}

// Split-K "last CTA finishes" handshake: every CTA of one output tile calls this after its atomics;
// exactly one (the last to arrive) gets true, sees every other CTA's atomics, and resets the counter
// so that the workspace needs no clearing before the next call.
__device__ __forceinline__ bool LastToArrive(unsigned* counter, unsigned expected) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1u) == expected - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// Workspace carving: the same sequence of Take calls on a null base gives the size to request.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename U>
  U* Take(size_t count) {
    offset_ = (offset_ + 255) & ~static_cast<size_t>(255);
    U* p = base_ ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(U);
    return p;
  }
  size_t Bytes() const { return offset_ + 255; }

 private:
  char* base_;
  size_t offset_ = 0;
};

inline unsigned Blocks(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

// Multiprocessors of the current device (grids are sized from it).
int Multiprocessors();

// Token groups: the row-dot and gather kernels compute up to 8 tokens from one read of a weight
// row; a group's size is a compile-time constant (1, 2, 4 or 8).
inline int TokenGroup(int64_t tokens) { return tokens > 4 ? 8 : tokens > 2 ? 4 : tokens > 1 ? 2 : 1; }

// Host dispatch of a run-time choice to a compile-time constant: f(std::integral_constant<...>).
template <class F>
void WithTokenGroup(int mt, F&& f) {
  switch (mt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}
template <typename T, class F>
void WithVector(bool vector, F&& f) {
  if (vector)
    f(std::integral_constant<int, kVec16<T>>{});
  else
    f(std::integral_constant<int, 1>{});
}
template <class F>
void WithFlag(bool flag, F&& f) {
  if (flag)
    f(std::true_type{});
  else
    f(std::false_type{});
}

}  // namespace cuda
}  // namespace shadowllm

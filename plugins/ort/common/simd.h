// The vector vocabulary of the CPU kernels: 16 floats as one value (one AVX-512 register, two AVX2
// registers, four SSE registers; GCC lowers it per clone), and the clone list the hot loops are
// compiled for (AVX-512, AVX2+FMA+F16C, baseline x86-64), picked at load time (GCC target_clones).
#pragma once

#include <cstdint>
#include <cstring>

namespace shadowllm {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SHADOWLLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SHADOWLLM_CLONES
#endif
#define SHADOWLLM_INLINE inline __attribute__((always_inline))

typedef float V16 __attribute__((vector_size(64)));

#if defined(__x86_64__) && defined(__GNUC__)
#define SHADOWLLM_X86 1
#define SHADOWLLM_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
// Whether this CPU runs the hand-written AVX2 + FMA + F16C kernels (checked once).
inline bool CpuHasAvx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
}
#else
inline bool CpuHasAvx2() { return false; }
#endif

SHADOWLLM_INLINE V16 Load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
SHADOWLLM_INLINE void Store(float* p, V16 v) { std::memcpy(p, &v, sizeof v); }
SHADOWLLM_INLINE V16 Splat(float f) { return V16{} + f; }
SHADOWLLM_INLINE float Sum(V16 v) {
  float s[16];
  std::memcpy(s, &v, sizeof v);
  float a = 0.f;
  for (int i = 0; i < 8; ++i) a += s[i] + s[i + 8];
  return a;
}

}  // namespace shadowllm

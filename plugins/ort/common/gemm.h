// A blocked fp32 matrix product for prompts (S >= 4 tokens), where the decode loops' one pass over
// the weights per token would leave the machine compute-starved: C[M, N] += A[M, K] * B[K, N], with
// packed panels and a 6x16 register tile (AVX2 + FMA). The operands are read through row pointers
// while packing, so gathered rows (the kept heads and neurons) and transposed views cost nothing extra.
#pragma once

#include <cstdint>

#include "parallel.h"

namespace shadowllm {

// A [rows x cols] view through pointers: element (i, j) is ptr[i][j], or ptr[j][i] when by_column.
struct Operand {
  const float* const* ptr;
  bool by_column;
};

// Whether this machine runs the packed product (AVX2 + FMA); callers keep their own loops otherwise.
bool GemmAvailable();

// C[i * ldc + j] += sum_k A(i, k) * B(k, j) for i < M, j < N.
void Gemm(int64_t M, int64_t N, int64_t K, const Operand& A, const Operand& B, float* C, int64_t ldc,
          const Parallel& parallel);

}  // namespace shadowllm
